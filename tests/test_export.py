"""ONNX export: a Loop over the dynamic seq axis, guards against unrolling, metadata, opsets."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from gru_deploy.convert import script
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.convert.graphs import (GUARD_LENGTHS, SUPPORTED_OPSETS, _export_once, check_not_unrolled, check_opset,
                               count_ops)
from gru_deploy.models.tutorial import GRUClassifier, tutorial_forward
from gru_deploy.spec import ModelSpec

from cli_helpers import onnxruntime_outputs, tutorial_graph


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GRUClassifier().eval()


@pytest.fixture(scope="module")
def exported(model):
    return tutorial_graph(model, ModelSpec(), metadata={"gru_deploy.config": ModelSpec().to_dict(), "note": "plain"})


def test_graph_has_a_loop_and_dynamic_batch_and_seq(exported):
    proto = onnx.load_from_string(exported.onnx_bytes)
    assert exported.op_types.get("Loop") == 1
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 8]
    out_dims = [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 4]
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["logits"]
    onnx.checker.check_model(proto, full_check=True)


def test_metadata_props_are_recorded(exported):
    props = {p.key: p.value for p in onnx.load_from_string(exported.onnx_bytes).metadata_props}
    assert json.loads(props["gru_deploy.config"])["hidden_size"] == 16
    assert props["note"] == "plain"


def test_loop_body_does_not_slice_the_whole_input(exported):
    """Time-major iteration: the body gathers one step; no Slice over [batch, seq, input]."""
    proto = onnx.load_from_string(exported.onnx_bytes)
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    body_ops = count_ops(body)
    # Two hidden projections per step (z|r merged, candidate); the input projections are hoisted.
    assert body_ops.get("MatMul", 0) + body_ops.get("Gemm", 0) == 2
    assert body_ops.get("Gather") == 2  # x_zr[t] and x_h[t]: one step each, no copy of the input
    assert "Shape" not in body_ops  # no per-step shape arithmetic


def test_traced_export_unrolls_and_the_guard_refuses_it(model):
    """Exporting the plain (unscripted) module traces it: the loop unrolls to the example length."""
    models = [onnx.load_from_string(_export_once(model, ModelSpec().signature(), 17, n)) for n in GUARD_LENGTHS]
    with pytest.raises(CheckFailed, match="unrolled"):
        check_not_unrolled(models)


def test_guard_refuses_a_graph_without_a_loop(exported):
    proto = onnx.load_from_string(exported.onnx_bytes)
    loop_free = onnx.ModelProto()
    loop_free.CopyFrom(proto)
    kept = [n for n in loop_free.graph.node if n.op_type != "Loop"]
    del loop_free.graph.node[:]
    loop_free.graph.node.extend(kept)
    with pytest.raises(CheckFailed, match="without a Loop"):
        check_not_unrolled([loop_free, loop_free])


@pytest.mark.parametrize("opset", [12, 21, -1])
def test_opsets_outside_the_verified_range_are_refused(opset):
    with pytest.raises(UserInputError, match="verified range"):
        check_opset(opset)


@pytest.mark.parametrize("opset", list(SUPPORTED_OPSETS))
def test_every_supported_opset_exports_and_matches_onnxruntime(model, opset):
    result = tutorial_graph(model, ModelSpec(), opset=opset)
    assert onnx.load_from_string(result.onnx_bytes).opset_import[0].version == opset
    for seq in (0, 1, 37):
        x = np.random.default_rng(seq).standard_normal((3, seq, 8)).astype(np.float32) * 4
        with torch.no_grad():
            expected = tutorial_forward(model, torch.from_numpy(x)).numpy()
        got = onnxruntime_outputs(result.onnx_bytes, {"x": x})["logits"]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


# --- fused -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fused(model):
    return tutorial_graph(model, ModelSpec(), "fused")


def test_fused_graph_is_one_gru_node_with_an_old_ir_version(fused):
    proto = onnx.load_from_string(fused.onnx_bytes)
    assert fused.op_types["GRU"] == 1 and "Loop" not in fused.op_types
    assert proto.ir_version == 8  # readable by onnxruntime 1.14+, not onnx.helper's newest default
    gru = next(n for g in (a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
               for n in g.node if n.op_type == "GRU")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gru.attribute}
    assert attrs["linear_before_reset"] == 0 and attrs["hidden_size"] == 16


@pytest.mark.parametrize("seq", [1, 7, 1500])
def test_fused_matches_float64_up_to_1500_steps(model, fused, seq):
    from gru_deploy.models.tutorial import weights_numpy
    from gru_deploy.check.runners import Float64Runner

    x = {"x": (np.random.default_rng(seq).standard_normal((3, seq, 8)) * 3).astype(np.float32)}
    got = onnxruntime_outputs(fused.onnx_bytes, x)["logits"]
    np.testing.assert_allclose(got, Float64Runner(ModelSpec(), weights_numpy(model)).run(x)["logits"], atol=1e-5)


def run_isolated(code: str, *args: str) -> Any:
    """Run `code` (it prints JSON) in a fresh Python: a kernel abort kills that process, not the tests."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # a kernel abort would be -6 (SIGABRT)
    return json.loads(proc.stdout)


def test_empty_inputs_never_reach_the_gru_kernel(fused, model, tmp_path):
    """Raw onnxruntime (not our runner) on the fused file: empty batch or time axis must not abort."""
    path = tmp_path / "fused.onnx"
    path.write_bytes(fused.onnx_bytes)
    code = (
        "import json, sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "print(json.dumps([s.run(None, {'x': np.zeros(shape, np.float32)})[0].tolist()\n"
        "                  for shape in [(3, 0, 8), (0, 5, 8), (0, 0, 8)]]))\n"
    )
    seq0, batch0, both0 = run_isolated(code, str(path))
    bias = model.fc.bias.detach().numpy()
    np.testing.assert_allclose(np.array(seq0), np.tile(bias, (3, 1)), atol=1e-6)  # h stays 0: fc(0) = bias
    assert batch0 == [] and both0 == []


def test_variants_answer_empty_inputs_and_zero_lengths_without_the_recurrence(model, tmp_path):
    """Raw onnxruntime on the fused stream and lengths files: empty axes and lengths of 0
    answer what the model means (stream: h_n = h0, fc(h0); lengths 0: fc(0)) and never abort
    (the GRU kernel aborts on an empty axis)."""
    import torch

    from gru_deploy.models.tutorial import tutorial_state

    for variant in ("stream", "lengths"):
        result = tutorial_graph(model, ModelSpec(), "fused", variant)
        assert result.strategy == "fused" and result.op_types["GRU"] == 1
        (tmp_path / f"{variant}.onnx").write_bytes(result.onnx_bytes)
    code = (
        "import json, sys, numpy as np, onnxruntime as ort\n"
        "def session(name): return ort.InferenceSession(sys.argv[1] + '/' + name, providers=['CPUExecutionProvider'])\n"
        "stream, lengths = session('stream.onnx'), session('lengths.onnx')\n"
        "h0 = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)\n"
        "out = {'stream_seq0': [a.tolist() for a in stream.run(None, {'x': np.zeros((3, 0, 8), np.float32), 'h0': h0})],\n"
        "       'stream_batch0': [a.tolist() for a in stream.run(None, {'x': np.zeros((0, 4, 8), np.float32),\n"
        "                                                                'h0': np.zeros((0, 16), np.float32)})],\n"
        "       'lengths_seq0': lengths.run(None, {'x': np.zeros((2, 0, 8), np.float32), 'lengths': np.zeros(2, np.int64)})[0].tolist(),\n"
        "       'lengths_batch0': lengths.run(None, {'x': np.zeros((0, 3, 8), np.float32), 'lengths': np.zeros(0, np.int64)})[0].tolist(),\n"
        "       'lengths_mixed': lengths.run(None, {'x': np.ones((3, 5, 8), np.float32), 'lengths': np.array([0, 5, 2])})[0].tolist()}\n"
        "print(json.dumps(out))\n"
    )
    out = run_isolated(code, str(tmp_path))
    h0 = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
    with torch.no_grad():
        fc_h0 = model.fc(torch.from_numpy(h0)).numpy()
        x = torch.ones(3, 5, 8)
        mixed = [model.fc(tutorial_state(model, x[b:b + 1, :n]))[0].numpy() for b, n in enumerate([0, 5, 2])]
    logits, h_n = out["stream_seq0"]
    np.testing.assert_allclose(np.array(logits), fc_h0, atol=1e-6)
    np.testing.assert_array_equal(np.array(h_n), h0)
    assert out["stream_batch0"] == [[], []] and out["lengths_batch0"] == []
    bias = model.fc.bias.detach().numpy()
    np.testing.assert_allclose(np.array(out["lengths_seq0"]), np.tile(bias, (2, 1)), atol=1e-6)
    np.testing.assert_allclose(np.array(out["lengths_mixed"]), np.stack(mixed), atol=1e-5)


def test_fused_mapping_negates_only_the_z_gate(model):
    from gru_deploy.convert.graphs import float32_arrays, tutorial_cell_gru_weights

    W, R, B = tutorial_cell_gru_weights(float32_arrays(model.state_dict()), "gru.")
    h = 16
    np.testing.assert_array_equal(W[:h], -model.gru.W_xz.weight.detach().numpy())
    np.testing.assert_array_equal(W[h:2 * h], model.gru.W_xr.weight.detach().numpy())
    np.testing.assert_array_equal(R[2 * h:], model.gru.W_hh.weight.detach().numpy())
    assert not B[3 * h:].any()  # recurrent biases are zero


@pytest.mark.parametrize("variant,inputs,outputs", [
    ("stream", {"x": ["batch", "seq", 8], "h0": ["batch", 16]}, {"logits": ["batch", 4], "h_n": ["batch", 16]}),
    ("lengths", {"x": ["batch", "seq", 8], "lengths": ["batch"]}, {"logits": ["batch", 4]}),
])
def test_variants_export_with_dynamic_dims(model, variant, inputs, outputs):
    result = tutorial_graph(model, ModelSpec(), variant=variant)
    proto = onnx.load_from_string(result.onnx_bytes)
    assert result.op_types.get("Loop") == 1

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    assert dims(proto.graph.input) == inputs and dims(proto.graph.output) == outputs



def test_plain_dynamo_export_of_the_for_loop_unrolls_and_the_guard_refuses_it(model):
    import warnings

    graphs = []
    for n in GUARD_LENGTHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphs.append(torch.onnx.export(model, (torch.zeros(2, n, 8),), dynamo=True, verbose=False).model_proto)
    with pytest.raises(CheckFailed, match="unrolled"):
        check_not_unrolled(graphs, needs=None)


@pytest.mark.parametrize("opset, ir", [(17, 8), (18, 8), (19, 9), (20, 9)])
def test_ir_version_follows_the_opset(opset, ir):
    """The lowest IR version that carries the opset (onnx's own table), for old runtimes and a valid model."""
    from gru_deploy.convert.graphs import min_ir_version

    assert min_ir_version(opset) == ir


@pytest.mark.slow
def test_fused_at_opset_19_carries_ir_9_and_passes_the_checker(model):
    """IR 8 with opset 19 is an invalid model."""
    for result in (tutorial_graph(model, ModelSpec(), "fused", opset=19),):
        proto = onnx.load_from_string(result.onnx_bytes)
        assert (result.opset, proto.ir_version) == (19, 9), result.strategy
        onnx.checker.check_model(proto, full_check=True)


def test_logger_levels_are_restored_when_an_export_fails(monkeypatch):
    """The ORT-format conversion quiets onnxruntime's logger while it runs, and puts it back in
    `finally`, also when the conversion raises."""
    import logging

    from onnxruntime.tools import convert_onnx_models_to_ort as tool

    from gru_deploy.convert.graphs import to_ort_format
    from gru_deploy.errors import WriteFailed

    noisy = logging.getLogger("ort_format_model.utils")
    noisy.setLevel(logging.INFO)

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(tool, "convert_onnx_models_to_ort", broken)
    with pytest.raises(WriteFailed, match="conversion failed"):
        to_ort_format({"m.onnx": b"x"})
    assert noisy.level == logging.INFO


@pytest.mark.parametrize("layers, normalized", [(1, False), (3, True)])
def test_the_one_step_model_is_gru_nodes_and_the_head_and_computes_a_stream_step(layers, normalized):
    """model_step.onnx: one GRU node per layer, the head, and for a stack only the state's split
    and concat: nothing around them (no Transpose, Gather, Unsqueeze or If); normalisation folded
    into the first layer's weights. It computes the module's stream step from any state."""
    import onnxruntime as ort

    from gru_deploy.convert.families import build_step
    from gru_deploy.models.families import StackedGRUClassifier

    torch.manual_seed(1)
    module = (GRUClassifier() if layers == 1 else
              StackedGRUClassifier(8, 16, 4, layers=layers, normalization=((0.5,) * 8, (2.0,) * 8))).eval()
    from gru_deploy.convert.graphs import without_empty_guard

    step = build_step(module, "logits", 17)
    assert [n.op_type for n in step.graph.node] == ["Shape", "Gather", "Equal", "If"]  # the empty-batch guard
    work = onnx.load_from_string(without_empty_guard(step.SerializeToString()))  # what Stream.step runs
    assert count_ops(work.graph) == {"GRU": layers, "Squeeze": 1, "Gemm": 1,
                                     **({"Split": 1, "Concat": 1} if layers > 1 else {})}
    session = ort.InferenceSession(step.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = 3
    h0 = torch.rand(module.initial_state(batch).shape) * 2 - 1
    x = torch.randn(batch, 1, 8) * 3
    with torch.no_grad():
        want_logits, want_h = module.forward_stream(x, h0)
    state = h0.numpy().reshape(batch, layers, 16).transpose(1, 0, 2).copy()
    logits, h_n = session.run(None, {"x": x.numpy().reshape(1, batch, 8), "h0": state})
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(h_n.transpose(1, 0, 2).reshape(want_h.shape), want_h.numpy(), atol=1e-5, rtol=0)
    # an empty batch never reaches the kernel, which would abort the process (run apart, to survive one)
    probe = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.stdin.buffer.read(), "
             "providers=['CPUExecutionProvider']); logits, h_n = s.run(None, {'x': np.zeros((1, 0, 8), np.float32), "
             f"'h0': np.zeros(({layers}, 0, 16), np.float32)}}); print(logits.shape, h_n.shape)")
    proc = subprocess.run([sys.executable, "-c", probe], input=step.SerializeToString(), capture_output=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.decode().split() == ["(0,", "4)", f"({layers},", "0,", "16)"], \
        proc.stderr.decode()[-300:]


def test_an_export_whose_one_step_model_computes_something_else_writes_nothing(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    from gru_deploy.convert import graphs
    from gru_deploy.convert.folder import export_to_dir

    real = graphs.step_graph
    monkeypatch.setattr(graphs, "step_graph", lambda layers, w, b, *args, **kw: real(layers, w, b + 0.01, *args, **kw))
    with pytest.raises(CheckFailed, match="one-step model's parity failed.*step:float64->onnxruntime-step"):
        export_to_dir(tiny_checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()
