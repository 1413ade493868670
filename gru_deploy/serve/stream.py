"""`Stream`: one live sequence (or a batch of them) stepped through the stream model.

For edge and online use, where a model sees one time step at a time: the state stays inside
onnxruntime's bound buffers between calls, with no numpy round trip and no re-allocation.

    from gru_deploy import Stream
    stream = Stream("exported-edge/")          # an export folder or a bundle
    for x_t in sensor:                          # x_t: float32 [input_size] (or [batch, input_size])
        logits = stream.step(x_t)
    stream.reset()                              # the next sequence starts from zeros

The model is the stream variant the manifest lists (in the export's chosen form: a fused
`GRU` node or a Loop), its file checked against the manifest. `step` runs it with
onnxruntime's io_binding: x, the two state buffers and the logits are allocated once; the
state ping-pongs between the two buffers (one is h0 while the other receives h_n), so a step
copies only x in and the logits out. `run(chunk)` feeds a chunk of any length the same way
(it is what `gru-deploy infer --state-in/--state-out` uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, STATE_IN, STATE_OUT


class Stream:
    """A batch of live sequences in the stream model: `step(x_t) -> logits`, `state`, `reset()`.

    On the export or bundle of a module (a built-in family or your own model) with a stream
    variant, `Stream(...)` is a ModuleStream: `step(x_t) -> {output: value}`."""

    def __new__(cls, path: str | Path, batch: int = 1, precision: str = "fp32", threads: int = 1,
                _chosen: Any = None) -> Any:
        from gru_deploy.serve.user import user_model_kind

        if _chosen is None and user_model_kind(Path(path)) is not None:
            return ModuleStream(Path(path), batch, precision, threads)
        return super().__new__(cls)

    def __init__(self, path: str | Path, batch: int = 1, precision: str = "fp32", threads: int = 1,
                 _chosen: Any = None) -> None:
        import onnxruntime as ort

        from gru_deploy.convert.graphs import without_empty_guard
        from gru_deploy.check.runners import session_options
        from gru_deploy.serve.repository import load_model_bytes

        if type(batch) is not int or batch < 1:
            raise UserInputError(f"a Stream needs a batch of at least 1 sequence, got {batch!r}")
        chosen = _chosen if _chosen is not None else load_model_bytes(Path(path), "stream", precision)
        self.spec, self.model, self.precision, self.batch = chosen.spec, chosen.name, chosen.precision, batch
        # `step` never feeds an empty axis, so it may run the guarded graph's non-empty branch
        # alone (the same nodes, without the per-call guard); `run` takes any chunk: the whole graph.
        step_graph = without_empty_guard(chosen.data)
        try:
            self.session = ort.InferenceSession(chosen.data, session_options(threads),
                                                providers=["CPUExecutionProvider"])
            self._step_session = self.session if step_graph is None else ort.InferenceSession(
                step_graph, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise UserInputError(f"{path}: onnxruntime cannot load {chosen.name}: "
                                 f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None
        self.guard_skipped = step_graph is not None
        hidden, inputs, outputs = self.spec.hidden_size, self.spec.input_size, self.spec.output_size
        self._x = np.zeros((batch, 1, inputs), np.float32)
        self._h = [np.zeros((batch, hidden), np.float32), np.zeros((batch, hidden), np.float32)]
        self._logits = np.zeros((batch, outputs), np.float32)
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in
                  (("x", self._x), ("h0", self._h[0]), ("h1", self._h[1]), ("logits", self._logits))}
        self._bindings = []  # [0]: h0 <- buffer 0, h_n -> buffer 1; [1]: the other way round
        for state_in, state_out in (("h0", "h1"), ("h1", "h0")):
            binding = self._step_session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, values["x"])
            binding.bind_ortvalue_input(STATE_IN, values[state_in])
            binding.bind_ortvalue_output(OUTPUT_NAME, values["logits"])
            binding.bind_ortvalue_output(STATE_OUT, values[state_out])
            self._bindings.append(binding)
        self._current = 0  # which buffer holds the state

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, spec: Any, batch: int = 1, threads: int = 1,
                  name: str = "model_stream.onnx") -> "Stream":
        """A Stream over a stream model given as bytes (benchmarks, tests): no manifest, no checks."""
        from gru_deploy.serve.repository import ChosenModel

        return cls("", batch, "fp32", threads, _chosen=ChosenModel(name, onnx_bytes, spec, "fp32"))

    def step(self, x_t: np.ndarray) -> np.ndarray:
        """One time step for every sequence: x_t float32 [batch, input_size] (or [input_size]
        for a batch of 1). Returns the logits after it, [batch, output_size] (a copy)."""
        if x_t.__class__ is not np.ndarray:
            x_t = np.asarray(x_t)
        if x_t.shape == (self.spec.input_size,) and self.batch == 1:
            x_t = x_t[None]
        if x_t.shape != (self.batch, self.spec.input_size):
            raise UserInputError(f"step takes x_t of shape [{self.batch}, {self.spec.input_size}] (batch, input "
                                 f"size), got {list(x_t.shape)}")
        if x_t.dtype != np.float32:
            raise UserInputError(f"step takes float32 x_t, got {x_t.dtype}")
        if not np.isfinite(x_t).all():
            raise UserInputError("non-finite input: x_t holds NaN or inf")
        self._x[:, 0, :] = x_t
        self._step_session.run_with_iobinding(self._bindings[self._current])
        self._current ^= 1
        return self._logits.copy()

    def run(self, chunk: np.ndarray) -> np.ndarray:
        """Feed a chunk x [batch, steps, input_size] (any number of steps, 0 included), carrying
        the state; returns the logits after its last step (fc(state) for 0 steps)."""
        from gru_deploy.check.runners import validate_feed

        chunk = np.asarray(chunk)
        if chunk.ndim == 3 and chunk.shape[0] != self.batch:
            raise UserInputError(f"this Stream holds {self.batch} sequence(s); the chunk has batch {chunk.shape[0]}")
        feed = validate_feed({INPUT_NAME: chunk, STATE_IN: self._h[self._current]}, self.spec, "stream")
        if chunk.shape[1] == 1:
            return self.step(chunk[:, 0])
        logits, h_n = self.session.run([OUTPUT_NAME, STATE_OUT], feed)
        self._h[self._current][...] = h_n
        return logits

    @property
    def state(self) -> np.ndarray:
        """The hidden state of every sequence, [batch, hidden] (a copy)."""
        return self._h[self._current].copy()

    @state.setter
    def state(self, h: np.ndarray) -> None:
        h = np.asarray(h)
        if h.shape != (self.batch, self.spec.hidden_size) or h.dtype != np.float32:
            raise UserInputError(f"the state must be float32 [{self.batch}, {self.spec.hidden_size}], got "
                                 f"{h.dtype} {list(h.shape)}")
        if not np.isfinite(h).all():
            raise UserInputError("non-finite state: it holds NaN or inf")
        self._h[self._current][...] = h

    def reset(self) -> None:
        """Start every sequence again from the zero state."""
        self._h[self._current][...] = 0.0

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels


class ModuleStream:
    """A batch of live sequences in a module's stream model (its forward_stream): `step(x)`
    with x [batch, input] (one step) or [batch, chunk, input] returns every output of the
    module's signature by name; the state ([batch, ...], from the module's initial_state,
    zeros) is carried between calls. `state` reads or sets it; `reset()` zeroes it."""

    def __init__(self, path: Path, batch: int = 1, precision: str = "fp32", threads: int = 1) -> None:
        import onnxruntime as ort

        from gru_deploy.check.runners import session_options
        from gru_deploy.check.runners import check_user_state
        from gru_deploy.serve.user import module_file

        if type(batch) is not int or batch < 1:
            raise UserInputError(f"a Stream needs a batch of at least 1 sequence, got {batch!r}")
        file = module_file(path, "stream", precision)  # says so when the module does not stream
        data, signature, self.model = file.data, file.signature, file.name
        self.signature, self.batch, self.precision = signature, batch, precision
        self.session = ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        self.output_names = [o["name"] for o in signature["outputs"]]
        self.input_size = int(signature["inputs"][0]["shape"][2])
        self._check_state = check_user_state
        self.reset()

    def reset(self) -> None:
        """Every sequence of the batch starts again from the initial (zero) state."""
        self._state = self._check_state(None, np.zeros((self.batch, 1, self.input_size), np.float32), self.signature)

    @property
    def state(self) -> np.ndarray:
        return self._state.copy()

    @state.setter
    def state(self, value: np.ndarray) -> None:
        self._state = self._check_state(np.asarray(value), np.zeros((self.batch, 1, self.input_size), np.float32),
                                        self.signature)

    def step(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from gru_deploy.check.runners import check_user_input

        x = np.asarray(x)
        if x.ndim == 2:
            x = x[:, None, :]
        if x.ndim != 3 or x.shape[0] != self.batch:
            raise UserInputError(f"step takes x [batch={self.batch}, input] or [batch, chunk, input], got "
                                 f"{list(x.shape)}")
        x = check_user_input(x, self.signature)
        values = dict(zip(self.output_names, self.session.run(self.output_names, {INPUT_NAME: x,
                                                                                   STATE_IN: self._state})))
        self._state = values.pop(STATE_OUT)
        return values
