"""Your own module written with torch.while_loop (or scan), which TorchScript cannot compile and
torch.export keeps a loop: exported without TorchScript, its torch.export programs in
TorchScript's place (the PyTorch side of verify, the int8 gate and bench), its ONNX by the dynamo
exporter, proved by the same gate; packaged, verified and benchmarked from its files."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gru_deploy
from gru_deploy.check.module_parity import UserSignature, load_program, verify_export
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import atomic_write_json, file_entry, read_manifest


@pytest.fixture(scope="module")
def while_export(tmp_path_factory):
    from user_models import WhileLoopRNN

    torch.manual_seed(0)
    module = WhileLoopRNN().eval()
    out = tmp_path_factory.mktemp("program") / "while"
    return out, module, gru_deploy.export(module, out=out)


def test_a_while_loop_module_exports_without_torchscript_and_proves_its_files(while_export):
    out, module, manifest = while_export
    formats = {(info["variant"], info["format"]) for info in manifest["models"].values()}
    assert not any(fmt == "torchscript" for _, fmt in formats) and not list(out.glob("*.pt"))
    assert {("classifier", "torch-export"), ("stream", "torch-export"), ("classifier", "onnx")} <= formats
    assert manifest["model"]["recurrence"] == "while_loop" and manifest["onnx_exporter"] == "dynamo"
    assert "Loop" in manifest["onnx"]["op_types"] and any("TorchScript cannot compile" in n for n in manifest["notes"])
    summary = manifest["parity"]["summary"]
    for pair in ("float64->torch-export", "float64->onnxruntime", "stream:float64->torch-export"):
        assert summary[pair]["passed"] and summary[pair]["cases"] > 0
    x = torch.randn(3, 300, 4)  # a length and batch no example had
    program = load_program((out / "model.pt2").read_bytes(), "model.pt2")
    with torch.no_grad():
        np.testing.assert_allclose(program(x).numpy(), module(x).numpy(), atol=1e-5, rtol=1e-5)
    report = verify_export(out)
    assert report and {"torch-export->onnxruntime", "float64->onnxruntime"} <= set(report.summary())


def test_verify_fails_when_the_program_computes_something_else(while_export, tmp_path):
    """The program is verify's PyTorch side here: one built from scaled weights fails against the
    stored float64 answers and against the ONNX model."""
    from gru_deploy.convert.programs import build_program
    from user_models import WhileLoopRNN

    out, module, _ = while_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    scaled = WhileLoopRNN()
    scaled.load_state_dict({k: v * 1.05 for k, v in module.state_dict().items()})
    manifest = read_manifest(copy)
    data, _, _ = build_program(SimpleNamespace(module=scaled.eval(), reference="scaled", program=True), "classifier",
                               UserSignature(manifest["signature"]["inputs"], manifest["signature"]["outputs"]),
                               lambda message: None)
    (copy / "model.pt2").write_bytes(data)
    manifest["files"]["model.pt2"] = file_entry(copy / "model.pt2")
    atomic_write_json(copy / "manifest.json", manifest)
    failures = verify_export(copy).failures()
    assert any(f.startswith("float64->torch-export") for f in failures)
    assert any(f.startswith("torch-export->onnxruntime") for f in failures)


def test_its_bundles_and_bench_run_from_its_files(while_export, tmp_path):
    from gru_deploy.bench import bench
    from gru_deploy.bundle.package import package
    from gru_deploy.bundle.read import verify_bundle

    out, _, _ = while_export
    edge, _ = package(out, "edge", out=tmp_path / "edge", quantize="int8")
    gate = json.loads((edge / "manifest.json").read_text())["quantization"]["models"]["model.int8.onnx"][
        "gates_vs_eager"]["logits"]
    assert gate["reference"] == "model.pt2 (torch.export program, fp32)" and gate["passed"]
    server, _ = package(out, "server", out=tmp_path / "server")
    formats = {info["format"] for info in json.loads((server / "manifest.json").read_text())["models"].values()}
    assert "torchscript" not in formats and "onnx" in formats
    for bundle in (edge, server):
        assert verify_bundle(bundle)["passed"]
    result, table = bench(out, budget_s=0.02)
    assert {row["pytorch"] for row in result["rows"]} == {"torch-export"} and "torch.export program" in table


def test_verify_data_measures_accuracy_against_its_program(while_export, tmp_path):
    from gru_deploy.accuracy import deployment_accuracy

    out, module, _ = while_export
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 9, 4)).astype(np.float32)
    with torch.no_grad():
        y = module(torch.from_numpy(x)).argmax(1).numpy()  # labels the model gets right, so accuracy is 100%
    np.savez(tmp_path / "data.npz", x=x, y=y)
    result = deployment_accuracy(out, str(tmp_path / "data.npz"), test_fraction=0.5)
    assert result["reference"] == "torch-export"
    fp32 = {label: row for label, row in result["runtimes"].items() if "int8" not in label}
    assert set(fp32) == {"torch-export", "onnxruntime fp32 (loop, exported)"}
    for label, row in fp32.items():
        assert row["accuracy"] == 1.0 and row["agreement_with_torch-export"] == 1.0, label


def test_a_scan_module_lowers_to_executorch_and_what_cannot_be_built_is_refused(tmp_path):
    """scan: ExecuTorch lowers it (the classifier); while_loop is refused for ExecuTorch, scan for
    AOTInductor (a dynamic batch fails inside inductor), each before anything is written."""
    pytest.importorskip("executorch", reason="the executorch extra (the test extra installs it)")
    from user_models import ScanRNN, WhileLoopRNN

    torch.manual_seed(0)
    module = ScanRNN().eval()
    manifest = gru_deploy.export(module, out=tmp_path / "scan", targets=("executorch",), executorch_batch=2,
                                 executorch_max_seq=40)
    assert manifest["model"]["recurrence"] == "scan" and "Scan" in manifest["onnx"]["op_types"]
    ptes = {name: info for name, info in manifest["models"].items() if info["format"] == "executorch"}
    assert sorted(ptes) == ["model.portable.pte", "model.xnnpack.pte"]  # no one-step program of your own module
    assert manifest["parity"]["summary"]["float64->executorch-xnnpack"]["passed"]
    with pytest.raises(UserInputError, match="ExecuTorch does not lower torch.while_loop"):
        gru_deploy.export(WhileLoopRNN().eval(), out=tmp_path / "w", targets=("executorch",))
    with pytest.raises(UserInputError, match="AOTInductor cannot compile a scan"):
        gru_deploy.export(module, out=tmp_path / "a", targets=("aoti",))
    assert not (tmp_path / "w").exists() and not (tmp_path / "a").exists()
