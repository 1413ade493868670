"""Training (Adam + cross-entropy, as in the tutorial, with minibatches) and checkpoints."""

from __future__ import annotations

import io
import math
import pickle
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gru_deploy.data import DataSplit, Dataset
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import atomic_write_bytes, sha256_bytes
from gru_deploy.models.tutorial import GRUClassifier, build_model, load_weights, spec_from_state_dict
from gru_deploy.spec import ModelSpec
from gru_deploy.versions import library_versions

CHECKPOINT_FORMAT = "gru-deploy-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    seed: int = 0
    normalize: bool = False  # learn per-channel mean/std on the training split, bake them into the model

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserInputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserInputError(f"--lr must be a positive number, got {self.lr}")


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the spec, weights and how they were made."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None  # of the file it was read from

    def model(self) -> GRUClassifier:
        return load_weights(self.spec, self.state_dict)

    def to_bytes(self) -> bytes:
        return _payload_bytes({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                               "config": self.spec.to_dict(), "state_dict": self.state_dict, "metrics": self.metrics,
                               "training": self.training, "versions": self.versions})

    def save(self, path: Path) -> str:
        """Write the checkpoint atomically; its sha256."""
        data = self.to_bytes()
        atomic_write_bytes(Path(path), data)
        return sha256_bytes(data)


def _payload_bytes(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _logits(model: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The classifier's logits; with lengths, its `forward_lengths` (state held past each length)."""
    return model(x) if lengths is None else model.forward_lengths(x, lengths)


def accuracy(model: torch.nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Share of `data` the classifier (the tutorial's or a family's) gets right."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = torch.from_numpy(data.x[start:start + batch_size])
            lengths = None if data.lengths is None else torch.from_numpy(data.lengths[start:start + batch_size])
            correct += int((_logits(model, x, lengths).argmax(1).numpy() == data.y[start:start + batch_size]).sum())
    return correct / len(data)


def channel_statistics(data: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over the valid steps of the training data (std floored at 1e-6)."""
    x = data.x
    if data.lengths is not None:
        valid = np.arange(x.shape[1])[None, :] < data.lengths[:, None]
        values = x[valid]
    else:
        values = x.reshape(-1, x.shape[2])
    if values.shape[0] == 0:
        raise UserInputError(f"{data.name}: no valid steps to learn the normalisation from")
    values = values.astype(np.float64)
    return tuple(values.mean(0).tolist()), tuple(np.maximum(values.std(0), 1e-6).tolist())


def train(spec: ModelSpec, split: DataSplit, options: TrainOptions,
          progress: Callable[[int, float], None] | None = None) -> Checkpoint:
    """Train a fresh classifier on `split.train`; report held-out accuracy on `split.test`.

    `progress(epoch, loss)` is called after every epoch.
    """
    if split.train.input_size != spec.input_size:
        raise UserInputError(f"data has {split.train.input_size} input channels but the model takes "
                             f"{spec.input_size}")
    if len(split.train.labels) != spec.output_size:
        raise UserInputError(f"data has {len(split.train.labels)} classes but the model has {spec.output_size}")
    if options.normalize:
        spec = replace(spec, normalization=channel_statistics(split.train))
    torch.manual_seed(options.seed)
    metrics, state = _fit(build_model(spec), split, options, progress)
    return Checkpoint(spec, state, metrics, _training_record(split, options), library_versions())


def _training_record(split: DataSplit, options: TrainOptions) -> dict[str, Any]:
    return {"data": split.describe(), "epochs": options.epochs, "batch_size": options.batch_size,
            "normalize": options.normalize, "lr": options.lr, "seed": options.seed, "optimizer": "Adam",
            "loss": "cross_entropy"}


def _fit(model: torch.nn.Module, split: DataSplit, options: TrainOptions,
         progress: Callable[[int, float], None] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adam + cross-entropy over shuffled minibatches, `progress(epoch, loss)` after each epoch;
    then the metrics (accuracies, loss per epoch) and a copy of the trained weights."""
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(split.train.x)
    y = torch.from_numpy(split.train.y)
    lengths = None if split.train.lengths is None else torch.from_numpy(split.train.lengths)
    generator = torch.Generator().manual_seed(options.seed)
    history: list[float] = []
    for epoch in range(1, options.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), options.batch_size):
            index = order[start:start + options.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(_logits(model, x[index], None if lengths is None else lengths[index]), y[index])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        history.append(total / len(x))
        if progress is not None:
            progress(epoch, history[-1])
    metrics = {"train_accuracy": accuracy(model, split.train), "test_accuracy": accuracy(model, split.test),
               "final_loss": history[-1], "loss_history": history}
    return metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the built-in families (stacked / bidirectional tutorial cells, torch.nn.GRU) -------------

@dataclass
class FamilyCheckpoint:
    """A checkpoint of a built-in family: which family, its constructor arguments, the weights
    and how they were made. Exported through the generic path for a module."""

    family: str
    model_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    labels: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None

    def model(self) -> torch.nn.Module:
        from gru_deploy.models.families import build_family

        module = build_family(self.family, self.model_args)
        try:
            module.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise UserInputError(f"the checkpoint's weights do not fit family {self.family!r} with "
                                 f"{self.model_args}: {' '.join(str(exc).split())[:300]}") from None
        for name, tensor in self.state_dict.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserInputError(f"state_dict entry {name} holds NaN or inf; refusing to deploy it")
        return module.eval()

    def to_bytes(self) -> bytes:
        return _payload_bytes({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                               "family": self.family, "model_args": self.model_args, "state_dict": self.state_dict,
                               "labels": list(self.labels), "metrics": self.metrics, "training": self.training,
                               "versions": self.versions})

    save = Checkpoint.save


def train_family(family: str, hidden_size: int, layers: int, bidirectional: bool, split: DataSplit,
                 options: TrainOptions, progress: Callable[[int, float], None] | None = None) -> FamilyCheckpoint:
    """Train a fresh member of a built-in family on `split.train`, as `train` does the tutorial's."""
    from gru_deploy.models.families import build_family

    args: dict[str, Any] = {"input_size": split.train.input_size, "hidden_size": hidden_size,
                            "output_size": len(split.train.labels), "layers": layers, "bidirectional": bidirectional}
    if options.normalize:
        args["normalization"] = channel_statistics(split.train)
    torch.manual_seed(options.seed)
    metrics, state = _fit(build_family(family, args), split, options, progress)
    return FamilyCheckpoint(family, args, state, tuple(split.train.labels), metrics,
                            _training_record(split, options), library_versions())


def load_checkpoint(path: Path) -> "Checkpoint | FamilyCheckpoint":
    """Read a checkpoint safely (`weights_only=True`, never a fallback).

    Accepts gru-deploy checkpoints and the tutorial's plain state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    if not raw:
        raise UserInputError(f"{path}: the checkpoint file is empty")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile,
            KeyError, AttributeError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(f"{path}: not a loadable weights-only PyTorch checkpoint ({first[:200]})") from None
    sha = sha256_bytes(raw)
    if not isinstance(obj, dict):
        raise UserInputError(f"{path}: holds a {type(obj).__name__}, expected a checkpoint dict or a state_dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("format_version") != CHECKPOINT_VERSION:
            raise UserInputError(f"{path}: checkpoint format_version {obj.get('format_version')!r} is not supported")
        if "family" in obj:
            return _family_checkpoint(path, obj, sha)
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise UserInputError(f"{path}: checkpoint has no state_dict")
        spec = ModelSpec.from_dict(obj.get("config"))
        ckpt = Checkpoint(spec, dict(state), _plain(obj.get("metrics")), _plain(obj.get("training")),
                          _plain(obj.get("versions")), sha)
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = Checkpoint(spec_from_state_dict(obj), dict(obj), {}, {"source": "state_dict"}, {}, sha)
    else:
        raise UserInputError(f"{path}: neither a gru-deploy checkpoint nor a tutorial state_dict")
    ckpt.model()  # validates keys, shapes and finiteness now, with a clear message
    return ckpt


def _family_checkpoint(path: Path, obj: dict[str, Any], sha: str) -> FamilyCheckpoint:
    state, args, labels = obj.get("state_dict"), obj.get("model_args"), obj.get("labels") or []
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path}: the family checkpoint's state_dict must map names to tensors")
    if not isinstance(args, dict) or not isinstance(labels, (list, tuple)):
        raise UserInputError(f"{path}: the family checkpoint's model_args or labels are malformed")
    ckpt = FamilyCheckpoint(str(obj["family"]), dict(args), dict(state), tuple(str(v) for v in labels),
                            _plain(obj.get("metrics")), _plain(obj.get("training")), _plain(obj.get("versions")), sha)
    ckpt.model()  # validates family, arguments, keys and shapes now, with a clear message
    return ckpt


def _plain(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def stderr_progress(epochs: int, quiet: bool) -> tuple[Callable[[int, float], None] | None, Callable[[], None]]:
    """A click progress bar on a terminal, nothing otherwise. Returns (callback, close)."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    import click

    bar = click.progressbar(length=epochs, label="training", file=sys.stderr,
                            item_show_func=lambda loss: f"loss {loss:.4f}" if loss is not None else "")
    bar.__enter__()
    return lambda epoch, loss: bar.update(1, loss), lambda: bar.__exit__(None, None, None)

