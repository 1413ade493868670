"""TrainOptions, training determinism and accuracy, checkpoint save/load and its refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from gru_deploy.data import DataSplit, load_data
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import sha256_file
from gru_deploy.models.tutorial import GRUClassifier
from gru_deploy.spec import ModelSpec
from gru_deploy.train import Checkpoint, TrainOptions, load_checkpoint, train


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "--epochs"), ({"epochs": -3}, "--epochs"), ({"batch_size": 0}, "--batch-size"),
     ({"lr": 0.0}, "--lr"), ({"lr": -1e-3}, "--lr"), ({"lr": float("nan")}, "--lr"),
     ({"lr": float("inf")}, "--lr")],
)
def test_train_options_reject(kwargs, match):
    with pytest.raises(UserInputError, match=match):
        TrainOptions(**kwargs)


@pytest.fixture(scope="module")
def small_split() -> DataSplit:
    full = load_data("synthetic", seed=0)
    return DataSplit(full.train.subset(np.arange(128), "train"), full.test.subset(np.arange(64), "test"), "small")


def test_train_is_deterministic(small_split):
    spec = ModelSpec(labels=small_split.train.labels)
    seen = []
    a = train(spec, small_split, TrainOptions(epochs=1, batch_size=32, seed=3), progress=lambda e, l: seen.append(e))
    b = train(spec, small_split, TrainOptions(epochs=1, batch_size=32, seed=3))
    c = train(spec, small_split, TrainOptions(epochs=1, batch_size=32, seed=4))
    assert seen == [1]
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.metrics == b.metrics
    assert not all(torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    assert len(a.metrics["loss_history"]) == 1


def accuracy_of(spec: ModelSpec, state_dict: dict, x: np.ndarray, y: np.ndarray) -> float:
    """Share of argmax(logits) == y, recomputed from the weights alone (not through train.accuracy)."""
    model = GRUClassifier(spec.input_size, spec.hidden_size, spec.output_size)
    model.load_state_dict(state_dict)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x))
    return float(np.mean(logits.argmax(1).numpy() == y))


def test_train_reports_the_accuracy_of_its_weights_on_each_split(small_split):
    """metrics hold the returned weights' accuracy on the held-out split (and on the training split)."""
    ckpt = train(ModelSpec(labels=small_split.train.labels), small_split, TrainOptions(epochs=2, batch_size=32))
    for split, key in ((small_split.test, "test_accuracy"), (small_split.train, "train_accuracy")):
        assert ckpt.metrics[key] == accuracy_of(ckpt.spec, ckpt.state_dict, split.x, split.y), key


def test_train_rejects_mismatched_spec(small_split):
    with pytest.raises(UserInputError, match="input channels"):
        train(ModelSpec(input_size=5), small_split, TrainOptions(epochs=1))
    with pytest.raises(UserInputError, match="classes"):
        train(ModelSpec(output_size=3), small_split, TrainOptions(epochs=1))


@pytest.mark.slow
def test_default_training_reaches_90_percent():
    split = load_data("synthetic")
    ckpt = train(ModelSpec(labels=split.train.labels), split, TrainOptions())
    assert ckpt.metrics["test_accuracy"] >= 0.90


# --- checkpoints --------------------------------------------------------------------

def test_checkpoint_round_trip(tiny_checkpoint, checkpoint_file):
    loaded = load_checkpoint(checkpoint_file)
    assert loaded.spec == tiny_checkpoint.spec
    assert loaded.state_dict.keys() == tiny_checkpoint.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in tiny_checkpoint.state_dict.items())
    assert loaded.metrics == tiny_checkpoint.metrics and loaded.training == tiny_checkpoint.training
    assert loaded.versions == tiny_checkpoint.versions
    assert loaded.sha256 == sha256_file(checkpoint_file) == tiny_checkpoint.sha256


@pytest.mark.parametrize("sizes", [(8, 16, 4), (5, 7, 3)])
def test_load_tutorial_state_dict(tmp_path, sizes):
    torch.manual_seed(0)
    state = GRUClassifier(*sizes).state_dict()
    path = tmp_path / "tutorial.pt"
    torch.save(state, path)
    ckpt = load_checkpoint(path)
    assert (ckpt.spec.input_size, ckpt.spec.hidden_size, ckpt.spec.output_size) == sizes
    assert ckpt.training == {"source": "state_dict"} and ckpt.metrics == {}
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state.items())
    x = torch.randn(2, 3, sizes[0])
    reference = GRUClassifier(*sizes)
    reference.load_state_dict(state)
    assert torch.equal(ckpt.model()(x), reference.eval()(x))


class Payload:
    """An arbitrary class: weights_only loading must refuse it."""

    def __init__(self):
        self.value = 42


def _state(**changes):
    state = dict(GRUClassifier().state_dict())
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return state


def _ckpt(**changes):
    payload = {"format": "gru-deploy-checkpoint", "format_version": 1, "config": ModelSpec().to_dict(),
               "state_dict": dict(GRUClassifier().state_dict()), "metrics": {}, "training": {}, "versions": {}}
    payload.update(changes)
    return payload


def _nan_weight():
    w = torch.zeros(16, 8)
    w[3, 4] = float("nan")
    return w


BAD_OBJECTS = {
    "custom object": (lambda: Payload(), "weights-only"),
    "dict with custom object": (lambda: {"fc.weight": Payload()}, "weights-only"),
    "dict with a set": (lambda: {"fc.weight": {1, 2}}, "not a loadable|neither"),
    "a list": (lambda: [torch.zeros(1)], "holds a list"),
    "a bare tensor": (lambda: torch.zeros(3), "holds a Tensor"),
    "empty state_dict": (lambda: {}, "missing"),
    "missing key": (lambda: _state(fc__bias=None), r"missing \['fc.bias'\]"),
    "extra key": (lambda: _state(gru__extra=torch.zeros(1)), r"unexpected \['gru.extra'\]"),
    "wrong shape": (lambda: _state(gru__W_hz__weight=torch.zeros(16, 15)), "gru.W_hz.weight has shape"),
    "1-D weight": (lambda: _state(gru__W_xz__weight=torch.zeros(16)), "2-D"),
    "nan weight": (lambda: _state(gru__W_xz__weight=_nan_weight()), "NaN or inf"),
    "inf bias": (lambda: _state(fc__bias=torch.full((4,), float("inf"))), "NaN or inf"),
    "int weight": (lambda: _state(fc__weight=torch.zeros(4, 16, dtype=torch.int64)), "not floating point"),
    "format_version 2": (lambda: _ckpt(format_version=2), "format_version 2"),
    "no state_dict": (lambda: _ckpt(state_dict=None), "no state_dict"),
    "unknown config field": (lambda: _ckpt(config={**ModelSpec().to_dict(), "layers": 2}), "unknown fields"),
    "config vs weights": (lambda: _ckpt(config=ModelSpec(hidden_size=32).to_dict()), "has shape"),
    "mixed dict": (lambda: {"fc.weight": torch.zeros(1), "note": "hi"}, "neither"),
}


@pytest.mark.parametrize("case", BAD_OBJECTS)
def test_load_checkpoint_rejects_objects(tmp_path, case):
    make, match = BAD_OBJECTS[case]
    path = tmp_path / "bad.pt"
    torch.save(make(), path)
    with pytest.raises(UserInputError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "empty"), (b"these are not weights\n", "not a loadable"), (b"PK\x03\x04broken", "not a loadable")],
)
def test_load_checkpoint_rejects_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=match):
        load_checkpoint(path)


def test_load_checkpoint_truncated(checkpoint_file, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(checkpoint_file.read_bytes()[:-200])
    with pytest.raises(UserInputError, match="not a loadable"):
        load_checkpoint(path)


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserInputError, match="not found"):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


def test_checkpoint_to_bytes_loads_back(tmp_path):
    ckpt = Checkpoint(ModelSpec(), dict(GRUClassifier().state_dict()), {"a": 1})
    obj = torch.load(io.BytesIO(ckpt.to_bytes()), weights_only=True)
    assert obj["format"] == "gru-deploy-checkpoint" and obj["metrics"] == {"a": 1}


# --- variable-length data ----------------------------------------------------------------

def _variable_length_npz(path, padding_seed):
    """Synthetic data cut to random lengths; the padding past each length is noise of `padding_seed`."""
    from gru_deploy.data import synthetic

    data = synthetic(n=200, seq_len=30)
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 31, size=len(data))
    x = data.x.copy()
    pad = np.random.default_rng(padding_seed)
    for i, n in enumerate(lengths):
        x[i, n:] = pad.normal(0, 5, size=(30 - n, 8))
    np.savez(path, x=x, y=data.y, lengths=lengths, labels=np.array(data.labels))


def test_variable_length_training_ignores_the_padding(tmp_path):
    """Masked training: what lies past each sample's length cannot change the weights."""
    from gru_deploy.data import load_data

    results = []
    for seed in (1, 2):
        _variable_length_npz(tmp_path / f"v{seed}.npz", padding_seed=seed)
        split = load_data(str(tmp_path / f"v{seed}.npz"), seed=0)
        assert split.train.lengths is not None
        ckpt = train(ModelSpec(labels=split.train.labels), split, TrainOptions(epochs=2, seed=0))
        assert ckpt.training["data"]["variable_length"] is True
        results.append(ckpt)
    for name, tensor in results[0].state_dict.items():
        torch.testing.assert_close(tensor, results[1].state_dict[name], rtol=0, atol=0)
    assert results[0].metrics == results[1].metrics
