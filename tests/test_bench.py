"""The benchmark harness: structure and ratios (never wall-clock thresholds)."""

from __future__ import annotations

import json
import re

import pytest

from gru_deploy.bench import format_table, median_us, run_bench

from cli_helpers import run_cli


def test_median_us_is_the_median_of_the_timed_runs_within_the_budget(monkeypatch):
    """On a fake clock where the k-th call takes k ms: 3 warm-ups, one estimate, then as many
    runs as fit in the budget (clamped to min/max runs), and the median of those runs."""
    from gru_deploy.check import timing

    clock = {"now": 0.0, "calls": 0}

    def fn():
        clock["calls"] += 1
        clock["now"] += clock["calls"] * 1e-3

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    value = median_us(fn, budget_s=0.05, min_runs=5, max_runs=20)
    # the estimate is call 4 (4 ms): 0.05 / 0.004 = 12 runs, calls 5..16, median 10.5 ms
    assert clock["calls"] == 16 and value == pytest.approx(10_500)
    clock.update(now=0.0, calls=0)
    assert median_us(fn, budget_s=10.0, min_runs=5, max_runs=7) == pytest.approx(8_000) and clock["calls"] == 11


FORMS = ("loop", "stepwise", "fused")


@pytest.fixture(scope="module")
def small_result(tiny_checkpoint):
    from gru_deploy.models.user import UserModel

    model = UserModel(tiny_checkpoint.model(), "gru_deploy.models.tutorial:GRUClassifier", None)
    return run_bench(model, budget_s=0.01, large=False)


def test_bench_measures_every_runtime_on_every_shape(small_result):
    shapes = [(r["batch"], r["seq"]) for r in small_result["rows"]]
    assert shapes == [(1, 1), (1, 100), (32, 100), (1, 1000), (256, 200)]
    for row in small_result["rows"]:
        assert set(row["median_us"]) == {"eager", "torchscript", "onnxruntime loop", "onnxruntime stepwise",
                                         "onnxruntime fused"}
    [stream] = small_result["streaming"]
    assert set(stream["median_us_per_step"]) == {
        "eager step", "torchscript stream", "one GRU node, io_binding", "onnxruntime step model, run()",
        *(f"onnxruntime stream {form}, run()" for form in FORMS), *(f"Stream API, {form}" for form in FORMS)}
    assert [(r["batch"], r["seq"]) for r in small_result["lengths"]] == [(1, 100), (32, 100)]


def test_bench_ratios_are_taken_against_a_reference_measured_in_the_same_run(small_result):
    """Every ratio has its reference among the same row's medians, where it is exactly 1: a
    ratio is never against a number from another run."""
    for row in small_result["rows"]:
        assert row["speedup_vs_eager"]["eager"] == 1 and min(row["times_fastest"].values()) == 1
    for stream in small_result["streaming"]:
        assert stream["speedup_vs_eager"]["eager step"] == 1 and stream["vs_one_gru_node"][
            "one GRU node, io_binding"] == 1 and stream["vs_loop_stream_run"]["onnxruntime stream loop, run()"] == 1
    for row in small_result["lengths"]:
        assert set(row["median_us"]) == {f"onnxruntime lengths {form}" for form in FORMS}
        assert row["vs_loop"]["onnxruntime lengths loop"] == 1


def _numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def test_bench_table_shows_what_was_measured(small_result):
    """Each row of the table holds that row's medians and speed-ups, under its column's name."""
    lines = format_table(small_result).splitlines()
    header = re.split(r"\s{2,}", lines[1].strip())
    assert header[:2] == ["I/H", "batch, seq"]
    names = header[2:]
    assert sorted(names) == sorted(small_result["rows"][0]["median_us"])
    table_rows = lines[2:2 + len(small_result["rows"])]
    for row, line in zip(small_result["rows"], table_rows):
        label = re.match(r"\s*(\d+)/(\d+)\s+(\d+), (\d+)\s", line)
        assert label, line
        assert [int(n) for n in label.groups()] == [row["input_size"], row["hidden_size"], row["batch"], row["seq"]]
        shown = _numbers(line[label.end():])
        assert len(shown) == 2 * len(names), line
        for i, name in enumerate(names):
            assert shown[2 * i] == pytest.approx(row["median_us"][name], abs=0.501), (name, line)
            assert shown[2 * i + 1] == pytest.approx(row["speedup_vs_eager"][name], abs=0.051), (name, line)
    scaling = small_result["loop_scaling"]
    [scaling_line] = [line for line in lines if line.startswith("loop scaling")]
    assert _numbers(scaling_line) == pytest.approx(
        [scaling["batch"], scaling["seq"][0], scaling["median_us"][0], scaling["seq"][1], scaling["median_us"][1],
         scaling["ratio"], 2.0, scaling["linear_below"]], abs=0.5)
    assert f"ratio {scaling['ratio']:.2f}" in scaling_line
    assert scaling["linear"] == (scaling["ratio"] < scaling["linear_below"])
    assert ("NOT LINEAR" in scaling_line) != scaling["linear"]
    stream_lines = [line for line in lines if line.startswith("streaming per step")]
    assert len(stream_lines) == len(small_result["streaming"])
    for stream, line in zip(small_result["streaming"], stream_lines):
        for name, value in stream["median_us_per_step"].items():
            assert f"{name} {value:,.1f} µs ({stream['speedup_vs_eager'][name]:.1f}x)" in line


@pytest.mark.slow
def test_bench_cli_json_and_plot(export_dir, tmp_path):
    png = tmp_path / "bench.png"
    proc = run_cli("bench", str(export_dir), "--budget", "0.01", "--json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {(r["input_size"], r["hidden_size"]) for r in result["rows"]} == {(8, 16), (64, 256)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
