"""`Stream`: one live sequence (or a batch of them) stepped through the stream model.

For edge and online use, where a model sees one time step at a time: the state stays inside
onnxruntime's bound buffers between calls, with no numpy round trip and no re-allocation.

    from gru_deploy import Stream
    stream = Stream("exported-edge/")          # an export folder or a bundle
    for x_t in sensor:                          # x_t: float32 [input_size] (or [batch, input_size])
        logits = stream.step(x_t)
    stream.reset()                              # the next sequence starts from zeros

One engine for every model with a stream variant (the tutorial model, a built-in family, your
own), read off the stream signature the manifest records: the model is the stream variant the
manifest lists (in the export's chosen form: `GRU` nodes or a Loop), its file checked against
the manifest. `step` runs it with onnxruntime's io_binding: x, the two state buffers and the
outputs are allocated once; the state ping-pongs between the two buffers (one is h0 while the
other receives h_n), so a step copies only x in and the outputs out. `run(chunk)` feeds a chunk
of any length the same way (it is what a chunk of `gru-deploy infer --state-in/--state-out`
computes).

What a step returns keeps each model's API as it was: the tutorial model's stream returns its
logits array; a module's (a built-in family's, your own) every output by name, a dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, STATE_IN, STATE_OUT


class Stream:
    """A batch of live sequences in the stream model: `step(x_t)`, `run(chunk)`, `state`,
    `reset()`."""

    def __init__(self, path: str | Path, batch: int = 1, precision: str = "fp32", threads: int = 1,
                 _file: Any = None) -> None:
        import onnxruntime as ort

        from gru_deploy.check.runners import session_options
        from gru_deploy.convert.graphs import without_empty_guard
        from gru_deploy.serve.user import module_file

        if type(batch) is not int or batch < 1:
            raise UserInputError(f"a Stream needs a batch of at least 1 sequence, got {batch!r}")
        file = _file if _file is not None else module_file(Path(path), "stream", precision)
        self.model, self.precision, self.batch, self.labels = file.name, precision, batch, tuple(file.labels)
        self.signature, self.answers_empty = file.signature, file.answers_empty
        # what a step returns, as each did before one engine ran both (README): the tutorial
        # model's logits array; a module's (a family's, your own) every output by name
        self.by_name = file.module
        inputs = {t["name"]: t for t in self.signature["inputs"]}
        self.input_size = int(inputs[INPUT_NAME]["shape"][2])
        self.state_shape = tuple(int(d) for d in inputs[STATE_IN]["shape"][1:])
        self.output_names = [o["name"] for o in self.signature["outputs"] if o["name"] != STATE_OUT]
        # `step` never feeds an empty axis, so it may run the guarded graph's non-empty branch
        # alone (the same nodes, without the per-call guard); `run` takes any chunk: the whole graph.
        step_graph = without_empty_guard(file.data)
        try:
            self.session = ort.InferenceSession(file.data, session_options(threads),
                                                providers=["CPUExecutionProvider"])
            self._step_session = self.session if step_graph is None else ort.InferenceSession(
                step_graph, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise UserInputError(f"{path}: onnxruntime cannot load {file.name}: "
                                 f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None
        self.guard_skipped = step_graph is not None
        self._x = np.zeros((batch, 1, self.input_size), np.float32)
        self._h = [np.zeros((batch, *self.state_shape), np.float32) for _ in range(2)]
        self._out = {o["name"]: np.zeros([batch] + [1 if d == "seq" else int(d) for d in o["shape"][1:]], np.float32)
                     for o in self.signature["outputs"] if o["name"] != STATE_OUT}
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in
                  (("x", self._x), ("h0", self._h[0]), ("h1", self._h[1]), *self._out.items())}
        self._first = self._out[self.output_names[0]]  # what a step of the tutorial model's Stream returns
        self._bindings = []  # [0]: h0 <- buffer 0, h_n -> buffer 1; [1]: the other way round
        for state_in, state_out in (("h0", "h1"), ("h1", "h0")):
            binding = self._step_session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, values["x"])
            binding.bind_ortvalue_input(STATE_IN, values[state_in])
            for name in self._out:
                binding.bind_ortvalue_output(name, values[name])
            binding.bind_ortvalue_output(STATE_OUT, values[state_out])
            self._bindings.append(binding)
        self._current = 0  # which buffer holds the state

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, signature: dict[str, Any], batch: int = 1, threads: int = 1,
                  name: str = "model_stream.onnx", by_name: bool = False) -> "Stream":
        """A Stream over a stream model given as bytes and its signature (benchmarks, tests): no
        manifest, no checks."""
        from gru_deploy.serve.user import ModuleFile

        return cls("", batch, "fp32", threads, _file=ModuleFile(name, onnx_bytes, "stream", signature, [], "", True,
                                                                 by_name))

    def step(self, x_t: np.ndarray) -> Any:
        """One time step for every sequence: x_t float32 [batch, input_size] (or [input_size]
        for a batch of 1; a chunk [batch, steps, input_size] goes to `run`). Returns the outputs
        after it (copies): the logits [batch, classes] of the tutorial model, every output by
        name of a module."""
        if x_t.__class__ is not np.ndarray:
            x_t = np.asarray(x_t)
        if x_t.ndim == 3:
            return self.run(x_t)
        if x_t.shape == (self.input_size,) and self.batch == 1:
            x_t = x_t[None]
        if x_t.shape != (self.batch, self.input_size):
            raise UserInputError(f"step takes x_t of shape [{self.batch}, {self.input_size}] (batch={self.batch}, "
                                 f"input size), got {list(x_t.shape)}")
        if x_t.dtype != np.float32:
            raise UserInputError(f"step takes float32 x_t, got {x_t.dtype}")
        if not np.isfinite(x_t).all():
            raise UserInputError("non-finite input: x_t holds NaN or inf")
        self._x[:, 0, :] = x_t
        self._step_session.run_with_iobinding(self._bindings[self._current])
        self._current ^= 1
        if self.by_name:
            return {name: value.copy() for name, value in self._out.items()}
        return self._first.copy()

    def run(self, chunk: np.ndarray) -> Any:
        """Feed a chunk x [batch, steps, input_size], carrying the state (steps 0 too where the
        export answers it: the outputs of the state as it is); returns the outputs after its
        last step, as `step` does."""
        from gru_deploy.check.runners import check_user_input

        chunk = np.asarray(chunk)
        if chunk.ndim == 3 and chunk.shape[0] != self.batch:
            raise UserInputError(f"this Stream holds {self.batch} sequence(s) (batch={self.batch}); the chunk has "
                                 f"batch {chunk.shape[0]}")
        chunk = check_user_input(chunk, self.signature, empty_seq=self.answers_empty)
        if chunk.shape[1] == 1:
            return self.step(chunk[:, 0])
        names = list(self._out) + [STATE_OUT]
        values = dict(zip(names, self.session.run(names, {INPUT_NAME: chunk, STATE_IN: self._h[self._current]})))
        self._h[self._current][...] = values.pop(STATE_OUT)
        return values if self.by_name else values[self.output_names[0]]

    @property
    def state(self) -> np.ndarray:
        """The state of every sequence, [batch, *state] as the signature says (a copy)."""
        return self._h[self._current].copy()

    @state.setter
    def state(self, h: np.ndarray) -> None:
        h = np.asarray(h)
        if h.shape != (self.batch, *self.state_shape) or h.dtype != np.float32:
            raise UserInputError(f"the state must be float32 {[self.batch, *self.state_shape]}, got "
                                 f"{h.dtype} {list(h.shape)}")
        if not np.isfinite(h).all():
            raise UserInputError("non-finite state: it holds NaN or inf")
        self._h[self._current][...] = h

    def reset(self) -> None:
        """Start every sequence again from the zero state."""
        self._h[self._current][...] = 0.0
