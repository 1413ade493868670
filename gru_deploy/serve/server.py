"""`serve`: onnxruntime behind aiohttp, speaking the Open Inference Protocol (KServe v2 /
Triton REST), with dynamic batching.

Requests hold `x` FP32 [batch, seq, input_size] and optionally `lengths` INT64 [batch].
Concurrent requests are collected (up to --max-batch samples, waiting at most
--max-delay-ms), split by sequence length so that a short request never runs padded to a
long one, and each part runs, shortest first, as one onnxruntime call of the variable-length
model, so each answer equals the one the request gets alone. Every tensor is validated
before onnxruntime sees it; client errors get a 4xx and a v2 error body; a failure while
running a group fails that group's requests (500) and the batcher goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from aiohttp import web

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME

DATATYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}
HEADER_LENGTH = "Inference-Header-Content-Length"
INT64_MAX = 2**63 - 1
MAX_RANK = 16  # dimensions of an input's shape: numpy refuses more than 32 (64 in numpy 2)
EXTENSIONS = ["binary_tensor_data", "sequence", "statistics"]  # v2 extensions served (ServerMetadata)
# Grouping by length (length_groups): no request runs padded beyond max(LENGTH_RATIO x its
# length, its length + LENGTH_SLACK) steps, and the calls of one batch run under
# 1/(LENGTH_RATIO - 1) more steps than the one padded call would (with hidden 16 on a CPU a
# step at batch 32 costs about 1.6x one at batch 1: a call costs mostly its steps, so a split
# costs the steps of its extra call).
LENGTH_RATIO = 8.0
LENGTH_SLACK = 128
# An onnxruntime call expected to take less than this runs on the event loop's own thread
# (Model.call): handing it to the worker thread and back costs about as much. perf_analyzer on
# the stream model, one-step chunks, HTTP concurrency 1: 0.46 ms mean latency with every call on
# the worker, 0.35 ms inline (docs/serving.md, two runs each). A longer call runs on the worker,
# so that the loop goes on reading requests while it runs.
INLINE_NS = 100_000

log = logging.getLogger(__name__)


class ClientError(Exception):
    """A request the server refuses: status code and message for the v2 error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    max_elements: int = 4 << 20
    max_seq: int = 100_000
    max_json_depth: int = 32
    read_timeout_s: float = 10.0


@dataclass
class Pending:
    x: np.ndarray
    lengths: np.ndarray
    future: asyncio.Future = field(repr=False)
    # when it was queued (perf_counter_ns): its queue time in the statistics ends when its call starts
    queued_ns: int = field(init=False, repr=False, default_factory=time.perf_counter_ns)


def length_groups(group: list[Pending], ratio: float = LENGTH_RATIO, slack: int = LENGTH_SLACK) -> list[list[Pending]]:
    """`group` in parts of similar sequence length, shortest part first. From the longest request
    down, a request joins the open part while that part's longest is at most max(ratio * its
    length, its length + slack); otherwise it opens the next part. So each part's longest is under
    1/ratio of the next part's, and the parts cost under 1/(ratio - 1) more steps than one call."""
    parts: list[list[Pending]] = []
    for p in reversed(sorted(group, key=lambda p: p.x.shape[1])):  # sorted is stable: equal lengths keep order
        seq = p.x.shape[1]
        if parts and parts[-1][0].x.shape[1] <= max(ratio * seq, seq + slack):
            parts[-1].append(p)
        else:
            parts.append([p])
    return [part[::-1] for part in reversed(parts)]


def same_length(group: list[Pending]) -> list[list[Pending]]:
    """`group` in parts of one sequence length each (nothing is padded), shortest first."""
    by_seq: dict[int, list[Pending]] = {}
    for p in group:
        by_seq.setdefault(p.x.shape[1], []).append(p)
    return [by_seq[seq] for seq in sorted(by_seq)]


def fail(group: list[Pending], exc: BaseException) -> None:
    """Answer every still-waiting request of `group` with `exc`."""
    for p in group:
        if not p.future.done():
            p.future.set_exception(exc)


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))


@dataclass
class ModelStats:
    """One model's numbers for Triton's statistics extension (ModelStatistics), cumulative since
    start-up, counted as Triton counts them: `success`/`fail` each request to the model, from its
    arrival to its answer (a refused request is a fail); `queue` each request's wait from its
    queueing to the start of its onnxruntime call; `compute_input` (building the call's batch),
    `compute_infer` (the call) and `compute_output` (splitting the answers) each request of a
    call, with the call's durations; `inference_count` the samples answered, `execution_count`
    the onnxruntime calls; `batch_stats` the calls by batch size."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0  # ms since the epoch, of the last request
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)

    def executed(self, requests: list[Pending], batch: int, start: int, built: int, ran: int, end: int) -> None:
        """One onnxruntime call of `batch` samples (perf_counter_ns marks: start, input built,
        call done, answers split) that answered `requests`."""
        self.execution_count += 1
        per_batch = self.batches.setdefault(batch, (Duration(), Duration(), Duration()))
        for duration, ns in zip(per_batch, (built - start, ran - built, end - ran)):
            duration.add(ns)
        for p in requests:
            self.inference_count += p.x.shape[0]
            self.queue.add(start - p.queued_ns)
            self.compute_input.add(built - start)
            self.compute_infer.add(ran - built)
            self.compute_output.add(end - ran)

    def finished(self, ok: bool, ns: int) -> None:
        """One request answered: a success, or a fail (refused or failed)."""
        (self.success if ok else self.fail).add(ns)
        self.last_inference = time.time_ns() // 1_000_000

    def as_dict(self, name: str) -> dict[str, Any]:
        """Triton's ModelStatistics, as its REST endpoint answers it (integers in JSON)."""
        def d(duration: Duration) -> dict[str, int]:
            return {"count": duration.count, "ns": duration.ns}

        return {"name": name, "version": "1", "last_inference": self.last_inference,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {key: d(getattr(self, key)) for key in
                                    ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
                | {"cache_hit": d(Duration()), "cache_miss": d(Duration())},
                "batch_stats": [{"batch_size": size, "compute_input": d(i), "compute_infer": d(c),
                                 "compute_output": d(o)} for size, (i, c, o) in sorted(self.batches.items())]}


def parse_config(text: str) -> Any:
    """A config.pbtxt as Triton's ModelConfig message (tritonclient's model_config_pb2)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def configured(config: str, name: str, max_batch: int, max_delay_ms: float | None = None,
               idle_s: float | None = None) -> str:
    """`config` as served: under `name`, with `max_batch` as its max_batch_size, and where given
    its dynamic batcher's delay and its sequence batcher's idle time. `serve` passes the
    config's own values unless an option overrides them, so by default it serves the file."""
    from google.protobuf import text_format

    parsed = parse_config(config)
    parsed.name, parsed.max_batch_size = name, max_batch
    if max_delay_ms is not None and parsed.HasField("dynamic_batching"):
        parsed.dynamic_batching.max_queue_delay_microseconds = round(max_delay_ms * 1000)
    if idle_s is not None and parsed.HasField("sequence_batching"):
        parsed.sequence_batching.max_sequence_idle_microseconds = round(idle_s * 1_000_000)
    return text_format.MessageToString(parsed)


class Model:
    """One ONNX model of an export or a bundle (its classifier, or its variable-length model:
    its signature says which) in one onnxruntime session, plus the batcher in front of it; the
    tutorial model, a built-in family and your own model alike. It serves `config` (a
    config.pbtxt; by default the one the server bundle writes for the signature), its metadata
    derived from it. With a lengths input, requests are padded within parts of similar length
    (`lengths` optional); without, requests batch only with requests of the same sequence
    length (nothing is padded), shortest first, and `lengths` is refused. `answers_empty`: the
    export's grid ran empty sequences and lengths of 0 (manifest.answers_empty); otherwise
    they are refused before onnxruntime sees them (a GRU/LSTM kernel aborts on an empty axis)."""

    def __init__(self, name: str, signature: dict[str, Any], onnx_bytes: bytes, labels: list[str] | tuple[str, ...],
                 threads: int, max_batch: int, max_delay_ms: float, group_by_length: bool = True,
                 config: str | None = None, answers_empty: bool = False) -> None:
        import onnxruntime as ort

        from gru_deploy.bundle.triton import triton_config
        from gru_deploy.check.runners import session_options
        from gru_deploy.manifest import labelled_output

        self.takes_lengths = any(t["name"] == LENGTHS_NAME for t in signature["inputs"])
        self.signature, self.labels, self.answers_empty = signature, list(labels), answers_empty
        self.session = ort.InferenceSession(onnx_bytes, session_options(threads), providers=["CPUExecutionProvider"])
        self.output_names = [o["name"] for o in signature["outputs"]]
        self.scored = labelled_output(signature, labels)  # the output probabilities and label come from
        self._batching(name, max_batch, max_delay_ms, group_by_length)
        self._configure(configured(config or triton_config(name, "onnxruntime_onnx", signature), name, max_batch,
                                   max_delay_ms))

    def _configure(self, config: str) -> None:
        """Serve `config`: the name, max_batch and delay in it are the ones the batcher uses."""
        self.config_text, self.model_config = config, parse_config(config)
        assert (self.model_config.name, self.model_config.max_batch_size) == (self.name, self.max_batch)

    def _batching(self, name: str, max_batch: int, max_delay_ms: float, group_by_length: bool) -> None:
        """The name and the batcher's state, the same for every kind of model."""
        self.name = name
        self.file, self.precision = "", "fp32"  # the manifest's name of the model file, and its precision
        self.lengths_model: str | None = None  # the served model that takes lengths, where this one does not
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1000.0
        self.group_by_length = group_by_length  # False: one call per collected group, padded to its longest
        self.queue: asyncio.Queue[Pending] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.ns_per_step: float | None = None  # what a sample-step of a call took, recently (call)
        self.on_batch: Callable[[int], None] = lambda size: None  # samples per onnxruntime call
        self.stats = ModelStats()  # Triton's statistics extension (GET /v2/models/NAME/stats)
        # Requests read or being checked but not yet queued: the batcher waits for more only while
        # one of them (or the queue) could still join its group.
        self.arriving = 0

    @property
    def input_size(self) -> int:
        return int(self.signature["inputs"][0]["shape"][2])

    def validate(self, arrays: dict[str, np.ndarray], limits: "Limits") -> tuple[np.ndarray, np.ndarray]:
        """x and lengths (seq per sample when absent), checked before onnxruntime sees them."""
        from gru_deploy.check.runners import check_user_input, check_user_lengths

        arrays = self.reshaped(arrays)
        if INPUT_NAME not in arrays:
            raise ClientError(400, f"missing input {INPUT_NAME!r}")
        allowed = {INPUT_NAME, LENGTHS_NAME} if self.takes_lengths else {INPUT_NAME}
        unknown = sorted(set(arrays) - allowed)
        if unknown:
            raise ClientError(400, f"unknown input(s) {unknown}; model {self.name!r} takes {sorted(allowed)}"
                              + ("" if self.takes_lengths or LENGTHS_NAME not in unknown else
                                 f" (the classifier: send each sequence unpadded, or padded ones with "
                                 f"{LENGTHS_NAME!r} to {self.lengths_model!r})" if self.lengths_model else
                                 " (it has no lengths variant: send each sequence unpadded)"))
        x = arrays[INPUT_NAME]
        if x.ndim == 3 and x.shape[1] > limits.max_seq:
            raise ClientError(413, f"sequence length {x.shape[1]} exceeds the limit {limits.max_seq}")
        try:
            x = check_user_input(x, self.signature, empty_seq=self.answers_empty)
            lengths = arrays.get(LENGTHS_NAME)
            lengths = (np.full(x.shape[0], x.shape[1], np.int64) if lengths is None
                       else check_user_lengths(lengths, x, empty_seq=self.answers_empty))
        except UserInputError as exc:
            raise ClientError(400, str(exc)) from None
        return x, lengths

    def reshaped(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A per-sample scalar input (lengths) as the config declares it, dims [1] reshaped to
        [], arrives as [batch, 1] (Triton's clients send the dims) or [batch]: [batch] either way."""
        scalars = {t.name for t in self.model_config.input if t.HasField("reshape") and not t.reshape.shape}
        return {name: a.reshape(a.shape[0]) if name in scalars and a.ndim == 2 and a.shape[1:] == (1,) else a
                for name, a in arrays.items()}

    def parts(self, group: list[Pending]) -> list[list[Pending]]:
        """How one collected group runs: with a lengths input, in parts of similar length (padded
        within one); without, only requests of one sequence length together (nothing is padded),
        shortest first."""
        if not self.takes_lengths:
            return same_length(group)
        return length_groups(group) if self.group_by_length else [group]

    def rows(self, result: Any, row: int, request: Pending) -> Any:
        """One request's share of a batched result: its rows of every output, and of a per-step
        output its own steps (not the padding)."""
        count, seq = request.x.shape[:2]
        out = {}
        for spec in self.signature["outputs"]:
            value = result[spec["name"]][row:row + count]
            if "seq" in spec["shape"]:
                value = value.take(range(seq), axis=spec["shape"].index("seq"))
            out[spec["name"]] = value
        return out

    def outputs(self, result: Any) -> dict[str, tuple[str, Callable[[], np.ndarray]]]:
        """What a request may ask for: name -> (v2 datatype, computed only when asked)."""
        from gru_deploy.serve.infer import softmax

        available: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
            name: ("FP32", (lambda v: lambda: np.asarray(v, np.float32))(value)) for name, value in result.items()}
        if self.scored is not None:
            scores = result[self.scored]
            available["probabilities"] = ("FP32", lambda: softmax(scores))
            available["label"] = ("BYTES", lambda: np.array([self.labels[i] for i in scores.argmax(axis=1)],
                                                            dtype=object))
        return available

    @property
    def default_outputs(self) -> tuple[str, ...]:
        return tuple(self.output_names)

    def extra_outputs(self) -> tuple[str, ...]:
        """Outputs served on request beyond the config's (a classifier with labels: computed
        from its scores)."""
        return ("probabilities", "label") if self.scored is not None else ()

    def run(self, x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """One onnxruntime call. Each request was validated on arrival (`validate`) and a padded
        batch of them is valid too."""
        self.on_batch(x.shape[0])
        feed = {INPUT_NAME: x, LENGTHS_NAME: lengths} if self.takes_lengths else {INPUT_NAME: x}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    async def call(self, fn: Callable[..., Any], x: np.ndarray, *args: Any) -> Any:
        """fn(x, *args), one onnxruntime call over x [batch, seq, ...]: on the event loop when the
        model's recent calls say it takes under INLINE_NS, otherwise (and before any call has
        been timed) on the worker thread. Each call updates the estimate, per sample-step, with
        the time fn itself took (not the hop to the worker and back)."""
        steps = max(1, x.shape[0] * x.shape[1])

        def timed() -> tuple[Any, int]:
            start = time.perf_counter_ns()
            return fn(x, *args), time.perf_counter_ns() - start
        if self.ns_per_step is not None and self.ns_per_step * steps < INLINE_NS:
            result, took = timed()
        else:
            result, took = await asyncio.get_running_loop().run_in_executor(self.executor, timed)
        self.ns_per_step = took / steps if self.ns_per_step is None else 0.8 * self.ns_per_step + 0.2 * took / steps
        return result

    async def infer(self, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        pending = Pending(x, lengths, asyncio.get_running_loop().create_future())
        if self.max_batch <= 1 or self.queue is None:
            await self._run_group([pending])  # no batcher: alone, now (counted in the statistics alike)
        else:
            await self.queue.put(pending)
        return await pending.future

    async def batcher(self) -> None:
        """Collect requests until max_batch samples or max_delay (or until no other request is
        queued or arriving), then run them in parts of similar length, shortest first. A failure
        fails only the requests that did not run (a part's, or the round's if splitting it
        failed); those answered keep their answers, and the loop goes on with the next request."""
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        carry: Pending | None = None  # the request that did not fit in the last group
        while True:
            group: list[Pending] = []
            try:
                first = carry if carry is not None else await self.queue.get()
                carry = None
                group = [first]
                samples, deadline = first.x.shape[0], loop.time() + self.max_delay
                while samples < self.max_batch:
                    await asyncio.sleep(0)  # let requests whose bytes are in run their handlers first
                    if self.queue.empty() and self.arriving == 0:
                        break  # nothing else could join: waiting would only add latency
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                    if samples + item.x.shape[0] > self.max_batch:
                        carry = item  # full: this one starts the next group
                        break
                    group.append(item)
                    samples += item.x.shape[0]
                parts = self.parts(group)
            except Exception as exc:
                log.exception("the batcher failed a group of %d request(s)", len(group))
                fail(group, exc)
                continue
            for part in parts:  # a part that fails fails its own requests only: the others still run
                try:
                    await self._run_group(part)
                except Exception as exc:
                    log.exception("the batcher failed a part of %d request(s)", len(part))
                    fail(part, exc)

    async def _run_group(self, group: list[Pending]) -> None:
        """One onnxruntime call for `group`, padded to its longest sequence. Any failure, building
        the padded batch included (a MemoryError), answers these requests with it. A request whose
        client gave up while it waited (its future cancelled) is not run."""
        group = [p for p in group if not p.future.done()]
        if not group:
            return
        start = time.perf_counter_ns()
        try:
            seq = max(p.x.shape[1] for p in group)
            x = np.zeros((sum(p.x.shape[0] for p in group), seq, self.input_size), np.float32)
            row = 0
            for p in group:
                x[row:row + p.x.shape[0], : p.x.shape[1]] = p.x
                row += p.x.shape[0]
            lengths = np.concatenate([p.lengths for p in group])
            built = time.perf_counter_ns()
            result = await self.call(self.run, x, lengths)
        except Exception as exc:
            fail(group, exc)
            return
        ran = time.perf_counter_ns()
        row, answered = 0, []
        for p in group:
            if not p.future.done():
                p.future.set_result(self.rows(result, row, p))
                answered.append(p)
            row += p.x.shape[0]
        self.stats.executed(answered, x.shape[0], start, built, ran, time.perf_counter_ns())


def config_tensors(config: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The v2 metadata's inputs and outputs of a ModelConfig, as Triton derives them: the batch
    axis (-1) first where max_batch_size > 0, then each tensor's dims."""
    from tritonclient.grpc import model_config_pb2 as pb

    batch = [-1] if config.max_batch_size > 0 else []

    def meta(t: Any) -> dict[str, Any]:
        return {"name": t.name, "datatype": pb.DataType.Name(t.data_type).removeprefix("TYPE_"),
                "shape": batch + [int(d) for d in t.dims]}

    return [meta(t) for t in config.input], [meta(t) for t in config.output]


def served_settings(config: str, name: str | None, variant: str, max_batch: int | None,
                    max_delay_ms: float | None) -> tuple[str, int, float]:
    """A model's served name, max batch and delay (ms): the config's own, unless `name` (the
    base of every served name, --model-name) or an option overrides them."""
    from gru_deploy.bundle.triton import triton_name

    parsed = parse_config(config)
    return (triton_name(name, variant) if name else parsed.name,
            parsed.max_batch_size if max_batch is None else max_batch,
            parsed.dynamic_batching.max_queue_delay_microseconds / 1000 if max_delay_ms is None else max_delay_ms)


def load_models(repository: Any, threads: int, max_batch: int | None, max_delay_ms: float | None, name: str | None,
                group_by_length: bool = True) -> list[Model]:
    """The stateless models of a read repository (serve.repository): each ONNX classifier and
    lengths model, under its Triton name and serving its config (with any option applied)."""
    models: list[Model] = []
    for file in repository.files:
        if file.variant == "stream":
            continue
        served, batch, delay = served_settings(file.config, name, file.variant, max_batch, max_delay_ms)
        model = Model(served, repository.signatures[file.variant], file.data, repository.labels, threads, batch,
                      delay, group_by_length, config=file.config, answers_empty=repository.answers_empty)
        model.file, model.precision = file.file, repository.precision
        models.append(model)
    lengths = next((m.name for m in models if m.takes_lengths), None)
    for m in models:
        m.lengths_model = None if m.takes_lengths else lengths
    return models


def load_model(path: Path, threads: int, max_batch: int | None, max_delay_ms: float | None, name: str | None,
               precision: str = "fp32", group_by_length: bool = True) -> Model:
    """One stateless model of the export folder or bundle at `path`: its lengths model where it
    has one of `precision`, else its classifier (see load_models)."""
    from gru_deploy.serve.repository import read_repository

    repository = read_repository(Path(path), precision)
    lengths = [f for f in repository.files if f.variant == "lengths"]
    repository.files = lengths or [f for f in repository.files if f.variant == "classifier"]
    return load_models(repository, threads, max_batch, max_delay_ms, name, group_by_length)[0]


# --- protocol ------------------------------------------------------------------------------

def _depth(value: Any, limit: int, level: int = 0) -> None:
    if level > limit:
        raise ClientError(400, f"JSON nested deeper than {limit} levels")
    if isinstance(value, dict):
        for v in value.values():
            _depth(v, limit, level + 1)
    elif isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        for v in value:
            _depth(v, limit, level + 1)


def tensor_header(name: str, shape: Any, datatype: Any, limits: Limits) -> tuple[np.dtype, int]:
    """An input's numpy dtype and element count from its v2 header (shape, datatype), checked."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise ClientError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    if datatype not in DATATYPES:
        raise ClientError(400, f"input {name!r}: datatype {datatype!r} is not one of {sorted(DATATYPES)}")
    if len(shape) > MAX_RANK:
        raise ClientError(400, f"input {name!r}: 'shape' has {len(shape)} dimensions; at most {MAX_RANK} are "
                               "accepted (the models take rank 1 to 3)")
    count = math.prod(shape)  # exact (Python ints, at most MAX_RANK of them): np.prod wraps past int64
    if count > INT64_MAX:
        raise ClientError(400, f"input {name!r}: shape {list(shape)} has more elements than int64 can count: "
                               "send the tensor's real shape")
    if count > limits.max_elements:
        raise ClientError(413, f"input {name!r} has {count} elements; the limit is {limits.max_elements}")
    return np.dtype(DATATYPES[datatype]), count


def array_from_raw(name: str, raw: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """An input's values from its raw little-endian bytes (the binary extension; gRPC's
    raw_input_contents), flat; ClientError when their size does not match."""
    if len(raw) != count * dtype.itemsize:
        raise ClientError(400, f"input {name!r}: {len(raw)} bytes of data do not match its shape and datatype "
                               f"({count} x {dtype.itemsize} bytes)")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def raw_output(datatype: str, array: np.ndarray) -> bytes:
    """An output's raw bytes: little-endian numbers, or for BYTES each element's length (4 bytes)
    and UTF-8 text, as the binary extension and gRPC's raw_output_contents carry them."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in array.ravel())
    return array.astype("<f4").tobytes()


def parse_request(body: bytes, header_length: str | None, limits: Limits) -> tuple[dict, dict[str, np.ndarray]]:
    """Decode a v2 infer request (JSON, or JSON + binary tensors) into its header and arrays."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ClientError(400, f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= n <= len(body):
            raise ClientError(400, f"{HEADER_LENGTH} {n} exceeds the body ({len(body)} bytes)")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(400, f"malformed JSON: {exc}") from None
    except ValueError:  # Python refuses an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise ClientError(400, "the JSON holds an integer too long to read: integers in a request (shapes, "
                               "lengths, a sequence_id) must fit in 64 bits") from None
    _depth(request, limits.max_json_depth)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ClientError(400, "the request must be a JSON object with an 'inputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in request["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ClientError(400, "each input needs a 'name', 'shape', 'datatype' and data")
        name, shape, datatype = item["name"], item.get("shape"), item.get("datatype")
        if name in arrays:
            raise ClientError(400, f"input {name!r} given twice")
        dtype, count = tensor_header(name, shape, datatype, limits)
        params = item.get("parameters") or {}
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if type(size) is not int or offset + size > len(binary):
                raise ClientError(400, f"input {name!r}: binary_data_size does not match its shape and datatype")
            array = array_from_raw(name, binary[offset:offset + size], dtype, count)
            offset += size
        else:
            data = item.get("data")
            if data is None:
                raise ClientError(400, f"input {name!r} has no 'data'")
            try:
                array = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                raise ClientError(400, f"input {name!r}: data is not a list of {datatype} numbers") from None
            if array.size != count:
                raise ClientError(400, f"input {name!r}: {array.size} values for shape {shape}")
        arrays[name] = array.reshape(shape)
    if offset != len(binary):
        raise ClientError(400, "binary data left over after the inputs")
    return request, arrays


def requested_outputs(request: dict) -> list[str] | None:
    """The output names a REST request asks for (None: the model's own)."""
    wanted = request.get("outputs")
    if not wanted:
        return None
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                               for o in wanted):
        raise ClientError(400, "'outputs' must be a list of {name}")
    return [o["name"] for o in wanted]


def encode_response(model: Model, request: dict, result: Any) -> tuple[bytes, dict[str, str]]:
    """The v2 response with the requested outputs (by default the model's own), binary where the
    request asked for it."""
    available = model.outputs(result)  # computed only when asked for
    wanted = request.get("outputs") or [{"name": name} for name in model.default_outputs]
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    outputs, chunks = [], []
    for item in wanted:
        name = item["name"]
        if name not in available:
            raise ClientError(400, f"unknown output {name!r}; choose from {sorted(available)}")
        datatype, compute = available[name]
        array = compute()
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if (item.get("parameters") or {}).get("binary_data", binary_default):
            raw = raw_output(datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    head = json.dumps({"model_name": model.name, "model_version": "1", "id": request.get("id", ""),
                       "outputs": outputs}).encode()
    if chunks:
        return head + b"".join(chunks), {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return head, {"Content-Type": "application/json"}


# --- the application -----------------------------------------------------------------------

def internal_error(exc: BaseException) -> str:
    """One line for a 500's v2 error body: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"internal error: {type(exc).__name__}" + (f": {lines[0][:300]}" if lines else "")


class Arrival:
    """A request read or being checked but not yet queued, counted by each batcher it could join
    (so a batcher waits for it); `done()` once it is queued or refused."""

    def __init__(self, models: tuple[Model, ...]) -> None:
        self.models = models
        for m in models:
            m.arriving += 1

    def done(self) -> None:
        for m in self.models:
            m.arriving -= 1
        self.models = ()


# A string sequence_id is at most this many UTF-8 bytes: room for a UUID (36), a session key or
# a user id with a prefix, while the ids of --max-sequences live sequences (1024 by default) stay
# within 256 KiB; unbounded, 100 ids of 7 MB held 700 MiB. An integer id is Triton's: uint64.
MAX_SEQUENCE_ID_BYTES = 256
MAX_SEQUENCE_ID = 2**64 - 1


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
    if isinstance(sid, int) and not 0 <= sid <= MAX_SEQUENCE_ID:
        shown = f"sequence_id {sid}" if sid.bit_length() <= 128 else f"a sequence_id of {sid.bit_length()} bits"
        raise ClientError(400, f"{shown} is outside uint64: use an integer from 1 to 2**64 - 1, or a string of "
                               f"at most {MAX_SEQUENCE_ID_BYTES} bytes")
    if isinstance(sid, str) and (size := len(sid.encode("utf-8", "surrogatepass"))) > MAX_SEQUENCE_ID_BYTES:
        raise ClientError(400, f"sequence_id is a string of {size} bytes; the limit is {MAX_SEQUENCE_ID_BYTES}: "
                               "use a shorter id (a UUID, or a hash of yours)")
    for name, value in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(value, bool):
            raise ClientError(400, f"{name} must be true or false, got {value!r}")
    if sid == 0 or sid == "":
        if start or end:
            raise ClientError(400, "sequence_start/sequence_end need a sequence_id (a non-zero integer or a "
                                   "non-empty string)")
        return None
    return SequenceFlags(sid, start, end)


class Service:
    """What the REST and gRPC endpoints share: the stateless models (the classifier and the
    lengths model; `model` is the first), the sequences (the stream variant, when the export
    has one), the limits, the batchers and the metrics. Protocol-free: each endpoint decodes
    its requests into arrays and parameters and encodes the results."""

    def __init__(self, model: "Model | list[Model] | tuple[Model, ...]" = (), sequences: Any = None,
                 limits: Limits | None = None) -> None:
        """With no model, the service answers health and refuses model calls with 503 while
        `install` has not given it its models (`serve` listens while it loads them)."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.limits = limits or Limits()
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("gru_deploy_requests", "Inference requests", ["protocol", "status"], registry=registry)
        self.latency = Histogram("gru_deploy_request_seconds", "Inference request latency", ["protocol"],
                                 registry=registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                                                             0.5, 1, 2, 5))
        self._tasks: list[asyncio.Task] = []
        # loading -> ready (start) -> draining (drain, after SIGTERM) -> stopped: ready only in
        # "ready" (/v2/health/ready, ServerReady, ModelReady); live in every state
        self.state = "loading"
        self.in_flight = 0  # inference requests between decoding and their answer
        self.stateless: tuple[Model, ...] = ()
        self.sequences: Any = None
        self._offered: dict[str, list[str]] = {}
        models = tuple(model) if isinstance(model, (list, tuple)) else (model,)
        if models:
            self.install(models, sequences)

    def install(self, models: "list[Model] | tuple[Model, ...]", sequences: Any = None) -> None:
        """The models to serve (the stateless ones, `models[0]` first) and the sequences."""
        from prometheus_client import Counter, Gauge, Histogram

        registry = self.registry
        self.stateless = tuple(models)
        self.model = self.stateless[0]
        self.sequences = sequences
        batch = Histogram("gru_deploy_batch_size", "Samples per onnxruntime call", ["model"], registry=registry,
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        for m in self.stateless:
            m.on_batch = batch.labels(model=m.name).observe  # once per onnxruntime call, batched or not
        if sequences is not None:
            sequences.on_batch = batch.labels(model=sequences.name).observe
            live = Gauge("gru_deploy_live_sequences", "Sequences whose state the server keeps", registry=registry)
            live.set_function(lambda: len(sequences.live))
            ended = Counter("gru_deploy_sequences_freed", "Sequences freed, by why", ["reason"], registry=registry)
            sequences.on_end = lambda why: ended.labels(reason=why).inc()
        # each model's output names (its metadata's, and those it computes on request), checked
        # against every request's before it runs
        self._offered = {m.name: [t["name"] for t in config_tensors(m.model_config)[1]] + list(m.extra_outputs())
                         for m in self.models}

    @property
    def models(self) -> tuple[Model, ...]:
        return self.stateless if self.sequences is None else (*self.stateless, self.sequences)

    def target(self, name: str) -> Model:
        if not self.stateless:
            raise ClientError(503, "the models are still loading: wait until /v2/health/ready answers 200")
        for m in self.models:
            if name == m.name:
                return m
        raise ClientError(404, f"unknown model {name!r}; this server serves {', '.join(repr(m.name) for m in self.models)}")

    def metadata(self, name: str) -> dict[str, Any]:
        target = self.target(name)
        inputs, outputs = config_tensors(target.model_config)
        return {"name": target.name, "versions": ["1"], "platform": "onnxruntime_onnx", "inputs": inputs,
                "outputs": outputs}

    def config(self, name: str) -> Any:
        """Triton's ModelConfig message for `name`: the config.pbtxt it serves, parsed afresh."""
        return parse_config(self.target(name).config_text)

    def arrival(self) -> Arrival:
        return Arrival(self.models)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def statistics(self, name: str = "") -> list[dict[str, Any]]:
        """Triton's ModelStatistics of `name` (every model's for ""), as REST answers them."""
        models = self.models if not name else (self.target(name),)
        return [m.stats.as_dict(m.name) for m in models]

    async def infer(self, name: str, arrays: dict[str, np.ndarray], parameters: Any, requested: list[str] | None,
                    arrival: Arrival) -> tuple[Model, Any]:
        """Run one decoded request: stateless, or a chunk of a sequence when its parameters carry
        a sequence_id. Returns the model that answered and its result (`outputs()` reads it).
        Every check, the requested output names included, comes before the model runs: a
        refused chunk leaves its sequence's state as it was. Counted in flight while it runs
        (`drain` waits for none)."""
        self.in_flight += 1
        try:
            target = self.target(name)
            offered = self._offered[target.name]
            unknown = [n for n in requested or () if n not in offered]
            if unknown:
                raise ClientError(400, f"unknown output {unknown[0]!r}; choose from {sorted(offered)}")
            flags = sequence_flags(parameters or {})
            if flags is None:
                if target is self.sequences:
                    raise ClientError(400, f"model {name!r} keeps a state per sequence: send sequence_id with "
                                           "sequence_start/sequence_end (tritonclient: infer(..., sequence_id=..., "
                                           "sequence_start=..., sequence_end=...))")
                x, lengths = target.validate(arrays, self.limits)
                if 0 < target.max_batch < x.shape[0]:  # as Triton refuses a batch beyond the config's
                    raise ClientError(400, f"batch {x.shape[0]} exceeds model {target.name!r}'s max_batch_size "
                                           f"{target.max_batch} (its config): send at most {target.max_batch} "
                                           "samples per request")
                arrival.done()
                return target, await target.infer(x, lengths)
            if self.sequences is None:
                raise ClientError(400, f"{self.model.file} cannot keep a sequence's state: the export has no stream "
                                       f"variant (a bidirectional model or torch.nn.GRU's family has none); send "
                                       "each sequence whole, without sequence_id")
            x = self.sequences.admit(arrays, flags, self.limits)
            arrival.done()
            return self.sequences, await self.sequences.infer_chunk(x, flags)
        finally:
            self.in_flight -= 1

    @contextmanager
    def observed(self, protocol: str, model: str) -> Iterator[None]:
        """One inference request, answered inside: counted in the metrics by its status (200, the
        client error's, or 500), and in the statistics of `model` (the model named in the
        request, when this server serves it)."""
        start, status = time.perf_counter(), "200"
        try:
            yield
        except ClientError as exc:
            status = str(exc.status)
            raise
        except Exception:
            status = "500"
            raise
        finally:
            seconds = time.perf_counter() - start
            self.requests.labels(protocol=protocol, status=status).inc()
            self.latency.labels(protocol=protocol).observe(seconds)
            served = next((m for m in self.models if m.name == model), None)
            if served is not None:
                served.stats.finished(status == "200", round(seconds * 1e9))

    def refused(self, protocol: str, model: str, exc: ClientError) -> None:
        """One line at info level for a request refused with a client error (4xx)."""
        reason = str(exc).replace("\n", " ")
        log.info("refused a %s request for model %r: %d %s", protocol, model[:200],
                 exc.status, reason if len(reason) <= 500 else reason[:500] + "...")

    async def drain(self, timeout: float) -> None:
        """Report not ready, and wait (at most `timeout` s) until no inference request is in
        flight: after SIGTERM, before the endpoints stop; requests that arrive meanwhile are served."""
        self.state = "draining"
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def start(self) -> None:
        """The batchers (and the sequences' reaper) on the running loop."""
        for m in self.stateless:
            if m.max_batch > 1:
                m.queue = asyncio.Queue()
                self._tasks.append(asyncio.create_task(m.batcher()))
        if self.sequences is not None:  # always through its batcher: it reads and writes the states
            self.sequences.queue = asyncio.Queue()
            self._tasks += [asyncio.create_task(self.sequences.batcher()),
                            asyncio.create_task(self.sequences.reaper())]
        self.state = "ready"

    async def stop(self) -> None:
        self.state = "stopped"
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for m in self.models:
            m.executor.shutdown(wait=True)


def config_json(message: Any) -> dict[str, Any]:
    """A ModelConfig as Triton's REST /config answers it: protobuf's JSON mapping, but 64-bit
    integers (dims, delays, counts) as JSON numbers, not the strings that mapping writes."""
    from google.protobuf import json_format
    from google.protobuf.descriptor import FieldDescriptor

    wide = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}

    def numbers(value: Any, entry: Any) -> Any:  # the JSON value of field `entry` (each item, where repeated)
        if isinstance(value, list):
            return [numbers(v, entry) for v in value]
        if entry.message_type is None:
            return int(value) if entry.type in wide else value
        if entry.message_type.GetOptions().map_entry:
            return {k: numbers(v, entry.message_type.fields_by_name["value"]) for k, v in value.items()}
        return message_numbers(value, entry.message_type)

    def message_numbers(value: dict[str, Any], descriptor: Any) -> dict[str, Any]:
        return {k: numbers(v, descriptor.fields_by_name[k]) for k, v in value.items()}

    return message_numbers(json_format.MessageToDict(message, preserving_proto_field_name=True), message.DESCRIPTOR)


def make_app(service: "Service | Model", limits: Limits | None = None, manage: bool = True) -> "web.Application":
    """The REST endpoint (KServe v2 / Triton HTTP, with the binary tensor extension) of `service`
    (a Model alone is served without sequences). `manage`: the app starts and stops the
    service's batchers (False where the gRPC endpoint shares them and `serve` runs them).
    Over 60 lines: the protocol's routes, each a few lines over Service and Model."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from gru_deploy.versions import __version__

    if isinstance(service, Model):
        service = Service(service, None, limits)
    limits = service.limits

    too_large = f"request body exceeds the limit of {limits.max_body_bytes} bytes"

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    @web.middleware
    async def v2_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except (ClientError, web.HTTPRequestEntityTooLarge) as exc:
            refused = exc if isinstance(exc, ClientError) else ClientError(413, too_large)
            service.refused("rest", request.match_info.get("name", ""), refused)
            return error(refused.status, str(refused))
        except web.HTTPException as exc:
            if exc.status >= 400:
                return error(exc.status, exc.reason)
            raise
        except Exception as exc:  # a bug or a failed onnxruntime call: a v2 500, not aiohttp's HTML page
            log.exception("%s %s failed", request.method, request.path)
            return error(500, internal_error(exc))

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:  # 503 while loading or draining (after SIGTERM)
        return web.json_response({"ready": service.ready}, status=200 if service.ready else 503)

    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": "gru-deploy", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: web.Request) -> web.Response:
        return web.json_response(service.metadata(request.match_info["name"]))

    async def model_config(request: web.Request) -> web.Response:
        return web.json_response(config_json(service.config(request.match_info["name"])))

    async def model_ready(request: web.Request) -> web.Response:
        return web.json_response({"name": service.target(request.match_info["name"]).name, "ready": service.ready},
                                 status=200 if service.ready else 503)

    async def model_stats(request: web.Request) -> web.Response:  # Triton's statistics extension
        return web.json_response({"model_stats": service.statistics(request.match_info.get("name", ""))})

    async def infer(request: web.Request) -> web.Response:
        with service.observed("rest", request.match_info["name"]):
            arrival = service.arrival()
            try:
                service.target(request.match_info["name"])
                if request.content_length is not None and request.content_length > limits.max_body_bytes:
                    raise ClientError(413, too_large)
                try:
                    body = await asyncio.wait_for(request.read(), limits.read_timeout_s)
                except asyncio.TimeoutError:
                    raise ClientError(408, f"the request body did not arrive within "
                                           f"{limits.read_timeout_s:g} s") from None
                header, arrays = parse_request(body, request.headers.get(HEADER_LENGTH), limits)
                target, result = await service.infer(request.match_info["name"], arrays, header.get("parameters"),
                                                     requested_outputs(header), arrival)
                payload, headers = encode_response(target, header, result)
                return web.Response(body=payload, headers=headers)
            finally:
                arrival.done()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(service.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[v2_errors])
    if manage:
        app.on_startup.append(lambda app: service.start())
        app.on_cleanup.append(lambda app: service.stop())
    per_model = [(web.get, "", model_metadata), (web.get, "/config", model_config), (web.get, "/ready", model_ready),
                 (web.get, "/stats", model_stats), (web.post, "/infer", infer)]
    app.add_routes([
        web.get("/v2/models/stats", model_stats),  # every model's; before /v2/models/{name} matches "stats"
        web.get("/v2/health/live", live), web.get("/v2/health/ready", ready), web.get("/v2", server_metadata),
        *(route(f"/v2/models/{{name}}{version}{suffix}", handler) for route, suffix, handler in per_model
          for version in ("", "/versions/{version}")),
        web.get("/metrics", metrics),
    ])
    return app
