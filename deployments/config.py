"""Typed configuration of the serving app: everything under `args:` in serve_config.yaml.

A bad config fails at deploy time with pydantic's message naming the field. The seeds'
environment variables override the matching fields (and only those): MODEL_PATH, DEVICE,
MAX_BATCH_SIZE, LOG_LEVEL. API_PORT is not an app field: the port belongs to Serve's proxy, which
is started before `build_app` runs (see the http_options comments in serve_config.yaml).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.gateway.audit import AuditConfig
from deployments.gateway.auth import AuthConfig
from deployments.gateway.client_identity import ClientIdentityConfig
from deployments.gateway.client_limits import ClientLimitsConfig
from deployments.gateway.rate_limit import RateLimitConfig
from deployments.gateway.traffic import TrafficSplit


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingConfig(_Strict):
    """Admission batching (Ray Serve `@serve.batch`) and the engine's continuous-batching caps."""

    max_batch_size: int = Field(16, ge=1, le=256, description="Requests admitted per batch.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=1, description="How long admission waits to fill a batch."
    )
    max_running: int = Field(16, ge=1, le=256, description="Sequences decoded together.")
    max_prefill_tokens: int = Field(
        512, ge=16, description="Prompt tokens prefilled between two decode steps."
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=64,
        description="Tokens per streamed chunk after the first (vLLM's stream_interval); "
        "larger values cut per-token overhead on small hosts, the first token is never held.",
    )


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)
    # Over how long Serve averages the load (Ray's default). How often the load is reported is
    # Ray's environment variables RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S.
    look_back_period_s: float = Field(30, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ModelConfig(_Strict):
    """One served model variant: which artifact, on what hardware, with what limits."""

    name: str = Field(description="Name clients send as `model`.", min_length=1)
    source: str = Field(
        description="Registry reference `name[:version]`, or a path to a model folder."
    )
    registry: Path = Field(Path("models"), description="Model registry root.")
    verify: bool = Field(True, description="Check the manifest's sha256 before loading.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA if present."
    )
    max_model_len: int = Field(2048, ge=64, description="Prompt + completion tokens per request.")
    prefix_cache_mb: float = Field(
        256,
        ge=0,
        description="Memory for automatic prefix caching (KV of shared prompt starts such as a "
        "system prompt, reused instead of recomputed); 0 turns it off.",
    )
    lm_head_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the output projection; auto: the model's. bfloat16 on CPU is "
        "faster but its coarse logits can change greedy answers.",
    )
    batch_invariant: bool = Field(
        True,
        description="A request's output does not depend on its batch-mates (temperature 0 is "
        "reproducible under load): attention and dense matmuls run in calls whose shapes depend "
        "on a token's own position only. Exact on CPU; on CUDA the AWQ kernels may still vary.",
    )
    decode_step: Literal["auto", "native", "eager", "compile", "cuda_graph"] = Field(
        "auto",
        description="How a decode step runs: auto = a captured CUDA graph per batch bucket on "
        "CUDA, native on CPU (the decoder as one C++ call, built by `make setup`; eager where it "
        "cannot be built or does not cover the model); compile = torch.compile (fullgraph), "
        "minutes per new bucket on CPU.",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request omits it.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    num_replicas: int = Field(1, ge=1, description="Fixed replicas when autoscaling is off.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Serve autoscaling.")
    max_ongoing_requests: int = Field(64, ge=1, description="Per replica, running + admitting.")
    max_queued_requests: int = Field(128, ge=-1, description="Queued at the handle; then 503.")
    num_cpus: float = Field(2, gt=0, description="CPUs per replica (and torch threads).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (1 on GPU nodes).")
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="Spread replicas: at most this many per Ray node (1 keeps a node's loss "
        "from taking every replica). None lets Serve pack them.",
    )
    gpu_dollars_per_hour: float = Field(0.0, ge=0, description="For cost per token metrics.")

    @field_validator("registry")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # Resolved where the config is read (the `serve run` cwd), not in a replica's cwd.
        return v.expanduser().resolve()


class RolloutGuardrails(_Strict):
    """Bounds on the canary during `awq-serve rollout`; crossing one rolls back at once."""

    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Canary 5xx responses / requests over one interval."
    )
    max_p95_latency_s: float = Field(
        30.0, gt=0, description="Canary p95 end-to-end latency of successful requests."
    )


class AliasConfig(_Strict):
    """A served name that splits traffic over variants (canary / gradual rollout)."""

    name: str
    split: TrafficSplit
    rollout: RolloutGuardrails = Field(default_factory=RolloutGuardrails)


class RouterUserConfig(_Strict):
    """The Router deployment's `user_config`: live split weights that override `aliases`."""

    splits: dict[str, TrafficSplit] = Field(
        default_factory=dict, description="Alias name to its current split."
    )

    def check(self, args: AppArgs) -> None:
        """Raise ValueError unless every alias and variant named here is in `args`."""
        aliases = {a.name for a in args.aliases}
        models = {m.name for m in args.models}
        for name, split in self.splits.items():
            if name not in aliases:
                raise ValueError(f"unknown alias '{name}'; aliases: {sorted(aliases)}")
            unknown = set(split.variants) - models
            if unknown:
                raise ValueError(
                    f"alias '{name}' names unknown variants {sorted(unknown)}; "
                    f"served models: {sorted(models)}"
                )


class AppArgs(_Strict):
    """Everything the app needs; `serve_config.yaml` `args:` is validated into this."""

    models: list[ModelConfig] = Field(min_length=1)
    aliases: list[AliasConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    request_timeout_s: float = Field(300, gt=0, description="Whole-request deadline; then 504.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger bodies get 413.")
    client_identity: ClientIdentityConfig = Field(
        default_factory=ClientIdentityConfig,
        description="Which proxies' X-Forwarded-For to believe for the client's IP.",
    )
    client_limits: ClientLimitsConfig = Field(
        default_factory=ClientLimitsConfig,
        description="Clients without an API key: requests in flight per client and tokens per "
        "minute per IP (429 with Retry-After past either). Keys have their own limits.",
    )
    allow_ignore_eos: bool = Field(
        False,
        description="Accept `ignore_eos` (decode to max_tokens past the end of the answer) from "
        "clients without an API key. A benchmark switch: it lets one client hold decode slots.",
    )
    router_replicas: int = Field(1, ge=1)
    log_level: str = Field("INFO")

    @model_validator(mode="after")
    def _names(self) -> AppArgs:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        for alias in self.aliases:
            missing = set(alias.split.variants) - set(names)
            if missing:
                raise ValueError(f"alias '{alias.name}' names unknown models: {sorted(missing)}")
            if alias.name in names:
                raise ValueError(f"alias '{alias.name}' clashes with a model name")
        tpm = self.client_limits.tokens_per_minute_per_ip
        if tpm is not None and tpm < self.router_replicas:
            raise ValueError(
                f"client_limits.tokens_per_minute_per_ip={tpm} is below router_replicas="
                f"{self.router_replicas}: each replica's share would be under 1 token per minute"
            )
        return self

    def with_absolute_paths(self) -> AppArgs:
        """Pin relative file paths to the deploying process's cwd before replicas see them."""
        self.audit.path = self.audit.path.expanduser().resolve()
        if self.auth.keys_file is not None:
            self.auth.keys_file = self.auth.keys_file.expanduser().resolve()
        return self

    @property
    def default_model(self) -> str:
        return self.aliases[0].name if self.aliases else self.models[0].name


def apply_env_overrides(raw: dict[str, Any], environ: dict[str, str] | None = None) -> dict:
    """The seeds' env vars override the first model's fields; documented in the README."""
    env = os.environ if environ is None else environ
    data = {**raw, "models": [dict(m) for m in raw.get("models", [])]}
    first = data["models"][0] if data["models"] else None
    if first is not None and env.get("MODEL_PATH"):
        first["source"] = env["MODEL_PATH"]
    if first is not None and env.get("DEVICE"):
        first["device"] = env["DEVICE"]
    if first is not None and env.get("MAX_BATCH_SIZE"):
        batching = dict(first.get("batching", {}))
        batching["max_batch_size"] = batching["max_running"] = int(env["MAX_BATCH_SIZE"])
        first["batching"] = batching
    if env.get("LOG_LEVEL"):
        data["log_level"] = env["LOG_LEVEL"]
    return data
