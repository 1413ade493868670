"""The CLI end to end, through the real console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gru_deploy import __version__
from gru_deploy.manifest import read_manifest

from cli_helpers import EXPORT_FILES, run_cli


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gru-deploy: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_help_loads_neither_torch_nor_onnxruntime():
    code = ("import sys\nfrom gru_deploy.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "gru-deploy export" in proc.stdout


@pytest.mark.parametrize("command", ["train", "export", "verify", "infer", "bench", "package"])
def test_each_command_has_help_with_an_example(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and ("Example:" in proc.stdout or "Examples:" in proc.stdout)


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


def held_out_accuracy(checkpoint: Path, data: str, seed: int, test_fraction: float) -> float:
    """The checkpoint's accuracy on the test split `train --data` holds out, recomputed from its weights."""
    import torch

    from gru_deploy.data import load_data
    from gru_deploy.train import load_checkpoint

    test = load_data(data, seed=seed, test_fraction=test_fraction).test
    with torch.no_grad():
        logits = load_checkpoint(checkpoint).model().eval()(torch.from_numpy(test.x))
    return float(np.mean(logits.argmax(1).numpy() == test.y))


def test_train_export_verify_round_trip(tmp_path):
    ckpt = tmp_path / "c.pt"
    proc = run_cli("train", "--epochs", "2", "--out", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["checkpoint"] == str(ckpt) and ckpt.is_file()
    assert result["metrics"]["test_accuracy"] == held_out_accuracy(ckpt, "synthetic", seed=0, test_fraction=0.2)
    out = tmp_path / "exp"
    proc = run_cli("export", "--checkpoint", str(ckpt), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["parity"]["passed"] and summary["strategy"] == "loop"
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES
    assert read_manifest(out)["source_checkpoint"]["sha256"] == result["sha256"]
    assert_stages(summary["stage_seconds"], {"script", "forms", "parity", "float32 noise", "ORT conversion",
                                             "golden", "write"})
    proc = run_cli("verify", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    assert_stages(report["stage_seconds"], {"checksums", "load", "parity"})
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0 and "parity holds" in proc.stdout
    assert "time " in proc.stderr and " parity " in proc.stderr  # where the time went, for people too


def assert_stages(record, stages):
    """A run's stage_seconds: at least these stages, every number >= 0, and the stages and the
    rest adding up to the total (each second counted once)."""
    assert stages <= set(record["stages_s"]), record
    assert all(v >= 0 for v in record["stages_s"].values()) and record["other_s"] >= 0
    assert abs(sum(record["stages_s"].values()) + record["other_s"] - record["total_s"]) < 0.01, record


@pytest.mark.slow
def test_export_without_a_checkpoint_trains_the_default_model(tmp_path):
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "README.md").write_text("kept\n")
    proc = run_cli("export", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "training the default model" in proc.stderr
    assert re.search(r"time [0-9.]+ s: .*train [0-9.]+ s", proc.stderr)  # training counted as a stage
    manifest = read_manifest(tmp_path / "exported")
    assert manifest["metrics"]["test_accuracy"] >= 0.9
    assert (tmp_path / "exported" / "README.md").read_text() == "kept\n"  # foreign files survive


def test_failed_export_leaves_the_earlier_export_intact(export_copy, checkpoint_file):
    before = {p.name: p.read_bytes() for p in export_copy.iterdir()}
    # Zero tolerance: the parity gate fails after everything else was built.
    proc = run_cli("export", "--checkpoint", str(checkpoint_file), "--out", str(export_copy),
                   "--atol", "0", "--rtol", "0")
    assert_one_line_error(proc, 1, "parity failed")
    # A bad checkpoint fails before anything is built.
    proc = run_cli("export", "--checkpoint", str(export_copy / "parity.json"), "--out", str(export_copy))
    assert_one_line_error(proc, 2, "not a loadable")
    assert {p.name: p.read_bytes() for p in export_copy.iterdir()} == before
    assert not [p for p in export_copy.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_verify_exits_1_on_a_tampered_export(export_copy):
    (export_copy / "model.onnx").write_bytes((export_copy / "model.onnx").read_bytes() + b"\0")
    assert_one_line_error(run_cli("verify", str(export_copy)), 1, "sha256")


def _bad_npz(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 5, 8), np.float64), y=np.zeros(4, np.int64))
    return path


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["export", "--checkpoint", "missing.pt"], "checkpoint not found"),
        (["export", "--opset", "9"], "verified range"),
        (["export", "--atol", "-1"], "--atol"),
        (["export", "--bogus"], "No such option"),
        (["verify", "no-such-dir"], "no such folder"),
        (["verify", "."], "no manifest.json"),
        (["train", "--data", "nope"], "unknown data set"),
        (["train", "--data", "BAD_NPZ"], "float32"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--epochs", "many"], "not a valid integer"),
        (["train", "--hidden-size", "0"], "--hidden-size"),
        (["train", "--test-fraction", "1.5"], "test fraction"),
        (["frobnicate"], "No such command"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, fragment):
    args = [str(_bad_npz(tmp_path)) if a == "BAD_NPZ" else a for a in args]
    assert_one_line_error(run_cli(*args, cwd=tmp_path), 2, fragment)


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "export", "--checkpoint", "missing.pt", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_tutorial_state_dict_exports(tmp_path):
    """A plain state_dict saved by the tutorial's own code is a valid checkpoint."""
    import torch

    from gru_deploy.models.tutorial import GRUClassifier

    torch.manual_seed(5)
    path = tmp_path / "tutorial.pt"
    torch.save(GRUClassifier(8, 12, 3).state_dict(), path)
    proc = run_cli("export", "--checkpoint", str(path), "--out", str(tmp_path / "e"), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "e")
    assert manifest["config"] == {"input_size": 8, "hidden_size": 12, "output_size": 3,
                                  "labels": ["class_0", "class_1", "class_2"]}


def test_the_readme_cli_reference_names_every_option():
    """Every option of every command appears in README's CLI reference, on that command's lines."""
    import re

    from gru_deploy.cli import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## CLI reference", 1)[1].split("```", 2)[1]
    entries = re.split(r"\n(?=gru-deploy )", block)
    for name, command in cli.commands.items():
        [entry] = [e for e in entries if e.startswith(f"gru-deploy {name} ")]
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--") and opt != "--help":
                    assert opt in entry, f"README's CLI reference lacks {name} {opt}"
