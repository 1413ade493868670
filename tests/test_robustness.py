"""Fault injection: kill -9 mid-write, a full disk, hostile ONNX files, random inputs through every runner.

Each case ends with the documented exit code, no signal death and nothing half-written
(see docs/robustness.md).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import gru_deploy_exe, run_cli
from gru_deploy.manifest import recover_interrupted_runs, read_manifest, sha256_file
from gru_deploy.check.module_parity import verify_export


def _spawn(*args, preexec=None):
    return subprocess.Popen([gru_deploy_exe(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)


def _other_checkpoint(tmp_path):
    import torch

    from gru_deploy.models.tutorial import GRUClassifier

    torch.manual_seed(99)
    path = tmp_path / "other.pt"
    torch.save(GRUClassifier().state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_during_export_leaves_old_or_new_complete(export_copy, tmp_path, seed):
    old_sha = read_manifest(export_copy)["source_checkpoint"]["sha256"]
    other = _other_checkpoint(tmp_path)
    proc = _spawn("export", "--checkpoint", str(other), "--out", str(export_copy), "-q")
    time.sleep(random.Random(seed).uniform(0.5, 5.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recover_interrupted_runs(export_copy)  # what the next export does first (the swap window: see below)
    manifest = read_manifest(export_copy)
    assert manifest["source_checkpoint"]["sha256"] in (old_sha, sha256_file(other))
    assert verify_export(export_copy)  # complete: every checksum and the parity gate
    rerun = run_cli("export", "--checkpoint", str(other), "--out", str(export_copy), "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert read_manifest(export_copy)["source_checkpoint"]["sha256"] == sha256_file(other)


# Runs `gru-deploy ARGS...` with staged_dir's os.replace wrapped: right after the rename that
# opens POINT of the folder swap, the process SIGKILLs itself. Only the manifest module's view
# of `os` changes, so every other rename is the real one.
SWAP_KILLER = """
import os, signal, sys, types
from pathlib import Path

from gru_deploy import manifest
from gru_deploy.cli import main

target, point = Path(sys.argv[1]).absolute(), sys.argv[2]
real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    src, dst = Path(src).absolute(), Path(dst).absolute()
    old_aside = dst.name == target.name and dst.parent.name.startswith(f".{target.name}.old-")
    new_in = dst == target and src.name.startswith(f".{target.name}.staging-")
    if (point == "old-aside" and old_aside) or (point == "new-in" and new_in):
        os.kill(os.getpid(), signal.SIGKILL)


manifest.os = types.SimpleNamespace(**{**vars(os), "replace": replace})
main(sys.argv[3:])
"""


class SwapLeftovers(AssertionError):
    """Hidden folders of an interrupted swap that the next run left beside the export."""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["old-aside", "new-in"])
def test_kill_9_inside_the_folder_swap_is_repaired_by_the_next_run(export_copy, tmp_path, point):
    """kill -9 exactly inside the folder swap (old moved aside, new not in; new in, old not deleted):
    the next export finds the old export (or the new one) whole in place, and nothing else beside it."""
    from gru_deploy.manifest import check_files

    old_sha = read_manifest(export_copy)["source_checkpoint"]["sha256"]
    other = _other_checkpoint(tmp_path)
    killed = subprocess.run([sys.executable, "-c", SWAP_KILLER, str(export_copy), point,
                             "export", "--checkpoint", str(other), "--out", str(export_copy), "-q"],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died inside the swap, not before
    if point == "old-aside":
        assert not export_copy.exists()  # the window: no export in place until the next run
    else:
        assert read_manifest(export_copy)["source_checkpoint"]["sha256"] == sha256_file(other)
    # The next run: staged_dir repairs the swap first, then this export fails its parity gate
    # (zero tolerances), so what it leaves in place is what the repair put there.
    rerun = run_cli("export", "--checkpoint", str(other), "--out", str(export_copy), "--atol", "0", "--rtol", "0")
    assert rerun.returncode == 1 and "parity failed" in rerun.stderr, rerun.stderr
    expected = old_sha if point == "old-aside" else sha256_file(other)
    manifest = read_manifest(export_copy)
    assert manifest["source_checkpoint"]["sha256"] == expected
    check_files(export_copy, manifest)  # complete: every listed file, every checksum
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{export_copy.name}."))
    if leftovers:
        raise SwapLeftovers(f"left beside {export_copy.name}: {leftovers}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_during_package_leaves_nothing_half_written(export_dir, tmp_path, seed):
    out = tmp_path / "edge.tar.gz"
    proc = _spawn("package", str(export_dir), "--target", "edge", "--archive", "--out", str(out), "-q")
    time.sleep(random.Random(seed).uniform(0.3, 2.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # the archive is renamed into place whole, or not at all
        assert run_cli("verify", str(out)).returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name != out.name and not p.name.startswith(".")]
    rerun = run_cli("package", str(export_dir), "--target", "edge", "--archive", "--out", str(out), "--force")
    assert rerun.returncode == 0 and run_cli("verify", str(out)).returncode == 0


@pytest.mark.parametrize("limit", [20_000, 60_000])
def test_full_disk_is_exit_1_and_changes_nothing(export_copy, checkpoint_file, limit):
    before = {p.name: p.read_bytes() for p in export_copy.iterdir()}

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _spawn("export", "--checkpoint", str(checkpoint_file), "--out", str(export_copy), "-q", preexec=small_files)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and ("File too large" in lines[0] or "could not write" in lines[0])
    assert "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in export_copy.iterdir()} == before
    assert not [p for p in export_copy.parent.iterdir() if p.name.startswith(".")]  # no temp files left


# --- hostile ONNX files in a bundle ----------------------------------------------------------

def _onnx_with(kind):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    if kind == "unknown op":
        nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0),
                 helper.make_node("Softmax", ["m"], ["logits"])]
        graph = helper.make_graph(nodes, "g", [x], [y])
    elif kind == "unknown op in a sub-graph":
        inner = helper.make_graph([helper.make_node("Softmax", ["x"], ["s"])], "body", [],
                                  [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)])
        nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
                 helper.make_node("If", ["c"], ["logits"], then_branch=inner, else_branch=inner)]
        graph = helper.make_graph(nodes, "g", [x], [y])
    elif kind == "custom domain op":
        nodes = [helper.make_node("Gemm", ["x"], ["logits"], domain="com.evil")]
        graph = helper.make_graph(nodes, "g", [x], [y])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.evil", 1)],
                                 ir_version=8).SerializeToString()
    elif kind == "wrong input name":
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "seq", 8])
        nodes = [helper.make_node("Transpose", ["z"], ["t"], perm=[1, 0, 2]),
                 helper.make_node("Gather", ["t", "i"], ["logits"], axis=0)]
        index = numpy_helper.from_array(np.array(0, np.int64), "i")
        graph = helper.make_graph(nodes, "g", [z], [y], [index])
    else:  # external data
        weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
        weight.data_location = TensorProto.EXTERNAL
        del weight.external_data[:]
        entry = weight.external_data.add()
        entry.key, entry.value = "location", "../../etc/passwd"
        weight.ClearField("raw_data")
        nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0),
                 helper.make_node("MatMul", ["m", "w"], ["logits"])]
        graph = helper.make_graph(nodes, "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _no_nodes(data):
    import onnx

    model = onnx.load_from_string(data)
    del model.graph.node[:]
    return model.SerializeToString()


@pytest.mark.parametrize("kind,fragment", [
    ("empty", "empty"), ("garbage", "not an ONNX model"), ("truncated", "not an ONNX model|failed on golden"),
    ("no nodes", "no graph nodes"), ("unknown op", "not ones gru-deploy writes"),
    ("unknown op in a sub-graph", "not ones gru-deploy writes"), ("custom domain op", "not ones gru-deploy writes|"
                                                                  "cannot load|runs standard ONNX ops only"),
    ("external data", "external data"), ("wrong input name", "does not fit|failed on golden|cannot load"),
    ("the stream model as the classifier", "does not fit|failed on golden"),
])
def test_hostile_onnx_in_a_bundle_is_refused_before_loading(export_dir, tmp_path, kind, fragment):
    from gru_deploy.bundle.read import verify_bundle
    from gru_deploy.bundle.package import package

    root, _ = package(export_dir, "edge", out=tmp_path / "edge")
    original = (root / "model.onnx").read_bytes()
    raw = {"empty": b"", "garbage": b"\x08\x07garbage", "truncated": original[: len(original) // 2],
           "no nodes": _no_nodes(original), "the stream model as the classifier": (root / "model_stream.onnx").read_bytes()}
    data = raw[kind] if kind in raw else _onnx_with(kind)
    (root / "model.onnx").write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(root / "model.onnx"), "size": len(data)}
    (root / "manifest.json").write_text(json.dumps(manifest))  # checksums updated: only the guard can catch it
    report = verify_bundle(root)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not report["passed"] and failed, report
    assert re.search(fragment, failed[0]["message"]) and "model.onnx" in failed[0]["message"], failed[0]


# --- random shapes and values through every runner, in a subprocess ---------------------------

FUZZ = r'''
import sys, numpy as np
from hypothesis import given, settings, strategies as st, HealthCheck
from gru_deploy.errors import UserInputError
from gru_deploy.serve.infer import infer

folders = sys.argv[1:]  # an export in the loop form, one in the fused form
calls = []
for folder in folders:
    calls += [(folder, "classifier"), (folder, "stream"), (folder, "lengths")]
values = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 3.4e38, np.nan, np.inf, -np.inf, 1e-30])
outcomes = {"ok": 0, "refused": 0}

@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(0, 3), seq=st.integers(0, 5), channels=st.sampled_from([8, 0, 7]),
       fill=values, dtype=st.sampled_from(["float32", "float64", "int64"]), rank=st.sampled_from([3, 2, 4]),
       lengths=st.integers(-2, 7), h=st.integers(0, 17))
def check(batch, seq, channels, fill, dtype, rank, lengths, h):
    shape = [(batch, seq, channels), (batch, seq), (batch, seq, channels, 1)][[3, 2, 4].index(rank)]
    x = np.full(shape, fill).astype(dtype) if dtype != "int64" or np.isfinite(fill) else np.zeros(shape, dtype)
    for folder, variant in calls:
        options = {}
        if variant == "stream":
            options["h0"] = np.zeros((batch, h), np.float32)
        if variant == "lengths":
            options["lengths"] = np.full(batch, lengths, np.int64)
        try:
            infer(folder, x, **options)
            outcomes["ok"] += 1
        except UserInputError:
            outcomes["refused"] += 1

check()
import json
print(json.dumps(outcomes))
'''


@pytest.mark.slow
def test_random_inputs_never_kill_the_process(export_dir, checkpoint_file, tmp_path):
    """Random shapes and values through infer (the path every runtime call takes) on a loop and
    a fused export, every variant, in a subprocess: each is answered or refused, none kills it."""
    import gru_deploy

    fused = tmp_path / "fused"
    gru_deploy.export(checkpoint=checkpoint_file, out=fused, strategy="fused")
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(export_dir), str(fused)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by signal {-proc.returncode})\n" \
                                 f"{proc.stderr[-2000:]}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


def test_recovery_puts_back_a_folder_moved_aside(export_copy):
    """The one window of the folder swap: old moved aside, new not yet in. The next run restores it."""
    from gru_deploy.manifest import staged_dir

    backup = export_copy.parent / f".{export_copy.name}.old-test"
    backup.mkdir()
    os.replace(export_copy, backup / export_copy.name)
    with pytest.raises(RuntimeError):
        with staged_dir(export_copy):
            raise RuntimeError("fail after the restore")
    assert verify_export(export_copy) and not backup.exists()
    shutil.rmtree(backup, ignore_errors=True)


def test_recovery_restores_the_newest_backup_and_leaves_live_runs_alone(tmp_path):
    """A stale backup left by an older crash must not win over the folder moved aside last; a
    concurrent run's staging folder (its process alive) is not touched."""
    target = tmp_path / "out"
    for name, content, when in (("old-999999991-a", "stale", 1_000), ("old-999999992-z", "newest", 2_000)):
        (tmp_path / f".out.{name}" / "out").mkdir(parents=True)
        (tmp_path / f".out.{name}" / "out" / "v").write_text(content)
        os.utime(tmp_path / f".out.{name}", (when, when))
    live = tmp_path / f".out.staging-{os.getpid()}-x"
    live.mkdir()
    dead = tmp_path / ".out.staging-999999993-y"
    dead.mkdir()
    recover_interrupted_runs(target)
    assert (target / "v").read_text() == "newest"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


@pytest.mark.slow
def test_ctrl_c_during_export_exits_130_and_keeps_the_old_export(export_copy, tmp_path):
    before = {p.name: p.read_bytes() for p in export_copy.iterdir()}
    # A terminal's Ctrl-C reaches a foreground process whose SIGINT is the default; a test run
    # started in the background (`cmd &` in a script) passes SIGINT on ignored, so reset it.
    proc = _spawn("export", "--checkpoint", str(_other_checkpoint(tmp_path)), "--out", str(export_copy), "-q",
                  preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupt while the new export is being written and checked: its staging folder exists
    # (a fixed sleep raced a fast machine, where the export had finished by then).
    deadline = time.monotonic() + 120
    while not list(export_copy.parent.glob(f".{export_copy.name}.staging-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["gru-deploy: interrupted"]
    assert {p.name: p.read_bytes() for p in export_copy.iterdir()} == before
