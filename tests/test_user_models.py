"""The user's own model (`export --model file.py:Name`): stacked cells with their own names,
torch.nn.GRU, an LSTM cell loop, a per-step tagger, and the two it must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from gru_deploy.errors import CheckFailed, UserInputError

MODELS = Path(__file__).parent / "user_models.py"
ACCEPTED = {  # name: (output shapes in the manifest, how the recurrence is kept, the ONNX op holding it)
    "TwoLayerGRU": ([["batch", 3]], "loop", "Loop"),
    "TorchGRUClassifier": ([["batch", 4]], "gru", "GRU"),
    "LSTMLoop": ([["batch", 2], ["batch", 8]], "loop", "Loop"),
    "Tagger": ([["batch", "seq", 5]], "loop", "Loop"),
}


def ref(name: str) -> str:
    return f"{MODELS}:{name}"


def user_checkpoint(name: str, folder: Path, **args) -> Path:
    """A trained-looking checkpoint: the module's own init, scaled so the state moves, saved as data."""
    from gru_deploy.models.user import load_user_model

    torch.manual_seed(len(name))
    module = load_user_model(ref(name), args).module
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5)
    path = folder / f"{name}.pt"
    torch.save({"state_dict": module.state_dict(), "model_args": args}, path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each accepted model exported once through the CLI, from a checkpoint holding its args."""
    folder = tmp_path_factory.mktemp("user")
    done = {}
    for name in (*ACCEPTED, "TwoHeads"):  # TwoHeads: a class and per-step tags, for the int8 tests
        ckpt = user_checkpoint(name, folder)
        out = folder / f"{name}_export"
        proc = run_cli("export", "--model", ref(name), "--checkpoint", str(ckpt), "--out", str(out), "--json")
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        done[name] = (out, json.loads(proc.stdout), ckpt)
    return done


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_user_model_exports_with_its_own_signature_and_parity_to_float64(exports, name):
    from gru_deploy.manifest import read_manifest

    out, summary, _ = exports[name]
    shapes, kept, op = ACCEPTED[name]
    manifest = read_manifest(out)
    assert [o["shape"] for o in manifest["signature"]["outputs"]] == shapes
    assert manifest["signature"]["inputs"][0]["shape"][:2] == ["batch", "seq"]
    assert manifest["model"]["kind"] == "user" and manifest["model"]["recurrence"] == kept
    assert op in manifest["onnx"]["op_types"] and manifest["variants"] == {}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {2048} == {c["seq"] for c in parity["cases"] if c["seq"] > 1000}  # the ORT copy too
    for key, entry in parity["summary"].items():  # every output, every runner, up to 2,048 steps
        if key.startswith("float64->"):
            assert entry["max_abs"] <= 1e-5, (key, entry)
    runners = {key.split("->")[1].split("[")[0] for key in parity["summary"]}
    assert runners == {"eager", "torchscript", "onnxruntime", "onnx-reference", "onnxruntime-ort"}
    assert summary["parity"]["passed"] and summary["model"]["reference"].endswith(f":{name}")


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_verify_reruns_a_user_export_without_the_users_code(exports, name):
    out, _, _ = exports[name]
    proc = run_cli("verify", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and any(key.startswith("float64->onnxruntime") for key in report["summary"])


def test_onnxruntime_on_the_exported_file_matches_the_users_module(exports):
    """Independent of gru-deploy's runners: raw onnxruntime on model.onnx against the user's module."""
    import onnxruntime as ort

    from gru_deploy.models.user import load_user_model

    out, _, ckpt = exports["Tagger"]
    module = load_user_model(ref("Tagger"), checkpoint=ckpt).module
    x = np.random.default_rng(1).standard_normal((2, 37, 3)).astype(np.float32)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 37, 5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_model_args_on_the_command_line_override_the_checkpoints(tmp_path):
    ckpt = user_checkpoint("TwoLayerGRU", tmp_path, hidden=7)
    out = tmp_path / "out"
    proc = run_cli("export", "--model", ref("TwoLayerGRU"), "--model-args", '{"hidden": 7, "classes": 3}',
                   "--checkpoint", str(ckpt), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = run_cli("export", "--model", ref("TwoLayerGRU"), "--model-args", '{"hidden": 9}',
                  "--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "does not fit" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_constant_trip_count_is_refused_naming_the_line(tmp_path):
    ckpt = user_checkpoint("FixedSteps", tmp_path)
    proc = run_cli("export", "--model", ref("FixedSteps"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"))
    line = next(i for i, text in enumerate(MODELS.read_text().splitlines(), 1) if "range(10)" in text)
    assert proc.returncode == 1, proc.stderr
    assert f"user_models.py:{line}" in proc.stderr and "fixed number of times" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_an_unscriptable_module_is_a_user_error_with_torchscripts_message_and_line(tmp_path):
    ckpt = user_checkpoint("Unscriptable", tmp_path)
    proc = run_cli("export", "--model", ref("Unscriptable"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"))
    line = next(i for i, text in enumerate(MODELS.read_text().splitlines(), 1) if text.strip() == "try:")
    assert proc.returncode == 2, proc.stderr
    assert "try blocks aren't supported" in proc.stderr and f"user_models.py:{line}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model, fragment", [
    ("no_colon.py", "path/to/file.py:Name"),
    ("missing.py:Model", "is not a file"),
    (f"{MODELS}:NoSuchModel", "has no 'NoSuchModel'"),
    ("no_such_package_xyz.mod:Model", "cannot import no_such_package_xyz.mod"),
])
def test_bad_model_references_are_one_line_user_errors(tmp_path, model, fragment):
    ckpt = user_checkpoint("TwoLayerGRU", tmp_path)
    proc = run_cli("export", "--model", model, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_factory_function_and_a_package_module_path_work(tmp_path, monkeypatch):
    """`file.py:factory` (a function returning the module) and `package.module:Name` (importable)."""
    from gru_deploy.models.user import load_user_model

    model = load_user_model(ref("tagger_factory"), {"tags": 4})
    assert type(model.module).__name__ == "Tagger" and model.module.tag.out_features == 4
    monkeypatch.syspath_prepend(str(MODELS.parent))
    assert type(load_user_model("user_models:LSTMLoop").module).__name__ == "LSTMLoop"
    with pytest.raises(UserInputError, match="not a torch.nn.Module"):
        load_user_model("json:dumps", {"obj": 1})


def test_a_module_with_no_recurrence_is_refused():
    from gru_deploy.convert.script import quiet_torchscript_deprecation
    from gru_deploy.check.recurrence import check_recurrence

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(1)

    with quiet_torchscript_deprecation():
        scripted = torch.jit.script(Mean())
    with pytest.raises(CheckFailed, match="no recurrence over the input's time axis"):
        check_recurrence(scripted, "Mean")


def _scripted(name: str):
    from gru_deploy.convert.script import quiet_torchscript_deprecation
    from gru_deploy.models.user import load_user_model

    with quiet_torchscript_deprecation():
        return torch.jit.script(load_user_model(ref(name)).module)


def _line(fragment: str) -> int:
    return next(i for i, text in enumerate(MODELS.read_text().splitlines(), 1) if fragment in text)


def test_the_loop_check_reads_the_time_axis_not_any_loop():
    """A while loop over x.size(1) is a recurrence; a fixed 3-step state loop beside a loop over
    the batch is refused at its line; a per-sample loop, or a time loop that carries nothing,
    is no recurrence."""
    from gru_deploy.check.recurrence import check_recurrence

    assert check_recurrence(_scripted("WhileLoop"), "WhileLoop") == "loop"
    for name in ("TwoLayerGRU", "Tagger", "MaskedTagger", "LSTMLoop"):
        assert check_recurrence(_scripted(name), name) == "loop", name
    assert check_recurrence(_scripted("TorchGRUClassifier"), "TorchGRUClassifier") == "gru"
    assert check_recurrence(_scripted("HoistedProjection"), "HoistedProjection") == "loop"  # via linear and a tuple
    with pytest.raises(CheckFailed, match="carries state .* fixed number"):  # the projected axis is not time
        check_recurrence(_scripted("LoopOverProjectedAxis"), "LoopOverProjectedAxis")
    with pytest.raises(CheckFailed, match=rf"user_models.py:{_line('range(3)')} carries state .* fixed number"):
        check_recurrence(_scripted("FixedStepsAndBatchLoop"), "FixedStepsAndBatchLoop")
    with pytest.raises(CheckFailed, match="no recurrence over the input's time axis"):
        check_recurrence(_scripted("PerSample"), "PerSample")
    with pytest.raises(CheckFailed, match=rf"the loop at \S*user_models.py:{_line('out.append(self.fc(x[:, t]))') - 1} "
                                          "carries nothing"):
        check_recurrence(_scripted("StatelessSteps"), "StatelessSteps")


def test_a_while_loop_recurrence_exports_and_holds_parity(tmp_path):
    ckpt = user_checkpoint("WhileLoop", tmp_path)
    proc = run_cli("export", "--model", ref("WhileLoop"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                   "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(proc.stdout)
    assert manifest["model"]["recurrence"] == "loop" and manifest["parity"]["verified_max_seq"]["classifier"] == 2048


def test_the_tutorial_export_is_unchanged_without_model(export_dir):
    """No --model: the tutorial classifier as before (its manifest has no user model record)."""
    from gru_deploy.manifest import read_manifest

    manifest = read_manifest(export_dir)
    assert "model" not in manifest and set(manifest["variants"]) == {"stream", "lengths"}


def test_verify_data_on_a_model_that_does_not_fit_the_data_says_why(exports):
    """verify --data measures classifiers whose classes are the data's: a 3-class model on the
    4-class synthetic set, and a per-step tagger, are one-line user errors."""
    for name, fragment in (("TwoLayerGRU", "synthetic has 4 classes; the model outputs 3"),
                           ("Tagger", "measures classifiers (one output [batch, classes])")):
        proc = run_cli("verify", str(exports[name][0]), "--data", "synthetic")
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_shows_a_user_export(exports):
    proc = run_cli("inspect", str(exports["LSTMLoop"][0]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "model.onnx" in json.loads(proc.stdout)["files"]


def test_the_readme_example_model_trains_exports_and_verifies(tmp_path):
    """examples/own_model/my_models.py and the README's three commands, as written."""
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "own_model" / "my_models.py"
    ckpt = tmp_path / "ck.pt"
    trained = subprocess.run([sys.executable, str(example), str(ckpt)], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0 and ckpt.is_file(), trained.stderr
    out = tmp_path / "mine"
    proc = run_cli("export", "--model", f"{example}:TwoLayerGRU", "--checkpoint", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_cli("verify", str(out)).returncode == 0


def test_infer_runs_every_output_of_a_user_export(exports, tmp_path):
    """infer on a user export: the manifest's model file, every output by name, each equal to the
    user's module on the same input; a per-step output printed per step; bad input one line."""
    from gru_deploy.models.user import load_user_model

    x = np.random.default_rng(3).standard_normal((2, 9, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out, _, ckpt = exports["Tagger"]
    proc = run_cli("infer", str(out), "--input", str(tmp_path / "x.npy"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == "model.onnx" and result["outputs"]["logits"]["shape"] == [2, 9, 5]
    with torch.no_grad():
        want = load_user_model(ref("Tagger"), checkpoint=ckpt).module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(result["outputs"]["logits"]["data"]), want, atol=1e-5, rtol=1e-5)
    text = run_cli("infer", str(out), "--input", str(tmp_path / "x.npy"))
    steps = " ".join(str(int(s)) for s in want[0].argmax(-1))
    assert text.returncode == 0 and f"sample 0: argmax per step {steps}" in text.stdout, text.stdout
    lstm = exports["LSTMLoop"][0]
    np.save(tmp_path / "x4.npy", x[:, :, :2].repeat(2, axis=2))
    two = json.loads(run_cli("infer", str(lstm), "--input", str(tmp_path / "x4.npy"), "--json").stdout)
    assert [two["outputs"][n]["shape"] for n in ("output_0", "output_1")] == [[2, 2], [2, 8]]
    for bad, fragment in [((2, 9, 4), "[batch, seq, 3]"), ((0, 9, 3), "empty batch or sequence"),
                          ((2, 0, 3), "empty batch or sequence")]:
        np.save(tmp_path / "bad.npy", np.zeros(bad, np.float32))
        proc = run_cli("infer", str(out), "--input", str(tmp_path / "bad.npy"))
        assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("infer", str(out), "--input", str(tmp_path / "x.npy"), "--state-out", str(tmp_path / "h.npy"))
    assert proc.returncode == 2 and "--state-out" in proc.stderr


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_user_bundles_package_verify_and_infer(exports, tmp_path, name):
    """export -> package (edge folder, server archive) -> verify BUNDLE -> infer on the bundle,
    equal to the export's own model; a bundle whose golden outputs were changed fails verify."""
    import shutil

    from gru_deploy.manifest import atomic_write_json, read_manifest, sha256_file

    out = exports[name][0]
    signature = read_manifest(out)["signature"]
    size = signature["inputs"][0]["shape"][2]
    x = np.random.default_rng(7).standard_normal((2, 13, size)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    local = json.loads(run_cli("infer", str(out), "--input", str(tmp_path / "x.npy"), "--json").stdout)
    for target, where in (("edge", tmp_path / "edge"), ("server", tmp_path / "server.tar.gz")):
        argv = ["package", str(out), "--target", target, "--out", str(where)] + (["--archive"] if "tar" in where.name else [])
        proc = run_cli(*argv)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(run_cli("verify", str(where), "--json").stdout)
        assert report["passed"], [c for c in report["checks"] if not c["passed"]]
        golden = [c for c in report["checks"] if c["check"].startswith("golden")]
        assert len(golden) >= 2 * len(signature["outputs"])
        proc = run_cli("infer", str(where), "--input", str(tmp_path / "x.npy"), "--json")
        assert proc.returncode == 0, proc.stderr
        for output, value in json.loads(proc.stdout)["outputs"].items():
            np.testing.assert_allclose(value["data"], local["outputs"][output]["data"], atol=1e-6)
    edge = json.loads((tmp_path / "edge" / "manifest.json").read_text())
    assert {"onnx", "ort"} <= {info["format"] for info in edge["models"].values()}
    shutil.copytree(tmp_path / "edge", tmp_path / "edge-bad")
    golden_file = tmp_path / "edge-bad" / "golden" / "golden.json"
    document = json.loads(golden_file.read_text())
    first = document["cases"][0]["outputs"][signature["outputs"][0]["name"]]
    array = np.load(tmp_path / "edge-bad" / first["npy"]) + 1.0
    np.save(tmp_path / "edge-bad" / first["npy"], array)
    first["data"] = array.ravel().tolist()
    golden_file.write_text(json.dumps(document))
    manifest = json.loads((tmp_path / "edge-bad" / "manifest.json").read_text())
    for rel in (first["npy"], "golden/golden.json"):  # checksums fixed: only the golden check can tell
        path = tmp_path / "edge-bad" / rel
        manifest["files"][rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    atomic_write_json(tmp_path / "edge-bad" / "manifest.json", manifest)
    bad = run_cli("verify", str(tmp_path / "edge-bad"))
    assert bad.returncode == 1 and "golden" in bad.stdout + bad.stderr


def test_a_user_server_bundle_has_triton_configs_from_the_signature(exports, tmp_path):
    out = exports["Tagger"][0]
    assert run_cli("package", str(out), "--target", "server", "--out", str(tmp_path / "s")).returncode == 0
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def parse(name):
        text = (tmp_path / "s" / "model_repository" / name / "config.pbtxt").read_text()
        return text_format.Parse(text, model_config_pb2.ModelConfig())  # Triton's own schema

    config = parse("model")
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [-1, 3])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [-1, 5])]
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    libtorch = parse("model_torchscript")
    assert (libtorch.platform, libtorch.input[0].name, libtorch.output[0].name) == (
        "pytorch_libtorch", "x__0", "logits__0")


def test_a_scripted_gru_cell_that_the_exporter_fails_on_is_refused_with_the_way_out(tmp_path):
    """torch 2.13's TorchScript ONNX exporter fails on a scripted torch.nn.GRUCell: exit 1, the
    exporter's message and what to do instead (write the cell out, or use torch.nn.GRU), nothing written."""
    ckpt = user_checkpoint("TorchCellLoop", tmp_path)
    out = tmp_path / "cell"
    proc = run_cli("export", "--model", ref("TorchCellLoop"), "--checkpoint", str(ckpt), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "the ONNX exporter failed on the scripted model" in proc.stderr
    assert "write the cell out, as the tutorial does, or use torch.nn.GRU" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("name", ["TwoLayerGRU", "Tagger", "TwoHeads"])
def test_an_int8_edge_bundle_of_a_user_model_is_gated_verified_and_runs(exports, tmp_path, name):
    """package --quantize int8: onnxruntime's quantiser over the loop graph, the gate of each
    output against the export's TorchScript on the int8 gate's sequences recorded and re-checked
    by verify; infer --precision int8 runs it. A per-step output (the tagger's, and TwoHeads'
    second) is judged per step."""
    out = exports[name][0]
    bundle = tmp_path / "edge8"
    proc = run_cli("package", str(out), "--target", "edge", "--quantize", "int8", "--out", str(bundle), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    int8 = [p for p, info in manifest["models"].items() if info["precision"] == "int8"]
    assert len(int8) == 1
    record = manifest["quantization"]["models"][int8[0]]
    outputs = [o["name"] for o in manifest["signatures"]["classifier"]["outputs"]]
    assert record["weight_bytes_quantized_share"] >= 0.5 and list(record["gates_vs_eager"]) == outputs
    for output, gate in record["gates_vs_eager"].items():
        assert gate["passed"] and gate["inputs"]["output"] == output and gate["reference_file"] in manifest["files"]
    (golden,) = [c for c in json.loads((bundle / "golden/golden.json").read_text())["cases"]
                 if c.get("precision") == "int8" and c["inputs"]["x"]["shape"][1] == 7]
    assert list(golden["outputs"]) == outputs
    report = json.loads(run_cli("verify", str(bundle), "--json").stdout)
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    gated = [c for c in report["checks"] if c["check"].startswith("int8 gate")]
    assert len(gated) == len(outputs) and all(c["passed"] for c in gated)
    assert len(outputs) == 1 or all(f"({o})" in c["check"] for o, c in zip(outputs, gated))
    size = manifest["signatures"]["classifier"]["inputs"][0]["shape"][2]
    x = np.random.default_rng(3).standard_normal((2, 9, size)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    fp32 = json.loads(run_cli("infer", str(bundle), "--input", str(tmp_path / "x.npy"), "--json").stdout)
    proc = run_cli("infer", str(bundle), "--input", str(tmp_path / "x.npy"), "--precision", "int8", "--json")
    assert proc.returncode == 0, proc.stderr
    q = json.loads(proc.stdout)
    assert q["model"] == int8[0] and fp32["model"] != int8[0]
    for output, value in q["outputs"].items():
        ref = np.asarray(fp32["outputs"][output]["data"])
        assert np.abs(np.asarray(value["data"]) - ref).max() <= 0.1 * np.abs(ref).max()


def test_torch_gru_with_a_head_that_outweighs_it_quantises_its_head_only(tmp_path):
    """The README's claim: torch.nn.GRU has no int8 kernel, so its weights stay float; with a
    head larger than the GRU (Linear(16, 512)), most weight bytes are the head's, the model is
    accepted, and the manifest says what stayed float."""
    import gru_deploy

    ckpt = user_checkpoint("TorchGRUClassifier", tmp_path, input_size=8, hidden=16, classes=512)
    out = tmp_path / "wide"
    gru_deploy.export(ref("TorchGRUClassifier"), checkpoint=str(ckpt), out=out)
    bundle, manifest = gru_deploy.package(out, "edge", out=tmp_path / "wide-edge", quantize="int8")
    (record,) = manifest["quantization"]["models"].values()
    assert 0.5 <= record["weight_bytes_quantized_share"] < 0.9 and "GRU" in record["float_weight_consumers"]
    (gate,) = record["gates_vs_eager"].values()
    assert gate["passed"] and gru_deploy.verify(bundle)["passed"]


def test_an_int8_bundle_fails_when_any_one_output_fails_its_gate(exports, tmp_path, monkeypatch, capsys):
    """Each output has its own gate: with the int8 model's per-step tags reversed (its class
    output untouched), package exits 1 naming that output and writes nothing, and verify of a
    bundle packaged before fails that output's gate alone."""
    import gru_deploy
    from gru_deploy.bundle import quantize
    from gru_deploy.cli import main

    out = exports["TwoHeads"][0]
    bundle, _ = gru_deploy.package(out, "edge", out=tmp_path / "good", quantize="int8")
    real = quantize._session_run
    monkeypatch.setattr(quantize, "_session_run", lambda data, outputs: lambda feed: {
        k: v[..., ::-1] if k == "output_1" else v for k, v in real(data, outputs)(feed).items()})
    with pytest.raises(SystemExit) as exited:
        main(["package", str(out), "--target", "edge", "--quantize", "int8", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "fails its gate" in err and "on output output_1" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    report = gru_deploy.verify(bundle)
    gated = {c["check"].split()[3]: c["passed"] for c in report["checks"] if c["check"].startswith("int8 gate")}
    assert not report["passed"] and gated == {"(output_0)": True, "(output_1)": False}


def test_an_int8_bundle_with_the_single_gate_record_of_before_still_verifies(exports, tmp_path):
    """Bundles packaged before per-output gates hold one `gate_vs_eager` (a single-output model's):
    verify reads it and judges that output."""
    import gru_deploy

    bundle, _ = gru_deploy.package(exports["TwoLayerGRU"][0], "edge", out=tmp_path / "b", quantize="int8")
    document = json.loads((bundle / "manifest.json").read_text())
    (record,) = document["quantization"]["models"].values()
    [record["gate_vs_eager"]] = record.pop("gates_vs_eager").values()
    (bundle / "manifest.json").write_text(json.dumps(document))
    report = gru_deploy.verify(bundle)
    gated = [c for c in report["checks"] if c["check"].startswith("int8 gate")]
    assert report["passed"] and len(gated) == 1 and gated[0]["passed"]


def test_int8_is_refused_where_it_does_not_quantise(exports, tmp_path):
    """torch.nn.GRU (no int8 GRU kernel: the quantiser leaves almost every weight in float):
    exit 2 with the reason, nothing written."""
    where = tmp_path / "gru"
    proc = run_cli("package", str(exports["TorchGRUClassifier"][0]), "--target", "edge", "--quantize", "int8",
                   "--out", str(where))
    assert proc.returncode == 2 and "no int8 kernel in onnxruntime" in proc.stderr, proc.stderr
    assert not where.exists()
    proc = run_cli("infer", str(exports["Tagger"][0]), "--input", str(tmp_path / "none.npy"), "--precision", "int8")
    assert proc.returncode == 2 and "package --quantize int8 makes an int8 one" in proc.stderr


def test_serve_answers_a_user_model_over_v2_with_its_own_outputs(exports, tmp_path):
    """serve on a user export and on its edge bundle: the v2 metadata is the signature, a real
    client (tritonclient.http) gets every output equal to infer's, concurrent requests of
    different lengths each get their own answer (batched only with their own length), and a
    lengths input is a 400 that leaves the server serving."""
    import signal

    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from test_serve import start

    out = exports["LSTMLoop"][0]
    bundle = tmp_path / "edge"
    assert run_cli("package", str(out), "--target", "edge", "--out", str(bundle)).returncode == 0
    size = json.loads((out / "manifest.json").read_text())["signature"]["inputs"][0]["shape"][2]
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((b, s, size)).astype(np.float32) for b, s in ((1, 5), (2, 5), (1, 40), (3, 1), (1, 5))]
    expected = []
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x)
        proc = run_cli("infer", str(out), "--input", str(tmp_path / f"x{i}.npy"), "--json")
        expected.append({k: np.asarray(v["data"], np.float32).ravel() for k, v in json.loads(proc.stdout)["outputs"].items()})
    for path in (out, bundle):
        proc, port, _ = start(path, "--max-batch", "8", "--max-delay-ms", "20")
        try:
            client = http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=8)
            meta = client.get_model_metadata("model")
            assert [o["name"] for o in meta["outputs"]] == ["output_0", "output_1"]
            assert [i["shape"] for i in meta["inputs"]] == [[-1, -1, size]]

            def send(x):
                tensor = http.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                return client.async_infer("model", [tensor])  # all in flight at once

            results = [request.get_result() for request in [send(x) for x in xs]]
            answers = [{name: r.as_numpy(name) for name in ("output_0", "output_1")} for r in results]
            for got, want in zip(answers, expected):
                for name in want:
                    np.testing.assert_allclose(got[name].ravel(), want[name], atol=1e-5)
            lengths = http.InferInput("lengths", [1], "INT64")
            lengths.set_data_from_numpy(np.array([5], np.int64))
            tensor = http.InferInput("x", [1, 5, size], "FP32")
            tensor.set_data_from_numpy(xs[0])
            with pytest.raises(InferenceServerException, match="no lengths variant"):
                client.infer("model", [tensor, lengths])
            assert client.is_server_ready()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0


def test_serve_gives_a_family_classifier_labels_and_probabilities(tmp_path):
    """A built-in family's export carries labels: the server offers probabilities and label too."""
    import signal

    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    import gru_deploy
    from gru_deploy.data import load_data
    from gru_deploy.train import TrainOptions, train_family
    from test_serve import start

    split = load_data("synthetic", seed=0)
    ckpt = train_family("torch-gru", 6, 1, True, split, TrainOptions(epochs=1))  # bidirectional: no stream
    out = tmp_path / "fam"
    gru_deploy.export(checkpoint=ckpt, out=out)
    proc, port, _ = start(out)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        x = split.test.x[:3]
        tensor = http.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("model", [tensor], outputs=[http.InferRequestedOutput(n) for n in
                                                          ("logits", "probabilities", "label")])
        logits = result.as_numpy("logits")
        np.testing.assert_allclose(result.as_numpy("probabilities").sum(1), 1.0, atol=1e-6)
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert labels == [split.test.labels[i] for i in logits.argmax(1)]
        np.testing.assert_allclose(logits, gru_deploy.load(out).predict(x)["logits"], atol=1e-5)
        # a bidirectional torch.nn.GRU has no stream variant: no sequences, said so
        with pytest.raises(InferenceServerException, match="no stream variant") as info:
            client.infer("model", [tensor], sequence_id=1, sequence_start=True)
        assert info.value.status() == "400"
        assert not client.is_model_ready("model_stream")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_the_server_batches_a_user_models_requests_only_with_their_own_length(exports, monkeypatch):
    """No lengths variant, so nothing may be padded: one collected group runs as one call per
    sequence length, shortest first, and each request gets exactly its rows."""
    import asyncio

    from gru_deploy.serve.server import load_model
    from gru_deploy.manifest import read_manifest
    from gru_deploy.serve.infer import infer
    from test_serve import calls_of, run_async

    out = exports["Tagger"][0]
    manifest = read_manifest(out)
    size = manifest["signature"]["inputs"][0]["shape"][2]
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((b, s, size)).astype(np.float32) for b, s in ((1, 5), (2, 40), (1, 5), (3, 1))]
    model = load_model(out, 1, sum(x.shape[0] for x in xs), 60_000.0, None)
    calls = calls_of(model, monkeypatch)

    async def scenario():
        model.queue = asyncio.Queue()
        batcher = asyncio.create_task(model.batcher())
        try:
            return await asyncio.gather(*(model.infer(x, np.full(x.shape[0], x.shape[1])) for x in xs))
        finally:
            batcher.cancel()
            model.executor.shutdown(wait=True)

    answers = run_async(scenario(), timeout=60)
    assert calls == [(3, 1, size), (2, 5, size), (2, 40, size)]
    for x, got in zip(xs, answers):
        np.testing.assert_allclose(got["logits"], infer(out, x).outputs["logits"], atol=1e-6)
