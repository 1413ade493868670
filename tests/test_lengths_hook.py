"""The lengths variant of a module that defines the hook (`@torch.jit.export forward_lengths`):
exported beside the classifier, proved against the module in float64 (and the module's padded
answer held to each sample alone), re-verified, packaged, run by infer and by serve."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli

MODELS = Path(__file__).parent / "user_models.py"


def _checkpoint(name: str, folder: Path) -> Path:
    from gru_deploy.models.user import load_user_model

    torch.manual_seed(3)
    module = load_user_model(f"{MODELS}:{name}").module
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5)
    path = folder / f"{name}.pt"
    torch.save({"state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hook")
    out = folder / "export"
    proc = run_cli("export", "--model", f"{MODELS}:MaskedTagger", "--checkpoint", str(_checkpoint("MaskedTagger", folder)),
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_hook_exports_a_lengths_variant_proved_padded_equals_alone(tagger):
    from gru_deploy.manifest import read_manifest

    manifest = read_manifest(tagger)
    lengths = manifest["variants"]["lengths"]
    assert [t["name"] for t in lengths["signature"]["inputs"]] == ["x", "lengths"]
    assert lengths["signature"]["outputs"] == manifest["signature"]["outputs"]  # per step: [batch, seq, 3]
    assert {m["variant"] for m in manifest["models"].values()} == {"classifier", "lengths", "stream"}
    parity = json.loads((tagger / "parity.json").read_text())
    assert parity["passed"] and parity["verified_max_seq"]["lengths"] == 2048
    summary = {k: e for k, e in parity["summary"].items() if k.startswith("lengths:")}
    assert summary["lengths:float64 alone->float64 padded"]["max_abs"] <= 1e-9
    for key, entry in summary.items():
        assert entry["max_abs"] <= 1e-5, (key, entry)
    assert {k.split("->")[1].split("[")[0] for k in summary} >= {"onnxruntime", "onnx-reference"}


def test_a_hook_that_lets_padding_leak_is_refused(tmp_path):
    """The hook's promise is checked, not trusted: a forward_lengths that ignores the lengths
    fails the padded-vs-alone check, exit 1, nothing written."""
    out = tmp_path / "leaky"
    proc = run_cli("export", "--model", f"{MODELS}:LeakyLengths", "--checkpoint",
                   str(_checkpoint("LeakyLengths", tmp_path)), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "lengths variant's parity failed" in proc.stderr and "float64 alone->float64 padded" in proc.stderr
    assert not out.exists()


def test_verify_rechecks_the_lengths_variant_and_catches_a_tampered_reference(tagger, tmp_path):
    import shutil

    from gru_deploy.manifest import atomic_write_json, sha256_file

    proc = run_cli("verify", str(tagger), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["summary"]["lengths:float64->onnxruntime"]["passed"]
    bad = tmp_path / "bad"
    shutil.copytree(tagger, bad)
    with np.load(bad / "reference_float64.npz") as data:
        arrays = {k: data[k] for k in data.files}
    key = next(k for k in arrays if k.startswith("lengths/"))
    arrays[key] = arrays[key] + 0.01
    np.savez(bad / "reference_float64.npz", **arrays)
    manifest = json.loads((bad / "manifest.json").read_text())
    path = bad / "reference_float64.npz"
    manifest["files"]["reference_float64.npz"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    atomic_write_json(bad / "manifest.json", manifest)
    junit = tmp_path / "parity-junit.xml"
    proc = run_cli("verify", str(bad), "--junit-xml", str(junit))
    assert proc.returncode == 1 and "lengths:float64->" in proc.stderr, proc.stderr
    import xml.etree.ElementTree as ET  # CI's view of the same failure: the lengths pairs, by case

    root = ET.parse(junit).getroot()
    failed = [t.get("classname") for t in root.iter("testcase") if t.find("failure") is not None]
    assert failed and all(name.startswith("lengths:float64->") for name in failed)
    assert int(root.get("failures")) == len(failed) and int(root.get("tests")) > len(failed)


def test_infer_with_lengths_gives_each_sample_its_answer_alone(tagger, tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 11, 4)).astype(np.float32)
    lengths = np.array([11, 6, 1], np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "l.npy", lengths)
    proc = run_cli("infer", str(tagger), "--input", str(tmp_path / "x.npy"), "--lengths", str(tmp_path / "l.npy"),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    padded = np.asarray(json.loads(proc.stdout)["outputs"]["logits"]["data"], np.float32)
    for i, n in enumerate(lengths):
        np.save(tmp_path / "one.npy", x[i:i + 1, :n])
        alone = json.loads(run_cli("infer", str(tagger), "--input", str(tmp_path / "one.npy"), "--json").stdout)
        np.testing.assert_allclose(padded[i, :n], np.asarray(alone["outputs"]["logits"]["data"])[0], atol=1e-5)
    np.save(tmp_path / "l0.npy", np.array([11, 0, 1], np.int64))
    proc = run_cli("infer", str(tagger), "--input", str(tmp_path / "x.npy"), "--lengths", str(tmp_path / "l0.npy"))
    assert proc.returncode == 2 and "must lie in 1..11" in proc.stderr


@pytest.mark.parametrize("target", ["edge", "server"])
def test_bundles_carry_the_lengths_variant_with_golden_vectors(tagger, tmp_path, target):
    import gru_deploy

    bundle, manifest = gru_deploy.package(tagger, target, out=tmp_path / target)
    assert set(manifest["signatures"]) == {"classifier", "lengths", "stream"}
    report = gru_deploy.verify(bundle)
    assert report["passed"]
    assert any("lengths_" in c["check"] for c in report["checks"] if c["check"].startswith("golden"))
    if target == "server":  # the lengths model's config, read with Triton's own schema
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        text = (bundle / "model_repository" / "model_lengths" / "config.pbtxt").read_text()
        lengths = text_format.Parse(text, model_config_pb2.ModelConfig()).input[1]
        assert (lengths.name, list(lengths.dims), lengths.HasField("reshape"), list(lengths.reshape.shape)) == (
            "lengths", [1], True, [])
        assert lengths.data_type == model_config_pb2.DataType.Value("TYPE_INT64")
    x = np.random.default_rng(9).standard_normal((2, 7, 4)).astype(np.float32)
    lengths = np.array([7, 3])
    np.testing.assert_allclose(gru_deploy.load(bundle).predict(x, lengths)["logits"],
                               gru_deploy.load(tagger).predict(x, lengths)["logits"], atol=1e-6)


def test_the_server_pads_a_lengths_models_requests_within_similar_lengths(tagger, monkeypatch):
    """With a lengths variant the server batches as for the tutorial model: one padded call for
    requests of similar length, and every request's valid steps equal its answer alone."""
    from gru_deploy.serve.server import load_model
    from gru_deploy.serve.infer import infer
    from test_serve import calls_of, run_async

    rng = np.random.default_rng(13)
    xs = [rng.standard_normal((1, s, 4)).astype(np.float32) for s in (5, 9, 3)]
    model = load_model(tagger, 1, len(xs), 60_000.0, None)
    assert model.takes_lengths
    calls = calls_of(model, monkeypatch)

    async def scenario():
        model.queue = asyncio.Queue()
        batcher = asyncio.create_task(model.batcher())
        try:
            return await asyncio.gather(*(model.infer(x, np.array([x.shape[1]], np.int64)) for x in xs))
        finally:
            batcher.cancel()
            model.executor.shutdown(wait=True)

    answers = run_async(scenario(), timeout=60)
    assert calls == [(3, 9, 4)]  # one call, padded to the longest
    for x, got in zip(xs, answers):
        want = infer(tagger, x).outputs["logits"]
        assert got["logits"].shape == want.shape  # its own steps, not the padding
        np.testing.assert_allclose(got["logits"], want, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_serve_on_a_module_bundle_serves_each_onnx_model_with_exactly_its_config(tagger, tmp_path, protocol):
    """A module's server bundle archive: `model` (the classifier, x only), `model_lengths` and
    `model_stream` each answer with exactly the bundle's config.pbtxt and the metadata derived
    from it; padded requests with lengths go to model_lengths, and equal each sample alone
    through `model`; a chunked sequence to model_stream equals it whole."""
    import signal

    import gru_deploy
    from test_serve_protocols import CLIENTS, assert_serves_exactly, client, inputs, launch

    bundle, _ = gru_deploy.package(tagger, "server", out=tmp_path / "server.tar.gz", archive=True)
    proc, where = launch(bundle)
    try:
        configs = assert_serves_exactly(where, bundle, protocol)
        assert sorted(configs) == ["model", "model_lengths", "model_stream"]
        c, module = client(where, protocol), CLIENTS[protocol][0]
        x = np.random.default_rng(22).standard_normal((2, 8, 4)).astype(np.float32)
        lengths = module.InferInput("lengths", [2, 1], "INT64")
        lengths.set_data_from_numpy(np.array([[8], [5]], np.int64))
        padded = c.infer("model_lengths", [*inputs(protocol, x), lengths]).as_numpy("logits")
        alone = c.infer("model", inputs(protocol, np.ascontiguousarray(x[1:, :5]))).as_numpy("logits")
        np.testing.assert_allclose(padded[1:, :5], alone, atol=1e-5)
        whole = c.infer("model", inputs(protocol, x[:1])).as_numpy("logits")
        chunks = [c.infer("model_stream", inputs(protocol, np.ascontiguousarray(x[:1, s:s + 4])), sequence_id=77,
                          sequence_start=s == 0, sequence_end=s == 4).as_numpy("logits") for s in (0, 4)]
        np.testing.assert_allclose(np.concatenate(chunks, axis=1), whole, atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
