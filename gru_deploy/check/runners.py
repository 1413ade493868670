"""What runs a model outside its exported graph: the inputs' checks before onnxruntime sees
them (check_user_*: infer, serve, Stream and bundle verify call them; onnxruntime checks none
of the semantics and some of its kernels abort the process on an empty axis), onnxruntime's
session options, a torch module run on a feed (run_module), where onnx's reference evaluator
would judge a graph wrongly (reference_gaps), and the tutorial classifier's float64
re-implementation (Float64Runner). Every parity runner is check.module_parity's `Call`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME, STATE_IN, STATE_OUT, VARIANT_IO, ModelSpec

if TYPE_CHECKING:
    import onnx

Feed = Mapping[str, np.ndarray]
FLOAT32_ROUNDING = 2.0 ** -24  # unit roundoff of float32
Outputs = dict[str, np.ndarray]


def session_options(threads: int, spinning: bool = True) -> Any:
    """onnxruntime session options for `threads` intra-op threads; inter-op parallelism off
    (our graphs are one chain).

    The pool's workers spin while they wait for work (onnxruntime's default): in two runs of
    scripts/bench_threads.py on this 2-core machine, 2 threads without spinning were 1.01-1.13x
    the time of 1 thread in every cell (1.95x once), while with spinning they were 0.84-0.92x for
    loop and scan at batch 256 and 1.00-1.08x elsewhere, with one outlier per run (1.32x, 1.84x)
    that the other run did not repeat (docs/performance.md).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def reference_gaps(model: "onnx.ModelProto") -> str:
    """What onnx's ReferenceEvaluator would compute wrongly in `model`, or "": its GRU ignores
    the `sequence_lens` input (onnx/reference/ops/op_gru.py), so a fused lengths model would
    be judged against a reference that runs every sample to the padded end."""
    from gru_deploy.check.onnx_walk import all_graphs

    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.op_type in ("GRU", "LSTM", "RNN") and len(node.input) > 4 and node.input[4]:
                return f"onnx's ReferenceEvaluator ignores {node.op_type}'s sequence_lens"
    return ""


class Float64Runner:
    """The tutorial classifier's equations, re-implemented in float64 numpy from the design, not
    from our torch code: the float64 reference of its proof (`run(feed) -> outputs by name`,
    the grid's feeds), which also estimates float32's own error (`float32_noise`)."""

    name = "float64"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], variant: str = "classifier") -> None:
        self.spec, self.variant, self.outputs = spec, variant, VARIANT_IO[variant][1]
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}

    def run(self, feed: Feed) -> Outputs:
        return self._compute(feed)

    def float32_noise(self, feed: Feed, probes: int = 3, seed: int = 0,
                      clean: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """How far float32 rounding can move each output on this input (Monte Carlo arithmetic).

        The recurrence is re-run in float64 with every step's state multiplied by
        (1 + u·2⁻²⁴), u uniform in [−1, 1] — the size of one float32 rounding — `probes`
        times; the result per output is the largest deviation from the unperturbed run. On a
        well-conditioned input it is ~1e-7; where the trajectory amplifies rounding (a
        saturated or near-chaotic state) it grows, and any float32 runtime differs that much.
        `clean`: this runner's own answer on `feed`, where the caller has it (not run again).
        """
        if feed[INPUT_NAME].shape[0] == 0 or feed[INPUT_NAME].shape[1] == 0:
            return {name: 0.0 for name in self.outputs}
        clean = self._compute(feed) if clean is None else clean
        rng = np.random.default_rng(seed)
        spread = {name: 0.0 for name in self.outputs}
        for _ in range(probes):
            noisy = self._compute(feed, rng)
            for name in self.outputs:
                spread[name] = max(spread[name], float(np.abs(noisy[name] - clean[name]).max()))
        return spread

    def _compute(self, feed: Mapping[str, np.ndarray], rng: np.random.Generator | None = None) -> Outputs:
        w = self.w
        x = feed[INPUT_NAME].astype(np.float64)
        if self.spec.normalization is not None:
            mean, std = (np.asarray(v, np.float64) for v in self.spec.normalization)
            x = (x - mean) / std
        batch, seq = x.shape[:2]
        h = feed[STATE_IN].astype(np.float64) if STATE_IN in feed else np.zeros((batch, self.spec.hidden_size))
        lengths = feed.get(LENGTHS_NAME, np.full(batch, seq))

        def sigmoid(a: np.ndarray) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-a))

        for t in range(seq):
            xt = x[:, t, :]
            z = sigmoid(xt @ w["gru.W_xz.weight"].T + w["gru.W_xz.bias"] + h @ w["gru.W_hz.weight"].T)
            r = sigmoid(xt @ w["gru.W_xr.weight"].T + w["gru.W_xr.bias"] + h @ w["gru.W_hr.weight"].T)
            h_tilde = np.tanh(xt @ w["gru.W_xh.weight"].T + w["gru.W_xh.bias"] + (r * h) @ w["gru.W_hh.weight"].T)
            if rng is not None:  # one float32 rounding of the new state, where it is updated
                h_tilde = h_tilde * (1.0 + FLOAT32_ROUNDING * rng.uniform(-1.0, 1.0, h.shape))
            h = np.where((t < lengths)[:, None], (1.0 - z) * h + z * h_tilde, h)
        out = {OUTPUT_NAME: h @ w["fc.weight"].T + w["fc.bias"]}
        if STATE_OUT in self.outputs:
            out[STATE_OUT] = h
        return out


# A module's inputs, checked before onnxruntime sees them (infer, serve, Stream, bundle verify).

def check_user_input(x: Any, signature: dict[str, Any], empty_seq: bool = False) -> np.ndarray:
    """x as the signature's float32 [batch, seq, input_size], non-empty (`empty_seq`: a
    sequence of 0 steps allowed, where the export's graphs answer it) and finite: a graph may
    hold onnxruntime's GRU or LSTM kernel, which aborts the process on an empty axis."""
    want = signature["inputs"][0]
    size = want["shape"][2]
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise UserInputError(f"input {INPUT_NAME!r} must be a float32 array, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 3 or x.shape[2] != size:
        raise UserInputError(f"input {INPUT_NAME!r} must have shape [batch, seq, {size}] (the model takes {size} "
                             f"channels), got {list(x.shape)}")
    if x.shape[0] == 0 or (x.shape[1] == 0 and not empty_seq):
        raise UserInputError(f"input {INPUT_NAME!r} has an empty batch or sequence ({list(x.shape)}): "
                             "nothing to run")
    if not np.isfinite(x).all():
        raise UserInputError(f"non-finite input: {INPUT_NAME!r} holds NaN or inf")
    return np.ascontiguousarray(x)


def check_user_lengths(lengths: Any, x: np.ndarray, empty_seq: bool = False) -> np.ndarray:
    """lengths as int64 [batch], each in 1..seq (a sample has at least one step: the module's
    own forward has none to run on an empty sequence), or 0..seq with `empty_seq` (where the
    export's graphs answer an empty sequence, as for check_user_input)."""
    minimum = 0 if empty_seq else 1
    if not isinstance(lengths, np.ndarray) or lengths.dtype.kind not in "iu":
        raise UserInputError(f"{LENGTHS_NAME!r} must be INT64 (whole steps per sample), got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)}: send the lengths as integers")
    if lengths.shape != (x.shape[0],):
        raise UserInputError(f"{LENGTHS_NAME!r} must have shape [{x.shape[0]}] (one per sample), got "
                             f"{list(lengths.shape)}")
    if lengths.size and (lengths.min() < minimum or lengths.max() > x.shape[1]):
        raise UserInputError(f"{LENGTHS_NAME!r} must lie in {minimum}..{x.shape[1]} (the padded length), got "
                             f"{int(lengths.min())}..{int(lengths.max())}")
    return np.ascontiguousarray(lengths.astype(np.int64))


def check_user_state(state: Any, x: np.ndarray, signature: dict[str, Any]) -> np.ndarray:
    """The stream model's h0: float32 [batch, ...] as the signature says, finite; zeros when None."""
    want = next(t for t in signature["inputs"] if t["name"] == STATE_IN)
    shape = (x.shape[0], *want["shape"][1:])
    if state is None:
        return np.zeros(shape, np.float32)
    if not isinstance(state, np.ndarray) or state.dtype != np.float32 or state.shape != shape:
        raise UserInputError(f"the state {STATE_IN!r} must be float32 of shape {list(shape)}, got "
                             f"{getattr(state, 'dtype', type(state).__name__)} {list(getattr(state, 'shape', []))}")
    if not np.isfinite(state).all():
        raise UserInputError(f"non-finite state: {STATE_IN!r} holds NaN or inf")
    return np.ascontiguousarray(state)


def check_user_feed(x: Any, signature: dict[str, Any], empty_seq: bool = False, lengths: Any = None,
                    state: Any = None) -> dict[str, np.ndarray]:
    """The feed onnxruntime gets: every input the signature takes, each checked first
    (check_user_input, check_user_lengths, check_user_state; `empty_seq` as for them)."""
    names = {t["name"] for t in signature["inputs"]}
    feed = {INPUT_NAME: check_user_input(x, signature, empty_seq=empty_seq)}
    if LENGTHS_NAME in names:
        feed[LENGTHS_NAME] = check_user_lengths(lengths, feed[INPUT_NAME], empty_seq=empty_seq)
    if STATE_IN in names:
        feed[STATE_IN] = check_user_state(state, feed[INPUT_NAME], signature)
    return feed


def run_module(module: Any, signature: dict[str, Any], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A torch module (eager, or TorchScript loaded from an export or bundle) run on `feed`
    (numpy, by input name): its inputs passed by position in the signature's order, every
    output returned by name."""
    import torch

    with torch.no_grad():
        result = module(*(torch.from_numpy(np.ascontiguousarray(feed[t["name"]])) for t in signature["inputs"]))
    result = result if isinstance(result, tuple) else (result,)
    return {o["name"]: r.numpy() for o, r in zip(signature["outputs"], result)}
