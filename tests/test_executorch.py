"""`--targets executorch`: ExecuTorch programs (.pte) of the classifier (its loop a scan, a
static batch, seq bounded) and of the stream's one step, for the portable kernels and XNNPACK,
proved on the grid at export and by verify, run by ExecuTorch's runtime; their bounds are
recorded and enforced (ExecuTorch itself answers a batch it was not built for wrongly)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gru_deploy
from gru_deploy.check.module_parity import UserSignature, case_feed, executorch_runner, verify_export
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import atomic_write_json, file_entry, read_manifest

pytest.importorskip("executorch", reason="the executorch extra (the test extra installs it)")


@pytest.fixture(scope="module")
def programs(checkpoint_file, tiny_checkpoint, tmp_path_factory):
    """The tutorial classifier (batch 1, seq up to 2048) and a 2-layer family model (batch 2,
    seq up to 64), each exported with its ExecuTorch programs."""
    from gru_deploy.models.families import StackedGRUClassifier

    root = tmp_path_factory.mktemp("executorch")
    gru_deploy.export(checkpoint=checkpoint_file, out=root / "tutorial", targets=("executorch",))
    torch.manual_seed(0)
    family = StackedGRUClassifier(3, 5, 2, layers=2).eval()
    gru_deploy.export(family, out=root / "family", targets=("executorch",), executorch_batch=2,
                      executorch_max_seq=64)
    return {"tutorial": (root / "tutorial", tiny_checkpoint.model().eval(), 1, 2048),
            "family": (root / "family", family, 2, 64)}


def listed(manifest):
    return {name: info for name, info in manifest["models"].items() if info["format"] == "executorch"}


def signature_of(manifest, variant):
    raw = manifest["signature"] if variant == "classifier" else manifest["variants"][variant]["signature"]
    return UserSignature(raw["inputs"], raw["outputs"])


@pytest.mark.parametrize("kind", ["tutorial", "family"])
def test_export_writes_the_programs_with_their_bounds_and_verify_reruns_them(programs, kind):
    folder, _, batch, max_seq = programs[kind]
    manifest = read_manifest(folder)
    found = listed(manifest)
    assert sorted(found) == ["model.portable.pte", "model.xnnpack.pte", "model_step.portable.pte",
                             "model_step.xnnpack.pte"]
    for name, info in found.items():
        assert info["batch"] == batch
        assert info["seq"] == ([1, max_seq] if info["variant"] == "classifier" else [1, 1])
    summary = manifest["parity"]["summary"]
    for backend in ("portable", "xnnpack"):
        assert summary[f"float64->executorch-{backend}"]["cases"] > 0
        assert summary[f"stream:float64->executorch-{backend}"]["cases"] > 0
    report = verify_export(folder)
    assert report and "torchscript->executorch-xnnpack" in report.summary()


def test_verify_fails_on_a_program_that_computes_something_else(programs, tmp_path):
    from gru_deploy.convert.programs import build_executorch
    from gru_deploy.models.families import StackedGRUClassifier

    folder, module, batch, max_seq = programs["family"]
    copy = tmp_path / "family"
    shutil.copytree(folder, copy)
    scaled = StackedGRUClassifier(3, 5, 2, layers=2)
    scaled.load_state_dict({k: v * 1.01 for k, v in module.state_dict().items()})
    manifest = read_manifest(copy)
    lowered = build_executorch(SimpleNamespace(module=scaled.eval(), reference="scaled"), "classifier",
                               signature_of(manifest, "classifier"), batch, max_seq, lambda message: None)
    name, data, _ = next(item for item in lowered if item[0] == "model.xnnpack.pte")
    (copy / name).write_bytes(data)
    manifest["files"][name] = file_entry(copy / name)
    atomic_write_json(copy / "manifest.json", manifest)
    report = verify_export(copy)
    assert not report
    assert report.failures() and all("->executorch-xnnpack" in f for f in report.failures())


def test_a_batch_or_length_the_program_was_not_built_for_never_answers_wrongly(programs):
    """ExecuTorch's own runtime, fed a batch the program was not built for, answers without an
    error (or fails); gru-deploy's runner never lets that answer out: a seq beyond the bound is a
    UserInputError, another batch runs in calls of the recorded one and matches the module."""
    from executorch.runtime import Runtime

    folder, module, batch, max_seq = programs["family"]
    manifest = read_manifest(folder)
    data = (folder / "model.portable.pte").read_bytes()
    raw = Runtime.get().load_program(data).load_method("forward")
    x1 = torch.randn(1, 7, 3)
    try:
        rows = raw.execute([x1])[0].shape[0]
    except RuntimeError:
        rows = None  # a loud failure is fine too; a wrong answer is the trap
    assert rows != 1, "ExecuTorch now answers another batch correctly: the runner's batching may be dropped"
    signature = signature_of(manifest, "classifier")
    runner = executorch_runner(data, signature, "model.portable.pte", manifest["models"]["model.portable.pte"])
    for rows_in in (1, 3):
        feed = case_feed(signature, rows_in, 7)
        with torch.no_grad():
            want = module(torch.from_numpy(feed["x"])).numpy()
        np.testing.assert_allclose(runner.run(feed)["logits"], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserInputError, match=f"1 to {max_seq} steps"):
        runner.run(case_feed(signature, 2, max_seq + 1))
    step = executorch_runner((folder / "model_step.xnnpack.pte").read_bytes(), signature_of(manifest, "stream"),
                             "model_step.xnnpack.pte", manifest["models"]["model_step.xnnpack.pte"])
    with pytest.raises(UserInputError, match="1 to 1 steps"):
        step.run(case_feed(signature_of(manifest, "stream"), 2, 2))


def test_the_runner_keeps_its_program_alive(programs, tmp_path):
    """A method whose program was collected read freed memory and crashed the process (seen in
    bench: a segmentation fault): the runner, collected around, still answers. In a subprocess,
    so that a crash fails this test alone."""
    import subprocess
    import sys

    folder, _, _, _ = programs["family"]
    code = (
        "import gc\n"
        "from pathlib import Path\n"
        "from gru_deploy.check.module_parity import UserSignature, case_feed, executorch_runner\n"
        "from gru_deploy.manifest import read_manifest\n"
        f"folder = Path({str(folder)!r})\n"
        "manifest = read_manifest(folder)\n"
        "sig = UserSignature(manifest['signature']['inputs'], manifest['signature']['outputs'])\n"
        "runners = [executorch_runner((folder / n).read_bytes(), sig, n, manifest['models'][n])\n"
        "           for n in ('model.portable.pte', 'model.xnnpack.pte')]\n"
        "junk = [bytes(1 << 16) for _ in range(200)]\n"
        "del junk\n"
        "gc.collect()\n"
        "for _ in range(20):\n"
        "    for runner in runners:\n"
        "        out = runner.run(case_feed(sig, 3, 9))\n"
        "print(out['logits'].shape)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "(3, 2)" in proc.stdout, proc.stderr[-2000:]


def test_an_edge_bundle_carries_the_programs_and_runs_their_golden_cases(programs, tmp_path):
    """The edge bundle lists each .pte with its bounds; verify runs the golden cases within them in
    ExecuTorch's runtime, the stream case through the one-step program a step per call (its state
    carried, as an app steps it), and lists a case outside a program's bounds as not run, never
    as passed."""
    import json

    from gru_deploy.bundle.package import package
    from gru_deploy.bundle.read import verify_bundle

    folder, _, batch, max_seq = programs["tutorial"]
    bundle, _ = package(folder, "edge", out=tmp_path / "edge")
    models = json.loads((bundle / "manifest.json").read_text())["models"]
    found = {n: i for n, i in models.items() if i["format"] == "executorch"}
    assert sorted(found) == ["model.portable.pte", "model.xnnpack.pte", "model_step.portable.pte",
                             "model_step.xnnpack.pte"]
    assert found["model.xnnpack.pte"]["seq"] == [1, max_seq] and found["model.xnnpack.pte"]["batch"] == batch
    report = verify_bundle(bundle)
    ran = [c for c in report["checks"] if c["check"].startswith("golden") and ".pte" in c["check"]]
    assert report["passed"] and ran and all(c["passed"] for c in ran)
    assert {c["check"] for c in ran if "model.portable.pte" in c["check"]}
    stepped = {c["check"] for c in ran if "model_step" in c["check"]}
    assert len(stepped) == 4  # logits and h_n, each backend
    assert not [n for n in report["not_run"] if "model_step" in n["check"]]
    # a case beyond the classifier's bound is listed, not run
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"]["model.portable.pte"]["seq"] = [1, 5]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    outside = [n for n in verify_bundle(bundle)["not_run"] if "model.portable.pte" in n["check"]]
    assert outside and all("outside" in n["why"] for n in outside)


def test_a_bidirectional_torch_gru_lowers_its_scans_and_runs_right():
    """torch.nn.GRU's cell and the backward direction (a scan over the flipped steps) in the
    classifier's program, for both backends: proved at export, and run by the runner at a
    length and batch no example had against the module."""
    from gru_deploy.check.module_parity import executorch_runner
    from gru_deploy.convert.pipeline import discover_signature
    from gru_deploy.convert.programs import build_executorch
    from gru_deploy.models.families import TorchGRUClassifier

    torch.manual_seed(0)
    module = TorchGRUClassifier(3, 5, 2, layers=2, bidirectional=True).eval()
    signature = discover_signature(module, 3, "torch-gru")
    lowered = build_executorch(SimpleNamespace(module=module, reference="torch-gru"), "classifier", signature, 2, 40,
                               lambda message: None)
    assert [name for name, _, _ in lowered] == ["model.portable.pte", "model.xnnpack.pte"]
    x = torch.randn(3, 40, 3)
    with torch.no_grad():
        want = module(x).numpy()
    for name, data, record in lowered:
        run = executorch_runner(data, signature, name, record)
        np.testing.assert_allclose(run.run({"x": x.numpy()})["logits"], want, atol=1e-5, rtol=1e-5)
