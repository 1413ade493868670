"""Parity: the export dir's report, the grid, the float64 check, and failures that are caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli_helpers import EXPORT_FILES, run_cli, small_grid, tutorial_runners

from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import atomic_write_json, read_manifest, sha256_file, variant_record
from gru_deploy.spec import ModelSpec
from gru_deploy.check.grid import make_input
from gru_deploy.check.module_parity import (GRID_BATCHES, GRID_SEQS, WIDE_GRID, Grid, UserSignature, scaled_feed,
                                            verify_export)

from conftest import KINDS


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
                                      "eager->onnx-reference", "float64->onnxruntime-ort",
                                      "stream:eager->onnxruntime[h_n]", "stream:float64->onnxruntime-ort[h_n]",
                                      "stream:one-pass->chunks:onnxruntime[h_n]", "lengths:eager->onnxruntime",
                                      "lengths:float64 alone->float64 padded"}
    for stats in report["summary"].values():
        assert stats["passed"] and stats["argmax_agreement"] == 1.0
        assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "p99_rel", "min_atol", "min_rtol"} <= set(stats)


def test_grid_inputs_have_both_signs_and_several_scales():
    x = make_input(64, 100, 8, seed=0)
    assert x.min() < 0 < x.max()
    scales = np.abs(x).max(axis=(1, 2))
    assert scales.max() / scales.min() > 50


@pytest.mark.parametrize("seq", [1500, 2048])
def test_onnxruntime_matches_float64_up_to_2048_steps(export_dir, seq):
    runners = tutorial_runners(export_dir)
    x = {"x": make_input(4, seq, 8, seed=seq)}
    np.testing.assert_allclose(runners["onnxruntime"].run(x)["logits"], runners["float64"].run(x)["logits"],
                               atol=1e-5, rtol=0)


class Offset:
    """A runner that is wrong by a fixed amount on one class once seq reaches 7."""

    name = "offset"

    def __init__(self, inner, delta: float) -> None:
        self.inner, self.delta = inner, delta

    def run(self, feed):
        out = self.inner.run(feed)["logits"].copy()
        if feed["x"].shape[1] >= 7:
            out[:, 2] += self.delta
        return {"logits": out}


def test_a_wrong_runtime_fails_and_the_worst_case_is_named(export_dir):
    runners = tutorial_runners(export_dir)
    runners = {"eager": runners["eager"], "onnxruntime": Offset(runners["onnxruntime"], 1e-3)}
    report = small_grid(runners, export_dir, [(1, 1), (3, 7)])
    assert not report
    [line] = report.failures()
    assert "eager->onnxruntime" in line and "batch=3 seq=7" in line
    assert report.summary()["eager->onnxruntime"]["min_atol"] == pytest.approx(1e-3, rel=1e-2)
    # The same runtime passes with a tolerance above its error.
    assert small_grid(runners, export_dir, [(3, 7)], atol=2e-3, rtol=0)


@pytest.mark.parametrize("atol,rtol", [(-1, 1e-5), (1e-5, float("nan")), (float("inf"), 0)])
def test_bad_tolerances_are_user_errors(export_dir, atol, rtol):
    with pytest.raises(UserInputError):
        verify_export(export_dir, atol=atol, rtol=rtol)


def test_grid_is_the_documented_one():
    cases = WIDE_GRID.cases["classifier"]
    assert (64, 1000) in cases and (1, 0) in cases and (2, 2048) in cases
    assert len(cases) == len(GRID_BATCHES) * len(GRID_SEQS) + 1


# --- verify, one path for every model: the tutorial classifier, a family's model, your own ----


@pytest.fixture()
def kind_copy(every_kind, kind, tmp_path):
    """A private copy of that kind's export, free to corrupt."""
    folder = tmp_path / kind
    shutil.copytree(every_kind[kind][0], folder)
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_verify_passes_from_the_files_alone(every_kind, kind):
    """TorchScript against every ONNX runtime, each against the stored float64 answers, every
    variant the export has under its prefix, the chunked stream in the runtimes where it streams."""
    folder = every_kind[kind][0]
    manifest = read_manifest(folder)
    report = verify_export(folder)
    assert report.passed and not any(key.startswith("eager") for key in report.summary())
    for variant in ("classifier", *(manifest.get("variants") or {})):
        prefix = "" if variant == "classifier" else f"{variant}:"
        assert any(key.startswith(f"{prefix}float64->onnxruntime") for key in report.summary())
        assert any(key.startswith(f"{prefix}torchscript->onnxruntime-ort") for key in report.summary())
    assert any(key.startswith("stream:one-pass->chunks:onnxruntime") for key in report.summary()) == \
        ("stream" in (manifest.get("variants") or {}))
    # the one-step model of a one-direction tutorial-cell model (not your own module's), with the stream
    assert bool(variant_record(manifest, "step")) == (kind != "user")
    assert ({"step:float64->onnxruntime-step", "step:torchscript->onnxruntime-step[h_n]"} <= set(report.summary())) \
        == (kind != "user")


@pytest.mark.parametrize("kind", KINDS)
def test_verify_reports_progress_per_case_of_the_grid_the_export_recorded(every_kind, kind):
    """One message per parity case (the CLI shows them on stderr on a terminal; --quiet drops
    them), as many as the grid the manifest records, in order."""
    folder = every_kind[kind][0]
    grid = Grid.from_record(read_manifest(folder)["reference"], str(folder))
    heard: list[str] = []
    report = verify_export(folder, on_case=heard.append)
    case_lines = [m for m in heard if " case " in m]
    variants = ("classifier", *(read_manifest(folder).get("variants") or {}))
    one_step = [c for c in grid.cases["stream"] if c[1] == 1] if variant_record(read_manifest(folder), "step") else []
    assert len(case_lines) == sum(len(grid.cases[v]) for v in variants) + len(one_step)
    first = grid.cases["classifier"][0]
    assert case_lines[0] == f"classifier: case 1/{len(grid.cases['classifier'])}: batch {first[0]}, seq {first[1]}"
    assert sum("chunks of" in m for m in heard) == (2 if "stream" in variants else 0)
    assert report.passed


def scale_weights(folder, name):
    """Every float weight of the export's ONNX file `name` scaled by 1.01, its checksum updated
    in the manifest (returned): the checksums pass, parity must not."""
    import onnx
    from onnx import numpy_helper

    from gru_deploy.manifest import file_entry

    model = onnx.load(str(folder / name))
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            tensor.CopyFrom(numpy_helper.from_array(array * np.float32(1.01), tensor.name))
    onnx.save(model, str(folder / name))
    manifest = read_manifest(folder)
    manifest["files"][name] = file_entry(folder / name)
    atomic_write_json(folder / "manifest.json", manifest)
    return manifest


@pytest.mark.parametrize("kind", KINDS)
def test_verify_fails_on_a_model_that_computes_something_else(kind_copy, kind):
    """Every weight of model.onnx scaled by 1.01, its checksum updated: the checksums pass,
    parity must not; TorchScript still agrees with the reference."""
    manifest = scale_weights(kind_copy, "model.onnx")
    report = verify_export(kind_copy)
    summary = report.summary()
    first = manifest["signature"]["outputs"][0]["name"]
    suffix = "" if first == "logits" else f"[{first}]"
    assert not report and not summary[f"float64->onnxruntime{suffix}"]["passed"]
    assert not summary[f"torchscript->onnxruntime{suffix}"]["passed"]
    assert summary[f"float64->torchscript{suffix}"]["passed"]
    proc = run_cli("verify", str(kind_copy))
    assert proc.returncode == 1 and "float64->onnxruntime" in proc.stderr


@pytest.mark.parametrize("kind", ["tutorial", "family"])
def test_verify_fails_on_a_one_step_model_that_computes_something_else(kind_copy, kind):
    """model_step.onnx with its weights scaled by 1.01, its checksum updated: the stream model
    still passes, the one-step model's pairs must not."""
    scale_weights(kind_copy, "model_step.onnx")
    summary = verify_export(kind_copy).summary()
    assert not summary["step:float64->onnxruntime-step"]["passed"]
    assert not summary["step:torchscript->onnxruntime-step"]["passed"]
    assert summary["stream:float64->onnxruntime"]["passed"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", ["flip a byte of model.pt", "delete model.onnx",
                                    "flip a byte of reference_float64.npz"])
def test_verify_refuses_a_damaged_file(kind_copy, kind, damage):
    name = damage.rsplit(" ", 1)[-1]
    if damage.startswith("delete"):
        (kind_copy / name).unlink()
    else:
        data = bytearray((kind_copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (kind_copy / name).write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="missing" if damage.startswith("delete") else "sha256"):
        verify_export(kind_copy)


@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_of_an_export_still_verifies(every_kind, kind, tmp_path):
    dest = tmp_path / "moved"
    shutil.copytree(every_kind[kind][0], dest)
    assert verify_export(dest)


def test_an_export_from_before_the_stored_reference_is_refused_with_what_to_do(export_copy):
    manifest = read_manifest(export_copy)
    del manifest["reference"]
    atomic_write_json(export_copy / "manifest.json", manifest)
    with pytest.raises(UserInputError, match="re-export with this gru-deploy"):
        verify_export(export_copy)


@pytest.fixture(scope="module")
def ill_conditioned_export(tiny_checkpoint, tmp_path_factory):
    """The tiny model with its three recurrent matrices scaled by 8: float32's own error is far
    above float32's rounding on every long case and above the ceiling at batch 64 x 100 steps
    (measured: 10x noise 0.0146 where the logits' scale is 3.1)."""
    import dataclasses

    from gru_deploy.convert.folder import export_to_dir

    scaled = {k: v * 8 if k in ("gru.W_hz.weight", "gru.W_hr.weight", "gru.W_hh.weight") else v
              for k, v in tiny_checkpoint.state_dict.items()}
    out = tmp_path_factory.mktemp("ill") / "exported"
    export_to_dir(dataclasses.replace(tiny_checkpoint, state_dict=scaled), out)
    return out


def _ceiling_holds(report: dict, runners: dict, folder) -> int:
    """Every compared output of every case was held to at most atol + max(atol, 0.1% of its
    float64 scale); the number of comparisons checked."""
    manifest = read_manifest(folder)
    signature = UserSignature(manifest["signature"]["inputs"], manifest["signature"]["outputs"])
    checked = 0
    for case in report["cases"]:
        if "float32_noise" not in case or case["variant"] != "classifier":
            continue
        reference = runners["float64"].run(scaled_feed(signature, case["batch"], case["seq"], case["seed"]))
        scale = float(np.abs(reference["logits"]).max()) if reference["logits"].size else 0.0
        for c in case["pairs"].values():
            assert c["atol"] <= report["atol"] + max(report["atol"], 1e-3 * scale) * (1 + 1e-9)
            checked += 1
    return checked


def test_noise_above_the_ceiling_is_unverifiable_never_passed(ill_conditioned_export):
    """Classifier runners only (no stream variant to back the gate up): the 100-step case whose
    float32 noise exceeds the ceiling is recorded as unverifiable, not compared into a pass,
    and the longest verified length stops below it; the case where it stays under is judged."""
    runners = tutorial_runners(ill_conditioned_export)
    runners.pop("onnx-reference")
    report = small_grid(runners, ill_conditioned_export, [(64, 100), (2, 1000)], first_seed=13)  # 64 x 100's seed
    loud, long_case = report.cases
    assert set(loud["unverifiable"]) == {"logits"} and "ceiling" in loud["unverifiable"]["logits"]
    assert loud["pairs"] == {} and set(loud["unverified_pairs"]) >= {"eager->onnxruntime", "float64->onnxruntime"}
    assert "unverifiable" not in long_case and long_case["pairs"]["float64->onnxruntime"]["passed"]
    assert report.verification()["verified_max_seq"] == {"classifier": -1}
    assert all(s["cases"] == 1 for s in report.summary().values())  # the 1,000-step case alone
    assert _ceiling_holds(report.to_json(), runners, ill_conditioned_export) >= 4


def test_an_ill_conditioned_export_records_how_far_it_is_verified(ill_conditioned_export, tmp_path):
    from gru_deploy.check.grid import NOISE_CAP_FRACTION

    manifest = read_manifest(ill_conditioned_export)
    parity = manifest["parity"]
    assert parity["passed"] and parity["unverifiable"]
    assert 0 <= parity["verified_max_seq"]["classifier"] < 100 <= parity["verified_max_seq"]["stream"]
    assert parity["atol"] < parity["applied_atol"] <= parity["atol"] + NOISE_CAP_FRACTION * 100
    inspected = json.loads(run_cli("inspect", str(ill_conditioned_export), "--json").stdout)
    assert inspected["parity"]["verified_max_seq"] == parity["verified_max_seq"]
    proc = run_cli("verify", str(ill_conditioned_export), "--json", "--junit-xml", str(tmp_path / "j.xml"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verified_max_seq"] == parity["verified_max_seq"] and report["unverifiable"]
    assert report["applied_atol"] == pytest.approx(parity["applied_atol"])
    assert _ceiling_holds(report, tutorial_runners(ill_conditioned_export), ill_conditioned_export) > 50
    from junitparser import JUnitXml, Skipped

    suite = next(iter(JUnitXml.fromfile(str(tmp_path / "j.xml"))))
    properties = {p.name: json.loads(p.value) for p in suite.properties()}
    assert properties["verified_max_seq"] == parity["verified_max_seq"]
    assert properties["applied_atol"] == pytest.approx(parity["applied_atol"])
    skipped = [c for c in suite if any(isinstance(r, Skipped) for r in c.result)]
    assert skipped and all("unverifiable" in c.result[0].message for c in skipped)
    human = run_cli("verify", str(ill_conditioned_export))
    assert proc.returncode == 0 and "UNVERIFIABLE classifier batch=64 seq=100" in human.stdout
    assert f"applied atol up to {parity['applied_atol']:.3g} (requested 1e-05)" in human.stdout.splitlines()[-1]


def _truncate_loop(onnx_path, steps: int) -> None:
    """The classifier's top-level Loop stops after `steps` steps (its trip count min(M, steps))."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    index, loop = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Loop")
    graph.initializer.append(numpy_helper.from_array(np.array(steps, np.int64), "truncate_steps"))
    graph.node.insert(index, helper.make_node("Min", [loop.input[0], "truncate_steps"], ["truncated_trip_count"]))
    loop.input[0] = "truncated_trip_count"
    onnx.save(model, str(onnx_path))


def test_a_loop_stopped_after_500_steps_fails_verify_on_an_ill_conditioned_export(ill_conditioned_export, tmp_path):
    from gru_deploy.manifest import file_entry

    folder = tmp_path / "exported"
    shutil.copytree(ill_conditioned_export, folder)
    manifest = read_manifest(folder)
    name = next(n for n, m in manifest["models"].items() if m["variant"] == "classifier" and m["format"] == "onnx")
    _truncate_loop(folder / name, 500)
    manifest["files"][name] = file_entry(folder / name)
    manifest["onnx"]["op_types"]["Min"] = 1  # the record vouches for the new op: parity alone must catch it
    atomic_write_json(folder / "manifest.json", manifest)
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 1, proc.stdout
    assert "float64->onnxruntime" in proc.stderr and "seq=1000" in proc.stderr and "atol applied up to" in proc.stderr


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
