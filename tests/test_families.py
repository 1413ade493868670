"""The built-in families: the tutorial cell stacked and bidirectional, and a torch.nn.GRU
classifier — trained by `gru-deploy train`, exported through the generic path, in loop,
fused and auto form, and measured on data by `verify --data`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from gru_deploy.errors import UserInputError

FAMILY_CASES = {  # name: (family, layers, bidirectional)
    "stacked": ("tutorial", 2, False),
    "stacked_bi": ("tutorial", 2, True),
    "torch": ("torch-gru", 2, False),
    "torch_bi": ("torch-gru", 2, True),
}


def _split(seed: int = 0):
    from gru_deploy.data import load_data

    return load_data("synthetic", seed=seed)


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    """Each family trained briefly on the synthetic data (through train_family) and saved."""
    from gru_deploy.train import TrainOptions, train_family

    from dataclasses import replace

    folder = tmp_path_factory.mktemp("families")
    split = _split()
    split = replace(split, train=replace(split.train, x=split.train.x[:300], y=split.train.y[:300]))
    done = {}
    for name, (family, layers, bidirectional) in FAMILY_CASES.items():
        ckpt = train_family(family, 8, layers, bidirectional, split, TrainOptions(epochs=2, batch_size=64))
        path = folder / f"{name}.pt"
        ckpt.save(path)
        done[name] = path
    return done


@pytest.mark.parametrize("cls_name", ["StackedGRUClassifier", "TorchGRUClassifier"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_padded_batch_gives_each_sample_its_answer_alone(cls_name, bidirectional):
    """forward_lengths (training on variable-length data): padding changes nothing, in both
    directions (the backward direction starts at each sample's last valid step)."""
    from gru_deploy.models import families

    torch.manual_seed(0)
    model = getattr(families, cls_name)(5, 7, 3, layers=2, bidirectional=bidirectional).eval()
    x = torch.randn(3, 9, 5)
    lengths = torch.tensor([9, 4, 1])
    with torch.no_grad():
        padded = model.forward_lengths(x, lengths)
        alone = torch.cat([model(x[i:i + 1, :int(lengths[i])]) for i in range(3)])
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=1e-6)


def _packed_logits(model, x, lengths):
    """TorchGRUClassifier's forward_lengths as it was (eager only, not exportable): torch's
    packed sequences, lengths clamped to >= 1 -- the reference the exportable form must equal."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(model.normalized(x), lengths.clamp(min=1).cpu(),
                                                     batch_first=True, enforce_sorted=False)
    _, h_n = model.gru(packed)
    return model.fc(model.last(h_n))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_gru_forward_lengths_is_torchs_packed_sequences(bidirectional):
    """The exportable forward_lengths (a gather of the last valid step; both directions: per
    direction, the backward one over each sample's valid steps reversed in place) gives the
    packed-sequence logits and gradients, in training mode, over 70 steps, length 0 as 1,
    padding full of noise."""
    from gru_deploy.models.families import TorchGRUClassifier

    torch.manual_seed(0)
    model = TorchGRUClassifier(5, 7, 3, layers=3, bidirectional=bidirectional,
                               normalization=((0.5,) * 5, (2.0,) * 5)).train()
    x = torch.randn(5, 70, 5)
    lengths = torch.tensor([70, 33, 1, 0, 69])
    new, old = model.forward_lengths(x, lengths), _packed_logits(model, x, lengths)
    torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(new.square().sum(), params), torch.autograd.grad(old.square().sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    scripted = torch.jit.script(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted.forward_lengths(x, lengths), _packed_logits(model, x, lengths),
                                   atol=1e-6, rtol=1e-6)


def test_training_torch_gru_on_variable_length_data_gives_the_packed_numbers(monkeypatch):
    """train_family on padded data (lengths 0..40, padding not zeroed) runs forward_lengths:
    the same losses, weights and accuracies as with the packed sequences it used before."""
    from dataclasses import replace

    from gru_deploy.models.families import TorchGRUClassifier
    from gru_deploy.train import TrainOptions, train_family

    split = _split()
    rng = np.random.default_rng(3)

    def padded(data, n):
        return replace(data, x=data.x[:n], y=data.y[:n], lengths=rng.integers(0, 41, n).astype(np.int64))

    split = replace(split, train=padded(split.train, 200), test=padded(split.test, 100))
    for bidirectional in (False, True):
        new = train_family("torch-gru", 6, 2, bidirectional, split, TrainOptions(epochs=2, batch_size=64))
        with monkeypatch.context() as patch:
            patch.setattr(TorchGRUClassifier, "forward_lengths", _packed_logits)
            old = train_family("torch-gru", 6, 2, bidirectional, split, TrainOptions(epochs=2, batch_size=64))
        np.testing.assert_allclose(new.metrics["loss_history"], old.metrics["loss_history"], rtol=1e-5)
        assert (new.metrics["train_accuracy"], new.metrics["test_accuracy"]) == (old.metrics["train_accuracy"],
                                                                               old.metrics["test_accuracy"])
        for name, value in new.state_dict.items():
            torch.testing.assert_close(value, old.state_dict[name], atol=1e-5, rtol=1e-5)


def test_the_stacked_family_is_the_tutorial_cell_layer_by_layer():
    """One layer, one direction of StackedGRUClassifier is the tutorial classifier itself."""
    from gru_deploy.models.families import StackedGRUClassifier
    from gru_deploy.models.tutorial import GRUClassifier

    torch.manual_seed(1)
    stacked = StackedGRUClassifier(4, 6, 3, layers=1).eval()
    tutorial = GRUClassifier(4, 6, 3).eval()
    state = {k.replace("layers.0.fw.", "gru."): v for k, v in stacked.state_dict().items()}
    tutorial.load_state_dict(state)
    x = torch.randn(2, 11, 4)
    with torch.no_grad():
        torch.testing.assert_close(stacked(x), tutorial(x))


def test_train_writes_a_family_checkpoint_that_loads_back(tmp_path):
    from gru_deploy.train import FamilyCheckpoint, load_checkpoint

    out = tmp_path / "two.pt"
    proc = run_cli("train", "--layers", "2", "--bidirectional", "--epochs", "1", "--hidden-size", "6", "--out",
                   str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["config"]["family"] == "tutorial"
    assert result["config"]["model_args"]["layers"] == 2 and result["config"]["model_args"]["bidirectional"]
    ckpt = load_checkpoint(out)
    assert isinstance(ckpt, FamilyCheckpoint) and ckpt.labels == tuple(_split().train.labels)
    assert "layers.1.bw.W_hh.weight" in ckpt.state_dict
    assert 0.0 <= ckpt.metrics["test_accuracy"] <= 1.0


def test_a_family_checkpoint_naming_an_unknown_family_is_a_user_error(tmp_path, family_checkpoints):
    from gru_deploy.train import load_checkpoint

    data = torch.load(family_checkpoints["stacked"], weights_only=True)
    data["family"] = "transformer"
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    with pytest.raises(UserInputError, match="unknown model family 'transformer'"):
        load_checkpoint(bad)
    proc = run_cli("export", "--checkpoint", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown model family" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
@pytest.mark.parametrize("strategy", ["loop", "fused"])
def test_a_family_exports_in_each_form_with_parity_to_float64(family_checkpoints, tmp_path, name, strategy):
    """Parity of every runner against the module in float64 up to 2,048 steps; fused is ONNX
    GRU nodes only (one per layer, bidirectional where the model is), loop a Loop — except
    torch.nn.GRU, which TorchScript's exporter writes as GRU nodes either way."""
    import onnx

    import gru_deploy
    from gru_deploy.manifest import read_manifest

    family, layers, bidirectional = FAMILY_CASES[name]
    out = tmp_path / "e"
    manifest = gru_deploy.export(checkpoint=family_checkpoints[name], out=out, strategy=strategy)
    assert manifest == read_manifest(out)
    assert manifest["model"]["kind"] == "family" and manifest["model"]["family"] == family
    assert manifest["strategy"] == strategy and manifest["labels"] == list(_split().train.labels)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["verified_max_seq"]["classifier"] == 2048
    assert all(e["max_abs"] <= 1e-5 for k, e in parity["summary"].items() if k.startswith("float64->"))
    graph = onnx.load(out / "model.onnx").graph
    from gru_deploy.convert.graphs import all_graphs

    grus = [n for g in all_graphs(graph) for n in g.node if n.op_type == "GRU"]
    loops = [n for g in all_graphs(graph) for n in g.node if n.op_type == "Loop"]
    if strategy == "fused" or family == "torch-gru":
        assert len(grus) == layers and not loops
        direction = {a.name: a for a in grus[0].attribute}.get("direction")
        assert (direction is not None and direction.s == b"bidirectional") == bidirectional
        linear_before_reset = {a.name: a.i for a in grus[0].attribute}.get("linear_before_reset", 0)
        assert linear_before_reset == (1 if family == "torch-gru" else 0)
    else:
        assert loops and not grus


def test_auto_times_loop_fused_and_stepwise_and_keeps_the_fastest(family_checkpoints, tmp_path):
    import gru_deploy

    manifest = gru_deploy.export(checkpoint=family_checkpoints["stacked"], out=tmp_path / "a", strategy="auto",
                                 typical=(1, 20))
    auto = manifest["auto"]
    assert set(auto["median_us"]) == {"loop", "fused", "stepwise"} and auto["candidates"] == ["loop", "fused",
                                                                                            "stepwise"]
    decided = auto.get("retimed", auto)["median_us"]
    assert manifest["strategy"] == auto["chosen"] == min(decided, key=decided.__getitem__)
    assert manifest["models"]["model.onnx"]["strategy"] == auto["chosen"]
    for variant in ("lengths", "stream"):  # auto per variant: every form checked and timed at its own workload
        record = manifest["variants"][variant]
        assert set(record["auto"]["median_us"]) == {"loop", "fused", "stepwise"}, variant
        decided = record["auto"].get("retimed", record["auto"])["median_us"]
        assert record["strategy"] == record["auto"]["chosen"] == min(decided, key=decided.__getitem__), variant
        assert manifest["models"][record["onnx"]]["strategy"] == record["strategy"], variant
    assert manifest["variants"]["stream"]["auto"]["steps_per_call"] == 1


def test_fused_is_refused_for_a_cell_gru_deploy_cannot_map(tmp_path):
    """The user's own two-layer model with its own cell: fused refused with the reason, auto
    exports the loop alone."""
    import gru_deploy

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from user_models import TwoLayerGRU
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = TwoLayerGRU().eval()
    with pytest.raises(UserInputError, match="cannot map: export it with --strategy loop"):
        gru_deploy.export(model, out=tmp_path / "f", strategy="fused")
    assert not (tmp_path / "f").exists()
    manifest = gru_deploy.export(model, out=tmp_path / "a", strategy="auto")
    assert manifest["strategy"] == "loop" and manifest["auto"]["candidates"] == ["loop"]
    with pytest.raises(UserInputError, match="is not a tutorial-cell family model: export it with --strategy loop"):
        gru_deploy.export(model, out=tmp_path / "s", strategy="stepwise")


def test_the_fused_family_graph_answers_an_empty_batch_or_sequence_without_the_kernel(family_checkpoints,
                                                                                    tmp_path):
    """onnxruntime's GRU kernel aborts the process on an empty axis; the fused graph branches
    around it and answers fc(0) = fc.bias. Run in a child process: a missing guard is a crash."""
    import gru_deploy

    out = tmp_path / "f"
    gru_deploy.export(checkpoint=family_checkpoints["stacked_bi"], out=out, strategy="fused")
    code = f"""
import numpy as np, onnxruntime as ort, onnx
from onnx import numpy_helper
path = {str(out / "model.onnx")!r}
bias = {{t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}}["fc_bias"]
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
for shape in [(0, 5, 8), (2, 0, 8)]:
    y = s.run(None, {{"x": np.zeros(shape, np.float32)}})[0]
    assert y.shape == (shape[0], bias.shape[0]), y.shape
    assert np.allclose(y, bias), y
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_verify_data_measures_a_family_export_in_fp32_and_int8(family_checkpoints, tmp_path):
    """Accuracy on the test split through TorchScript, onnxruntime (the export's form) and int8
    (the loop form quantised); for torch.nn.GRU int8 is said to be unavailable, not faked."""
    import gru_deploy

    for name, expect_int8 in (("stacked", True), ("torch_bi", False)):
        out = tmp_path / name
        gru_deploy.export(checkpoint=family_checkpoints[name], out=out, strategy="fused")
        proc = run_cli("verify", str(out), "--data", "synthetic", "--json")
        assert proc.returncode == 0, proc.stderr
        accuracy = json.loads(proc.stdout)["deployment_accuracy"]
        rows = accuracy["runtimes"]
        assert accuracy["test_samples"] == len(_split().test.y)
        assert rows["onnxruntime fp32 (fused, exported)"]["agreement_with_torchscript"] == 1.0
        assert ("onnxruntime int8 (loop form)" in rows) == expect_int8
        if expect_int8:
            assert rows["onnxruntime int8 (loop form)"]["agreement_with_torchscript"] >= 0.95
        else:
            assert "no int8 GRU kernel" in accuracy["notes"][0]
        recorded = json.loads((out / "manifest.json").read_text())["metrics"]["test_accuracy"]
        assert rows["torchscript"]["accuracy"] == pytest.approx(recorded, abs=1.01 / accuracy["test_samples"])


def test_a_family_export_packages_and_its_bundle_verifies(family_checkpoints, tmp_path):
    import gru_deploy

    out = tmp_path / "e"
    gru_deploy.export(checkpoint=family_checkpoints["stacked_bi"], out=out, strategy="fused")
    for target in ("edge", "server"):
        bundle, manifest = gru_deploy.package(out, target, out=tmp_path / target)
        assert gru_deploy.verify(bundle)["passed"]
        assert manifest["labels"] == list(_split().train.labels)
    x = np.random.default_rng(0).standard_normal((2, 13, 8)).astype(np.float32)
    np.testing.assert_allclose(gru_deploy.load(tmp_path / "edge").predict(x)["logits"],
                               gru_deploy.load(out).predict(x)["logits"], atol=1e-6)


def _nodes(path):
    import onnx

    from gru_deploy.convert.graphs import all_graphs

    return [n for g in all_graphs(onnx.load(path).graph) for n in g.node]


def test_the_torch_gru_family_exports_its_lengths_and_stream_variants(family_checkpoints, tmp_path):
    """torch-gru, one direction, two layers: the lengths variant (the last valid step gathered
    after torch.nn.GRU) and the stream variant (torch.nn.GRU from h0 [batch, layers, hidden])
    are exported as ONNX GRU nodes, no Loop, the stream's GRUs given initial_h, and both pass
    parity -- padded = alone, and the stream's one chunk = forward, chunks carried = one pass."""
    import gru_deploy

    out = tmp_path / "e"
    manifest = gru_deploy.export(checkpoint=family_checkpoints["torch"], out=out)
    assert set(manifest["variants"]) == {"lengths", "stream"}
    assert not [note for note in manifest["notes"] if "absent" in note]
    assert {"model_lengths.onnx", "model_lengths.pt", "model_stream.onnx", "model_stream.pt"} <= set(manifest["models"])
    hidden = manifest["model"]["args"]["hidden_size"]
    for side in ("inputs", "outputs"):  # the state: [batch, layers, hidden], torch's [layers, batch, hidden] turned
        assert manifest["variants"]["stream"]["signature"][side][1]["shape"] == ["batch", 2, hidden]
    summary = manifest["parity"]["summary"]
    for variant in ("lengths", "stream"):
        assert [e["passed"] for k, e in summary.items() if k.startswith(f"{variant}:")].count(True) >= 8
        assert all(e["passed"] for e in summary.values())
    assert "lengths:float64 alone->float64 padded" in summary
    contract = {"stream:float64 forward->float64 stream"} | {f"stream:float64 one pass->float64 chunks of {n}{name}"
                                                              for n in (1, 7) for name in ("", "[h_n]")}
    assert contract <= set(summary)
    for variant in ("lengths", "stream"):
        nodes = _nodes(out / f"model_{variant}.onnx")
        grus = [n for n in nodes if n.op_type == "GRU"]
        assert len(grus) == 2 and not [n for n in nodes if n.op_type == "Loop"]
        if variant == "stream":
            assert all(len(n.input) > 5 and n.input[5] for n in grus)  # initial_h: the state carried in


def test_the_bidirectional_torch_gru_family_exports_lengths_and_says_why_it_cannot_stream(family_checkpoints,
                                                                                        tmp_path):
    """Both directions: the lengths variant exports (each layer's two directions as GRU nodes
    of their own, the backward one over each sample's steps reversed by a gather), the stream
    variant cannot (the backward direction needs the whole sequence) and the notes say so."""
    import gru_deploy

    out = tmp_path / "e"
    manifest = gru_deploy.export(checkpoint=family_checkpoints["torch_bi"], out=out)
    assert set(manifest["variants"]) == {"lengths"} and manifest["parity"]["passed"] and \
        "lengths:float64->onnxruntime" in manifest["parity"]["summary"]
    assert [note for note in manifest["notes"] if "absent" in note] == [
        "the stream variant is absent: initial_state(batch) returned None: the module cannot stream "
        "(e.g. bidirectional)"]
    nodes = _nodes(out / "model_lengths.onnx")
    assert len([n for n in nodes if n.op_type == "GRU"]) == 4 and not [n for n in nodes if n.op_type == "Loop"]


def test_bench_on_a_family_export_times_every_form_beside_eager(family_checkpoints, tmp_path):
    """bench rebuilds a family's model from its export (models.user.rebuild) and times what it
    times for the tutorial model: eager, TorchScript and every form of every variant; a
    model that cannot stream (bidirectional) has no streaming row."""
    import gru_deploy

    for name, forms, streams in (("stacked", {"loop", "stepwise", "fused"}, True), ("torch_bi", {"fused"}, False)):
        out = tmp_path / name
        gru_deploy.export(checkpoint=family_checkpoints[name], out=out)
        proc = run_cli("bench", str(out), "--budget", "0.01", "--no-large", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert {r["hidden_size"] for r in result["rows"]} == {8}
        for row in result["rows"]:
            assert set(row["median_us"]) == {"eager", "torchscript", *(f"onnxruntime {f}" for f in forms)}
            assert row["speedup_vs_eager"]["eager"] == 1
        assert bool(result["streaming"]) == streams and len(result["lengths"]) == 2
