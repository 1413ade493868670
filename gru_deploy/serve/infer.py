"""Inference on an export folder with onnxruntime: pick the variant, check files, run, label."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.serve.repository import ChosenModel, load_model_bytes  # noqa: F401  (infer's callers read them here)
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME, STATE_IN, STATE_OUT


def load_array(path: Path, what: str) -> np.ndarray:
    """Load a `.npy` file without pickles; UserInputError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(array, np.ndarray):
        raise UserInputError(f"{path}: holds an .npz archive, give a single .npy array for {what}")
    return array


def save_array(path: Path, array: np.ndarray) -> None:
    from gru_deploy.manifest import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(Path(path), buffer.getvalue())


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Prediction:
    logits: np.ndarray
    probabilities: np.ndarray
    labels: tuple[str, ...]
    state: np.ndarray | None = None
    model: str = ""  # the model file that ran, as the manifest names it
    precision: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "precision": self.precision,
            "predictions": [
                {"index": int(i), "label": self.labels[int(i)],
                 "probabilities": {label: float(p) for label, p in zip(self.labels, probs)}}
                for i, probs in zip(self.logits.argmax(axis=-1), self.probabilities)
            ],
            "logits": self.logits.tolist(),
        }


def infer(folder: Path, x: np.ndarray, lengths: np.ndarray | None = None, h0: np.ndarray | None = None,
          stream: bool = False, threads: int = 1, precision: str = "fp32") -> Prediction:
    """Run onnxruntime on an export folder's or bundle's model for `x`.

    With `lengths` the variable-length model runs; with `stream` (h0 defaults to zeros) the
    stateful one, whose final state is returned. `precision` picks the fp32 model (the
    default) or the int8 one of an edge bundle packaged with --quantize int8; the model is
    the one the manifest lists for that variant and precision. Every file is checked
    against the manifest first, and every input is validated before onnxruntime sees it.
    """
    from gru_deploy.check.runners import OnnxRuntimeRunner, validate_feed

    if lengths is not None and (stream or h0 is not None):
        raise UserInputError("--lengths cannot be combined with --state-in/--state-out: "
                             "pad and use lengths, or stream chunk by chunk")
    variant = "lengths" if lengths is not None else "stream" if (stream or h0 is not None) else "classifier"
    chosen = load_model_bytes(Path(folder), variant, precision)
    spec = chosen.spec
    feed: dict[str, Any] = {INPUT_NAME: x}
    if variant == "lengths":
        feed[LENGTHS_NAME] = lengths
    if variant == "stream":
        batch = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 3 else 0
        feed[STATE_IN] = h0 if h0 is not None else np.zeros((batch, spec.hidden_size), np.float32)
        validate_feed(feed, spec, variant)
        if batch > 0:  # the streaming API's code path: the state set, the chunk fed, the state read back
            from gru_deploy.serve.stream import Stream

            stream = Stream(folder, batch, precision, threads, _chosen=chosen)
            stream.state = feed[STATE_IN]
            logits = stream.run(x)
            return Prediction(logits, softmax(logits), spec.labels, stream.state, chosen.name, precision)
    runner = OnnxRuntimeRunner(spec, chosen.data, threads=threads, variant=variant)
    out = runner.run(feed)
    logits = out[OUTPUT_NAME]
    return Prediction(logits, softmax(logits), spec.labels, out.get(STATE_OUT), chosen.name, precision)
