"""ModelSpec: the sizes, names and labels every stage agrees on (numpy-free, torch-free)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gru_deploy.errors import UserInputError

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
STATE_IN = "h0"
STATE_OUT = "h_n"
LENGTHS_NAME = "lengths"
# Exported forms of one model: the classifier, the stateful stream, the variable-length one.
VARIANT_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classifier": ((INPUT_NAME,), (OUTPUT_NAME,)),
    "stream": ((INPUT_NAME, STATE_IN), (OUTPUT_NAME, STATE_OUT)),
    "lengths": ((INPUT_NAME, LENGTHS_NAME), (OUTPUT_NAME,)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the classifier: input channels, hidden units, classes and their names."""

    input_size: int = 8
    hidden_size: int = 16
    output_size: int = 4
    labels: tuple[str, ...] = field(default=())
    # Per-channel (mean, std) learned on the training split; the exported graphs apply
    # (x - mean) / std themselves, so no runtime needs to know about it.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "output_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        if not self.labels:
            object.__setattr__(self, "labels", tuple(f"class_{i}" for i in range(self.output_size)))
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if len(self.labels) != self.output_size:
            raise UserInputError(
                f"{len(self.labels)} labels given for output_size {self.output_size}; "
                "give one label per class"
            )
        if self.normalization is not None:
            try:
                mean, std = (tuple(float(v) for v in part) for part in self.normalization)
            except (TypeError, ValueError):
                raise UserInputError("normalization must be a pair of number lists (mean, std)") from None
            if len(mean) != self.input_size or len(std) != self.input_size:
                raise UserInputError(f"normalization needs {self.input_size} means and stds, one per input channel")
            if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
                raise UserInputError("normalization means must be finite and stds finite and positive")
            object.__setattr__(self, "normalization", (mean, std))

    def tensor(self, name: str) -> dict[str, Any]:
        """Name, dtype and shape (dynamic dims named) of one input or output."""
        shapes: dict[str, tuple[str, list[Any]]] = {
            INPUT_NAME: ("float32", ["batch", "seq", self.input_size]),
            STATE_IN: ("float32", ["batch", self.hidden_size]),
            LENGTHS_NAME: ("int64", ["batch"]),
            OUTPUT_NAME: ("float32", ["batch", self.output_size]),
            STATE_OUT: ("float32", ["batch", self.hidden_size]),
        }
        dtype, shape = shapes[name]
        return {"name": name, "dtype": dtype, "shape": shape}

    def signature(self, variant: str = "classifier") -> dict[str, list[dict[str, Any]]]:
        """A variant's I/O contract, as recorded in manifests."""
        inputs, outputs = VARIANT_IO[variant]
        return {"inputs": [self.tensor(n) for n in inputs], "outputs": [self.tensor(n) for n in outputs]}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        if self.normalization is None:
            del data["normalization"]
        else:
            data["normalization"] = {"mean": list(self.normalization[0]), "std": list(self.normalization[1])}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        """Build from plain data (a checkpoint's or manifest's config), rejecting bad fields."""
        if not isinstance(data, dict):
            raise UserInputError(f"model config must be a mapping, got {type(data).__name__}")
        known = {"input_size", "hidden_size", "output_size", "labels", "normalization"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"model config has unknown fields {unknown}")
        missing = sorted({"input_size", "hidden_size", "output_size"} - set(data))
        if missing:
            raise UserInputError(f"model config lacks fields {missing}")
        labels = data.get("labels") or ()
        if not isinstance(labels, (list, tuple)):
            raise UserInputError("model config 'labels' must be a list of names")
        norm = data.get("normalization")
        if norm is not None:
            if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
                raise UserInputError("model config 'normalization' must be {mean: [...], std: [...]}")
            norm = (norm["mean"], norm["std"])
        return cls(
            input_size=data["input_size"],
            hidden_size=data["hidden_size"],
            output_size=data["output_size"],
            labels=tuple(labels),
            normalization=norm,
        )
