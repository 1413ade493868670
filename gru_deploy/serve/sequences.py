"""Stateful sequences in `serve`: Triton's sequence batcher, over the export's stream variant.

A client streams the chunks of one sequence as infer requests carrying the parameters
`sequence_id` (a non-zero integer within uint64, or a non-empty string of at most
MAX_SEQUENCE_ID_BYTES bytes), `sequence_start` and `sequence_end`,
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

from gru_deploy.serve.server import (  # noqa: F401  (the sequence parameters are read where requests are)
    MAX_SEQUENCE_ID, MAX_SEQUENCE_ID_BYTES, ClientError, Limits, Model, Pending, SequenceFlags, fail, same_length,
    sequence_flags)
from gru_deploy.spec import INPUT_NAME, STATE_IN, STATE_OUT

log = logging.getLogger(__name__)

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
    output names (logits, probabilities, label; or a module's outputs) a sequence shares.
    `config`: its config.pbtxt (the sequence batcher, h0 -> h_n as implicit state, clients
    sending x only), served under `name` with `max_batch` and `idle_s`."""

    def __init__(self, name: str, onnx_bytes: bytes, state_shape: tuple[int, ...], output_names: list[str],
                 stateless: Model, config: str,
                 threads: int, max_batch: int, max_delay_ms: float, max_sequences: int, idle_s: float) -> None:
        import onnxruntime as ort

        from gru_deploy.check.runners import session_options
        from gru_deploy.serve.server import configured

        self.session = ort.InferenceSession(onnx_bytes, session_options(threads), providers=["CPUExecutionProvider"])
        self.state_shape, self.output_names = tuple(state_shape), list(output_names)
        self.stateless = stateless
        self.scored, self.labels = stateless.scored, stateless.labels  # Model.outputs: the stateless model's
        self.max_sequences, self.idle_s = max_sequences, idle_s
        self.live: dict[int | str, Live] = {}
        # chunks queued or running per sequence, whose clients still wait: such a sequence is not
        # idle (a chunk queued behind a long call must find its state), the reaper leaves it
        self.waiting: dict[int | str, int] = {}
        self.on_end: Callable[[str], None] = lambda why: None  # why a sequence was freed: end, idle, failed
        self._batching(name, max_batch, max_delay_ms, group_by_length=False)
        self._configure(configured(config, name, max_batch, idle_s=idle_s))
        self.file, self.precision = stateless.file, stateless.precision

    @property
    def input_size(self) -> int:
        return self.stateless.input_size

    @property
    def default_outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.stateless.default_outputs)

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
        self.waiting[flags.id] = self.waiting.get(flags.id, 0) + 1
        try:
            await self.queue.put(SequencePending(x, np.zeros(0, np.int64), future, flags))
            return await future
        finally:  # answered, or its client gave up (cancelled)
            self.waiting[flags.id] -= 1
            if not self.waiting[flags.id]:
                del self.waiting[flags.id]

    def reap(self, now: float | None = None) -> int:
        """Free every sequence without a request for more than idle_s, and none with a chunk
        whose client waits for it; how many were freed."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, live in self.live.items()
                if now - live.last_used > self.idle_s and sid not in self.waiting]
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
        return [part for wave in waves for part in same_length(wave)]

    def run_chunks(self, x: np.ndarray, h0: np.ndarray) -> list[np.ndarray]:
        self.on_batch(x.shape[0])
        return self.session.run([*self.output_names, STATE_OUT], {INPUT_NAME: x, STATE_IN: h0})

    async def _run_group(self, group: list[Pending]) -> None:
        """One onnxruntime call for chunks of the same length of different sequences: their
        states stacked into h0, h_n split back. A chunk whose sequence is gone (ended before it,
        or freed while idle) fails alone; a failed call fails its chunks and frees their
        sequences (their state is lost). A chunk whose client gave up while it waited (its future
        cancelled: a client timeout) is not run, as Triton drops a cancelled request: its
        sequence's state stays as it was. A future is completed only while not done."""
        ready: list[tuple[SequencePending, Live]] = []
        for p in group:
            assert isinstance(p, SequencePending)
            if p.future.done():
                continue
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
        start = time.perf_counter_ns()
        try:
            x = np.concatenate([p.x for p, _ in ready])
            h0 = np.stack([np.zeros(self.state_shape, np.float32) if live.state is None else live.state
                           for _, live in ready])
            built = time.perf_counter_ns()
            values = await self.call(self.run_chunks, x, h0)
        except Exception as exc:
            for p, _ in ready:
                if self.live.pop(p.flags.id, None) is not None:
                    self.on_end("failed")
            fail([p for p, _ in ready], exc)
            return
        *outputs, h_n = values
        now, ran, answered = time.monotonic(), time.perf_counter_ns(), []
        for row, (p, live) in enumerate(ready):
            live.state, live.last_used = h_n[row].copy(), now
            if p.flags.end and self.live.get(p.flags.id) is live:
                del self.live[p.flags.id]
                self.on_end("end")
            if not p.future.done():
                p.future.set_result({name: value[row:row + 1] for name, value in zip(self.output_names, outputs)})
                answered.append(p)
        self.stats.executed(answered, x.shape[0], start, built, ran, time.perf_counter_ns())


def load_sequence_model(repository: Any, stateless: Model, threads: int, max_batch: int | None,
                        max_delay_ms: float | None, precision: str, max_sequences: int, idle_s: float | None,
                        name: str | None = None) -> SequenceModel | None:
    """The stream model of a read repository (serve.repository; or the export or bundle at that
    path, of `precision`) as a SequenceModel under its Triton name (its base `name` where given),
    serving its config.pbtxt with any option applied (`max_batch`, `idle_s`; the batcher waits
    `max_delay_ms`, by default as long as `stateless`'s); None when it lists none (a
    bidirectional model, or torch.nn.GRU's family, has none)."""
    from gru_deploy.bundle.triton import triton_name
    from gru_deploy.serve.repository import Repository, read_repository
    from gru_deploy.serve.server import parse_config

    if not isinstance(repository, Repository):
        repository = read_repository(repository, precision)
    file = repository.get("stream")
    if file is None:
        return None
    parsed = parse_config(file.config)
    args = (threads, parsed.max_batch_size if max_batch is None else max_batch,
            stateless.max_delay * 1000 if max_delay_ms is None else max_delay_ms, max_sequences,
            parsed.sequence_batching.max_sequence_idle_microseconds / 1e6 if idle_s is None else idle_s)
    served = triton_name(name, "stream") if name else parsed.name
    signature = repository.signatures["stream"]
    h0 = next(t for t in signature["inputs"] if t["name"] == STATE_IN)
    outputs = [o["name"] for o in signature["outputs"] if o["name"] != STATE_OUT]
    model = SequenceModel(served, file.data, tuple(int(d) for d in h0["shape"][1:]), outputs, stateless,
                          file.config, *args)
    model.file = file.file
    return model
