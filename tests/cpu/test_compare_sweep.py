"""benchmarks.compare's concurrency sweep, process-tree RSS and llama-server's command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.compare import (
    DEFAULT_LLAMA_SERVER,
    LoadPlan,
    Options,
    SystemResult,
    build_parser,
    llama_server_argv,
    llama_slot_context,
    make_launch,
    run_system,
    sweep_series,
    write_outputs,
)
from benchmarks.sweep import (
    SweepPoint,
    format_sweep_table,
    parse_levels,
    plot_sweep,
    requests_for,
    sweep_cell,
    sweep_point,
)
from benchmarks.tree_memory import (
    MIB,
    MemoryPeak,
    ProcInfo,
    TreeSample,
    TreeSampler,
    peak_of,
    tree_members,
    tree_sample,
)
from tests.cpu.test_compare_table import summary

# -- sweep ------------------------------------------------------------------------------------


def test_levels_parse_sorted_and_distinct_and_reject_nonsense():
    assert parse_levels("16,1, 4,32,4") == (1, 4, 16, 32)
    for bad in ("", "0,4", "a,b", "-1"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_levels(bad)


def test_each_level_gets_two_requests_per_client_but_never_fewer_than_the_minimum():
    assert requests_for(1) == 8
    assert requests_for(16) == 32
    assert requests_for(2, minimum=3) == 4


def test_plan_sizes_servers_for_its_busiest_run():
    assert LoadPlan(concurrency=16).max_clients == 16
    assert LoadPlan(concurrency=16, sweep=(1, 4, 32)).max_clients == 32


def point(level: int, tok_s: float | None, p95: float | None, errors: int = 0) -> SweepPoint:
    return SweepPoint(
        concurrency=level,
        requests=2 * level,
        ok=2 * level - errors,
        errors=errors,
        output_tok_per_s=tok_s,
        ttft_p95_s=p95,
    )


def test_sweep_table_has_a_row_per_system_and_a_column_per_level():
    series = {
        "awq-serve (AWQ)": [point(1, 38.8, 0.1), point(16, 195.6, 1.35, errors=2)],
        "llama.cpp server (Q4_1 GGUF)": [point(1, 60.0, 0.05)],
        "vLLM-CPU (FP16 as fp32)": [],  # skipped: no points
    }
    lines = format_sweep_table(series, (1, 16)).splitlines()
    assert lines[1] == "| system | 1 clients | 16 clients |"
    assert lines[1].count("|") == lines[2].count("|")
    assert lines[3] == (
        "| awq-serve (AWQ) | 38.8 tok/s, 0.10 s | 195.6 tok/s, 1.35 s (2/32 failed) |"
    )
    assert lines[4] == "| llama.cpp server (Q4_1 GGUF) | 60.0 tok/s, 0.05 s | - |"
    assert lines[5] == "| vLLM-CPU (FP16 as fp32) | - | - |"


def test_a_level_where_everything_failed_shows_no_figures():
    assert sweep_cell(point(4, None, None, errors=8)) == "-, - (8/8 failed)"


def test_sweep_point_takes_the_summary_figures_and_the_tree_peak():
    memory = MemoryPeak(peak_tree_mib=900.0, peak_largest_mib=400.0)
    got = sweep_point(4, summary(120.0, 0.4, ok=7, count=8), memory)
    assert (got.concurrency, got.requests, got.ok, got.errors) == (4, 8, 7, 1)
    assert (got.output_tok_per_s, got.ttft_p95_s, got.peak_tree_mib) == (120.0, 0.4, 900.0)
    # No successful request: 0 tok/s would read as a measured figure.
    assert sweep_point(4, summary(0.0, 1.0, ok=0, count=8), None).output_tok_per_s is None


def test_series_keeps_systems_without_points(tmp_path: Path):
    results = [
        SystemResult(key="awq-serve", label="a", sweep=[point(1, 10.0, 0.1), point(4, 30.0, 0.2)]),
        SystemResult(key="vllm-cpu", label="v", status="skipped"),
    ]
    series = sweep_series(results)
    assert list(series) == ["a", "v"] and series["v"] == []
    path = tmp_path / "sweep.png"
    plot_sweep(series, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- process-tree RSS -------------------------------------------------------------------------

# A `serve run`-like tree under session leader 100: raylet (101) with two workers, one of them
# orphaned (its parent died, ppid 1) but still in the session; 300 is another session entirely.
PROCS = [
    ProcInfo(pid=1, ppid=0, sid=1, rss=10 * MIB, name="init"),
    ProcInfo(pid=100, ppid=1, sid=100, rss=200 * MIB, name="serve run"),
    ProcInfo(pid=101, ppid=100, sid=100, rss=50 * MIB, name="raylet"),
    ProcInfo(pid=102, ppid=101, sid=100, rss=400 * MIB, name="ray::ServeReplica"),
    ProcInfo(pid=103, ppid=1, sid=100, rss=30 * MIB, name="ray::IDLE"),
    ProcInfo(pid=104, ppid=101, sid=104, rss=20 * MIB, name="setsid child"),
    ProcInfo(pid=300, ppid=1, sid=300, rss=999 * MIB, name="benchmark elsewhere"),
]


def test_tree_is_descendants_plus_the_session_and_nothing_else():
    assert [p.pid for p in tree_members(PROCS, 100)] == [100, 101, 102, 103, 104]
    assert tree_members(PROCS, 555) == []


def test_tree_sample_sums_rss_and_names_the_largest_process():
    sample = tree_sample(PROCS, 100)
    assert sample.total_rss == 700 * MIB
    assert sample.processes == 5
    assert sample.largest is not None and sample.largest.name == "ray::ServeReplica"


def test_peak_is_of_the_total_and_of_the_largest_process_each_at_its_own_time():
    big = ProcInfo(pid=102, ppid=101, sid=100, rss=500 * MIB, name="replica")
    samples = [
        TreeSample(total_rss=0, processes=0, largest=None),  # the tree had already exited
        TreeSample(total_rss=800 * MIB, processes=5, largest=big),
        TreeSample(total_rss=900 * MIB, processes=6, largest=PROCS[3]),
    ]
    peak = peak_of(samples)
    assert peak is not None
    assert (peak.peak_tree_mib, peak.peak_largest_mib) == (900.0, 500.0)
    assert (peak.largest_name, peak.max_processes, peak.samples) == ("replica", 6, 2)
    assert peak_of([]) is None


def test_sampler_sees_a_real_session_leader_and_its_child():
    # A shell that forks a sleeping child, in its own session as compare launches servers.
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"{sys.executable} -c 'import time; time.sleep(30)' & wait"],
        start_new_session=True,
    )
    try:
        with TreeSampler(proc.pid, interval_s=0.05) as sampler:
            deadline = time.monotonic() + 20
            # The samples are polled until the child shows; the sleep only paces the polls.
            while not any(s.processes >= 2 for s in sampler.samples):
                assert time.monotonic() < deadline, "the child never showed in the tree"
                time.sleep(0.05)
        peak = sampler.peak()
        assert peak is not None and peak.max_processes >= 2 and peak.peak_tree_mib > 0
        # The python child outweighs the shell; its name is the program without its folder.
        assert peak.largest_name.startswith(Path(sys.executable).name + " -c ")
        assert "time.sleep" in peak.largest_name
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- llama-server -----------------------------------------------------------------------------


def test_slot_context_fits_prompt_and_output_in_whole_blocks():
    assert llama_slot_context(128) == 512
    assert llama_slot_context(256) == 512
    assert llama_slot_context(257) == 768
    assert llama_slot_context(64, prompt_budget=100) == 256


def test_llama_server_argv_gives_each_client_a_slot_with_a_whole_request_of_context():
    argv = llama_server_argv(
        Path("/x/llama-server"), Path("/m/model.gguf"), "smol", 8123, 16, 512, 2
    )
    assert argv[0] == "/x/llama-server"
    flags = dict(zip(argv[1:-1:2], argv[2:-1:2], strict=True))
    assert flags == {
        "-m": "/m/model.gguf",
        "--alias": "smol",
        "--host": "127.0.0.1",
        "--port": "8123",
        "-np": "16",
        "-c": str(16 * 512),
        "-t": "2",
    }
    assert argv[-1] == "--no-webui"


def test_default_llama_server_is_where_the_setup_script_puts_it():
    assert DEFAULT_LLAMA_SERVER.parts[-3:] == (".llama-cpp", "bin", "llama-server")
    script = (Path(__file__).resolve().parents[2] / "benchmarks" / "setup_llama_cpp.sh").read_text()
    assert '"$DIR/bin/llama-server"' in script and ".llama-cpp" in script


def offline_options(tmp_path: Path, **given: object) -> Options:
    """Options for a run that never reaches a server (the fields a test cares about given)."""
    fields: dict[str, object] = {
        "plan": LoadPlan(),
        "registry": tmp_path,
        "awq_model": "m",
        "fp16_model": "m-fp16",
        "vllm_python": None,
        "llama_server": None,
        "start_timeout_s": 1.0,
        "timeline": False,
        "progress": False,
        "log_dir": tmp_path,
    }
    return Options(**(fields | given))  # type: ignore[arg-type]


def test_without_a_llama_server_binary_the_row_is_skipped_and_says_how_to_build_it(tmp_path):
    opts = offline_options(tmp_path)
    result, timeline = run_system("llama-cpp", opts, tmp_path)
    assert (result.status, timeline) == ("skipped", None)
    assert "benchmarks/setup_llama_cpp.sh" in result.note
    opts.llama_server = tmp_path / "nope"
    assert "does not exist" in run_system("llama-cpp", opts, tmp_path)[0].note


def test_sweep_flag_is_off_by_default_and_parsed_when_given(capsys):
    parser = build_parser()
    assert parser.parse_args([]).sweep == ()
    assert parser.parse_args(["--sweep", "32,1,4"]).sweep == (1, 4, 32)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", "0"])
    assert "positive integers" in capsys.readouterr().err


def test_outputs_carry_the_sweep_and_memory_in_the_json_and_add_the_sweep_plot(tmp_path):
    result = SystemResult(
        key="llama-cpp",
        label="llama.cpp server (Q4_1 GGUF)",
        load=summary(100.0, 0.5),
        memory=MemoryPeak(peak_tree_mib=497.0, peak_largest_mib=497.0, largest_name="llama"),
        sweep=[point(1, 60.0, 0.05), point(4, 150.0, 0.2)],
    )
    paths = write_outputs([result], None, LoadPlan(sweep=(1, 4)), tmp_path)
    assert [p.name.split("-compare")[1] for p in paths] == [".json", ".png", "-sweep.png"]
    payload = json.loads(paths[0].read_text())
    assert payload["plan"]["sweep"] == [1, 4]
    system = payload["systems"][0]
    assert system["memory"]["peak_tree_mib"] == 497.0
    assert [p["concurrency"] for p in system["sweep"]] == [1, 4]
    # Without a sweep there is no sweep plot.
    assert len(write_outputs([result], None, LoadPlan(), tmp_path / "plain")) == 2


def test_vllm_serves_the_fp16_folder_in_fp32_and_the_awq_artifact_in_bf16(tmp_path):
    awq, fp16, python = tmp_path / "awq", tmp_path / "fp16", tmp_path / "python"
    awq.mkdir(), fp16.mkdir(), python.touch()
    opts = offline_options(tmp_path, awq_model=str(awq), fp16_model=str(fp16), vllm_python=python)
    for key, folder, dtype in (("vllm-cpu", fp16, "float32"), ("vllm-cpu-awq", awq, "bfloat16")):
        launch, model_dir = make_launch(key, opts, tmp_path)
        flags = dict(zip(launch.argv[3::2], launch.argv[4::2], strict=False))
        assert model_dir == folder.resolve()
        assert (flags["--model"], flags["--dtype"]) == (str(folder.resolve()), dtype)
