"""Parity: the export dir's report, the grid, the float64 check, and failures that are caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli_helpers import EXPORT_FILES

from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import atomic_write_json, read_manifest, sha256_file
from gru_deploy.check.runners import Runner
from gru_deploy.spec import ModelSpec
from gru_deploy.check.verify import (GRID_BATCHES, GRID_SEQS, VARIANT_CASES, export_runners, grid_cases, make_input,
                               run_parity, verify_export)


def test_export_dir_holds_its_files_and_a_complete_manifest(export_dir):
    names = sorted(p.name for p in export_dir.iterdir())
    assert names == EXPORT_FILES
    manifest = read_manifest(export_dir)
    assert manifest["strategy"] == "loop" and manifest["opset"] == 17 and manifest["ir_version"] >= 7
    assert manifest["signature"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", "seq", 8]}
    assert manifest["signature"]["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 4]}
    for name, entry in manifest["files"].items():
        assert sha256_file(export_dir / name) == entry["sha256"]
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "python", "numpy"}
    assert manifest["metrics"]["test_accuracy"] > 0 and manifest["source_checkpoint"]["sha256"]
    assert manifest["parity"]["passed"] is True


def test_parity_json_covers_the_whole_grid_and_every_pair(export_dir):
    report = json.loads((export_dir / "parity.json").read_text())
    cases = {(c["batch"], c["seq"]) for c in report["cases"]}
    assert cases >= {(b, s) for b in GRID_BATCHES for s in GRID_SEQS}
    assert set(report["summary"]) >= {"eager->torchscript", "eager->onnxruntime", "float64->onnxruntime",
                                      "eager->onnx-reference", "stream:eager->onnxruntime[h_n]",
                                      "stream:one-pass->chunks:onnxruntime[h_n]", "lengths:eager->onnxruntime"}
    for stats in report["summary"].values():
        assert stats["passed"] and stats["argmax_agreement"] == 1.0
        assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "p99_rel", "min_atol", "min_rtol"} <= set(stats)


def test_grid_inputs_have_both_signs_and_several_scales():
    x = make_input(64, 100, 8, seed=0)
    assert x.min() < 0 < x.max()
    scales = np.abs(x).max(axis=(1, 2))
    assert scales.max() / scales.min() > 50


def test_verify_export_passes(export_dir):
    assert verify_export(export_dir)


@pytest.mark.parametrize("seq", [1500, 2048])
def test_onnxruntime_matches_float64_up_to_2048_steps(export_dir, seq):
    runners = export_runners(export_dir, read_manifest(export_dir))
    x = {"x": make_input(4, seq, 8, seed=seq)}
    np.testing.assert_allclose(runners["onnxruntime"].run(x)["logits"], runners["float64"].run(x)["logits"],
                               atol=1e-5, rtol=0)


class Offset(Runner):
    """A runner that is wrong by a fixed amount on one class once seq reaches 7."""

    name = "offset"

    def __init__(self, inner: Runner, delta: float) -> None:
        super().__init__(inner.spec)
        self.inner, self.delta = inner, delta

    def _infer(self, feed):
        out = self.inner.run(feed)["logits"].copy()
        if feed["x"].shape[1] >= 7:
            out[:, 2] += self.delta
        return {"logits": out}


def test_a_wrong_runtime_fails_and_the_worst_case_is_named(export_dir):
    runners = export_runners(export_dir, read_manifest(export_dir))
    runners = {"eager": runners["eager"], "onnxruntime": Offset(runners["onnxruntime"], 1e-3)}
    report = run_parity(runners, ModelSpec(labels=read_manifest(export_dir)["labels"]), cases=[(1, 1), (3, 7)])
    assert not report
    [line] = report.failures()
    assert "eager->onnxruntime" in line and "batch=3 seq=7" in line
    assert report.summary()["eager->onnxruntime"]["min_atol"] == pytest.approx(1e-3, rel=1e-2)
    # The same runtime passes with a tolerance above its error.
    assert run_parity(runners, ModelSpec(), cases=[(3, 7)], atol=2e-3, rtol=0)


def test_verify_fails_on_a_model_that_computes_something_else(export_copy, tmp_path):
    """Swap in another model's ONNX (checksum updated): the checksums pass, parity must not."""
    import torch

    from gru_deploy.convert import script
    from gru_deploy.convert.graphs import export_loop
    from gru_deploy.models.tutorial import GRUClassifier

    torch.manual_seed(123)
    other = export_loop(script.torchscript(GRUClassifier().eval()), ModelSpec())
    (export_copy / "model.onnx").write_bytes(other.onnx_bytes)
    manifest = read_manifest(export_copy)
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(export_copy / "model.onnx"),
                                       "size": len(other.onnx_bytes)}
    atomic_write_json(export_copy / "manifest.json", manifest)
    report = verify_export(export_copy)
    assert not report
    assert not report.summary()["eager->onnxruntime"]["passed"]
    assert report.summary()["eager->torchscript"]["passed"]


def test_verify_refuses_a_tampered_file(export_copy):
    data = bytearray((export_copy / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (export_copy / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="sha256"):
        verify_export(export_copy)


@pytest.mark.parametrize("atol,rtol", [(-1, 1e-5), (1e-5, float("nan")), (float("inf"), 0)])
def test_bad_tolerances_are_user_errors(export_dir, atol, rtol):
    with pytest.raises(UserInputError):
        verify_export(export_dir, atol=atol, rtol=rtol)


def test_grid_is_the_documented_one():
    cases = grid_cases()
    assert (64, 1000) in cases and (1, 0) in cases and (2, 2048) in cases
    assert len(cases) == len(GRID_BATCHES) * len(GRID_SEQS) + 1


def test_missing_model_file_is_a_check_failure(export_copy):
    (export_copy / "model.onnx").unlink()
    with pytest.raises(CheckFailed, match="missing"):
        verify_export(export_copy)


def test_copy_of_an_export_still_verifies(export_dir, tmp_path):
    dest = tmp_path / "moved"
    shutil.copytree(export_dir, dest)
    assert verify_export(dest)


def test_verify_reports_progress_per_case(export_dir):
    """One message per parity case (the CLI shows them on stderr on a terminal; --quiet drops them)."""
    heard: list[str] = []
    report = verify_export(export_dir, on_case=heard.append)
    parity_cases = [c for c in report.cases if "chunk" not in c]
    case_lines = [m for m in heard if " case " in m]
    assert len(case_lines) == len(parity_cases) == len(grid_cases()) + 2 * len(VARIANT_CASES)
    assert case_lines[0] == f"classifier: case 1/{len(grid_cases())}: batch 1, seq 0"
    assert sum("chunks of" in m for m in heard) == 2


def test_an_ill_conditioned_case_widens_its_atol_by_float32s_own_error(export_dir):
    """Each case records float32's own error on its input (Monte Carlo arithmetic on the float64
    reference) and its atol is atol + NOISE_FACTOR x that; on well-conditioned inputs it is tiny."""
    from gru_deploy.check.verify import NOISE_FACTOR

    report = json.loads((export_dir / "parity.json").read_text())
    for case in report["cases"]:
        if "float32_noise" not in case:
            continue  # chunked streaming compares one runtime with itself
        for key, c in case["pairs"].items():
            out = "h_n" if key.endswith("[h_n]") else "logits"
            assert c["atol"] == pytest.approx(report["atol"] + NOISE_FACTOR * case["float32_noise"][out])
    noise = [v for case in report["cases"] for v in case.get("float32_noise", {}).values()]
    assert 0 < np.median(noise) < 1e-6


def test_float32_noise_grows_where_the_trajectory_amplifies_rounding():
    """A cell whose recurrent weights are large amplifies a rounding; one that forgets does not."""
    import torch

    from gru_deploy.models.tutorial import GRUClassifier, weights_numpy
    from gru_deploy.check.runners import Float64Runner

    torch.manual_seed(0)
    model = GRUClassifier()
    feed = {"x": make_input(2, 200, 8, seed=1)}
    quiet = Float64Runner(ModelSpec(), weights_numpy(model)).float32_noise(feed)["logits"]
    with torch.no_grad():
        for name in ("W_hz", "W_hr", "W_hh"):
            getattr(model.gru, name).weight.mul_(8.0)
    loud = Float64Runner(ModelSpec(), weights_numpy(model)).float32_noise(feed)["logits"]
    assert quiet < 1e-5 and loud > 10 * quiet
