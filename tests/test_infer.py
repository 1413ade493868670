"""`gru-deploy infer`: predictions from each variant, and every invalid input refused with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from gru_deploy.manifest import read_manifest
from cli_helpers import tutorial_runners


@pytest.fixture()
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 40, 8)) * 2).astype(np.float32)
    paths = {}

    def put(name, value):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)

    put("x", x)
    put("lengths", np.array([40, 9, 0], np.int64))
    put("first", np.ascontiguousarray(x[:, :25]))
    put("second", np.ascontiguousarray(x[:, 25:]))
    put("neg_lengths", np.array([40, -1, 0], np.int64))
    put("long_lengths", np.array([41, 9, 0], np.int64))
    put("short_lengths", np.array([40, 9], np.int64))
    put("h0_wrong", np.zeros((3, 15), np.float32))
    put("x64", x.astype(np.float64))
    put("rank2", x[0])
    x_nan = x.copy()
    x_nan[1, 3, 2] = np.nan
    put("nan", x_nan)
    return x, paths


def test_infer_matches_the_float64_reference(export_dir, arrays):
    """Not the same file in the same runtime again: infer's logits against the float64
    re-implementation of the equations on the export's weights."""
    x, paths = arrays
    proc = run_cli("infer", str(export_dir), "--input", str(paths["x"]), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = tutorial_runners(export_dir)["float64"].run({"x": x})["logits"]
    np.testing.assert_allclose(np.array(result["logits"]), expected, rtol=1e-5, atol=1e-5)
    labels = read_manifest(export_dir)["labels"]
    for item, row in zip(result["predictions"], expected):
        assert item["label"] == labels[int(row.argmax())]
        assert sum(item["probabilities"].values()) == pytest.approx(1.0)


def test_infer_is_one_path_every_model_gets_its_outputs_and_a_labelled_classifier_its_predictions(export_dir,
                                                                                                    arrays, tmp_path):
    """The tutorial model's --json holds every output by name as a module's does, and a built-in
    family's classifier (labels, one [batch, classes] output) gets predictions as the tutorial
    model's does; the human lines are the labels for both."""
    import torch

    from gru_deploy.convert.user import export_user_model
    from gru_deploy.models.families import StackedGRUClassifier
    from gru_deploy.models.user import UserModel

    x, paths = arrays
    tutorial = json.loads(run_cli("infer", str(export_dir), "--input", str(paths["x"]), "--json").stdout)
    assert tutorial["outputs"]["logits"]["data"] == tutorial["logits"]
    assert [o["name"] for o in tutorial["signature"]["outputs"]] == ["logits"]
    labels = read_manifest(export_dir)["labels"]
    torch.manual_seed(2)
    family = tmp_path / "family"
    module = StackedGRUClassifier(8, 6, len(labels), layers=2).eval()
    export_user_model(UserModel(module, "gru_deploy.models.families:StackedGRUClassifier", None), family,
                      labels=tuple(labels))
    proc = run_cli("infer", str(family), "--input", str(paths["x"]), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    logits = np.array(result["outputs"]["logits"]["data"])
    assert [p["label"] for p in result["predictions"]] == [labels[i] for i in logits.argmax(1)]
    human = run_cli("infer", str(family), "--input", str(paths["x"]), "--quiet").stdout.splitlines()
    assert human == [f"{i}: {p['label']} (p={p['probabilities'][p['label']]:.3f})"
                     for i, p in enumerate(result["predictions"])]


def test_infer_with_lengths_equals_each_sample_alone(export_dir, arrays, tmp_path):
    x, paths = arrays
    proc = run_cli("infer", str(export_dir), "--input", str(paths["x"]), "--lengths", str(paths["lengths"]),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    padded = np.array(json.loads(proc.stdout)["logits"])
    runner = tutorial_runners(export_dir)["float64"]
    for b, n in enumerate([40, 9, 0]):
        alone = runner.run({"x": np.ascontiguousarray(x[b:b + 1, :n])})["logits"][0]
        np.testing.assert_allclose(padded[b], alone, atol=1e-5)


def test_infer_streams_chunk_by_chunk(export_dir, arrays, tmp_path):
    x, paths = arrays
    state = tmp_path / "h.npy"
    first = run_cli("infer", str(export_dir), "--input", str(paths["first"]), "--state-out", str(state))
    assert first.returncode == 0, first.stderr
    second = run_cli("infer", str(export_dir), "--input", str(paths["second"]), "--state-in", str(state),
                     "--state-out", str(state), "--json")
    assert second.returncode == 0, second.stderr
    whole = run_cli("infer", str(export_dir), "--input", str(paths["x"]), "--json")
    np.testing.assert_allclose(json.loads(second.stdout)["logits"], json.loads(whole.stdout)["logits"], atol=1e-5)
    assert np.load(state).shape == (3, 16)


@pytest.mark.parametrize("args,fragment", [
    (["--lengths", "neg_lengths"], "must lie in 0..40"),
    (["--lengths", "long_lengths"], "must lie in 0..40"),
    (["--lengths", "short_lengths"], "must have shape [3] (one per sample), got [2]"),
    (["--state-in", "h0_wrong"], "must be float32 of shape [3, 16]"),
    (["--state-in", "x"], "must be float32 of shape [3, 16]"),
    (["--input-override", "x64"], "must be a float32 array, got float64"),
    (["--input-override", "rank2"], "must have shape [batch, seq, 8]"),
    (["--input-override", "nan"], "non-finite input"),
    (["--lengths", "lengths", "--state-out", "OUT"], "cannot be combined"),
    (["--input-override", "missing"], "file not found"),
])
def test_invalid_inputs_exit_2_with_one_line(export_dir, arrays, tmp_path, args, fragment):
    _, paths = arrays
    input_path = paths["x"]
    extra = []
    for i in range(0, len(args), 2):
        flag, name = args[i], args[i + 1]
        value = str(tmp_path / "out.npy") if name == "OUT" else str(paths.get(name, tmp_path / "missing.npy"))
        if flag == "--input-override":
            input_path = value
        else:
            extra += [flag, value]
    proc = run_cli("infer", str(export_dir), "--input", str(input_path), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.npy").exists()


# --- infer, one path for every model: the tutorial classifier, a family's model, your own ------

@pytest.mark.parametrize("kind", ["tutorial", "family", "user"])
def test_infer_answers_every_variant_as_the_model_did_at_export(every_kind, kind):
    """The golden cases (the model run eager in fp32 at export) through infer, every variant the
    export has, every output by name: the file the manifest lists, run on the inputs checked."""
    from gru_deploy.check.module_parity import golden_load
    from gru_deploy.serve.infer import infer
    from gru_deploy.spec import LENGTHS_NAME, STATE_IN

    folder = every_kind[kind][0]
    manifest = read_manifest(folder)
    cases = golden_load(folder, manifest)
    assert {c["variant"] for c in cases} == {"classifier", *(manifest.get("variants") or {})}
    for case in cases:
        inputs = case["inputs"]
        result = infer(folder, inputs["x"], lengths=inputs.get(LENGTHS_NAME), h0=inputs.get(STATE_IN),
                       stream=case["variant"] == "stream")
        assert set(result.outputs) == set(case["outputs"]), case["name"]
        for name, want in case["outputs"].items():
            np.testing.assert_allclose(result.outputs[name], want, atol=1e-5, rtol=1e-5, err_msg=f"{case['name']} {name}")
