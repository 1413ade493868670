"""`--onnx-exporter dynamo`: the loop form's ONNX graphs written by torch.onnx's dynamo exporter
from the control-flow form (its while_loop an ONNX Loop), proved by the same gate, verified,
weighed by auto; refused for a model without a control-flow form."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import gru_deploy
from cli_helpers import run_cli
from gru_deploy.check.module_parity import verify_export
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import read_manifest


@pytest.fixture(scope="module")
def exports(checkpoint_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamo")
    gru_deploy.export(checkpoint=checkpoint_file, out=root / "tutorial", onnx_exporter="dynamo")
    return root, None


def test_the_dynamo_exporters_loop_graphs_pass_the_gate_and_verify(exports):
    root, _ = exports
    folder = root / "tutorial"
    manifest = read_manifest(folder)
    assert manifest["onnx_exporter"] == "dynamo" and manifest["strategy"] == "loop"
    for name in ("model.onnx", "model_lengths.onnx", "model_stream.onnx"):
        model = onnx.load(str(folder / name))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["gru_deploy.onnx_exporter"] == "dynamo"
        assert "Loop" in {n.op_type for n in model.graph.node}
        assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]
    summary = manifest["parity"]["summary"]
    assert all(summary[k]["passed"] for k in ("float64->onnxruntime", "lengths:float64->onnxruntime",
                                              "stream:float64->onnxruntime"))
    assert verify_export(folder)
    # a batch and a length no example had: the Loop runs over the input's own length
    x = np.random.default_rng(3).standard_normal((5, 300, 8)).astype(np.float32)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(folder / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": x})[0], scripted(torch.from_numpy(x)).numpy(),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tutorial", "torch-gru"])
def test_auto_weighs_the_dynamo_loop_beside_the_other_forms(family):
    """Under auto, a 2-layer family's candidates are the dynamo exporter's loop, fused and
    stepwise (torch.nn.GRU's: the dynamo loop and the TorchScript exporter's GRU nodes), for the
    classifier and each variant (export_model then checks and times each)."""
    from gru_deploy.check.recurrence import check_recurrence
    from gru_deploy.convert.pipeline import declared_variants, discover_signature, script_user, variant_candidates
    from gru_deploy.models.families import build_family
    from gru_deploy.models.user import UserModel

    torch.manual_seed(0)
    model = UserModel(build_family(family, {"input_size": 3, "hidden_size": 5, "output_size": 2, "layers": 2}).eval(),
                      family, None)
    scripted = script_user(model)
    kept = check_recurrence(scripted, model.reference)
    signatures, _ = declared_variants(model, scripted, discover_signature(model.module, 3, model.reference))
    for variant, sig in signatures.items():
        candidates = variant_candidates(model, scripted, kept, variant, sig, 17, "auto", {}, lambda m: None, "auto",
                                        "dynamo")
        assert set(candidates) == ({"loop", "fused", "stepwise"} if family == "tutorial" else {"loop", "fused"})
        assert candidates["loop"].graph["exporter"] == "dynamo" and "Loop" in candidates["loop"].graph["op_types"]
        assert "GRU" in candidates["fused"].graph["op_types"]
        if family == "tutorial":
            assert "exporter" not in candidates["stepwise"].graph  # the TorchScript exporter's


def test_dynamo_is_refused_where_no_control_flow_form_exists(tmp_path):
    from user_models import TwoHeads

    with pytest.raises(UserInputError, match="--onnx-exporter torchscript"):
        gru_deploy.export(TwoHeads().eval(), out=tmp_path / "user", onnx_exporter="dynamo")
    assert not (tmp_path / "user").exists()
    proc = run_cli("export", "--onnx-exporter", "jit", "--out", str(tmp_path / "cli"))
    assert proc.returncode == 2 and "jit" in proc.stderr and not (tmp_path / "cli").exists()
