"""Bundles: both targets build and verify; Triton configs parse; archives are deterministic;
every tampered or malformed bundle is refused."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from cli_helpers import run_cli
from gru_deploy.bundle.read import verify_bundle
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.bundle.package import package


@pytest.fixture(scope="module")
def bundles(export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for target in ("edge", "server"):
        made[target], _ = package(export_dir, target, out=root / target)
        made[f"{target}.tar.gz"], _ = package(export_dir, target, out=root / f"{target}.tar.gz", archive=True)
    return made


@pytest.mark.parametrize("name", ["edge", "server", "edge.tar.gz", "server.tar.gz"])
def test_bundles_verify(bundles, name):
    report = verify_bundle(bundles[name])
    assert report["passed"] and any("golden" in c["check"] for c in report["checks"])


def test_verify_loads_a_bundles_torchscript_only_when_trusted(bundles, monkeypatch):
    """torch.jit.load runs code from the file: verify BUNDLE does not call it unless asked, and
    says so (not counted as passed); --trust-torchscript loads and runs model.pt's golden cases."""
    from gru_deploy.convert import script

    loaded = []
    real_load = script.load
    monkeypatch.setattr(script, "load", lambda path: loaded.append(path) or real_load(path))
    report = verify_bundle(bundles["server"])
    assert report["passed"] and loaded == []
    assert [e["check"] for e in report["not_run"]] == [
        f"loads: {p}, and its golden cases" for p, m in report_models(bundles["server"]) if m["format"] == "torchscript"]
    assert not any("model.pt" in c["check"] for c in report["checks"])
    trusted = verify_bundle(bundles["server"], trust_torchscript=True)
    torchscript = [p for p, m in report_models(bundles["server"]) if m["format"] == "torchscript"]
    assert trusted["passed"] and len(loaded) == len(torchscript) == 2 and trusted["not_run"] == []
    assert any(c["check"].startswith("golden classifier_0 on ") and "model.pt" in c["check"] for c in trusted["checks"])
    proc = run_cli("verify", str(bundles["server"]))
    assert proc.returncode == 0 and "not run: loads: " in proc.stdout and "--trust-torchscript" in proc.stdout
    proc = run_cli("verify", str(bundles["server"]), "--trust-torchscript", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["not_run"] == []


def report_models(bundle):
    return list(json.loads((bundle / "manifest.json").read_text())["models"].items())


def test_edge_bundle_contents(bundles):
    root = bundles["edge"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert {"model.onnx", "model.ort", "model_stream.onnx", "model_stream.ort", "required_operators.config",
            "README.txt", "golden/golden.json"} <= set(manifest["files"])
    for name, info in manifest["models"].items():
        if info["format"] == "onnx":
            assert info["ir_version"] <= 9 and info["opset"] <= 20  # readable by onnxruntime 1.17
    config = (root / "required_operators.config").read_text()
    assert "ai.onnx;" in config and "Loop" in config and "/tmp" not in config
    assert manifest["source_export"]["manifest_sha256"] and manifest["parity"]["passed"]


def test_runtime_claims_are_what_was_computed(bundles):
    """No 'tested with' list and no floor release that nothing ran: the golden outputs' producer,
    the packaging runtime, and the opset and IR version read off the models."""
    import onnx
    import onnxruntime
    import torch

    for target in ("edge", "server"):
        manifest = json.loads((bundles[target] / "manifest.json").read_text())
        runtimes = manifest["onnxruntime"]
        assert "tested" not in runtimes and runtimes["checked_with"] == []
        assert runtimes["golden_outputs"] == {"fp32": f"eager PyTorch {torch.__version__}"}
        files = [bundles[target] / p for p, m in manifest["models"].items() if m["format"] == "onnx"]
        models = [onnx.load(str(p)) for p in files]
        opset = max(next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) for m in models)
        assert runtimes["onnx_compatibility"] == {"max_opset": opset, "max_ir_version": max(m.ir_version for m in models)}
        readme = (bundles[target] / "README.txt").read_text()
        assert "min_onnxruntime" not in json.dumps(runtimes)
        assert target == "server" or f"Made with onnxruntime {onnxruntime.__version__} (packaging)" in readme


def test_models_are_recorded_with_variant_format_and_precision(bundles):
    """Every model in a bundle says what it is and which export file it came from: nothing
    downstream guesses from a file name."""
    edge = json.loads((bundles["edge"] / "manifest.json").read_text())["models"]
    assert {(n, m["variant"], m["format"], m["precision"], m["source"]) for n, m in edge.items()} == {
        ("model.onnx", "classifier", "onnx", "fp32", "model.onnx"), ("model.ort", "classifier", "ort", "fp32", "model.ort"),
        ("model_stream.onnx", "stream", "onnx", "fp32", "model_stream.onnx"),
        ("model_stream.ort", "stream", "ort", "fp32", "model_stream.ort"),
        ("model_lengths.onnx", "lengths", "onnx", "fp32", "model_lengths.onnx"),
        ("model_lengths.ort", "lengths", "ort", "fp32", "model_lengths.ort")}
    server = json.loads((bundles["server"] / "manifest.json").read_text())["models"]
    lengths = server["model_repository/gru_classifier_lengths/1/model.onnx"]
    assert (lengths["variant"], lengths["source"]) == ("lengths", "model_lengths.onnx")


def test_golden_vectors_agree_in_npy_and_json(bundles):
    root = bundles["server"]
    golden = json.loads((root / "golden" / "golden.json").read_text())
    assert {c["variant"] for c in golden["cases"]} == {"classifier", "stream", "lengths"}
    for case in golden["cases"]:
        for tensors in (case["inputs"], case["outputs"]):
            for tensor in tensors.values():
                array = np.load(root / tensor["npy"])
                assert array.shape == tuple(tensor["shape"]) and str(array.dtype) == tensor["dtype"]
                np.testing.assert_array_equal(array.ravel(), np.asarray(tensor["data"], dtype=tensor["dtype"]))


def test_every_triton_config_parses_with_tritons_own_protobuf(bundles):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = sorted((bundles["server"] / "model_repository").glob("*/config.pbtxt"))
    assert len(configs) == 5  # classifier, lengths (each in onnxruntime and libtorch) and stream
    parsed = {}
    for path in configs:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name and config.max_batch_size > 0
        assert list(config.input[0].dims) == [-1, 8] and list(config.output[0].dims) == [4]
        assert (path.parent / "1").is_dir()
        parsed[config.name] = config
    assert parsed["gru_classifier"].platform == "onnxruntime_onnx"
    assert parsed["gru_classifier"].HasField("dynamic_batching")
    torchscript = parsed["gru_classifier_torchscript"]
    assert torchscript.platform == "pytorch_libtorch" and torchscript.input[0].name == "x__0"
    state = parsed["gru_classifier_stream"].sequence_batching.state[0]
    assert (state.input_name, state.output_name, list(state.dims)) == ("h0", "h_n", [16])
    assert state.initial_state[0].zero_data
    lengths = parsed["gru_classifier_lengths"].input[1]
    assert lengths.name == "lengths" and list(lengths.dims) == [1]


def test_a_typo_in_a_config_fails_to_parse(bundles):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (bundles["server"] / "model_repository" / "gru_classifier" / "config.pbtxt").read_text()
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("max_batch_size", "max_batchsize"), model_config_pb2.ModelConfig())


def test_archives_are_deterministic(export_dir, tmp_path, bundles):
    again, _ = package(export_dir, "edge", out=tmp_path / "edge.tar.gz", archive=True)
    assert again.read_bytes() == bundles["edge.tar.gz"].read_bytes()
    with tarfile.open(again) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and all(not n.startswith("/") and ".." not in n for n in names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.uname for m in members)


def test_out_that_exists_is_refused_without_force(export_dir, bundles, tmp_path):
    before = (bundles["edge"] / "manifest.json").read_bytes()
    proc = run_cli("package", str(export_dir), "--target", "edge", "--out", str(bundles["edge"]))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (bundles["edge"] / "manifest.json").read_bytes() == before


def test_package_refuses_an_export_with_a_bad_checksum(export_copy, tmp_path):
    (export_copy / "model_stream.onnx").write_bytes((export_copy / "model_stream.onnx").read_bytes()[:-1])
    with pytest.raises(CheckFailed, match="sha256"):
        package(export_copy, "edge", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_an_export_without_golden_cases_is_refused_with_what_to_do(export_copy, tmp_path):
    """An export made before the export chose its golden cases (no `golden` in its manifest, no
    golden.npz): one line on stderr saying to re-export, exit 2, nothing written."""
    data = json.loads((export_copy / "manifest.json").read_text())
    del data["golden"], data["files"]["golden.npz"]
    (export_copy / "golden.npz").unlink()
    (export_copy / "manifest.json").write_text(json.dumps(data))
    proc = run_cli("package", str(export_copy), "--target", "edge", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "re-export with this gru-deploy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


# --- tampered and malformed bundles --------------------------------------------------------

def _flip_byte(root):
    path = root / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _edit_manifest(root, change):
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def _change_golden(root):
    """A wrong expected output, with the checksums updated to match: only the golden check can catch it."""
    from gru_deploy.manifest import sha256_file

    golden_path = root / "golden" / "golden.json"
    golden = json.loads(golden_path.read_text())
    tensor = golden["cases"][0]["outputs"]["logits"]
    tensor["data"][0] += 0.5
    np.save(root / tensor["npy"], np.asarray(tensor["data"], dtype=tensor["dtype"]).reshape(tensor["shape"]))
    golden_path.write_text(json.dumps(golden))

    def fix(d):
        for rel in ("golden/golden.json", tensor["npy"]):
            d["files"][rel] = {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}

    _edit_manifest(root, fix)


FOLDER_CASES = {
    "one byte changed": (_flip_byte, CheckFailed, "sha256"),
    "missing file": (lambda r: (r / "model.ort").unlink(), CheckFailed, "missing"),
    "extra file": (lambda r: (r / "notes.txt").write_text("hi"), CheckFailed, "extra"),
    "symlink": (lambda r: ((r / "model.ort").unlink(), (r / "model.ort").symlink_to(r / "model.onnx")),
                CheckFailed, "symbolic link"),
    "manifest not JSON": (lambda r: (r / "manifest.json").write_text("{not json"), UserInputError, "not valid JSON"),
    "manifest lacks fields": (lambda r: _edit_manifest(r, lambda d: d.pop("golden")), UserInputError, "lacks"),
    "unsafe path listed": (lambda r: _edit_manifest(r, lambda d: d["files"].update({"../x": {"sha256": "0",
                                                                                          "size": 1}})),
                           UserInputError, "unsafe path"),
    "golden output changed": (lambda r: _change_golden(r), CheckFailed, "golden classifier_0"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_verify_refuses_a_bad_bundle_folder(bundles, tmp_path, case):
    """A check failure is a failed entry of the report (with its message); a malformed manifest
    is a user error."""
    corrupt, error, fragment = FOLDER_CASES[case]
    root = tmp_path / "edge"
    shutil.copytree(bundles["edge"], root)
    corrupt(root)
    if error is UserInputError:
        with pytest.raises(UserInputError, match=fragment):
            verify_bundle(root)
        return
    report = verify_bundle(root)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not report["passed"] and failed and any(fragment in c["message"] for c in failed)


def test_verify_bundle_json_reports_every_check_on_failure(bundles, tmp_path):
    root = tmp_path / "edge"
    shutil.copytree(bundles["edge"], root)
    _change_golden(root)
    proc = run_cli("verify", str(root), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["passed"] is False and report["target"] == "edge"
    failed = [c for c in report["checks"] if not c["passed"]]
    assert failed and all(c["message"] for c in failed) and "golden classifier_0" in failed[0]["message"]
    assert any(c["passed"] for c in report["checks"])  # the checks after the failing one still ran
    assert "elements exceed both atol" in failed[0]["message"]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_verify_on_a_file_that_is_no_bundle_is_a_usage_error(export_dir):
    proc = run_cli("verify", str(export_dir / "model.onnx"))
    assert proc.returncode == 2 and "not an export folder or a bundle" in proc.stderr


def test_verify_bundle_refuses_options_it_does_not_use(bundles):
    for option in (["--atol", "1e-3"], ["--data", "synthetic"], ["--junit-xml", "r.xml"]):
        proc = run_cli("verify", str(bundles["edge"]), *option)
        assert proc.returncode == 2 and option[0] in proc.stderr, proc.stderr


def _tar_with(members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def _member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def _with_real_bundle(bundles, extra):
    with tarfile.open(bundles["edge.tar.gz"]) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    return _tar_with(members + extra)


ARCHIVE_CASES = {
    "dot-dot path": lambda b: _with_real_bundle(b, [_member("edge/../evil.txt")]),
    "absolute path": lambda b: _tar_with([_member("/etc/evil")]),
    "symlink": lambda b: _with_real_bundle(b, [_member("edge/link", kind=tarfile.SYMTYPE, link="/etc/passwd")]),
    "hard link": lambda b: _with_real_bundle(b, [_member("edge/hard", kind=tarfile.LNKTYPE, link="edge/model.onnx")]),
    "extra member": lambda b: _with_real_bundle(b, [_member("edge/extra.bin")]),
    "truncated": lambda b: b["edge.tar.gz"].read_bytes()[: len(b["edge.tar.gz"].read_bytes()) // 2],
    "not a tar inside gzip": lambda b: gzip.compress(b"plain text, not a tar"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_CASES))
def test_verify_refuses_a_bad_archive_before_extracting(bundles, tmp_path, case):
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(ARCHIVE_CASES[case](bundles))
    proc = run_cli("verify", str(path))
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "evil.txt").exists()


def test_verify_cli_on_a_tampered_bundle_exits_1(bundles, tmp_path):
    root = tmp_path / "server"
    shutil.copytree(bundles["server"], root)
    target = root / "model_repository" / "gru_classifier_torchscript" / "1" / "model.pt"
    target.write_bytes(target.read_bytes() + b"\0")
    proc = run_cli("verify", str(root))
    assert proc.returncode == 1 and "sha256" in proc.stderr


# --- inspect and infer on bundles -----------------------------------------------------------

def test_inspect_reports_files_and_models(bundles, export_copy, tmp_path):
    proc = run_cli("inspect", str(bundles["server.tar.gz"]), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kind"] == "bundle" and report["target"] == "server"
    assert all(f["status"] == "ok" for f in report["files"].values())
    onnx = report["onnx"]["model_repository/gru_classifier_stream/1/model.onnx"]
    assert [i["name"] for i in onnx["inputs"]] == ["x", "h0"] and onnx["op_types"]["Loop"] == 1
    (export_copy / "model.ort").write_bytes(b"changed")
    report = json.loads(run_cli("inspect", str(export_copy), "--json").stdout)
    assert report["files"]["model.ort"]["status"] == "CHANGED" and report["files"]["model.onnx"]["status"] == "ok"
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    proc = run_cli("inspect", str(empty))
    assert proc.returncode == 2 and "empty" in proc.stderr


def test_infer_runs_on_bundles(bundles, export_dir, tmp_path):
    x = np.random.default_rng(5).standard_normal((2, 9, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    results = []
    for path in (export_dir, bundles["edge"], bundles["server.tar.gz"]):
        proc = run_cli("infer", str(path), "--input", str(tmp_path / "x.npy"), "--json")
        assert proc.returncode == 0, proc.stderr
        results.append(np.array(json.loads(proc.stdout)["logits"]))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


@pytest.fixture(scope="module")
def int8_bundle(export_dir, tmp_path_factory):
    out, manifest = package(export_dir, "edge", out=tmp_path_factory.mktemp("int8") / "q.tar.gz", archive=True,
                            quantize="int8")
    return out, manifest


def test_int8_edge_bundle(export_dir, int8_bundle, tmp_path):
    out, manifest = int8_bundle
    assert verify_bundle(out)["passed"]
    models = manifest["quantization"]["models"]
    assert set(models) == {"model.int8.onnx", "model_stream.int8.onnx"}
    for info in models.values():
        assert info["weight_bytes_quantized_share"] > 0.5 and info["int8_weights_in_subgraphs"] > 0
        assert info["quantized_op_types"]["MatMulInteger"] >= 4  # the three gates' weights and the head
        [(output, gate)] = info["gates_vs_eager"].items()  # the logits; h_n, the state, is not gated
        assert output == "logits" and gate["reference"].endswith("(TorchScript, fp32)")
        assert gate["max_abs"] > 0  # int8 really changed the numbers
        # judged on a few hundred sequences, up to the parity grid's longest
        assert gate["rows"] >= 200 and set(gate["median_abs_by_length"]) >= {"1", "100", "2048"}
        assert gate["reference_file"] in manifest["files"]
    assert manifest["quantization"]["settings"]["weight_type"] == "QInt8"
    assert manifest["models"]["model.int8.onnx"]["precision"] == "int8"
    assert manifest["models"]["model.int8.onnx"]["quantized_from"] == "model.onnx"
    assert manifest["onnxruntime"]["golden_outputs"]["int8"].startswith("the int8 model in onnxruntime")
    (tmp_path / "again").mkdir()
    again, _ = package(export_dir, "edge", out=tmp_path / "again" / "q.tar.gz", archive=True, quantize="int8")
    assert again.read_bytes() == out.read_bytes()


def test_infer_on_an_int8_bundle_runs_fp32_unless_asked(export_dir, int8_bundle, tmp_path):
    """The fp32 model by default, exactly the export's logits; --precision int8 runs the int8 one;
    both say which file ran."""
    x = np.random.default_rng(7).standard_normal((3, 20, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    runs = {}
    for path, extra in ((export_dir, []), (int8_bundle[0], []), (int8_bundle[0], ["--precision", "int8"])):
        proc = run_cli("infer", str(path), "--input", str(tmp_path / "x.npy"), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[(str(path), tuple(extra))] = json.loads(proc.stdout)
    export_run, fp32_run, int8_run = runs.values()
    assert (fp32_run["model"], fp32_run["precision"]) == ("model.onnx", "fp32")
    assert (int8_run["model"], int8_run["precision"]) == ("model.int8.onnx", "int8")
    assert fp32_run["logits"] == export_run["logits"]
    assert np.abs(np.array(int8_run["logits"]) - np.array(fp32_run["logits"])).max() > 1e-4
    proc = run_cli("infer", str(int8_bundle[0]), "--input", str(tmp_path / "x.npy"), "--precision", "int8")
    assert proc.returncode == 0 and "ran model.int8.onnx (int8)" in proc.stderr
    proc = run_cli("infer", str(export_dir), "--input", str(tmp_path / "x.npy"), "--precision", "int8")
    assert proc.returncode == 2 and "--quantize int8" in proc.stderr


def test_int8_gate_is_checked_at_verify_against_the_recorded_bound(int8_bundle, tmp_path):
    with tarfile.open(int8_bundle[0]) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "q"
    _edit_manifest(root, lambda d: d["quantization"]["models"]["model.int8.onnx"]["gates_vs_eager"]["logits"].update(
        {"max_abs_bound": 1e-6}))
    report = verify_bundle(root)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not report["passed"] and [c["check"] for c in failed] == [
        "int8 gate: model.int8.onnx vs model.pt (TorchScript, fp32) on the int8 gate's sequences"]
    assert "p95 of the rows' max abs error" in failed[0]["message"]


def test_verify_rejudges_int8_against_the_stored_reference_rows(int8_bundle, tmp_path):
    """The eager rows the gate was judged against travel in the bundle (checksummed); verify
    runs the int8 model on the regenerated inputs again: other rows (checksum updated) fail."""
    from gru_deploy.manifest import sha256_file

    with tarfile.open(int8_bundle[0]) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "q"
    rel = int8_bundle[1]["quantization"]["models"]["model_stream.int8.onnx"]["gates_vs_eager"]["logits"]["reference_file"]
    rows = np.load(root / rel)
    np.save(root / rel, rows[::-1].copy())
    _edit_manifest(root, lambda d: d["files"][rel].update({"sha256": sha256_file(root / rel),
                                                           "size": (root / rel).stat().st_size}))
    report = verify_bundle(root)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == [
        "int8 gate: model_stream.int8.onnx vs model_stream.pt (TorchScript, fp32) on the int8 gate's sequences"]


def test_int8_gate_at_package_time_refuses_and_writes_nothing(export_dir, tmp_path, monkeypatch):
    from gru_deploy.check import compare

    monkeypatch.setattr(compare, "INT8_BOUND_FRACTION", 1e-6)
    with pytest.raises(CheckFailed, match=r"gate against model.pt \(TorchScript, fp32\) on output logits"):
        package(export_dir, "edge", out=tmp_path / "q", quantize="int8")
    assert not (tmp_path / "q").exists()


def test_int8_of_a_fused_model_is_refused_with_the_reason(tiny_checkpoint):
    """onnxruntime has no int8 GRU kernel: the quantiser would touch only the head."""
    from cli_helpers import tutorial_graph
    from gru_deploy.bundle.package import _quantize

    fused = tutorial_graph(tiny_checkpoint.model(), tiny_checkpoint.spec, "fused").onnx_bytes
    files = {"model.onnx": fused}
    models = {"model.onnx": {"variant": "classifier", "format": "onnx", "precision": "fp32", "source": "model.onnx"}}
    source = {"models": {"model.onnx": {"strategy": "fused"}}}
    with pytest.raises(UserInputError, match=r"onnxruntime#9796.*--strategy loop") as caught:
        _quantize(files, models, source, lambda m: None)
    assert "GRU" in str(caught.value) and set(files) == {"model.onnx"}


def test_int8_is_for_edge_only(export_dir, tmp_path):
    with pytest.raises(UserInputError, match="edge"):
        package(export_dir, "server", out=tmp_path / "s", quantize="int8")


def test_a_fused_export_packages_and_verifies_for_both_targets(tiny_checkpoint, tmp_path):
    """Every op the fused variants use is one the bundle guard knows; the Triton models and the
    edge files carry the fused forms the export chose."""
    from gru_deploy.convert.folder import export_to_dir

    export_to_dir(tiny_checkpoint, tmp_path / "fused", strategy="fused")
    for target in ("edge", "server"):
        out, manifest = package(tmp_path / "fused", target, out=tmp_path / target)
        report = verify_bundle(out)
        assert report["passed"], [c for c in report["checks"] if not c["passed"]]
        onnx_models = [info for info in manifest["models"].values() if info["format"] == "onnx"]
        assert onnx_models and all(info["op_types"].get("GRU") == 1 for info in onnx_models)
