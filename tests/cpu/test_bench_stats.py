"""Benchmark statistics, SSE parsing and the load generator against an in-process fake server."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.load import (
    LoadConfig,
    LoadRun,
    StreamEvent,
    build_parser,
    closed_loop,
    config_from_args,
    ensure_loopback,
    format_table,
    main,
    parse_sse_line,
    poisson_arrival_times,
    record_from_stream,
    response_error,
    run_load,
    write_results,
)
from benchmarks.prompts import PROMPTS, pick_prompts
from benchmarks.stats import (
    RequestRecord,
    cost_per_1m_tokens,
    latency_stats,
    percentile,
    request_metrics,
    summarize,
)

# A recorded /v1/chat/completions stream with stream_options.include_usage, verbatim.
CHAT_STREAM = """\
data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"demo","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"demo","choices":[{"index":0,"delta":{"content":"Paris"},"finish_reason":null}]}

: keep-alive

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"demo","choices":[{"index":0,"delta":{"content":" is"},"finish_reason":null}]}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"demo","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}

data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"demo","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}

data: [DONE]

"""  # noqa: E501


def record(**overrides: Any) -> RequestRecord:
    """A successful 4-token request: sent at 1.0, chunks at 1.5/1.6/1.8/2.1, ended at 2.2."""
    fields: dict[str, Any] = {
        "send_s": 1.0,
        "first_token_s": 1.5,
        "token_times_s": [1.5, 1.6, 1.8, 2.1],
        "end_s": 2.2,
        "output_tokens": 4,
        "prompt_tokens": 10,
        "status": 200,
    }
    return RequestRecord(**(fields | overrides))


def timed_events(stream: str) -> list[tuple[float, StreamEvent]]:
    """Parse a stream's lines, stamping the n-th event at time n."""
    events = [e for e in map(parse_sse_line, stream.splitlines()) if e is not None]
    return [(float(i + 1), event) for i, event in enumerate(events)]


# Percentiles


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)  # rank 2.85: 3 + 0.85 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0


def test_percentile_matches_numpy_default_method() -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 17, 100):
        values = [rng.expovariate(3.0) for _ in range(n)]
        for q in (0, 1, 37.5, 50, 90, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_empty_input_is_none_and_stats_are_empty() -> None:
    assert percentile([], 50) is None
    stats = latency_stats([])
    assert (stats.count, stats.mean, stats.p50, stats.p95, stats.p99) == (0, None, None, None, None)


def test_percentile_rejects_q_outside_0_to_100() -> None:
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_latency_stats_reports_mean_and_p50_p95_p99() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    stats = latency_stats(values)
    assert stats.count == 100
    assert stats.mean == pytest.approx(50.5)
    assert (stats.p50, stats.p95, stats.p99) == pytest.approx((50.5, 95.05, 99.01))


# Per-request metrics


def test_request_metrics_from_recorded_stream() -> None:
    m = request_metrics(record())
    assert m.ttft_s == pytest.approx(0.5)
    assert m.e2e_s == pytest.approx(1.2)
    assert m.tpot_s == pytest.approx((1.2 - 0.5) / 3)
    assert m.itl_s == pytest.approx((0.1, 0.2, 0.3))


def test_tpot_uses_reported_token_count_not_chunk_count() -> None:
    m = request_metrics(record(output_tokens=8))  # 8 tokens arrived in 4 chunks
    assert m.tpot_s == pytest.approx(0.7 / 7)
    assert len(m.itl_s) == 3


def test_single_token_request_has_no_tpot_and_no_itl() -> None:
    m = request_metrics(record(token_times_s=[1.5], output_tokens=1, end_s=1.6))
    assert m.tpot_s is None
    assert m.itl_s == ()
    assert m.ttft_s == pytest.approx(0.5)


def test_request_without_tokens_has_no_ttft() -> None:
    m = request_metrics(record(first_token_s=None, token_times_s=[], output_tokens=0))
    assert m.ttft_s is None
    assert m.tpot_s is None
    assert m.e2e_s == pytest.approx(1.2)


# Summary


def test_summary_counts_errors_by_status_but_leaves_them_out_of_latency() -> None:
    records = [
        record(),
        record(send_s=0.0, first_token_s=0.3, end_s=1.0),
        record(status=503, error="HTTP 503: overloaded", first_token_s=None, token_times_s=[]),
        record(status=None, error="ConnectError", first_token_s=None, end_s=90.0),
        record(status=200, error="stream ended before data: [DONE]", first_token_s=50.0),
    ]
    s = summarize(records, wall_time_s=2.0)
    assert (s.count, s.ok, s.errors) == (5, 2, 3)
    assert s.errors_by_status == {"503": 1, "none": 1, "200": 1}
    assert s.ttft.count == 2
    assert (s.ttft.mean, s.ttft.p50) == pytest.approx((0.4, 0.4))
    assert s.e2e.p99 == pytest.approx(1.0 + (1.2 - 1.0) * 0.99)
    assert s.itl.count == 6  # three gaps per successful request, pooled


def test_summary_throughput_is_successful_tokens_over_wall_time() -> None:
    records = [record(output_tokens=100), record(output_tokens=60, prompt_tokens=None)]
    records.append(record(status=500, error="HTTP 500: boom", output_tokens=999))
    s = summarize(records, wall_time_s=4.0)
    assert s.output_tokens == 160
    assert s.prompt_tokens == 10
    assert s.output_tok_per_s == pytest.approx(40.0)
    assert s.requests_per_s == pytest.approx(0.5)


def test_goodput_counts_only_requests_meeting_both_slos() -> None:
    fast = record()  # ttft 0.5, tpot 0.233
    slow_first = record(first_token_s=3.0, token_times_s=[3.0, 3.1], end_s=3.3)
    slow_decode = record(end_s=5.0)  # tpot (4.0 - 0.5) / 3
    one_token = record(token_times_s=[1.5], output_tokens=1, end_s=1.6)
    records = [fast, slow_first, slow_decode, one_token]
    s = summarize(records, wall_time_s=2.0, slo_ttft_s=1.0, slo_tpot_s=0.5)
    assert s.goodput_rps == pytest.approx(2 / 2.0)  # fast and one_token
    assert summarize(records, wall_time_s=2.0).goodput_rps == pytest.approx(4 / 2.0)


def test_cost_per_million_tokens_from_price_and_throughput() -> None:
    assert cost_per_1m_tokens(2.0, 500.0) == pytest.approx(2.0 / (500 * 3600) * 1e6)
    assert cost_per_1m_tokens(2.0, 500.0) == pytest.approx(1.1111, rel=1e-4)
    assert cost_per_1m_tokens(None, 500.0) is None
    assert cost_per_1m_tokens(2.0, 0.0) is None
    s = summarize([record(output_tokens=3600)], wall_time_s=1.0, gpu_dollars_per_hour=0.69)
    assert s.cost_per_1m_output_tokens == pytest.approx(0.69 / (3600 * 3600) * 1e6)


def test_summary_of_no_requests_has_zero_rates_and_no_latencies() -> None:
    s = summarize([], wall_time_s=1.0, gpu_dollars_per_hour=1.0)
    assert (s.count, s.output_tok_per_s, s.requests_per_s, s.goodput_rps) == (0, 0.0, 0.0, 0.0)
    assert s.e2e.p50 is None
    assert s.cost_per_1m_output_tokens is None


def test_summary_rejects_non_positive_wall_time() -> None:
    with pytest.raises(ValueError, match="wall_time_s"):
        summarize([record()], wall_time_s=0.0)


# SSE parsing


def test_parse_sse_line_reads_chat_delta_content_and_finish_reason() -> None:
    lines = [line for line in CHAT_STREAM.splitlines() if line.startswith("data:")]
    assert parse_sse_line(lines[0]) == StreamEvent(text="")
    assert parse_sse_line(lines[1]) == StreamEvent(text="Paris")
    assert parse_sse_line(lines[3]) == StreamEvent(finish_reason="length")


def test_parse_sse_line_reads_usage_chunk_with_no_choices() -> None:
    line = CHAT_STREAM.splitlines()[10]
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert parse_sse_line(line) == StreamEvent(usage=usage)


def test_parse_sse_line_marks_done_and_skips_non_data_lines() -> None:
    assert parse_sse_line("data: [DONE]") == StreamEvent(done=True)
    assert parse_sse_line("data:[DONE]\r\n") == StreamEvent(done=True)
    for line in ("", ": keep-alive", "event: message", "id: 4", "retry: 100"):
        assert parse_sse_line(line) is None


def test_parse_sse_line_reads_completions_text() -> None:
    line = 'data: {"object":"text_completion","choices":[{"index":0,"text":" blue"}]}'
    assert parse_sse_line(line) == StreamEvent(text=" blue")


def test_parse_sse_line_turns_error_chunks_and_bad_json_into_errors() -> None:
    error = parse_sse_line('data: {"error": {"message": "out of memory", "type": "server_error"}}')
    assert error == StreamEvent(error="out of memory")
    assert "malformed" in (parse_sse_line("data: {not json").error or "")
    assert "not a JSON object" in (parse_sse_line("data: [1, 2]").error or "")


def test_record_from_stream_counts_tokens_from_usage_when_present() -> None:
    r = record_from_stream(0, 0.5, timed_events(CHAT_STREAM), 7.0, 200)
    assert r.ok
    assert r.token_times_s == [2.0, 3.0]  # the empty role chunk is not a token
    assert r.first_token_s == 2.0
    assert (r.output_tokens, r.prompt_tokens, r.finish_reason) == (3, 9, "length")


def test_record_from_stream_counts_content_chunks_without_usage() -> None:
    stream = "\n".join(line for line in CHAT_STREAM.splitlines() if '"usage"' not in line)
    r = record_from_stream(0, 0.5, timed_events(stream), 7.0, 200)
    assert r.ok
    assert (r.output_tokens, r.prompt_tokens) == (2, None)


def test_stream_without_done_or_with_error_event_is_a_failed_request() -> None:
    truncated = CHAT_STREAM.replace("data: [DONE]", "")
    r = record_from_stream(0, 0.0, timed_events(truncated), 7.0, 200)
    assert not r.ok
    assert r.error == "stream ended before data: [DONE]"
    broken = 'data: {"choices":[{"delta":{"content":"a"}}]}\ndata: {"error":{"message":"oom"}}'
    assert record_from_stream(0, 0.0, timed_events(broken), 2.0, 200).error == "oom"


def test_response_error_uses_openai_error_message_or_body_text() -> None:
    body = json.dumps({"error": {"message": "rate limited", "type": "rate_limit", "code": None}})
    assert response_error(429, body.encode()) == "HTTP 429: rate limited"
    assert response_error(502, b"Bad Gateway\n") == "HTTP 502: Bad Gateway"


# Load generator


class FakeServer:
    """In-process OpenAI server: streams `tokens` chunks and usage; each `fail_every`th gets 503."""

    def __init__(self, tokens: int = 3, fail_every: int = 0, usage: bool = True) -> None:
        self.tokens, self.fail_every, self.usage = tokens, fail_every, usage
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "demo-awq"}]})
        self.paths.append(request.url.path)
        self.bodies.append(json.loads(request.content))
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return httpx.Response(503, json={"error": {"message": "queue full"}})
        chunks = [{"choices": [{"delta": {"content": f"t{i}"}}]} for i in range(self.tokens)]
        if self.usage:
            chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def load(server: FakeServer, **config: Any) -> Any:
    """run_load against the fake server, no files, no progress bar."""
    return run_load(
        LoadConfig(**config), out_dir=None, transport=server.transport(), progress=False
    )


def test_closed_loop_sends_requested_count_of_greedy_streaming_requests() -> None:
    server = FakeServer()
    s = load(server, model="m", requests=6, concurrency=2, max_tokens=32)
    assert (s.count, s.ok, s.errors) == (6, 6, 0)
    assert s.output_tokens == 6 * 9  # from usage, not the 3 chunks
    assert set(server.paths) == {"/v1/chat/completions"}
    body = server.bodies[0]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("m", 32, 0.0)
    assert body["messages"][0]["content"] in PROMPTS


def test_load_counts_chunks_when_server_sends_no_usage() -> None:
    s = load(FakeServer(tokens=4, usage=False), model="m", requests=3, concurrency=3)
    assert s.output_tokens == 12
    assert s.prompt_tokens == 0


def test_load_counts_rejected_requests_by_status() -> None:
    s = load(FakeServer(fail_every=3), model="m", requests=9, concurrency=1)
    assert (s.count, s.ok, s.errors_by_status) == (9, 6, {"503": 3})
    assert s.ttft.count == 6


def test_model_defaults_to_first_model_the_server_lists() -> None:
    server = FakeServer()
    load(server, requests=1, concurrency=1, endpoint="completions")
    assert server.bodies[0]["model"] == "demo-awq"
    assert server.paths == ["/v1/completions"]
    assert server.bodies[0]["prompt"] in PROMPTS


def test_open_loop_sends_requested_count() -> None:
    s = load(FakeServer(), model="m", requests=5, rate=1000.0)
    assert (s.count, s.ok) == (5, 5)


def test_closed_loop_stops_issuing_after_deadline() -> None:
    now = [0.0]

    async def send(index: int) -> RequestRecord:
        now[0] += 1.0  # each request takes one second of the fake clock
        return record(index=index)

    records = asyncio.run(closed_loop(send, 1, None, 3.5, lambda: now[0]))
    assert [r.index for r in records] == [0, 1, 2, 3]


def test_poisson_arrivals_are_seeded_and_average_one_over_rate() -> None:
    def first(n: int, seed: int) -> list[float]:
        arrivals = poisson_arrival_times(rate=4.0, seed=seed)
        return [next(arrivals) for _ in range(n)]

    times = first(20_001, seed=1)
    assert times[0] == 0.0
    assert times == sorted(times)
    assert times[-1] / 20_000 == pytest.approx(0.25, rel=0.03)
    assert first(10, seed=1) == times[:10]
    assert first(10, seed=2) != times[:10]


def test_write_results_writes_json_without_api_key_and_a_png(tmp_path: Path) -> None:
    config = LoadConfig(model="m", requests=2, api_key="sk-secret")
    records = [record(index=0), record(index=1, status=503, error="HTTP 503: full")]
    run = LoadRun(config=config, model="m", records=records, summary=summarize(records, 2.0))
    json_path, png_path = write_results(run, tmp_path)
    saved = json.loads(json_path.read_text())
    assert "sk-secret" not in json_path.read_text()
    assert saved["summary"]["errors_by_status"] == {"503": 1}
    assert len(saved["records"]) == 2
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_shows_throughput_errors_and_dashes_for_missing_latencies() -> None:
    records = [record(status=503, error="HTTP 503: full")]
    run = LoadRun(
        config=LoadConfig(model="m"), model="m", records=records, summary=summarize(records, 1.0)
    )
    table = format_table(run)
    assert "0 ok, 1 errors (503: 1)" in table
    assert "0.0 tok/s" in table
    ttft_row = next(line for line in table.splitlines() if line.startswith("TTFT"))
    assert ttft_row.split() == ["TTFT", "-", "-", "-", "-"]


# Configuration and prompts


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost", "http://[::1]:80"])
def test_loopback_base_urls_are_accepted(url: str) -> None:
    ensure_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "https://api.openai.com", "http://"])
def test_remote_base_urls_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        ensure_loopback(url)
    with pytest.raises(ValueError, match="--allow-remote"):
        LoadConfig(base_url=url)
    assert LoadConfig(base_url=url, allow_remote=True).base_url == url


def test_cli_refuses_remote_host_with_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--base-url", "http://192.168.1.10:8000"])
    assert exit_info.value.code == 2


def test_cli_flags_map_onto_config_and_default_bounds() -> None:
    parse = build_parser().parse_args
    open_loop = config_from_args(parse(["--rate", "2.5", "--duration", "30", "--max-tokens", "64"]))
    assert (open_loop.mode, open_loop.rate, open_loop.duration_s) == ("open", 2.5, 30.0)
    assert (open_loop.requests, open_loop.max_tokens) == (None, 64)
    closed = config_from_args(parse(["--concurrency", "4"]))
    assert (closed.mode, closed.concurrency, closed.requests, closed.temperature) == (
        "closed",
        4,
        64,
        0.0,
    )


def test_prompt_set_is_64_distinct_prompts_of_varied_length() -> None:
    assert len(set(PROMPTS)) == 64
    words = sorted(len(p.split()) for p in PROMPTS)
    assert words[0] <= 6
    assert words[-1] >= 35


def test_pick_prompts_is_seeded_and_uses_every_prompt_before_repeating() -> None:
    assert pick_prompts(10, seed=3) == pick_prompts(10, seed=3)
    assert pick_prompts(10, seed=3) != pick_prompts(10, seed=4)
    picked = pick_prompts(100, seed=0)
    assert len(picked) == 100
    assert set(picked[:64]) == set(PROMPTS)
    assert pick_prompts(0) == []
