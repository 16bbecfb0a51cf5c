"""The comparison table: ratios against the naive server, and rows that never vanish."""

from __future__ import annotations

import pytest

from benchmarks.compare import (
    SystemResult,
    Timeline,
    TimelineEntry,
    awq_serve_config,
    format_table,
    format_timeline,
    ratio,
)
from benchmarks.stats import BenchSummary, LatencyStats
from benchmarks.tree_memory import MemoryPeak


def summary(tok_per_s: float, ttft_p95: float, ok: int = 48, count: int = 48) -> BenchSummary:
    latency = LatencyStats(
        count=ok, mean=ttft_p95 / 2, p50=ttft_p95 / 2, p95=ttft_p95, p99=ttft_p95
    )
    return BenchSummary(
        count=count,
        ok=ok,
        errors=count - ok,
        wall_time_s=100.0,
        output_tokens=int(tok_per_s * 100),
        prompt_tokens=0,
        output_tok_per_s=tok_per_s,
        requests_per_s=ok / 100,
        goodput_rps=ok / 100,
        ttft=latency,
        tpot=LatencyStats(count=ok, p50=0.05),
        itl=LatencyStats(),
        e2e=latency,
    )


def rows(table: str) -> dict[str, list[str]]:
    """Table rows by system label, as stripped cells."""
    out = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| system"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


def test_ratio_divides_by_the_baseline_and_marks_missing_values():
    assert ratio(150.0, 50.0) == "3.00x"
    assert ratio(1.0, 4.0) == "0.25x"
    assert ratio(None, 4.0) == "-"
    assert ratio(3.0, None) == "-"
    assert ratio(3.0, 0.0) == "-"


def test_table_gives_throughput_and_ttft_ratios_against_the_naive_server():
    results = [
        SystemResult(
            key="awq-serve",
            label="awq-serve (AWQ)",
            load=summary(150.0, 1.0),
            single=summary(20.0, 0.1, ok=8, count=8),
            ready_s=30.4,
        ),
        SystemResult(
            key="naive",
            label="naive server (AWQ)",
            load=summary(50.0, 4.0),
            single=summary(16.0, 0.1, ok=8, count=8),
        ),
    ]
    table = rows(format_table(results))
    awq, naive = table["awq-serve (AWQ)"], table["naive server (AWQ)"]
    assert awq[2:5] == ["48/48", "150.0", "3.00x"]  # ok/sent, tok/s, vs naive
    assert awq[6:8] == ["1.00", "0.25x"]  # TTFT p95 and its ratio: lower is better
    assert awq[8] == "50.0"  # TPOT p50 in ms
    assert awq[10:13] == ["20.0", "1.25x", "30"]  # 1-client tok/s, ratio, ready s
    assert naive[4] == "1.00x" and naive[7] == "1.00x"


def test_failed_and_skipped_systems_keep_their_row_and_say_why():
    results = [
        SystemResult(key="naive", label="naive server (AWQ)", load=summary(50.0, 4.0)),
        SystemResult(
            key="vllm-cpu",
            label="vLLM-CPU (FP16 as fp32)",
            status="skipped",
            note="no vLLM venv (run benchmarks/setup_vllm_cpu.sh, or pass --vllm-python)",
        ),
        SystemResult(
            key="awq-serve-fp16", label="awq-serve (FP16)", status="failed", note="not ready"
        ),
    ]
    text = format_table(results)
    table = rows(text)
    assert table["vLLM-CPU (FP16 as fp32)"][1:5] == ["skipped", "-", "-", "-"]
    assert table["awq-serve (FP16)"][1] == "failed"
    assert "- vLLM-CPU (FP16 as fp32): no vLLM venv" in text
    assert "- awq-serve (FP16): not ready" in text


def test_memory_columns_give_the_tree_peak_and_the_largest_process_and_say_what_counts():
    replica = "ray::ServeReplica:awq-serve:ModelServer"
    memory = MemoryPeak(peak_tree_mib=2310.4, peak_largest_mib=812.6, largest_name=replica)
    awq = SystemResult(key="awq-serve", label="awq-serve (AWQ)", memory=memory)
    text = format_table([awq, SystemResult(key="naive", label="naive server (AWQ)")])
    table = rows(text)
    assert table["awq-serve (AWQ)"][13:15] == ["2310", "813"]
    assert table["naive server (AWQ)"][13:15] == ["-", "-"]
    assert "Ray's GCS, raylet" in text and "upper bound" in text
    assert "awq-serve (AWQ): `ray::ServeReplica:awq-serve:ModelServer`" in text


def test_without_memory_samples_there_is_no_memory_note():
    text = format_table([SystemResult(key="naive", label="n", load=summary(1.0, 1.0))])
    assert "peak RSS:" not in text


def test_table_has_one_separator_cell_per_column():
    lines = format_table([SystemResult(key="naive", label="n", load=summary(1.0, 1.0))])
    header, separator, row = lines.splitlines()[:3]
    assert header.count("|") == separator.count("|") == row.count("|")


def test_without_a_baseline_result_ratios_are_blank_and_noted():
    results = [SystemResult(key="awq-serve", label="a", load=summary(150.0, 1.0))]
    text = format_table(results)
    assert rows(text)["a"][4] == "-"
    assert "no ratios: the baseline (naive) has no result" in text


def test_timeline_puts_the_short_request_next_to_the_long_ones():
    entries = [
        TimelineEntry(kind="long", send_s=0.0, ttft_s=0.5, e2e_s=20.0, output_tokens=256)
        for _ in range(15)
    ]
    entries.append(TimelineEntry(kind="short", send_s=2.0, ttft_s=0.3, e2e_s=1.1, output_tokens=8))
    text = format_timeline(
        Timeline(system="awq-serve", long_tokens=256, short_tokens=8, entries=entries)
    )
    assert "15 x 256-token requests" in text
    assert "| short | 2.00 | 0.30 | 1.10 | 8 |" in text
    assert "| long, median | 0.00 | 0.50 | 20.00 | 256 |" in text


@pytest.fixture
def base_config() -> dict:
    return {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "args": {
                    "models": [{"name": "m", "source": "m", "registry": "models"}],
                    "rate_limit": {"requests_per_minute_per_ip": 100},
                }
            }
        ],
    }


def test_generated_serve_config_is_loopback_unthrottled_and_leaves_the_base_alone(
    base_config, tmp_path
):
    config = awq_serve_config(base_config, "fp", "fp-ref", tmp_path, 9123, tmp_path / "a.jsonl")
    assert config["http_options"] == {"host": "127.0.0.1", "port": 9123}
    args = config["applications"][0]["args"]
    assert args["models"][0] == {"name": "fp", "source": "fp-ref", "registry": str(tmp_path)}
    assert args["rate_limit"]["requests_per_minute_per_ip"] >= 1_000_000
    assert args["client_limits"]["max_concurrent_per_client"] >= 100_000
    assert args["client_limits"]["tokens_per_minute_per_ip"] is None
    assert base_config["http_options"]["port"] == 8000
    assert base_config["applications"][0]["args"]["models"][0]["name"] == "m"
