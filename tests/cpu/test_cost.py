"""Cost per 1M output tokens and per request: the pure functions, the prices file, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from awq_serve_cli.main import main
from deployments.ops.cost import (
    CostConfig,
    Throughput,
    ThroughputWindow,
    cost_per_million_tokens,
    cost_per_request,
    cost_rows,
    cost_table,
    load_prices,
    throughput_from_benchmark,
)

SEED_PRICES = {"RTX 4090": 0.50, "A6000": 0.79, "A100": 2.00}


def test_cost_per_million_tokens_is_price_over_tokens_per_hour() -> None:
    # $2/h at 500 tok/s: 1.8M tokens an hour, so $1.111 per 1M.
    assert cost_per_million_tokens(2.0, 500.0) == pytest.approx(2.0 / 1.8)
    assert cost_per_million_tokens(0.5, 1000.0) == pytest.approx(0.5 / 3.6)
    assert cost_per_million_tokens(2.0, 0.0) is None


def test_cost_per_request_is_its_share_of_output_tokens() -> None:
    assert cost_per_request(2.0, 500.0, 128) == pytest.approx(2.0 / 1.8 * 128 / 1e6)
    assert cost_per_request(2.0, 0.0, 128) is None


def test_prices_file_holds_the_seed_gpu_prices() -> None:
    prices = load_prices()
    assert {g.name: g.dollars_per_hour for g in prices.gpus} == SEED_PRICES


@pytest.mark.parametrize(
    "gpus",
    [
        [{"name": "A100", "dollars_per_hour": 2.0}, {"name": "A100", "dollars_per_hour": 1.0}],
        [{"name": "A100", "dollars_per_hour": -1.0}],
        [],
    ],
)
def test_bad_prices_are_rejected(gpus: list[dict]) -> None:
    with pytest.raises(ValueError):
        CostConfig.model_validate({"gpus": gpus})


def test_rows_price_every_gpu_at_the_same_throughput() -> None:
    rows = cost_rows(load_prices(), Throughput(400.0, 100.0, "test"))
    by_gpu = {r.gpu: r for r in rows}
    assert set(by_gpu) == set(SEED_PRICES)
    for gpu, price in SEED_PRICES.items():
        assert by_gpu[gpu].per_million == pytest.approx(price / (400 * 3600) * 1e6)
        assert by_gpu[gpu].per_request == pytest.approx(price / (400 * 3600) * 100)
    table = cost_table(rows, Throughput(400.0, 100.0, "test"))
    assert "$1.389" in table  # A100: 2.00 / 1.44M tokens per hour


def test_throughput_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Throughput(0.0, None, "--tokens-per-second")


def test_window_rate_is_tokens_over_first_start_to_last_finish() -> None:
    w = ThroughputWindow(window_s=10)
    w.add(started=0.0, finished=2.0, tokens=20)
    w.add(started=1.0, finished=4.0, tokens=20)
    assert w.tokens_per_s() == pytest.approx(40 / 4.0)
    assert w.tokens_per_request() == pytest.approx(20)
    w.add(started=11.0, finished=13.0, tokens=30)  # the first request (finished at 2) drops out
    assert w.tokens_per_s() == pytest.approx(50 / (13.0 - 1.0))
    assert ThroughputWindow().tokens_per_s() == 0.0


def _benchmark_json(out_dir: Path) -> Path:
    """A real `benchmarks/load.py` result file: 2 requests, 64 output tokens in 2 s."""
    from benchmarks.load import LoadConfig, LoadRun, write_results
    from benchmarks.stats import RequestRecord, summarize

    timing = {"send_s": 0.0, "first_token_s": 0.5, "token_times_s": [0.5, 1.0], "end_s": 2.0}
    records = [
        RequestRecord(**timing, output_tokens=n, prompt_tokens=10, status=200) for n in (24, 40)
    ]
    summary = summarize(records, wall_time_s=2.0)
    run = LoadRun(config=LoadConfig(), model="m", records=records, summary=summary)
    json_path, _ = write_results(run, out_dir)
    return json_path


def test_benchmark_json_gives_throughput_and_tokens_per_request(tmp_path: Path) -> None:
    t = throughput_from_benchmark(_benchmark_json(tmp_path))
    assert t.output_tok_per_s == pytest.approx(64 / 2.0)
    assert t.tokens_per_request == pytest.approx(32)


def test_benchmark_json_without_summary_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"records": []}')
    with pytest.raises(ValueError, match=r"summary\.output_tok_per_s"):
        throughput_from_benchmark(path)


def test_cli_cost_from_benchmark_prints_each_gpu(tmp_path: Path, capsys) -> None:
    assert main(["cost", "--from", str(_benchmark_json(tmp_path))]) == 0
    out = capsys.readouterr().out
    for gpu, price in SEED_PRICES.items():
        line = next(line for line in out.splitlines() if line.startswith(gpu))
        assert f"${price / (32 * 3600) * 1e6:.3f}" in line
        assert f"${price / (32 * 3600) * 32:.6f}" in line


def test_cli_cost_from_tokens_per_second(capsys) -> None:
    assert main(["cost", "--tokens-per-second", "500", "--tokens-per-request", "128"]) == 0
    out = capsys.readouterr().out
    assert "$1.111" in out  # A100 at 500 tok/s
    assert main(["cost", "--tokens-per-second", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
