"""Runners: one interface, `run(feed) -> outputs`, over every runtime we compare.

Each runner takes a feed `{"x": float32 [batch, seq, input_size]}` and returns
`{"logits": [batch, output_size]}` as numpy arrays. `OnnxRuntimeRunner` validates the feed
before calling onnxruntime, whose kernels can abort the process on some edge cases; every
path into onnxruntime goes through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, ModelSpec

if TYPE_CHECKING:
    import torch

Feed = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]


def validate_feed(feed: Feed, spec: ModelSpec) -> np.ndarray:
    """Check a feed against the signature; return `x`. UserInputError says what is wrong."""
    if not isinstance(feed, Mapping):
        raise UserInputError("the input must be a mapping of input names to arrays")
    names = set(feed)
    if names != {INPUT_NAME}:
        raise UserInputError(f"the model takes exactly one input {INPUT_NAME!r}, got {sorted(names)}")
    x = feed[INPUT_NAME]
    if not isinstance(x, np.ndarray):
        raise UserInputError(f"input {INPUT_NAME!r} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise UserInputError(f"input {INPUT_NAME!r} must be float32, got {x.dtype}")
    if x.ndim != 3:
        raise UserInputError(
            f"input {INPUT_NAME!r} must have rank 3 [batch, seq, {spec.input_size}], got shape {list(x.shape)}"
        )
    if x.shape[2] != spec.input_size:
        raise UserInputError(
            f"input {INPUT_NAME!r} has {x.shape[2]} channels on its last axis, the model takes {spec.input_size}"
        )
    if x.size and not np.isfinite(x).all():
        raise UserInputError(f"non-finite input: {INPUT_NAME!r} holds NaN or inf")
    return x


class Runner:
    """Base: `name`, the spec, and `run(feed) -> outputs`."""

    name = "runner"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def run(self, feed: Feed) -> Outputs:
        x = validate_feed(feed, self.spec)
        if x.shape[0] == 0:  # empty batch: nothing to compute, and no kernel sees it
            return {OUTPUT_NAME: np.zeros((0, self.spec.output_size), dtype=np.float32)}
        return {OUTPUT_NAME: self._infer(x)}

    def _infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TorchRunner(Runner):
    """A torch module (eager or TorchScript) or a function of x, run under no_grad."""

    def __init__(self, spec: ModelSpec, fn: "torch.nn.Module", name: str) -> None:
        super().__init__(spec)
        self.fn = fn
        self.name = name

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.fn(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def eager_runner(spec: ModelSpec, model: "torch.nn.Module") -> TorchRunner:
    """The reference: the tutorial's own loop (`tutorial_forward`) on the model's weights."""
    from gru_deploy.model import tutorial_forward

    return TorchRunner(spec, lambda x: tutorial_forward(model, x), "eager")


def torchscript_runner(spec: ModelSpec, module: "torch.jit.ScriptModule") -> TorchRunner:
    return TorchRunner(spec, module, "torchscript")


class OnnxRuntimeRunner(Runner):
    """onnxruntime on the CPU execution provider, one session, its own thread setting."""

    name = "onnxruntime"

    def __init__(self, spec: ModelSpec, model: Path | bytes, threads: int = 1) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserInputError(f"onnxruntime cannot load the model: {first[:300]}") from None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


class OnnxReferenceRunner(Runner):
    """onnx's own `ReferenceEvaluator`: an independent (slow, pure numpy) runtime."""

    name = "onnx-reference"

    def __init__(self, spec: ModelSpec, model: bytes) -> None:
        super().__init__(spec)
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(onnx.load_from_string(model))

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.evaluator.run([OUTPUT_NAME], {INPUT_NAME: x})[0])


class Float64Runner(Runner):
    """The equations, re-implemented in float64 numpy from the design, not from our torch code."""

    name = "float64"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__(spec)
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}

    def _infer(self, x: np.ndarray) -> np.ndarray:
        w = self.w

        def sigmoid(a: np.ndarray) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-a))

        x64 = x.astype(np.float64)
        h = np.zeros((x.shape[0], self.spec.hidden_size))
        for t in range(x.shape[1]):
            xt = x64[:, t, :]
            z = sigmoid(xt @ w["gru.W_xz.weight"].T + w["gru.W_xz.bias"] + h @ w["gru.W_hz.weight"].T)
            r = sigmoid(xt @ w["gru.W_xr.weight"].T + w["gru.W_xr.bias"] + h @ w["gru.W_hr.weight"].T)
            h_tilde = np.tanh(xt @ w["gru.W_xh.weight"].T + w["gru.W_xh.bias"] + (r * h) @ w["gru.W_hh.weight"].T)
            h = (1.0 - z) * h + z * h_tilde
        return h @ w["fc.weight"].T + w["fc.bias"]
