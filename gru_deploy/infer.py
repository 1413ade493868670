"""Inference on an export folder with onnxruntime: pick the variant, check files, run, label."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME, STATE_IN, STATE_OUT, ModelSpec


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

    def to_json(self) -> dict[str, Any]:
        return {
            "predictions": [
                {"index": int(i), "label": self.labels[int(i)],
                 "probabilities": {label: float(p) for label, p in zip(self.labels, probs)}}
                for i, probs in zip(self.logits.argmax(axis=-1), self.probabilities)
            ],
            "logits": self.logits.tolist(),
        }


def infer(folder: Path, x: np.ndarray, lengths: np.ndarray | None = None, h0: np.ndarray | None = None,
          stream: bool = False, threads: int = 1) -> Prediction:
    """Run onnxruntime on an export folder's model for `x`.

    With `lengths` the variable-length model runs; with `stream` (h0 defaults to zeros) the
    stateful one, whose final state is returned. Every file is checked against the manifest
    first, and every input is validated before onnxruntime sees it.
    """
    from gru_deploy.runners import OnnxRuntimeRunner

    if lengths is not None and (stream or h0 is not None):
        raise UserInputError("--lengths cannot be combined with --state-in/--state-out: "
                             "pad and use lengths, or stream chunk by chunk")
    variant = "lengths" if lengths is not None else "stream" if (stream or h0 is not None) else "classifier"
    spec, model = _model_bytes(Path(folder), variant)
    feed: dict[str, Any] = {INPUT_NAME: x}
    if variant == "lengths":
        feed[LENGTHS_NAME] = lengths
    if variant == "stream":
        batch = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 3 else 0
        feed[STATE_IN] = h0 if h0 is not None else np.zeros((batch, spec.hidden_size), np.float32)
    runner = OnnxRuntimeRunner(spec, model, threads=threads, variant=variant)
    out = runner.run(feed)
    logits = out[OUTPUT_NAME]
    return Prediction(logits, softmax(logits), spec.labels, out.get(STATE_OUT))


def _model_bytes(path: Path, variant: str) -> tuple[ModelSpec, bytes]:
    """The spec and checked ONNX bytes of one variant, from an export folder or a bundle."""
    from gru_deploy.bundle import check_bundle_files, is_bundle, open_bundle
    from gru_deploy.export import check_onnx_bytes
    from gru_deploy.manifest import read_manifest, verified_path
    from gru_deploy.verify import VARIANT_FILES

    if is_bundle(path):
        with open_bundle(path) as (folder, manifest):
            check_bundle_files(folder, manifest)
            names = [n for n, info in manifest["models"].items()
                     if info.get("variant") == variant and info["format"] == "onnx"]
            if not names:
                raise UserInputError(f"{path}: this {manifest['target']} bundle has no {variant} ONNX model")
            data = (folder / names[0]).read_bytes()
            check_onnx_bytes(data, f"{path}: {names[0]}")
            return ModelSpec.from_dict(manifest["config"]), data
    manifest = read_manifest(path)
    if variant != "classifier" and variant not in (manifest.get("variants") or {}):
        raise UserInputError(f"{path}: this export has no {variant} model; re-export with this gru-deploy")
    return ModelSpec.from_dict(manifest["config"]), verified_path(path, manifest, VARIANT_FILES[variant][1]).read_bytes()
