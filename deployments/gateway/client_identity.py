"""Who the client is: the direct peer, or what a trusted proxy says it forwarded for.

Rate limits, budgets and audit lines are keyed by this address. `X-Forwarded-For` and RFC 7239
`Forwarded` are client-writable, so they are read only when the direct peer is a configured
trusted proxy, and then from the right: each trusted proxy appends the address it received the
request from, so the right-most address that is not itself a trusted proxy is the first one no
trusted party vouches for beyond, i.e. the client. Anything to its left was written by the
client and is ignored. Default: trust nobody, the peer is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]


class ClientIdentityConfig(BaseModel):
    """Which proxies may name the client, and in which header."""

    model_config = ConfigDict(extra="forbid")

    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="CIDRs (or single addresses) of proxies whose forwarding header is "
        "believed, e.g. ['10.0.0.0/8'] behind RunPod's HTTP proxy. Empty: trust nobody, the "
        "TCP peer is the client.",
    )
    forwarded_header: ForwardedHeader = Field(
        default="x-forwarded-for",
        description="The header the trusted proxies maintain. Only that one is read: a proxy "
        "that appends to X-Forwarded-For passes a client's forged Forwarded header through "
        "untouched, so reading both would let the client choose its identity.",
    )

    def client_ip(self, peer: str | None, headers: Mapping[str, str]) -> str:
        """`client_ip` with this config's proxies and header."""
        return client_ip(peer, headers, self.trusted_proxies, self.forwarded_header)


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it, or None if it is none (`unknown`, `_hidden`, garbage).

    Accepts `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` and `[2001:db8::1]:4711`,
    optionally double-quoted (RFC 7239 quotes IPv6 and ports). IPv4-mapped IPv6 is folded to
    IPv4 so one client has one bucket however its address is spelled.
    """
    node = text.strip()
    if len(node) >= 2 and node[0] == node[-1] == '"':
        node = node[1:-1].strip()
    if node.startswith("["):
        end = node.find("]")
        if end < 0 or not _is_port_suffix(node[end + 1 :]):
            return None
        node = node[1:end]
    elif node.count(":") == 1:  # IPv4 with a port; bare IPv6 has two colons or more
        node, port = node.split(":")
        if not _is_port_suffix(":" + port):
            return None
    try:
        address = ipaddress.ip_address(node)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port_suffix(rest: str) -> bool:
    return rest == "" or (rest[0] == ":" and rest[1:].isdigit() and len(rest) <= 6)


def forwarded_for_chain(value: str, header: ForwardedHeader) -> list[str]:
    """The hop entries of one header value, left (farthest) to right (nearest), unparsed.

    `X-Forwarded-For: a, b` gives [a, b]. `Forwarded: for=a;proto=https, for=b` gives [a, b];
    an element without `for=` gives "" (a hop that named no client). Splitting on every comma
    and semicolon is safe: no valid node contains either, so an element a client mangled with
    quotes only spoils itself, never the hops a trusted proxy appended to its right.
    """
    elements = value.split(",")
    if header == "x-forwarded-for":
        return [e.strip() for e in elements]
    chain = []
    for element in elements:
        node = ""
        for pair in element.split(";"):
            name, sep, val = pair.partition("=")
            if sep and name.strip().lower() == "for":
                node = val.strip()
        chain.append(node)
    return chain


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    # Starlette's Headers.items() keeps repeated lines in order; a proxy may add its own line
    # rather than append to the client's, and the lines read as one comma-joined list.
    return [v for k, v in headers.items() if k.lower() == name]


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def client_ip(
    peer: str | None,
    headers: Mapping[str, str],
    trusted: Sequence[IPNetwork],
    header: ForwardedHeader = "x-forwarded-for",
) -> str:
    """The client's address (normalised text) for limits and audit.

    `peer` is the TCP peer (`request.client.host`); `headers` the request headers (Starlette
    `Headers` or a plain dict). The header is read only when the peer is in `trusted`. Walking
    right to left, trusted proxies are skipped and the first other address is the client; when
    every hop is trusted the left-most is. A hop that is not an address (malformed, `unknown`,
    an obfuscated `_id`) stops the walk and the peer is used: nobody trusted vouches past it.
    An unparseable peer (a Unix socket, "-") is returned as given, with no header read.
    """
    peer_text = peer or "-"
    peer_address = parse_address(peer_text)
    if peer_address is None:
        return peer_text
    if not trusted or not _trusted(peer_address, trusted):
        return str(peer_address)
    chain: list[str] = []
    for value in _header_values(headers, header):
        chain.extend(forwarded_for_chain(value, header))
    client = peer_address
    for entry in reversed(chain):
        hop = parse_address(entry)
        if hop is None:
            return str(peer_address)
        client = hop
        if not _trusted(hop, trusted):
            break
    return str(client)
