"""Dynamic int8 quantisation (gru_deploy.bundle.quantize): the Loop body's hidden matmuls become int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gru_deploy.errors import CheckFailed
from gru_deploy.convert.graphs import count_ops
from gru_deploy.models.tutorial import GRUClassifier
from gru_deploy.bundle.quantize import MAX_IR_VERSION, quantize_int8, rewrite_for_quantization
from gru_deploy.convert.script import torchscript

from cli_helpers import tutorial_graph
from gru_deploy.spec import ModelSpec

# Max |int8 − fp32| on the logits of random N(0,1) inputs [4, 50, 8]. Measured: 0.014..0.017
# for the two-epoch checkpoint; a longer-trained model (the CLI's default export) measured
# 0.16..0.29 with logits spanning about ±7 — reduce_range (7-bit weights) and per-tensor uint8
# activations, repeated over 50 recurrent steps, grow with the weights' range.
MAX_ABS_ERROR = 0.1
MAX_RELATIVE_ERROR = 0.1  # of the largest |logit| in the batch


def session(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tiny_checkpoint) -> dict[str, bytes]:
    """The classifier and stream variants of the two-epoch checkpoint, as ONNX Loop graphs."""
    model = tiny_checkpoint.model()
    out = {}
    for variant in ("classifier", "stream"):
        out[variant] = tutorial_graph(model, tiny_checkpoint.spec, variant=variant).onnx_bytes
    return out


@pytest.fixture(scope="module")
def quantized(exported) -> dict[str, tuple[bytes, dict]]:
    return {variant: quantize_int8(data) for variant, data in exported.items()}


def feeds(variant: str, seeds=(0, 1, 2), batch: int = 4, seq: int = 50, hidden: int = 16):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        feed = {"x": rng.standard_normal((batch, seq, 8)).astype(np.float32)}
        if variant == "stream":
            feed["h0"] = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
        yield feed


def loop_body(model: onnx.ModelProto) -> onnx.GraphProto:
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    return loop.attribute[0].g


@pytest.mark.parametrize("variant", ["classifier", "stream"])
def test_rewrite_keeps_fp32_math(exported, variant):
    original = exported[variant]
    rewritten, sources, gemms = rewrite_for_quantization(onnx.load_from_string(original))
    onnx.checker.check_model(rewritten, full_check=True)
    assert gemms == 3  # two hidden matmuls in the body, the head outside
    assert "Gemm" not in count_ops(rewritten.graph)
    a, b = session(original), session(rewritten.SerializeToString())
    worst = max(float(np.abs(x - y).max()) for feed in feeds(variant)
                for x, y in zip(a.run(None, feed), b.run(None, feed)))
    print(f"\n{variant}: fp32 rewrite (Gemm -> MatMul) max abs diff {worst:.3g}")
    assert worst <= 1e-6


@pytest.mark.parametrize("variant", ["classifier", "stream"])
def test_int8_quantises_the_loop_body(quantized, variant):
    data, report = quantized[variant]
    model = onnx.load_from_string(data)
    body = loop_body(model)
    body_ops = count_ops(body)
    assert body_ops.get("MatMulInteger") == 2 and body_ops.get("DynamicQuantizeLinear") == 2, body_ops
    assert "Gemm" not in body_ops and "MatMul" not in body_ops
    top = {t.name: t for t in model.graph.initializer}
    for node in body.node:
        if node.op_type == "MatMulInteger":  # B: an int8 top-level initializer read from the outer scope
            assert top[node.input[1]].data_type == onnx.TensorProto.INT8
            assert list(top[node.input[1]].dims) in ([16, 32], [16, 16])  # [H, 2H] (z, r) and [H, H]
    assert report["weight_bytes_quantized_share"] > 0.5
    assert any(name.endswith("gru.W_hh.weight") for name in report["weights_quantized"])  # inner.: a hook's wrapper
    assert report["op_types"]["MatMulInteger"] == 5  # top: the hoisted input projections (z|r, h) and the head; body: two
    assert "Gemm" not in report["op_types"] and "MatMul" not in report["op_types"]
    assert model.ir_version <= MAX_IR_VERSION and report["ir_version"] == model.ir_version
    assert report["opset"]["ai.onnx"] == 17
    print(f"\n{variant}: share quantised {report['weight_bytes_quantized_share']:.3f} "
          f"({report['weight_bytes_quantized']} of {report['weight_bytes_fp32']} float weight bytes; "
          f"fp32 left: {report['weights_fp32']}), size {report['size_before']} -> {report['size_after']} bytes")


@pytest.mark.parametrize("variant", ["classifier", "stream"])
def test_int8_is_smaller_and_close(exported, quantized, variant):
    data, report = quantized[variant]
    assert report["size_before"] == len(exported[variant]) and report["size_after"] == len(data)
    assert report["size_after"] < report["size_before"]
    fp32, int8 = session(exported[variant]), session(data)
    errors, rel, agree, state_err = [], [], [], []
    for feed in feeds(variant):
        ref, got = fp32.run(None, feed), int8.run(None, feed)
        assert got[0].shape == (4, 4) and got[0].dtype == np.float32
        if variant == "stream":
            assert got[1].shape == (4, 16) and got[1].dtype == np.float32
            state_err.append(float(np.abs(got[1] - ref[1]).max()))
        errors.append(float(np.abs(got[0] - ref[0]).max()))
        rel.append(errors[-1] / float(np.abs(ref[0]).max()))
        agree.extend(got[0].argmax(1) == ref[0].argmax(1))
    agreement = float(np.mean(agree))
    extra = f", h_n max abs error {max(state_err):.3f}" if state_err else ""
    print(f"\n{variant}: int8 vs fp32 logits max abs error {max(errors):.3f} (relative {max(rel):.3f}), "
          f"argmax agreement {agreement:.3f} over {len(agree)} samples{extra}")
    assert max(errors) < MAX_ABS_ERROR and max(rel) < MAX_RELATIVE_ERROR
    assert agreement >= 0.9
    if variant == "stream":  # h_n lies in [-1, 1]; measured 0.014 on the two-epoch checkpoint
        assert max(state_err) < MAX_ABS_ERROR


def test_int8_agrees_on_the_test_split(exported, quantized):
    """Argmax agreement on the synthetic data's test split (real inputs, not noise)."""
    from gru_deploy.data import load_data

    x = load_data("synthetic", seed=0).test.x.astype(np.float32)
    ref = session(exported["classifier"]).run(None, {"x": x})[0]
    got = session(quantized["classifier"][0]).run(None, {"x": x})[0]
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    print(f"\ntest split ({len(x)} samples, seq {x.shape[1]}): argmax agreement {agreement:.4f}, "
          f"max abs error {float(np.abs(ref - got).max()):.3f}")
    assert agreement >= 0.9


def test_int8_file_shrinks_with_a_real_hidden_size():
    """At hidden 16 the graph's extra nodes eat most of the 4x on weights; at 128 the weights dominate."""
    import torch

    torch.manual_seed(0)
    spec = ModelSpec(hidden_size=128)
    model = GRUClassifier(spec.input_size, spec.hidden_size, spec.output_size).eval()
    data = tutorial_graph(model, spec).onnx_bytes
    out, report = quantize_int8(data)
    ratio = report["size_after"] / report["size_before"]
    print(f"\nhidden 128: share {report['weight_bytes_quantized_share']:.3f}, "
          f"size {report['size_before']} -> {report['size_after']} bytes ({ratio:.2f}x)")
    assert report["weight_bytes_quantized_share"] > 0.9
    assert ratio < 0.4


def test_nothing_to_quantise_is_refused():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(CheckFailed, match="left every weight in float"):
        quantize_int8(model.SerializeToString())


def test_sort_nodes_puts_a_loops_outer_scope_producer_first():
    """onnxruntime's quantiser sorts a graph without the tensors a Loop body reads from outside
    it; on the two-layer family's stream model it put such a producer after its Loop, and
    onnx.checker refused the model. sort_nodes orders by every read, outer-scope ones included,
    and leaves a sorted graph as it is."""
    from onnx import TensorProto, helper

    from gru_deploy.bundle.quantize import sort_nodes

    body = helper.make_graph(
        [helper.make_node("Add", ["h", "outer"], ["h_next"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [2])])
    produce = helper.make_node("Neg", ["x"], ["outer"])
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)
    graph = helper.make_graph([loop, produce], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                                     helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    sort_nodes(model.graph)
    assert [n.op_type for n in model.graph.node] == ["Neg", "Loop"]
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    sort_nodes(model.graph)
    assert model.SerializeToString() == before
