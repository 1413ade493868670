"""Stateful sequences in `serve`: Triton's sequence batcher, over the export's stream variant.

A client streams the chunks of one sequence as infer requests carrying the parameters
`sequence_id` (a non-zero integer or a non-empty string), `sequence_start` and `sequence_end`,
as tritonclient sends them for `infer(..., sequence_id=, sequence_start=, sequence_end=)`. The
server keeps each live sequence's hidden state between its requests: zeros on
`sequence_start`, h_n of one chunk is h0 of the next, freed on `sequence_end` or after
`idle_s` without a request. At most `max_sequences` are live; a start beyond that gets a 429.

Chunks of different sequences are batched: the batcher collects chunks as for stateless
requests, then runs them in waves (a sequence's k-th chunk of the round in wave k, so its
chunks run in the order they arrived), each wave in one onnxruntime call per chunk length
(the stream model has no lengths input, so nothing is padded), the rows' states stacked into
h0 and h_n split back. The state is read and written on the event loop, between calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gru_deploy.serve.server import ClientError, Limits, Model, Pending, fail
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, STATE_IN, STATE_OUT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceFlags:
    id: int | str
    start: bool
    end: bool


def sequence_flags(parameters: Any) -> SequenceFlags | None:
    """The request's sequence parameters, or None for a stateless request (no sequence_id, or
    Triton's "no sequence": 0 or an empty string). ClientError for a malformed one."""
    if not isinstance(parameters, dict):
        raise ClientError(400, "'parameters' must be an object")
    sid = parameters.get("sequence_id", 0)
    start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
    if not (isinstance(sid, str) or (isinstance(sid, int) and not isinstance(sid, bool))):
        raise ClientError(400, f"sequence_id must be an integer or a string, got {type(sid).__name__}")
    for name, value in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(value, bool):
            raise ClientError(400, f"{name} must be true or false, got {value!r}")
    if sid == 0 or sid == "":
        if start or end:
            raise ClientError(400, "sequence_start/sequence_end need a sequence_id (a non-zero integer or a "
                                   "non-empty string)")
        return None
    return SequenceFlags(sid, start, end)


@dataclass
class Live:
    """One live sequence: its state after its last chunk (None: zeros, not yet run)."""

    state: np.ndarray | None
    last_used: float


@dataclass
class SequencePending(Pending):
    flags: SequenceFlags


class SequenceModel(Model):
    """The stream variant in one onnxruntime session, the live sequences' states, and the
    batcher in front of them. `stateless`: the served stateless model, whose input checks and
    output names (logits, probabilities, label; or a module's outputs) a sequence shares."""

    def __init__(self, name: str, onnx_bytes: bytes, state_shape: tuple[int, ...], output_names: list[str],
                 stateless: Model, wrap: Callable[[dict[str, np.ndarray]], Any], config: Callable[[str, int], str],
                 threads: int, max_batch: int, max_delay_ms: float, max_sequences: int, idle_s: float) -> None:
        import onnxruntime as ort

        from gru_deploy.check.runners import session_options

        self.session = ort.InferenceSession(onnx_bytes, session_options(threads), providers=["CPUExecutionProvider"])
        self.state_shape, self.output_names = tuple(state_shape), list(output_names)
        self.stateless, self.wrap, self._config = stateless, wrap, config
        self.max_sequences, self.idle_s = max_sequences, idle_s
        self.live: dict[int | str, Live] = {}
        self.on_end: Callable[[str], None] = lambda why: None  # why a sequence was freed: end, idle, failed
        self._batching(name, max_batch, max_delay_ms, group_by_length=False)
        self.file, self.precision = stateless.file, stateless.precision

    @property
    def input_size(self) -> int:
        return self.stateless.input_size

    def outputs(self, result: Any) -> dict[str, tuple[str, Callable[[], np.ndarray]]]:
        return self.stateless.outputs(result)

    @property
    def default_outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.stateless.default_outputs)

    def config(self) -> str:
        """The config.pbtxt the server bundle writes for this stream model: the sequence batcher
        with h0 -> h_n as implicit state, clients sending x only."""
        return self._config(self.name, self.max_batch)

    def tensors(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        inputs, outputs = self.stateless.tensors()
        return [t for t in inputs if t["name"] == INPUT_NAME], outputs

    # --- admission, on the event loop -------------------------------------------------------

    def admit(self, arrays: dict[str, np.ndarray], flags: SequenceFlags, limits: Limits) -> np.ndarray:
        """x for one chunk of sequence `flags.id`, checked; the sequence made live on its start.
        ClientError for a bad chunk, an unknown sequence, or a start beyond max_sequences."""
        unknown = sorted(set(arrays) - {INPUT_NAME})
        if unknown:
            raise ClientError(400, f"a sequence request takes only {INPUT_NAME!r}, got {unknown} too (the server "
                                   "keeps the state; a chunk is never padded)")
        x = arrays.get(INPUT_NAME)
        if x is not None and x.ndim == 3 and (x.shape[0] != 1 or x.shape[1] == 0):
            raise ClientError(400, f"a sequence request holds one chunk of one sequence: {INPUT_NAME!r} must be "
                                   f"[1, steps >= 1, {self.input_size}], got {list(x.shape)}")
        x, _ = self.stateless.validate(arrays, limits)
        now = time.monotonic()
        live = self.live.get(flags.id)
        if flags.start and live is None:
            if len(self.live) >= self.max_sequences:
                raise ClientError(429, f"{len(self.live)} sequences are live, the server's limit (--max-sequences): "
                                       f"end one with sequence_end, or retry after one has been idle "
                                       f"{self.idle_s:g} s")
            live = self.live[flags.id] = Live(None, now)
        elif live is None:
            raise ClientError(400, f"sequence {flags.id!r} is not live: send its first chunk with "
                                   f"sequence_start=true (a sequence ends with sequence_end, or after "
                                   f"{self.idle_s:g} s without a request)")
        live.last_used = now
        return x

    async def infer_chunk(self, x: np.ndarray, flags: SequenceFlags) -> Any:
        assert self.queue is not None, "the sequence batcher runs while the server does"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put(SequencePending(x, np.zeros(0, np.int64), future, flags))
        return await future

    def reap(self, now: float | None = None) -> int:
        """Free every sequence without a request for more than idle_s; how many were freed."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, live in self.live.items() if now - live.last_used > self.idle_s]
        for sid in idle:
            del self.live[sid]
            self.on_end("idle")
        if idle:
            log.info("freed %d sequence(s) idle for more than %g s", len(idle), self.idle_s)
        return len(idle)

    async def reaper(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.idle_s / 4))
            self.reap()

    # --- batching ---------------------------------------------------------------------------

    def parts(self, group: list[Pending]) -> list[list[Pending]]:
        """Waves: the k-th chunk each sequence has in `group` runs in wave k; within a wave one
        part per chunk length, shortest first."""
        waves: list[list[Pending]] = []
        seen: dict[int | str, int] = {}
        for p in group:
            sid = p.flags.id  # type: ignore[attr-defined]
            k = seen.get(sid, 0)
            seen[sid] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(p)
        parts = []
        for wave in waves:
            by_steps: dict[int, list[Pending]] = {}
            for p in wave:
                by_steps.setdefault(p.x.shape[1], []).append(p)
            parts += [by_steps[steps] for steps in sorted(by_steps)]
        return parts

    def run_chunks(self, x: np.ndarray, h0: np.ndarray) -> list[np.ndarray]:
        self.on_batch(x.shape[0])
        return self.session.run([*self.output_names, STATE_OUT], {INPUT_NAME: x, STATE_IN: h0})

    async def _run_group(self, group: list[Pending]) -> None:
        """One onnxruntime call for chunks of the same length of different sequences: their
        states stacked into h0, h_n split back. A chunk whose sequence is gone (ended before it,
        or freed while idle) fails alone; a failed call fails its chunks and frees their
        sequences (their state is lost)."""
        ready: list[tuple[SequencePending, Live]] = []
        for p in group:
            assert isinstance(p, SequencePending)
            live = self.live.get(p.flags.id)
            if p.flags.start:
                if live is None:  # freed while its start waited: live again
                    live = self.live[p.flags.id] = Live(None, time.monotonic())
                live.state = None
            elif live is None:
                p.future.set_exception(ClientError(400, f"sequence {p.flags.id!r} ended before this chunk ran: "
                                                        "start it again with sequence_start=true"))
                continue
            ready.append((p, live))
        if not ready:
            return
        try:
            x = np.concatenate([p.x for p, _ in ready])
            h0 = np.stack([np.zeros(self.state_shape, np.float32) if live.state is None else live.state
                           for _, live in ready])
            values = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_chunks, x, h0)
        except Exception as exc:
            for p, _ in ready:
                if self.live.pop(p.flags.id, None) is not None:
                    self.on_end("failed")
            fail([p for p, _ in ready], exc)
            return
        *outputs, h_n = values
        now = time.monotonic()
        for row, (p, live) in enumerate(ready):
            live.state, live.last_used = h_n[row].copy(), now
            if p.flags.end and self.live.get(p.flags.id) is live:
                del self.live[p.flags.id]
                self.on_end("end")
            if not p.future.done():
                p.future.set_result(self.wrap({name: value[row:row + 1] for name, value in
                                               zip(self.output_names, outputs)}))


def lists_stream(path: Any, precision: str) -> bool:
    """Whether the manifest of the export or bundle at `path` lists an ONNX stream model of
    `precision` (a bidirectional model, or torch.nn.GRU's family, has none)."""
    from pathlib import Path

    from gru_deploy.bundle.read import is_bundle, open_bundle
    from gru_deploy.manifest import find_models, read_manifest

    path = Path(path)
    if is_bundle(path):
        with open_bundle(path) as (_, manifest):
            return bool(find_models(manifest, "stream", "onnx", precision, str(path)))
    return bool(find_models(read_manifest(path), "stream", "onnx", precision, str(path)))


def load_sequence_model(path: Any, stateless: Model, threads: int, max_batch: int, max_delay_ms: float,
                        precision: str, max_sequences: int, idle_s: float) -> SequenceModel | None:
    """The stream model of `precision` the manifest lists, checked, as a SequenceModel named
    `<stateless name>_stream` (the server bundle's Triton name for it); None when it lists none."""
    from pathlib import Path

    from gru_deploy.bundle.package import triton_config
    from gru_deploy.bundle.user import user_triton_config
    from gru_deploy.serve.infer import load_model_bytes
    from gru_deploy.serve.server import ModuleModel
    from gru_deploy.serve.user import module_file

    if not lists_stream(path, precision):
        return None
    name = f"{stateless.name}_stream"
    args = (threads, max_batch, max_delay_ms, max_sequences, idle_s)
    if isinstance(stateless, ModuleModel):
        file = module_file(Path(path), "stream", precision)
        h0 = next(t for t in file.signature["inputs"] if t["name"] == STATE_IN)
        outputs = [o["name"] for o in file.signature["outputs"] if o["name"] != STATE_OUT]
        model = SequenceModel(name, file.data, tuple(int(d) for d in h0["shape"][1:]), outputs, stateless,
                              lambda values: values,
                              lambda n, batch: user_triton_config(n, "onnxruntime_onnx", file.signature,
                                                                  max_batch=batch, idle_s=idle_s), *args)
        model.file = file.name
        return model
    chosen = load_model_bytes(Path(path), "stream", precision)
    model = SequenceModel(name, chosen.data, (chosen.spec.hidden_size,), [OUTPUT_NAME], stateless,
                          lambda values: values[OUTPUT_NAME],
                          lambda n, batch: triton_config(n, "onnxruntime_onnx", chosen.spec, "stream", batch,
                                                         idle_s=idle_s), *args)
    model.file = chosen.name
    return model
