"""The benchmark harness: structure and ratios (never wall-clock thresholds)."""

from __future__ import annotations

import json

import pytest

from gru_deploy.bench import format_table, median_us, run_bench

from cli_helpers import run_cli


def test_median_us_counts_calls_within_bounds():
    calls = []
    value = median_us(lambda: calls.append(1), budget_s=0.01, min_runs=5, max_runs=20)
    assert value >= 0 and 3 + 1 + 5 <= len(calls) <= 3 + 1 + 20


@pytest.fixture(scope="module")
def small_result(tiny_checkpoint):
    return run_bench(tiny_checkpoint.spec, tiny_checkpoint.state_dict, budget_s=0.01, large=False)


def test_bench_measures_every_runtime_on_every_shape(small_result):
    shapes = [(r["batch"], r["seq"]) for r in small_result["rows"]]
    assert shapes == [(1, 1), (1, 100), (32, 100), (1, 1000), (256, 200)]
    for row in small_result["rows"]:
        assert set(row["median_us"]) == {"eager", "torchscript", "onnxruntime loop", "onnxruntime scan", "onnxruntime fused"}
        assert row["speedup_vs_eager"]["eager"] == 1.0
        assert min(row["times_fastest"].values()) == 1.0
    scaling = small_result["loop_scaling"]
    assert scaling["ratio"] == pytest.approx(scaling["median_us"][1] / scaling["median_us"][0])
    [stream] = small_result["streaming"]
    assert set(stream["median_us_per_step"]) == {"eager cell", "torchscript stream", "onnxruntime stream"}
    assert "loop scaling" in format_table(small_result) and "streaming per step" in format_table(small_result)


@pytest.mark.slow
def test_bench_cli_json_and_plot(export_dir, tmp_path):
    png = tmp_path / "bench.png"
    proc = run_cli("bench", str(export_dir), "--budget", "0.01", "--json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {(r["input_size"], r["hidden_size"]) for r in result["rows"]} == {(8, 16), (64, 256)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
