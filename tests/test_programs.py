"""`--targets torch-export,aoti`: a torch.export program per variant, its loop a
torch.while_loop, and an AOTInductor package of the classifier's, each proved on the variant's
grid at export and again by verify, the package carried by server bundles; refused for models
without a control-flow form, and for a program that lost its loop. (The C++ loader of the
package: tests/test_examples_cpp.py.)"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gru_deploy
from cli_helpers import run_cli
from gru_deploy.check.module_parity import UserSignature, load_program, verify_export
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import atomic_write_json, file_entry, read_manifest

TARGETS = ("torch-export", "aoti")


@pytest.fixture(scope="module")
def programs(checkpoint_file, tiny_checkpoint, tmp_path_factory):
    """The tutorial classifier and a 2-layer family model, each exported with its programs."""
    from gru_deploy.models.families import StackedGRUClassifier

    root = tmp_path_factory.mktemp("programs")
    gru_deploy.export(checkpoint=checkpoint_file, out=root / "tutorial", targets=TARGETS)
    torch.manual_seed(0)
    family = StackedGRUClassifier(3, 5, 2, layers=2).eval()
    gru_deploy.export(family, out=root / "family", targets=TARGETS)
    return {"tutorial": (root / "tutorial", tiny_checkpoint.model().eval()), "family": (root / "family", family)}


def listed_programs(manifest, fmt="torch-export"):
    return {info["variant"]: (name, info) for name, info in manifest["models"].items() if info["format"] == fmt}


@pytest.mark.parametrize("kind", ["tutorial", "family"])
def test_export_writes_a_program_per_variant_with_its_loop_and_proves_it(programs, kind):
    folder, module = programs[kind]
    manifest = read_manifest(folder)
    found = listed_programs(manifest)
    assert sorted(found) == ["classifier", "lengths", "stream"]
    summary = manifest["parity"]["summary"]
    for variant, (name, info) in found.items():
        assert (folder / name).is_file() and info["while_loops"] >= 1
        assert info["bounds"] == {"batch": [0, None], "seq": [0, None]}
        prefix = "" if variant == "classifier" else f"{variant}:"
        assert summary[f"{prefix}float64->torch-export"]["cases"] > 0
    aoti = listed_programs(manifest, "aoti")
    assert sorted(aoti) == ["classifier"] and aoti["classifier"][1]["program"] == found["classifier"][0]
    assert aoti["classifier"][1]["cpu_isa"] and summary["float64->aoti"]["cases"] > 0
    # a length and batch no example had, against the module itself: the loop is a loop
    x = torch.randn(5, 300, module.layers[0].fw.input_size if kind == "family" else 8)
    for name, fmt in ((found["classifier"][0], "torch-export"), (aoti["classifier"][0], "aoti")):
        program = load_program((folder / name).read_bytes(), name, fmt)
        with torch.no_grad():
            np.testing.assert_allclose(program(x).numpy(), module(x).numpy(), atol=1e-5, rtol=1e-5)
    stream = load_program((folder / found["stream"][0]).read_bytes(), "model_stream.pt2")
    h0 = module.initial_state(5) + 0.5
    with torch.no_grad():
        for got, want in zip(stream(x[:, :7], h0), module.forward_stream(x[:, :7], h0)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


def scaled_program(folder, module, variant, name, fmt="torch-export"):
    """The variant's program (or its AOTInductor package) rebuilt from weights scaled by 1.01,
    written over `name`, its checksum updated in the manifest: the checksums pass, parity must not."""
    from gru_deploy.convert.programs import build_aoti, build_program

    manifest = read_manifest(folder)
    sig = manifest["signature"] if variant == "classifier" else manifest["variants"][variant]["signature"]
    scaled = type(module)(*module_args(module))
    scaled.load_state_dict({k: v * 1.01 for k, v in module.state_dict().items()})
    data, _, program = build_program(SimpleNamespace(module=scaled.eval(), reference="scaled"), variant,
                                     UserSignature(sig["inputs"], sig["outputs"]), lambda message: None)
    if fmt == "aoti":
        data, _ = build_aoti(program, variant, lambda message: None)
    (folder / name).write_bytes(data)
    manifest["files"][name] = file_entry(folder / name)
    atomic_write_json(folder / "manifest.json", manifest)


def module_args(module):
    if hasattr(module, "layers"):
        return module.layers[0].fw.input_size, module.hidden_size, module.fc.out_features, len(module.layers)
    return module.gru.input_size, module.hidden_size, module.fc.out_features


@pytest.mark.parametrize("kind", ["tutorial", "family"])
def test_verify_reruns_the_programs_and_fails_on_one_that_computes_something_else(programs, kind, tmp_path):
    folder, module = programs[kind]
    report = verify_export(folder)
    assert report and {"torchscript->torch-export", "torchscript->aoti"} <= set(report.summary())
    copy = tmp_path / kind
    shutil.copytree(folder, copy)
    variant, fmt = ("lengths", "torch-export") if kind == "family" else ("classifier", "aoti")
    scaled_program(copy, module, variant, listed_programs(read_manifest(copy), fmt)[variant][0], fmt)
    report = verify_export(copy)
    assert not report
    prefix = "" if variant == "classifier" else f"{variant}:"
    assert any(f.startswith(f"{prefix}float64->{fmt}") for f in report.failures())
    assert all(f"->{fmt}" in f for f in report.failures())


def test_a_server_bundle_carries_the_aoti_package_and_runs_its_golden_cases_when_trusted(programs, tmp_path):
    from gru_deploy.bundle.package import package
    from gru_deploy.bundle.read import verify_bundle

    folder, _ = programs["tutorial"]
    bundle, _ = package(folder, "server", out=tmp_path / "server")
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {n: i for n, i in manifest["models"].items() if i["format"] == "aoti"}
    assert list(listed) == ["aoti/model.aoti.pt2"] and (bundle / "aoti/model.aoti.pt2").is_file()
    assert not (bundle / "model_repository" / "aoti").exists()  # not a Triton model
    untrusted = verify_bundle(bundle)
    assert untrusted["passed"] and any("aoti/model.aoti.pt2" in n["check"] for n in untrusted["not_run"])
    trusted = verify_bundle(bundle, trust_torchscript=True)
    ran = [c for c in trusted["checks"] if "on aoti/model.aoti.pt2" in c["check"]]
    assert trusted["passed"] and ran and all(c["passed"] for c in ran)


def test_targets_are_refused_where_no_control_flow_form_exists(tmp_path):
    from user_models import TwoHeads

    with pytest.raises(UserInputError, match="torch.while_loop"):
        gru_deploy.export(TwoHeads().eval(), out=tmp_path / "user", targets=TARGETS)
    assert not (tmp_path / "user").exists()
    proc = run_cli("export", "--targets", "onnx-dynamo", "--out", str(tmp_path / "cli"))
    assert proc.returncode == 2 and "unknown target 'onnx-dynamo'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()


def test_a_program_whose_loop_was_unrolled_is_refused(tmp_path, monkeypatch):
    """torch.while_loop replaced by a Python loop (what torch.export would unroll): the export
    fails and writes nothing."""
    from gru_deploy.models.families import StackedGRUClassifier

    def unrolled(cond, body, carried):
        while cond(*carried):
            carried = body(*carried)
        return carried
    monkeypatch.setattr(torch, "while_loop", unrolled)
    torch.manual_seed(0)
    with pytest.raises(CheckFailed, match="torch.export|while_loop"):
        gru_deploy.export(StackedGRUClassifier(3, 5, 2, layers=1).eval(), out=tmp_path / "out", targets=TARGETS)
    assert not (tmp_path / "out").exists()


def test_bench_times_the_targets_beside_the_onnx_model_in_one_run(programs):
    from gru_deploy.bench import format_targets, time_targets

    folder, _ = programs["tutorial"]
    rows = time_targets(folder, read_manifest(folder), budget_s=0.02)
    assert [(r["model"], r["batch"], r["seq"]) for r in rows] == [("classifier", 1, 100), ("classifier", 32, 100),
                                                                   ("stream", 1, 1)]
    for r in rows:
        assert r["onnxruntime_us"] > 0 and r["torch-export_us"] > 0
        assert r["torch-export_vs_onnxruntime"] == round(r["torch-export_us"] / r["onnxruntime_us"], 2)
    assert all(r["aoti_us"] > 0 for r in rows[:2]) and "aoti_us" not in rows[2]  # the stream has no package
    assert "AOTInductor" in format_targets(rows)


def family_models():
    from gru_deploy.models.families import StackedGRUClassifier, TorchGRUClassifier

    torch.manual_seed(0)
    return {"tutorial-cell bidirectional, 2 layers": StackedGRUClassifier(3, 5, 2, layers=2, bidirectional=True),
            "torch.nn.GRU bidirectional, 2 layers": TorchGRUClassifier(3, 5, 2, layers=2, bidirectional=True),
            "torch.nn.GRU, 1 layer": TorchGRUClassifier(3, 5, 2, layers=1),
            "tutorial-cell, 1 layer": StackedGRUClassifier(3, 5, 2, layers=1)}


@pytest.mark.parametrize("name", list(family_models()))
def test_the_control_flow_form_computes_what_each_family_computes(name):
    """Each cell (the tutorial's, torch.nn.GRU's), each direction, 1 and 2 layers: every variant
    of the form against the module, lengths 0 and 1 included (torch.nn.GRU's family counts 0 as 1)."""
    from gru_deploy.models.control_flow import control_flow_form

    module = family_models()[name].eval()
    form = control_flow_form(module)
    x, lengths = torch.randn(4, 7, 3), torch.tensor([7, 3, 1, 0])
    pairs = [(form(x), module(x)), (form.forward_lengths(x, lengths), module.forward_lengths(x, lengths)),
             (form.forward_scan(x), module(x))]
    state = module.initial_state(4)
    if state is not None:
        h0 = torch.rand_like(state) - 0.5
        pairs += list(zip(form.forward_stream(x, h0), module.forward_stream(x, h0)))
        pairs += list(zip(form.forward_one_step(x[:, :1], h0), module.forward_stream(x[:, :1], h0)))
    with torch.no_grad():
        for got, want in pairs:
            np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["torch.nn.GRU, 1 layer", "tutorial-cell bidirectional, 2 layers"])
def test_torch_gru_and_bidirectional_families_export_their_programs(name, tmp_path):
    """torch.export (which unrolls torch.nn.GRU) gets each family's control-flow form: programs for
    every variant the model declares, proved at export, and right at a length no example had;
    torch.nn.GRU's loop form by the dynamo exporter too."""
    module = family_models()[name].eval()
    dynamo = name.startswith("torch.nn.GRU")
    manifest = gru_deploy.export(module, out=tmp_path / "out", targets=("torch-export",),
                                 onnx_exporter="dynamo" if dynamo else "torchscript")
    found = listed_programs(manifest)
    assert sorted(found) == (["classifier", "lengths", "stream"] if dynamo else ["classifier", "lengths"])
    summary = manifest["parity"]["summary"]
    for variant in found:
        prefix = "" if variant == "classifier" else f"{variant}:"
        assert summary[f"{prefix}float64->torch-export"]["passed"]
    if dynamo:
        assert manifest["onnx_exporter"] == "dynamo" and "Loop" in manifest["onnx"]["op_types"]
    x = torch.randn(3, 300, 3)
    program = load_program((tmp_path / "out" / found["classifier"][0]).read_bytes(), "model.pt2")
    with torch.no_grad():
        np.testing.assert_allclose(program(x).numpy(), module(x).numpy(), atol=1e-5, rtol=1e-5)
