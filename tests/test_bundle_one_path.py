"""One bundle builder for every model (bundle.package.build_bundle): the tutorial model, a
built-in family with every variant, and your own model with two outputs and no hooks go through
the same code, and each bundle is held to the same promises: golden vectors that are the model
run eager at export, every variant the export has, every int8 output but the state gated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gru_deploy
from gru_deploy.bundle.package import package
from gru_deploy.bundle.read import verify_bundle
from gru_deploy.check.module_parity import golden_load
from gru_deploy.check.runners import run_module
from gru_deploy.check.grid import pair_key
from gru_deploy.manifest import read_manifest
from gru_deploy.models.variants import LengthsOf, StreamOf
from gru_deploy.spec import STATE_OUT

from conftest import KINDS


@pytest.fixture(scope="module")
def exports(every_kind, tiny_checkpoint):
    """Each kind's export folder and its model eager: variant, inputs -> outputs by name."""
    def module_eager(module):
        wrap = {"classifier": lambda m: m, "lengths": LengthsOf, "stream": StreamOf}

        def run(variant, inputs, manifest):
            signature = manifest["signature"] if variant == "classifier" else manifest["variants"][variant]["signature"]
            return run_module(wrap[variant](module).eval(), signature, inputs)
        return run

    models = {kind: module if module is not None else tiny_checkpoint.model() for kind, (_, module) in every_kind.items()}
    return {kind: (folder, module_eager(models[kind])) for kind, (folder, _) in every_kind.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_is_bundled_by_one_builder_to_the_same_promises(exports, kind, tmp_path):
    folder, eager = exports[kind]
    source = read_manifest(folder)
    variants = {"classifier", *(source.get("variants") or {})}
    cases = golden_load(folder, source)
    assert {c["variant"] for c in cases} == variants
    for case in cases:  # the export's golden outputs are the model run eager on the golden inputs
        want = eager(case["variant"], case["inputs"], source)
        assert set(want) == set(case["outputs"])
        for name, got in case["outputs"].items():
            np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-6, err_msg=f"{kind} {case['name']} {name}")

    edge, manifest = package(folder, "edge", out=tmp_path / "edge", quantize="int8")
    assert verify_bundle(edge)["passed"]
    assert set(manifest["signatures"]) == variants == {m["variant"] for m in manifest["models"].values()}
    document = json.loads((edge / "golden" / "golden.json").read_text())
    by_name = {c["name"]: c for c in cases}
    for case in (c for c in document["cases"] if c.get("precision", "fp32") == "fp32"):
        for name, tensor in case["outputs"].items():  # the bundle carries the export's golden cases as they are
            np.testing.assert_array_equal(np.load(edge / tensor["npy"]), by_name[case["name"]]["outputs"][name])
    assert document["reference"]["fp32"] == source["golden"]["computed_by"] == f"eager PyTorch {torch.__version__}"
    quantized = {info["variant"]: record for path, record in manifest["quantization"]["models"].items()
                 for info in [manifest["models"][path]]}
    assert set(quantized) == {"classifier", "stream"} & variants
    for variant, record in quantized.items():
        gated = [o["name"] for o in manifest["signatures"][variant]["outputs"] if o["name"] != STATE_OUT]
        assert list(record["gates_vs_eager"]) == gated
        assert all(g["passed"] and g["reference"].endswith("(TorchScript, fp32)") for g in record["gates_vs_eager"].values())
    readme = (edge / "README.txt").read_text()
    assert all(path in readme for path in manifest["models"])

    server, manifest = package(folder, "server", out=tmp_path / "server")
    report = verify_bundle(server, trust_torchscript=True)
    assert report["passed"] and report["not_run"] == []
    formats = {(m["variant"], m["format"]) for m in manifest["models"].values()}
    assert formats == {(v, f) for v in variants for f in ("onnx", "torchscript") if (v, f) != ("stream", "torchscript")}


REPORT_KEYS = {"passed", "atol", "rtol", "applied_atol", "noise_ceiling_fraction", "verified_max_seq", "unverifiable",
               "empty_inputs_verified", "notes", "summary", "cases"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_is_proved_by_one_parity_grid_to_one_report(exports, kind, tmp_path):
    """check.grid.run_parity is every model's grid: parity.json has one shape, the manifest
    keeps it less the cases, verify re-runs it on the files, and a wrong ONNX weight fails it
    with the pair named, in the CLI's lines and in JUnit XML alike."""
    import shutil
    import xml.etree.ElementTree as ET

    import onnx
    from onnx import numpy_helper

    from gru_deploy.manifest import atomic_write_json, sha256_file

    folder, _ = exports[kind]
    manifest = read_manifest(folder)
    parity = json.loads((folder / "parity.json").read_text())
    assert set(parity) == REPORT_KEYS and parity["passed"]
    assert {k: v for k, v in parity.items() if k != "cases"} == manifest["parity"]
    variants = {"classifier", *(manifest.get("variants") or {})}
    assert set(parity["verified_max_seq"]) == {c["variant"] for c in parity["cases"]} == variants
    verified = gru_deploy.verify(folder)
    assert verified["passed"] and set(verified) - {"deployment_accuracy", "stage_seconds"} == REPORT_KEYS
    first = manifest["signature"]["outputs"][0]["name"]
    for variant in variants:  # the files' float64 -> onnxruntime comparison, made at export and at verify
        key = pair_key("" if variant == "classifier" else f"{variant}:", "float64", "onnxruntime", first)
        assert key in parity["summary"] and key in verified["summary"], key

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    model = onnx.load(bad / "model.onnx")
    weight = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + np.float32(0.05), weight.name))
    onnx.save(model, bad / "model.onnx")
    tampered = json.loads((bad / "manifest.json").read_text())
    tampered["files"]["model.onnx"] = {"sha256": sha256_file(bad / "model.onnx"),
                                       "size": (bad / "model.onnx").stat().st_size}
    atomic_write_json(bad / "manifest.json", tampered)
    junit = tmp_path / "junit.xml"
    report = gru_deploy.verify(bad, junit_xml=junit)
    failed = {k for k, s in report["summary"].items() if not s["passed"]}
    assert not report["passed"] and pair_key("", "float64", "onnxruntime", first) in failed
    assert not any(":" in k for k in failed)  # the classifier's graph was changed, not a variant's
    root = ET.parse(junit).getroot()
    assert {t.get("classname") for t in root.iter("testcase") if t.find("failure") is not None} == failed

    # the ORT-format copy (what onnxruntime mobile and web load) is judged too: the tampered
    # graph as model.ort beside the right model.onnx fails on the ORT copy's pairs alone
    from gru_deploy.convert.graphs import to_ort_format

    ort_bad = tmp_path / "ort_bad"
    shutil.copytree(folder, ort_bad)
    (ort_bad / "model.ort").write_bytes(to_ort_format({"model.onnx": (bad / "model.onnx").read_bytes()})["model.ort"])
    tampered = json.loads((ort_bad / "manifest.json").read_text())
    tampered["files"]["model.ort"] = {"sha256": sha256_file(ort_bad / "model.ort"),
                                      "size": (ort_bad / "model.ort").stat().st_size}
    atomic_write_json(ort_bad / "manifest.json", tampered)
    report = gru_deploy.verify(ort_bad)
    failed = {k for k, s in report["summary"].items() if not s["passed"]}
    assert not report["passed"] and failed and all("->onnxruntime-ort" in k and ":" not in k for k in failed)


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_is_exported_by_one_pipeline(exports, kind):
    """convert.pipeline.export_model writes every kind's folder: the same manifest fields, each
    ONNX graph naming its variant and form as the manifest lists them, each TorchScript file
    loading with the parameters of the one model, and the note on torch's deprecation heard."""
    import onnx

    folder, _ = exports[kind]
    manifest = read_manifest(folder)
    assert {"strategy", "auto", "opset", "ir_version", "onnx", "signature", "models", "variants", "config", "labels",
            "metrics", "training", "source_checkpoint", "golden", "parity", "files", "notes", "versions"} <= set(manifest)
    parameters = None
    for name, record in manifest["models"].items():
        if record["format"] == "onnx":
            props = {p.key: p.value for p in onnx.load(folder / name).metadata_props}
            assert props["gru_deploy.strategy"] == record["strategy"], name
            assert props.get("gru_deploy.variant", "classifier") == record["variant"], name
        if record["format"] == "torchscript":
            state = torch.jit.load(folder / name).state_dict()
            values = sorted((k.removeprefix("inner."), tuple(v.shape)) for k, v in state.items())
            assert parameters in (None, values), name  # every variant wraps the same model
            parameters = values
    assert any("deprecates what model.pt is made with" in note for note in manifest["notes"])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_inputs_are_answered_exactly_where_the_grid_verified_them(exports, kind, tmp_path):
    """An export records whether every variant's grid ran an empty sequence and passed; infer
    answers an empty sequence there and refuses it elsewhere, by that record, not by the kind."""
    import shutil

    from gru_deploy.errors import UserInputError
    from gru_deploy.manifest import atomic_write_json
    from gru_deploy.serve.infer import infer

    folder, _ = exports[kind]
    manifest = read_manifest(folder)
    ran_empty = {c["variant"] for c in json.loads((folder / "parity.json").read_text())["cases"] if c["seq"] == 0}
    verified = manifest["parity"]["empty_inputs_verified"]
    assert verified == (ran_empty == {"classifier", *(manifest.get("variants") or {})}) == (kind == "tutorial")
    size = manifest["signature"]["inputs"][0]["shape"][2]
    empty = np.zeros((2, 0, size), np.float32)
    if verified:
        assert all(v.shape[0] == 2 for v in infer(folder, empty).outputs.values())
        unverified = tmp_path / "unverified"  # the same files, the record saying otherwise: refused
        shutil.copytree(folder, unverified)
        atomic_write_json(unverified / "manifest.json",
                          {**manifest, "parity": {**manifest["parity"], "empty_inputs_verified": False}})
        folder = unverified
    with pytest.raises(UserInputError, match="empty"):  # (a module's graph is never handed one: it may abort)
        infer(folder, empty)


def test_a_modules_export_refuses_an_ort_copy_that_computes_something_else(tmp_path, monkeypatch):
    """At export, each ORT-format copy is run on the staged files against the float64 answers:
    a converter that wrote a different model fails the export, and nothing is written."""
    import onnx
    from onnx import numpy_helper

    from gru_deploy.convert import graphs
    from gru_deploy.errors import CheckFailed
    from gru_deploy.models.families import StackedGRUClassifier

    convert = graphs.to_ort_format

    def wrong_weights(onnx_files):
        model = onnx.load_from_string(onnx_files["model.onnx"])
        weight = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                     key=lambda t: int(np.prod(t.dims)))
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + np.float32(0.05), weight.name))
        return convert({**onnx_files, "model.onnx": model.SerializeToString()})

    monkeypatch.setattr(graphs, "to_ort_format", wrong_weights)
    torch.manual_seed(0)
    with pytest.raises(CheckFailed, match="classifier model's ORT-format copy failed parity.*onnxruntime-ort"):
        gru_deploy.export(StackedGRUClassifier(3, 5, 2, layers=1).eval(), out=tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_every_stream_model_is_fed_in_chunks_in_its_runtimes(exports, kind):
    """check.grid.check_chunked, for every model with a stream variant, at export and at
    verify: TorchScript and onnxruntime carry h_n across chunks of 1, 7 and 100 as one pass."""
    folder, _ = exports[kind]
    manifest = read_manifest(folder)
    keys = {f"stream:one-pass->chunks:{runtime}{suffix}" for runtime in ("torchscript", "onnxruntime")
            for suffix in ("", "[h_n]")}
    if "stream" not in (manifest.get("variants") or {}):
        assert not any("chunks:" in k for k in manifest["parity"]["summary"])
        return
    assert keys <= set(manifest["parity"]["summary"]) and keys <= set(gru_deploy.verify(folder)["summary"])


def test_the_chunked_check_catches_a_runtime_that_drops_the_state_and_joins_per_step_outputs():
    from gru_deploy.check.grid import check_chunked

    signature = {"inputs": [{"name": "x", "shape": ["batch", "seq", 2]}, {"name": "h0", "shape": ["batch", 3]}],
                 "outputs": [{"name": "tags", "shape": ["batch", "seq", 3]}, {"name": "h_n", "shape": ["batch", 3]}]}

    class Running:  # h_t = h_{t-1} + x_t (padded to 3): every step's state as the per-step output
        name = "running"

        def __init__(self, keeps_state):
            self.keeps_state = keeps_state

        def run(self, feed):
            x = np.pad(feed["x"], ((0, 0), (0, 0), (0, 1)))
            start = feed["h0"] if self.keeps_state else np.zeros_like(feed["h0"])
            tags = start[:, None, :] + np.cumsum(x, axis=1)
            return {"tags": tags.astype(np.float32), "h_n": tags[:, -1].astype(np.float32)}

    good = check_chunked(Running(True), signature, 1e-4, 1e-4, seq=50, chunks=(1, 7))
    assert all(c["passed"] for c in good) and {c["chunk"] for c in good} == {1, 7}
    assert set(good[0]["pairs"]) == {"stream:one-pass->chunks:running[tags]", "stream:one-pass->chunks:running[h_n]"}
    bad = check_chunked(Running(False), signature, 1e-4, 1e-4, seq=50, chunks=(7,))
    assert not bad[0]["passed"] and not bad[0]["pairs"]["stream:one-pass->chunks:running[h_n]"]["passed"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_is_served_by_one_infer_and_one_stream(exports, kind):
    """The serving stage, for every kind: gru_deploy.load(...).predict answers each golden case
    of the classifier and lengths variants as the model did eager at export, and a Stream fed a
    golden stream case step by step ends where the stream model's one pass ends."""
    folder, _ = exports[kind]
    manifest = read_manifest(folder)
    loaded = gru_deploy.load(folder)
    for case in golden_load(folder, manifest):
        inputs, want = case["inputs"], case["outputs"]
        if case["variant"] == "stream":
            stream = loaded.stream(batch=inputs["x"].shape[0])
            stream.state = inputs["h0"]
            for t in range(inputs["x"].shape[1]):
                answer = stream.step(inputs["x"][:, t])
            got = answer if isinstance(answer, dict) else {manifest["signature"]["outputs"][0]["name"]: answer}
            for name, value in got.items():
                np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5, err_msg=f"{kind} {name}")
            np.testing.assert_allclose(stream.state, want[STATE_OUT], rtol=1e-5, atol=1e-5)
            continue
        lengths = inputs.get("lengths")
        if lengths is not None and not manifest["parity"]["empty_inputs_verified"]:
            assert lengths.min() >= 1  # a module's golden lengths are what its grid verified
        got = loaded.predict(inputs["x"], lengths=lengths)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=f"{kind} {case['name']} {name}")
