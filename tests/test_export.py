"""ONNX export: a Loop over the dynamic seq axis, guards against unrolling, metadata, opsets."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gru_deploy import script
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.export import (GUARD_LENGTHS, SUPPORTED_OPSETS, _export_once, check_not_unrolled, check_opset,
                               count_ops, export_loop)
from gru_deploy.model import GRUClassifier, tutorial_forward
from gru_deploy.runners import OnnxRuntimeRunner
from gru_deploy.spec import ModelSpec


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GRUClassifier().eval()


@pytest.fixture(scope="module")
def exported(model):
    return export_loop(script.torchscript(model), ModelSpec(), metadata={"gru_deploy.config": ModelSpec().to_dict(),
                                                                         "note": "plain"})


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
    models = [onnx.load_from_string(_export_once(model, ModelSpec(), 17, n)) for n in GUARD_LENGTHS]
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
    result = export_loop(script.torchscript(model), ModelSpec(), opset)
    assert onnx.load_from_string(result.onnx_bytes).opset_import[0].version == opset
    runner = OnnxRuntimeRunner(ModelSpec(), result.onnx_bytes)
    for seq in (0, 1, 37):
        x = np.random.default_rng(seq).standard_normal((3, seq, 8)).astype(np.float32) * 4
        with torch.no_grad():
            expected = tutorial_forward(model, torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(runner.run({"x": x})["logits"], expected, atol=1e-5, rtol=1e-5)
