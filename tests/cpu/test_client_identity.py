"""Client identity: forwarding headers count only when a trusted proxy sent them."""

import ipaddress

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers

from deployments.gateway.client_identity import ClientIdentityConfig, client_ip, parse_address

PROXY = "10.0.0.5"  # a trusted proxy (inside 10.0.0.0/8)
INNER_PROXY = "10.1.2.3"  # another trusted hop
TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
XFF = "x-forwarded-for"
FWD = "forwarded"


@pytest.mark.parametrize(
    ("peer", "headers", "header", "expected"),
    [
        # Untrusted peers: the header is the client's own claim and never read.
        ("203.0.113.9", {"X-Forwarded-For": "1.1.1.1"}, XFF, "203.0.113.9"),
        ("203.0.113.9", {"Forwarded": "for=1.1.1.1"}, FWD, "203.0.113.9"),
        ("127.0.0.1", {"X-Forwarded-For": "1.1.1.1"}, XFF, "127.0.0.1"),
        # A trusted proxy's hop is believed.
        (PROXY, {"X-Forwarded-For": "198.51.100.7"}, XFF, "198.51.100.7"),
        (PROXY, {"Forwarded": "for=198.51.100.7;proto=https"}, FWD, "198.51.100.7"),
        # A spoofed prefix: the proxy appended the real peer, the right-most untrusted wins.
        (PROXY, {"X-Forwarded-For": "1.1.1.1, 198.51.100.7"}, XFF, "198.51.100.7"),
        # A chain of trusted proxies is skipped from the right.
        (PROXY, {"X-Forwarded-For": f"1.1.1.1, 198.51.100.7, {INNER_PROXY}"}, XFF, "198.51.100.7"),
        # Every hop trusted: the client is inside the trusted network, the left-most is it.
        (PROXY, {"X-Forwarded-For": f"10.9.9.9, {INNER_PROXY}"}, XFF, "10.9.9.9"),
        # No header from a trusted peer: the peer is the client.
        (PROXY, {}, XFF, PROXY),
        # IPv6 peers and hops, in both headers' spellings, normalised.
        ("fd00::1", {"X-Forwarded-For": "2001:DB8::1"}, XFF, "2001:db8::1"),
        ("fd00::1", {"X-Forwarded-For": "[2001:db8::1]:4711"}, XFF, "2001:db8::1"),
        (PROXY, {"Forwarded": 'for="[2001:db8::1]:4711"'}, FWD, "2001:db8::1"),
        (PROXY, {"Forwarded": 'For="[2001:db8::cafe]"'}, FWD, "2001:db8::cafe"),
        (PROXY, {"Forwarded": "for=192.0.2.60;proto=http;by=203.0.113.43"}, FWD, "192.0.2.60"),
        (PROXY, {"Forwarded": 'for="192.0.2.60:8080"'}, FWD, "192.0.2.60"),
        (PROXY, {"X-Forwarded-For": "192.0.2.60:8080"}, XFF, "192.0.2.60"),
        # IPv4-mapped IPv6 is the same client as its IPv4 address.
        ("::ffff:10.0.0.5", {"X-Forwarded-For": "::ffff:198.51.100.7"}, XFF, "198.51.100.7"),
        # Forwarded lists, spoofed element on the left.
        (PROXY, {"Forwarded": "for=1.1.1.1, for=198.51.100.7"}, FWD, "198.51.100.7"),
        # Only the configured header counts: a forged other header passes the proxy untouched.
        (PROXY, {"Forwarded": "for=1.1.1.1", "X-Forwarded-For": "198.51.100.7"}, XFF,
         "198.51.100.7"),
        (PROXY, {"Forwarded": "for=198.51.100.7", "X-Forwarded-For": "1.1.1.1"}, FWD,
         "198.51.100.7"),
    ],
)  # fmt: skip
def test_client_address_table(peer, headers, header, expected) -> None:
    assert client_ip(peer, headers, TRUSTED, header) == expected


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored() -> None:
    headers = {"X-Forwarded-For": "10.0.0.1", "Forwarded": "for=10.0.0.1"}
    assert client_ip("198.51.100.7", headers, TRUSTED) == "198.51.100.7"
    assert client_ip("198.51.100.7", headers, TRUSTED, FWD) == "198.51.100.7"


def test_default_trusts_nobody_even_loopback() -> None:
    config = ClientIdentityConfig()
    assert config.trusted_proxies == []
    assert config.client_ip("127.0.0.1", {"X-Forwarded-For": "1.1.1.1"}) == "127.0.0.1"


@pytest.mark.parametrize(
    ("value", "header"),
    [
        ("not-an-ip", XFF),
        ("", XFF),
        ("1.2.3.4.5", XFF),
        ("1.2.3.4:99999999", XFF),
        ("[2001:db8::1", XFF),
        ("for=unknown", FWD),  # RFC 7239: the proxy does not know
        ("for=_hidden", FWD),  # RFC 7239 obfuscated identifier
        ('for="_gazonk"', FWD),
        ("proto=https", FWD),  # an element naming no client
        ('for="[2001:db8::1]:port"', FWD),
        ("for=", FWD),
    ],
)
def test_a_hop_that_is_no_address_falls_back_to_the_peer(value, header) -> None:
    name = "Forwarded" if header == FWD else "X-Forwarded-For"
    assert client_ip(PROXY, {name: value}, TRUSTED, header) == PROXY


def test_client_garbage_left_of_the_proxys_hop_does_not_move_it_to_the_shared_bucket() -> None:
    # Falling back to the peer here would put this client in the proxy's bucket, which every
    # client behind the proxy shares: junk on the left must not buy that.
    xff = {"X-Forwarded-For": "}{garbage, 198.51.100.7"}
    assert client_ip(PROXY, xff, TRUSTED) == "198.51.100.7"
    fwd = {"Forwarded": 'for="unterminated, for=198.51.100.7'}
    assert client_ip(PROXY, fwd, TRUSTED, FWD) == "198.51.100.7"


def test_repeated_header_lines_read_as_one_list_in_order() -> None:
    headers = Headers(raw=[(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"198.51.100.7")])
    assert client_ip(PROXY, headers, TRUSTED) == "198.51.100.7"


def test_header_names_are_case_insensitive_in_a_plain_dict() -> None:
    assert client_ip(PROXY, {"x-FORWARDED-for": "198.51.100.7"}, TRUSTED) == "198.51.100.7"


@pytest.mark.parametrize("peer", [None, "-", "unix:/tmp/sock", ""])
def test_peer_that_is_no_address_is_returned_as_is_without_reading_headers(peer) -> None:
    assert client_ip(peer, {"X-Forwarded-For": "1.1.1.1"}, TRUSTED) == (peer or "-")


def test_peer_address_is_normalised() -> None:
    assert client_ip("2001:DB8:0::1", {}, []) == "2001:db8::1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ('"1.2.3.4"', "1.2.3.4"),
        ("[::1]", "::1"),
        ("[::1]:80", "::1"),
        ("::1", "::1"),
        ("unknown", None),
        ("_x", None),
        ("[::1]x", None),
        ("1.2.3.4:", None),
    ],
)
def test_parse_address(text, expected) -> None:
    address = parse_address(text)
    assert (None if address is None else str(address)) == expected


def test_config_accepts_cidrs_and_single_addresses() -> None:
    config = ClientIdentityConfig(trusted_proxies=["10.0.0.0/8", "::1", "fd00::/8"])
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "::1/128", "fd00::/8"]
    again = ClientIdentityConfig.model_validate(config.model_dump(mode="json"))
    assert again == config  # survives build_app's JSON round trip to the router


@pytest.mark.parametrize(
    "bad",
    [
        {"trusted_proxies": ["10.0.0.1/8"]},  # host bits set: likely meant one host
        {"trusted_proxies": ["everyone"]},
        {"trusted_proxies": ["10.0.0.0/33"]},
        {"forwarded_header": "x-real-ip"},
        {"trusted": ["10.0.0.0/8"]},
    ],
)
def test_config_rejects_bad_settings(bad) -> None:
    with pytest.raises(ValidationError):
        ClientIdentityConfig(**bad)
