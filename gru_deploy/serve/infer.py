"""Inference on an export folder or a bundle with onnxruntime, for every model alike (the
tutorial model, a built-in family, your own): the variant asked for (lengths, a state, or
neither), the file the manifest lists for it, every input checked before onnxruntime sees it,
every output of the signature by name; a classifier with labels also gets its predictions."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import STATE_OUT


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
    """Every output of the model that ran, by name (with h_n for the stream variant)."""

    outputs: dict[str, np.ndarray]
    signature: dict[str, Any]
    labels: tuple[str, ...] = ()
    model: str = ""  # the model file that ran, as the manifest names it
    precision: str = "fp32"

    @property
    def classes(self) -> str | None:
        """The output that scores the labels (manifest.labelled_output); None when there is none."""
        from gru_deploy.manifest import labelled_output

        return labelled_output(self.signature, self.labels)

    @property
    def logits(self) -> np.ndarray:
        return self.outputs[self.classes or self.signature["outputs"][0]["name"]]

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def state(self) -> np.ndarray | None:
        return self.outputs.get(STATE_OUT)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "precision": self.precision, "signature": self.signature,
            "outputs": {name: {"shape": list(value.shape), "data": value.tolist()} for name, value in
                        self.outputs.items()}}
        if self.classes is not None:
            out["predictions"] = [
                {"index": int(i), "label": self.labels[int(i)],
                 "probabilities": {label: float(p) for label, p in zip(self.labels, probs)}}
                for i, probs in zip(self.logits.argmax(axis=-1), self.probabilities)]
            out["logits"] = self.logits.tolist()
        return out

    def lines(self, limit: int = 8) -> list[str]:
        """A readable summary: a classifier with labels, each sample's label and probability;
        otherwise per output and sample, the argmax of class-like values (per step for a
        per-step output), else the values; at most `limit` samples."""
        if self.classes is not None:
            return [f"{i}: {item['label']} (p={item['probabilities'][item['label']]:.3f})"
                    for i, item in enumerate(self.to_json()["predictions"])]
        def few(values: np.ndarray, count: int, form: str) -> str:  # the first `count` values, "..." for more
            return " ".join(format(v, form) for v in values[:count]) + (" ..." if values.size > count else "")

        out = []
        for spec in self.signature["outputs"]:
            name, shape = spec["name"], spec["shape"]
            value = self.outputs[name]
            out.append(f"{name} {list(value.shape)} ({', '.join(str(d) for d in shape)})")
            for i, row in enumerate(value[:limit]):
                if row.ndim == 1 and row.size > 1:
                    out.append(f"  sample {i}: argmax {int(row.argmax())}  " + few(row, 8, ".4f"))
                elif row.ndim == 2 and shape[1] == "seq":
                    out.append(f"  sample {i}: argmax per step " + few(row.argmax(axis=-1), 40, "d"))
                else:
                    out.append(f"  sample {i}: " + few(np.ravel(row), 8, ".4f"))
            if value.shape[0] > limit:
                out.append(f"  ... {value.shape[0] - limit} more samples (--json prints all)")
        return out


def choose(path: Path, lengths: bool, stream: bool, precision: str = "fp32",
           manifest: dict[str, Any] | None = None) -> Any:
    """The model file infer runs (serve.user.module_file): the lengths variant when `lengths`,
    the stream variant when `stream`, else the classifier; of `precision`."""
    from gru_deploy.serve.user import module_file, requested_variant

    return module_file(Path(path), requested_variant(True if lengths else None, stream), precision, manifest)


def infer(path: Path, x: Any, lengths: Any = None, h0: Any = None, stream: bool = False, threads: int = 1,
          precision: str = "fp32", manifest: dict[str, Any] | None = None, file: Any = None) -> Prediction:
    """Run onnxruntime on an export folder's or bundle's model for `x`.

    With `lengths` the variable-length model runs on the padded x; with `stream` (or `h0`:
    zeros when None) the stateful one, from that state, h_n among the outputs. `precision`
    picks the fp32 model (the default) or the int8 one of a bundle packaged with --quantize
    int8; the model is the one the manifest lists for that variant and precision, every file
    checked against the manifest first, every input checked before onnxruntime sees it.
    `manifest`: an export folder's, already read; `file`: the model file, already chosen (choose)."""
    import onnxruntime as ort

    from gru_deploy.check.runners import check_user_feed, session_options

    file = file or choose(path, lengths is not None, stream or h0 is not None, precision, manifest)
    signature = file.signature
    feed = check_user_feed(x, signature, file.answers_empty, lengths, h0)
    session = ort.InferenceSession(file.data, session_options(threads), providers=["CPUExecutionProvider"])
    names = [o["name"] for o in signature["outputs"]]
    return Prediction(dict(zip(names, session.run(names, feed))), signature, tuple(file.labels), file.name, precision)
