"""The export folder for each strategy, auto's choice, and what a failed export leaves."""

from __future__ import annotations

import json

import pytest

from gru_deploy.errors import UserInputError
from gru_deploy.convert.graphs import count_ops
from gru_deploy.manifest import read_manifest
from gru_deploy.convert.folder import export_to_dir
from gru_deploy.convert.pipeline import time_strategies
from gru_deploy.check.module_parity import verify_export


def test_fused_export_verifies(tiny_checkpoint, tmp_path):
    manifest = export_to_dir(tiny_checkpoint, tmp_path / "fused", strategy="fused")
    assert manifest["strategy"] == "fused" and manifest["onnx"]["op_types"]["GRU"] == 1
    assert manifest["ir_version"] == 8 and manifest["auto"] is None
    assert (tmp_path / "fused" / "model.pt").is_file()  # TorchScript kept whatever the ONNX strategy
    # every variant in the chosen form: one GRU node, no Loop; the parity gate covered each
    for variant in ("stream", "lengths"):
        record = manifest["variants"][variant]
        assert record["strategy"] == "fused" and record["op_types"]["GRU"] == 1 and "Loop" not in record["op_types"]
        assert manifest["models"][record["onnx"]]["strategy"] == "fused"
    summary = manifest["parity"]["summary"]
    assert summary["stream:eager->onnxruntime[h_n]"]["passed"] and summary["lengths:float64->onnxruntime"]["passed"]
    assert summary["stream:one-pass->chunks:onnxruntime"]["passed"]
    # onnx's reference GRU ignores sequence_lens: that pair is not run for the lengths model, and it says so
    assert "lengths:eager->onnx-reference" not in summary and "stream:eager->onnx-reference" in summary
    assert any("sequence_lens" in note for note in manifest["parity"]["notes"])
    assert verify_export(tmp_path / "fused")


STRATEGY_OP = {"loop": "Loop", "fused": "GRU", "stepwise": "Loop"}


def test_auto_keeps_the_fastest_it_measured(tiny_checkpoint, tmp_path, monkeypatch):
    """auto's timings decide: the graph timed fastest is the one written, and the timings recorded."""
    import onnx

    from gru_deploy.convert import pipeline

    timed: dict[tuple[str, str], bytes] = {}
    # stepwise: not the first candidate; far apart: no re-timing
    medians = {"loop": 30.0, "fused": 20.0, "stepwise": 10.0}
    variant_medians = {"stream": {"loop": 5.0, "fused": 9.0, "stepwise": 12.0},
                       "lengths": {"loop": 50.0, "fused": 20.0, "stepwise": 60.0}}

    def fake_time_strategies(models, spec, typical, budget_s=0.5, variant="classifier"):
        assert tuple(typical) == (2, 30)
        for name, graph in models.items():  # each strategy's own graph is timed under its name
            assert STRATEGY_OP[name] in count_ops(onnx.load_from_string(graph).graph), name
            timed[(variant, name)] = graph
        chosen_from = medians if variant == "classifier" else variant_medians[variant]
        return {name: chosen_from[name] for name in models}

    monkeypatch.setattr(pipeline, "time_strategies", fake_time_strategies)
    manifest = export_to_dir(tiny_checkpoint, tmp_path / "auto", strategy="auto", typical=(2, 30))
    auto = manifest["auto"]
    assert auto["median_us"] == medians and auto["chosen"] == "stepwise" == manifest["strategy"]
    assert (tmp_path / "auto" / "model.onnx").read_bytes() == timed[("classifier", "stepwise")]
    assert (auto["typical_batch"], auto["typical_seq"]) == (2, 30)
    assert read_manifest(tmp_path / "auto")["auto"] == auto
    # each variant chose by its own timings, at its own workload, and wrote the graph it timed
    for variant, chosen in (("stream", "loop"), ("lengths", "fused")):
        record = manifest["variants"][variant]
        assert record["strategy"] == chosen == record["auto"]["chosen"] == manifest["models"][record["onnx"]]["strategy"]
        assert record["auto"]["median_us"] == variant_medians[variant]
        assert (tmp_path / "auto" / record["onnx"]).read_bytes() == timed[(variant, chosen)]
    assert manifest["variants"]["stream"]["auto"]["steps_per_call"] == 1


def test_time_strategies_times_each_graph_on_the_typical_input(tiny_checkpoint, monkeypatch):
    """Each name's median is taken of that name's graph, on a (batch, seq) input of the typical shape."""
    import numpy as np

    from gru_deploy.check import timing
    from cli_helpers import onnxruntime_outputs, tutorial_graph
    from gru_deploy.models.tutorial import load_weights

    spec = tiny_checkpoint.spec
    shifted = {**tiny_checkpoint.state_dict, "fc.bias": tiny_checkpoint.state_dict["fc.bias"] + 1.0}
    graphs = {"a": tutorial_graph(tiny_checkpoint.model(), spec, "fused").onnx_bytes,
              "b": tutorial_graph(load_weights(spec, shifted), spec, "fused").onnx_bytes}
    outputs = []

    def fake_median_us(fn, budget_s=1.0, min_runs=5, max_runs=1000):
        outputs.append(fn())
        return 10.04 * len(outputs)

    monkeypatch.setattr(timing, "median_us", fake_median_us)
    timings = time_strategies(graphs, spec.signature(), (3, 5), budget_s=0.05)
    assert timings == {"a": 10.0, "b": 20.1}  # the medians, rounded to 0.1 µs, in the order given
    x = np.random.default_rng(0).standard_normal((3, 5, spec.input_size)).astype(np.float32)
    for (name, graph), output in zip(graphs.items(), outputs):
        expected = onnxruntime_outputs(graph, {"x": x})
        [logits] = output  # the session's outputs, in the signature's order
        np.testing.assert_array_equal(logits, expected["logits"], err_msg=name)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"strategy": "scan"}, "unknown strategy"),
    ({"strategy": "auto", "typical": (0, 100)}, "typical"),
    ({"opset": 99}, "verified range"),
])
def test_bad_options_write_nothing(tiny_checkpoint, tmp_path, kwargs, fragment):
    with pytest.raises(UserInputError, match=fragment):
        export_to_dir(tiny_checkpoint, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_stepwise_export_projects_inside_the_loop_and_verifies(tiny_checkpoint, export_dir, tmp_path):
    """stepwise: every variant a Loop whose body computes the input projections (the loop form
    computes them once, before its Loop); the parity gate covered each."""
    import onnx

    from gru_deploy.convert.graphs import subgraphs

    manifest = export_to_dir(tiny_checkpoint, tmp_path / "stepwise", strategy="stepwise")
    loop_manifest = read_manifest(export_dir)
    for variant, record in [("classifier", manifest["models"]["model.onnx"]),
                            *((v, manifest["variants"][v]) for v in ("stream", "lengths"))]:
        onnx_name = "model.onnx" if variant == "classifier" else record["onnx"]
        assert manifest["models"][onnx_name]["strategy"] == "stepwise", variant

        def body_ops(folder):
            graph = onnx.load(str(folder / onnx_name)).graph
            [loop] = [n for n in graph.node if n.op_type == "Loop"]
            return count_ops(subgraphs(loop)[0])

        def matmuls(ops):
            return ops.get("MatMul", 0) + ops.get("Gemm", 0)

        assert matmuls(body_ops(tmp_path / "stepwise")) > matmuls(body_ops(export_dir)), variant
    assert manifest["strategy"] == "stepwise" and loop_manifest["strategy"] == "loop"
    assert manifest["parity"]["summary"]["stream:one-pass->chunks:onnxruntime"]["passed"]
    assert verify_export(tmp_path / "stepwise")


def test_auto_times_the_two_fastest_again_when_they_are_close():
    """Within 20%: the second, longer timing of the two decides, and both timings are recorded."""
    from gru_deploy.convert.pipeline import RETIME_BUDGET_S, TIMING_BUDGET_S, choose_fastest

    graphs = {"loop": b"L", "fused": b"F", "stepwise": b"S"}
    calls = []

    def timer(models, budget):
        calls.append((sorted(models), budget))
        return {"loop": 10.0, "fused": 11.5, "stepwise": 30.0} if len(calls) == 1 else {"loop": 12.0, "fused": 9.0}

    chosen, record = choose_fastest(graphs, timer)
    assert chosen == "fused" and record["chosen"] == "fused"
    assert calls == [(["fused", "loop", "stepwise"], TIMING_BUDGET_S), (["fused", "loop"], RETIME_BUDGET_S)]
    assert record["median_us"]["loop"] == 10.0 and record["retimed"]["median_us"] == {"loop": 12.0, "fused": 9.0}
    # far apart: one timing decides and nothing is timed again
    calls.clear()
    chosen, record = choose_fastest(graphs, lambda models, budget: (calls.append(1), {"loop": 10.0, "fused": 13.0,
                                                                                     "stepwise": 30.0})[1])
    assert chosen == "loop" and "retimed" not in record and len(calls) == 1


def test_inspect_shows_each_variants_form(tiny_checkpoint, tmp_path):
    from cli_helpers import run_cli

    export_to_dir(tiny_checkpoint, tmp_path / "fused", strategy="fused")
    proc = run_cli("inspect", str(tmp_path / "fused"), "--json")
    assert proc.returncode == 0, proc.stderr
    models = json.loads(proc.stdout)["models"]
    assert {n: (m["variant"], m.get("strategy")) for n, m in models.items() if m["format"] == "onnx"} == {
        "model.onnx": ("classifier", "fused"), "model_stream.onnx": ("stream", "fused"),
        "model_lengths.onnx": ("lengths", "fused"), "model_step.onnx": ("step", "fused")}
    text = run_cli("inspect", str(tmp_path / "fused")).stdout
    assert "model model_lengths.onnx: lengths (onnx, fp32, fused)" in text
