"""The gateway end to end over HTTPS: one app (two models, a canary alias, API keys, limits).

Deployed from a config like `serve run serve_config.yaml`, so `awq-serve rollout` / `rollback`
can change its split live. Test order matters only for the last test, which moves the split.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from awq_serve_cli import main as cli
from deployments.app import deployment_name
from deployments.gateway.admission import estimate_prompt_tokens
from deployments.gateway.auth import create_key
from deployments.gateway.router import VARIANT_HEADER
from deployments.gateway.traffic import TrafficSplit, choose_variant
from tests.serving import APP, CHAT, REPO, audit_records, health_detail, serve_app

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

AWQ, FP16, ALIAS = "smollm2-awq", "smollm2-fp16", "chat"
SPLIT = TrafficSplit(variants={AWQ: 90, FP16: 10})
ENV_VAR = "AWQ_SERVE_GATEWAY_TEST_KEYS"
ENV_SECRET = "sk-env-gateway-test-secret-0123456789"
TOKENS_PER_MINUTE = 300
SECRET_PROMPT = "zebra-quartz-7731 what is the capital of France?"


@dataclass(frozen=True)
class Gateway:
    url: str
    cert: Path
    tls: ssl.SSLContext  # trusts only the test's self-signed certificate
    audit: Path
    keys: dict[str, str]  # key id -> secret
    ray_address: str

    def auth(self, key: str | None = "full") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"} if key else {}

    def post(self, path: str, body: dict, key: str | None = "full", **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.auth(key), verify=self.tls,
                          timeout=120, **kw)  # fmt: skip

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.auth(key), verify=self.tls, timeout=60)

    def openai(self, api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             http_client=httpx.Client(verify=self.tls, timeout=120))  # fmt: skip


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "awq-serve test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def gw(registry_root: Path, tmp_path_factory: pytest.TempPathFactory):
    import ray

    folder = tmp_path_factory.mktemp("gateway")
    cert, key = self_signed_cert(folder)
    keys_file = folder / "keys.json"
    keys = {
        "full": create_key(keys_file, "full"),
        "awq-only": create_key(keys_file, "awq-only", allowed_models=[AWQ]),
        "rpm": create_key(keys_file, "rpm", rpm=2),
        "tpm": create_key(keys_file, "tpm", tpm=TOKENS_PER_MINUTE),
        "env-1": ENV_SECRET,
    }
    model = {"registry": str(registry_root), "num_cpus": 1, "max_model_len": 512}
    audit = folder / "audit.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, ENV_SECRET)  # before Ray starts: its workers inherit the environment
        with serve_app(
            registry_root,
            audit,
            http_options={"ssl_certfile": str(cert), "ssl_keyfile": str(key)},
            from_config=True,
            models=[{**model, "name": AWQ, "source": CHAT},
                    {**model, "name": FP16, "source": CHAT + "-fp16"}],
            aliases=[{"name": ALIAS, "split": SPLIT.model_dump()}],
            auth={"enabled": True, "keys_file": str(keys_file), "env_var": ENV_VAR},
            rate_limit={"requests_per_minute_per_ip": 100_000,
                        "requests_per_minute_per_key": 100_000},
            max_body_bytes=4096,
        ) as url:  # fmt: skip
            tls = ssl.create_default_context(cafile=str(cert))
            yield Gateway(url, cert, tls, audit, keys, ray.get_runtime_context().gcs_address)


def completion(model: str, user: str | None = None, **fields) -> dict:
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "ignore_eos": True, **fields}
    return body | ({"user": user} if user else {})


def ask_alias(gw: Gateway, users: list[str]) -> list[httpx.Response]:
    """One request to the alias per user, 16 at a time."""

    async def run() -> list[httpx.Response]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=gw.url, verify=gw.tls, timeout=120,
                                     headers=gw.auth()) as client:  # fmt: skip

            async def one(user: str) -> httpx.Response:
                async with limit:
                    return await client.post("/v1/completions", json=completion(ALIAS, user))

            return await asyncio.gather(*(one(u) for u in users))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(users), responses[0].text
    return responses


def variants_of(gw: Gateway, users: list[str]) -> list[str]:
    return [r.headers[VARIANT_HEADER] for r in ask_alias(gw, users)]


# ---- TLS and auth ----------------------------------------------------------------------------
def test_https_serves_with_the_configured_certificate_and_nothing_in_plaintext(gw) -> None:
    assert gw.url.startswith("https://")
    assert gw.get("/health").status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(gw.url + "/health", timeout=30)  # the public CA bundle does not trust it
    with pytest.raises(httpx.HTTPError):
        httpx.get(gw.url.replace("https://", "http://") + "/health", timeout=30)


def test_openai_client_with_a_key_from_the_file_or_the_env_var_works(gw) -> None:
    for secret in (gw.keys["full"], ENV_SECRET):
        chat = gw.openai(secret).chat.completions.create(
            model=AWQ, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)  # fmt: skip
        assert "Paris" in chat.choices[0].message.content


def test_openai_client_with_a_wrong_key_gets_authentication_error(gw) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        gw.openai("sk-not-a-key").completions.create(model=AWQ, prompt="Hi", max_tokens=1)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"


def test_request_without_a_key_gets_401_in_openai_shape(gw) -> None:
    r = gw.post("/v1/completions", completion(AWQ), key=None)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert gw.get("/v1/models").status_code == 401


def test_key_restricted_to_one_model_gets_403_on_another(gw) -> None:
    client = gw.openai(gw.keys["awq-only"])
    assert client.completions.create(model=AWQ, prompt="Hi", max_tokens=1).choices
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.completions.create(model=FP16, prompt="Hi", max_tokens=1)
    assert e.value.status_code == 403
    assert FP16 in e.value.body["message"]


def test_health_and_metrics_stay_public_and_the_health_detail_needs_a_key(gw) -> None:
    health = gw.get("/health")
    assert health.status_code == 200
    assert health.json()["models"] == {m: {"ready": True, "replicas": 1} for m in (AWQ, FP16)}
    refused = gw.get("/health?detail=1")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    sources = {m: health_detail(lambda: gw.get("/health?detail=1", key="full").json(), m)["source"]
               for m in (AWQ, FP16)}  # fmt: skip
    assert sources[AWQ].startswith(CHAT + ":") and sources[FP16].startswith(CHAT + "-fp16:")
    metrics = gw.get("/metrics")
    assert metrics.status_code == 200 and "inference_requests_total" in metrics.text


# ---- routing -----------------------------------------------------------------------------------
def test_requests_are_routed_by_model_and_name_the_variant(gw) -> None:
    models = gw.get("/v1/models", key="full").json()
    assert {m["id"] for m in models["data"]} == {ALIAS, AWQ, FP16}
    for model in (AWQ, FP16):
        r = gw.post("/v1/completions", completion(model))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        assert r.headers[VARIANT_HEADER] == model


def test_unknown_model_gets_404_naming_served_models_and_aliases(gw) -> None:
    r = gw.post("/v1/completions", completion("gpt-9"))
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert all(name in message for name in (AWQ, FP16, ALIAS))


# ---- validation and limits ---------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_cap_gets_413(gw, chunked) -> None:
    raw = json.dumps(completion(AWQ, prompt="x" * 5000)).encode()
    content = iter([raw]) if chunked else raw  # chunked: no Content-Length to refuse early
    r = httpx.post(gw.url + "/v1/completions", content=content, verify=gw.tls, timeout=60,
                   headers={**gw.auth(), "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_n_above_one_gets_400_naming_n(gw) -> None:
    r = gw.post("/v1/completions", completion(AWQ, n=2))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"


def test_successful_responses_carry_rate_limit_headers(gw) -> None:
    r = gw.post("/v1/completions", completion(AWQ))
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "100000"
    assert int(r.headers["x-ratelimit-remaining-requests"]) < 100_000
    assert r.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))


def test_request_limit_gives_429_with_retry_after_and_headers(gw) -> None:
    first, second, third = (gw.post("/v1/completions", completion(AWQ), key="rpm")
                            for _ in range(3))  # fmt: skip
    assert [first.status_code, second.status_code] == [200, 200]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"],
            second.headers["x-ratelimit-remaining-requests"]] == ["1", "0"]  # fmt: skip
    assert third.status_code == 429
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.json()["error"]["code"] == "rate_limit_exceeded"


def test_token_limit_reserves_prompt_plus_max_tokens_and_refunds_the_unused_part(gw) -> None:
    prompt = "The capital of France is"
    reserved = estimate_prompt_tokens(prompt) + 200
    a = gw.post("/v1/completions", {"model": AWQ, "prompt": prompt, "max_tokens": 200,
                                    "temperature": 0, "stop": ["."]}, key="tpm")  # fmt: skip
    assert a.status_code == 200, a.text
    assert a.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
    remaining_a = int(a.headers["x-ratelimit-remaining-tokens"])
    assert remaining_a <= TOKENS_PER_MINUTE - reserved + 5  # + refill while it ran (5 tokens/s)
    usage = a.json()["usage"]
    refund = reserved - usage["total_tokens"]
    assert refund > 100, usage  # the stop string ended it early: most of the 200 were unused

    b = gw.post("/v1/completions", {"model": AWQ, "prompt": prompt, "max_tokens": 1}, key="tpm")
    cost_b = estimate_prompt_tokens(prompt) + 1
    assert b.status_code == 200
    # Without the refund only the refill (5 tokens/s) would have come back.
    refunded_floor = min(TOKENS_PER_MINUTE, remaining_a + refund) - cost_b - 1
    assert int(b.headers["x-ratelimit-remaining-tokens"]) >= refunded_floor

    c = gw.post("/v1/completions", {"model": AWQ, "prompt": prompt, "max_tokens": 1000},
                key="tpm")  # fmt: skip
    assert c.status_code == 429
    assert c.json()["error"]["type"] == "tokens"
    assert c.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
    assert int(c.headers["retry-after"]) >= 1


# ---- audit ---------------------------------------------------------------------------------
def test_audit_log_has_every_request_but_never_keys_or_prompt_text(gw) -> None:
    r = gw.post("/v1/completions", completion(AWQ, prompt=SECRET_PROMPT))
    refused = gw.post("/v1/completions", completion(AWQ), key=None)
    text = gw.audit.read_text()
    assert all(secret not in text for secret in gw.keys.values())
    assert "zebra-quartz" not in text
    by_id = audit_records(gw.audit)
    ok = by_id[r.headers["x-request-id"]]
    assert (ok["key_id"], ok["model"], ok["status"]) == ("full", AWQ, 200)
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 1
    assert by_id[refused.headers["x-request-id"]]["status"] == 401


# ---- traffic split, rollout, rollback ---------------------------------------------------------
def test_alias_splits_90_10_sticky_per_user_with_variant_in_header_and_audit(gw) -> None:
    users = [f"user-{i}" for i in range(400)]
    responses = ask_alias(gw, users)
    variants = [r.headers[VARIANT_HEADER] for r in responses]
    share = variants.count(FP16) / len(users)
    assert 0.05 <= share <= 0.15, share
    assert variants == [choose_variant(SPLIT, f"{ALIAS}:{u}") for u in users]
    assert variants_of(gw, users[:40]) == variants[:40], "a user keeps their variant"
    audited = {request_id: r["variant"] for request_id, r in audit_records(gw.audit).items()}
    assert [audited[r.headers["x-request-id"]] for r in responses] == variants


def model_replicas() -> dict[str, list[str]]:
    from deployments.serve_controller import serve_details

    details = serve_details()
    deployments = details.applications[APP].deployments
    return {
        m: [r.replica_id for r in deployments[deployment_name(m)].replicas] for m in (AWQ, FP16)
    }


def awq_serve(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, joined to this test's Ray cluster."""
    env = {**os.environ, "RAY_ADDRESS": gw.ray_address, "SSL_CERT_FILE": str(gw.cert)}
    exe = Path(sys.executable).with_name("awq-serve")
    return subprocess.run([str(exe), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_rollout_cli_moves_the_split_live_and_rollback_cli_returns_all_to_stable(
    gw, capsys
) -> None:
    replicas = model_replicas()
    users = [f"after-{i}" for i in range(60)]

    done = awq_serve(gw, "rollout", ALIAS, "--variant", FP16, "--steps", "50", "--interval", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{ALIAS}: {FP16} at 50%" in done.stdout
    half = TrafficSplit(variants={AWQ: 50, FP16: 50})
    assert variants_of(gw, users) == [choose_variant(half, f"{ALIAS}:{u}") for u in users]

    # In this process (already on the cluster): the same CLI path, without a second Ray start-up.
    assert cli.main(["rollback", ALIAS]) == 0
    assert f"'{FP16}': 0.0" in capsys.readouterr().out
    assert set(variants_of(gw, users)) == {AWQ}
    assert model_replicas() == replicas, "weights changed live: no model replica restarted"
