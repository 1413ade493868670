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
the manifest. `step` runs the export's one-step model where it has one (model_step.onnx: GRU
nodes and the head in ONNX's GRU layout), else the stream model, with onnxruntime's
io_binding: x, the two state buffers and the outputs are allocated once; the state ping-pongs
between the two buffers (one is h0 while the other receives h_n), so a step copies only x in
and the outputs out. `run(chunk)` feeds a chunk
of any length the same way (it is what a chunk of `gru-deploy infer --state-in/--state-out`
computes).

What a step returns keeps each model's API as it was: the tutorial model's stream returns its
logits array; a module's (a built-in family's, your own) every output by name, a dict.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.check.module_parity import step_layout, step_state, stream_state
from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, STATE_IN, STATE_OUT

# step's finite check is a dot product with zeros (a fifth of np.isfinite(x).all()'s cost): NaN
# exactly where an element is NaN or inf, which numpy reports as a warning; step raises instead
warnings.filterwarnings("ignore", message="invalid value encountered in dot", category=RuntimeWarning,
                        module=r"gru_deploy\.serve\.stream")


class Stream:
    """A batch of live sequences in the stream model: `step(x_t)`, `run(chunk)`, `state`,
    `reset()`."""

    def __init__(self, path: str | Path, batch: int = 1, precision: str = "fp32", threads: int = 1,
                 _file: Any = None, _step: bytes | None = None) -> None:
        """Over 60 lines: the files chosen, then every buffer and both bindings allocated once,
        in the layout of the graph `step` runs (the one-step model's, or the stream model's)."""
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
        # `step` runs the one-step model where the export lists one (model_step.onnx: one GRU node
        # per layer and the head, state [layers, batch, H]); else the stream model's non-empty
        # branch alone (the same nodes, without the per-call guard); `run` the whole stream model.
        if file.step_listed:
            listed = module_file(Path(path), "step", precision)
            _step, self.step_model = listed.data, listed.name
        else:
            self.step_model = "model_step.onnx" if _step is not None else None
        step_graph = without_empty_guard(_step if _step is not None else file.data) or _step
        try:
            self.session = ort.InferenceSession(file.data, session_options(threads),
                                                providers=["CPUExecutionProvider"])
            self._step_session = self.session if step_graph is None else ort.InferenceSession(
                step_graph, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise UserInputError(f"{path}: onnxruntime cannot load {file.name}: "
                                 f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None
        self.guard_skipped = step_graph is not None
        self._layers, hidden = step_layout(self.state_shape)
        self._layer_major = _step is not None
        if _step is not None:  # ONNX's GRU layout: the same memory for one step
            x_shape, h_shape = (1, batch, self.input_size), (self._layers, batch, hidden)
        else:
            x_shape, h_shape = (batch, 1, self.input_size), (batch, *self.state_shape)
        self._x = np.zeros(x_shape, np.float32)
        self._x_rows = self._x.reshape(batch, self.input_size)  # views: [batch, input] in either layout, flat
        self._x_flat = self._x.reshape(-1)
        self._zeros = np.zeros(batch * self.input_size, np.float32)  # the finite check's (step)
        self._h = [np.zeros(h_shape, np.float32) for _ in range(2)]
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
                  name: str = "model_stream.onnx", by_name: bool = False, step: bytes | None = None) -> "Stream":
        """A Stream over a stream model given as bytes and its signature (benchmarks, tests), and
        its one-step model where given: no manifest, no checks."""
        from gru_deploy.serve.user import ModuleFile

        return cls("", batch, "fp32", threads, _file=ModuleFile(name, onnx_bytes, "stream", signature, [], "", True,
                                                                 by_name), _step=step)

    def step(self, x_t: np.ndarray) -> Any:
        """One time step for every sequence: x_t float32 [batch, input_size] (or [input_size]
        for a batch of 1; a chunk [batch, steps, input_size] goes to `run`). Returns the outputs
        after it (copies): the logits [batch, classes] of the tutorial model, every output by
        name of a module."""
        if x_t.__class__ is not np.ndarray:
            x_t = np.asarray(x_t)
        shape = x_t.shape
        if shape != self._x_rows.shape:
            if len(shape) == 3:
                return self.run(x_t)
            if shape != (self.input_size,) or self.batch != 1:  # [input_size]: the one row of a batch of 1
                raise UserInputError(f"step takes x_t of shape [{self.batch}, {self.input_size}] (batch="
                                     f"{self.batch}, input size), got {list(shape)}")
        if x_t.dtype != np.float32:
            raise UserInputError(f"step takes float32 x_t, got {x_t.dtype}")
        self._x_rows[...] = x_t
        if self._x_flat.dot(self._zeros) != 0.0:  # NaN exactly where an element is NaN or inf
            raise UserInputError("non-finite input: x_t holds NaN or inf")
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
        values = dict(zip(names, self.session.run(names, {INPUT_NAME: chunk, STATE_IN: self.state})))
        self._set_state(values.pop(STATE_OUT))
        return values if self.by_name else values[self.output_names[0]]

    @property
    def state(self) -> np.ndarray:
        """The state of every sequence, [batch, *state] as the signature says (a copy)."""
        h = self._h[self._current]
        return stream_state(h, self.state_shape) if self._layer_major else h.copy()

    def _set_state(self, h: np.ndarray) -> None:
        self._h[self._current][...] = step_state(h, self._layers) if self._layer_major else h

    @state.setter
    def state(self, h: np.ndarray) -> None:
        h = np.asarray(h)
        if h.shape != (self.batch, *self.state_shape) or h.dtype != np.float32:
            raise UserInputError(f"the state must be float32 {[self.batch, *self.state_shape]}, got "
                                 f"{h.dtype} {list(h.shape)}")
        if not np.isfinite(h).all():
            raise UserInputError("non-finite state: it holds NaN or inf")
        self._set_state(h)

    def reset(self) -> None:
        """Start every sequence again from the zero state."""
        self._h[self._current][...] = 0.0
