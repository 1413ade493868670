"""Export the user's own recurrent model: script it, check its recurrence runs over the input's
time axis, read its signature off the module, export it to ONNX and prove parity against the
module itself run in float64.

The checks are the tutorial path's, made generic: the loop is kept (a `prim::Loop` whose trip
count comes from `x`, or a recurrent operator such as `torch.nn.GRU`'s, which exports to ONNX
`GRU` over the dynamic axis), the graph's node count must not change with the example length,
and every output is compared, eager vs TorchScript vs onnxruntime vs onnx's reference vs the
float64 module.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN, STATE_OUT

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gru_deploy.models.user import UserModel

RECURRENT_OPS = ("aten::gru", "aten::lstm", "aten::rnn_tanh", "aten::rnn_relu")
ONNX_RECURRENCE = ("Loop", "Scan", "GRU", "LSTM", "RNN")
# Probes that name each output axis: (batch, seq) pairs whose sizes differ from each other.
PROBES = ((2, 3), (3, 5))
# The parity grid for user models: (batch, seq); the onnx reference evaluator (pure Python)
# runs up to REFERENCE_MAX_SEQ steps.
USER_CASES = ((1, 1), (3, 7), (2, 100), (1, 2048))
REFERENCE_MAX_SEQ = 100


def _where(text: str) -> str:
    """'file:line' from a TorchScript message or source range, or '' when it names none."""
    match = re.search(r'File "([^"]+)", line (\d+)', text)
    if match:
        return f"{match.group(1)}:{match.group(2)}"
    match = re.search(r"at (\S+\.py):(\d+)", text)
    return f"{match.group(1)}:{match.group(2)}" if match else ""


def script_user(model: "UserModel") -> "torch.jit.ScriptModule":
    """torch.jit.script the user's module; a module TorchScript cannot compile is a user error
    naming TorchScript's message and the user's file and line."""
    import torch

    from gru_deploy.convert.script import quiet_torchscript_deprecation

    try:
        with quiet_torchscript_deprecation():
            return torch.jit.script(model.module)
    except Exception as exc:  # TorchScript raises several types; all mean "cannot compile this"
        text = str(exc)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        where = _where(text)
        raise UserInputError(f"TorchScript cannot compile {model.reference}: {lines[0] if lines else type(exc).__name__}"
                             + (f" (at {where})" if where else "")
                             + "; make the module scriptable (torch.jit.script) and try again") from None


def _walk(block: Any, inside: tuple[Any, ...] = ()):
    """Every node of a block and its sub-blocks, each with the prim::Loop nodes it sits in."""
    for node in block.nodes():
        yield node, inside
        deeper = inside + (node,) if node.kind() == "prim::Loop" else inside
        for inner in node.blocks():
            yield from _walk(inner, deeper)


X_RANK = 3  # x is [batch, seq, input]: its time axis is 1
# Ops whose output keeps its (first) tensor input's axes: elementwise maths, copies, casts, flips.
SAME_AXES = frozenset({"aten::flip", "aten::contiguous", "aten::to", "aten::float", "aten::clone", "aten::detach",
                       "aten::sub", "aten::add", "aten::mul", "aten::div", "aten::neg", "aten::abs", "aten::tanh",
                       "aten::sigmoid", "aten::relu", "aten::type_as", "aten::masked_fill", "aten::where"})


def _constant_int(value: Any) -> int | None:
    node = value.node()
    if node.kind() == "prim::Constant" and value.type().kind() == "IntType":
        return int(node.i("value"))
    return None


def time_axes(value: Any, x: Any, depth: int = 0) -> set[int]:
    """The axes of tensor `value` that are x's time axis, followed back through transposes,
    permutes and shape-keeping ops (an empty set where it cannot tell)."""
    if value.debugName() == x.debugName():
        return {1}
    node = value.node()
    kind, args = node.kind(), list(node.inputs())
    if depth > 64 or not args:
        return set()
    if kind == "aten::transpose" and len(args) == 3:
        a, b = (_constant_int(v) for v in args[1:])
        if a is None or b is None:
            return set()
        a, b = a % X_RANK, b % X_RANK
        return {b if axis == a else a if axis == b else axis for axis in time_axes(args[0], x, depth + 1)}
    if kind == "aten::permute" and len(args) == 2 and args[1].node().kind() == "prim::ListConstruct":
        dims = [_constant_int(v) for v in args[1].node().inputs()]
        source = time_axes(args[0], x, depth + 1)
        return {i for i, d in enumerate(dims) if d is not None and d % X_RANK in source}
    if kind in SAME_AXES:
        tensors = [v for v in args if v.type().kind() == "TensorType"]
        return time_axes(tensors[0], x, depth + 1) if tensors else set()
    if kind == "prim::If":  # either branch's answer
        index = list(node.outputs()).index(value)
        return set().union(*(time_axes(list(b.outputs())[index], x, depth + 1) for b in node.blocks()))
    if kind in ("aten::stack", "aten::cat") and len(args) == 2 and _constant_int(args[1]) is not None:
        dim = _constant_int(args[1]) % X_RANK
        items = list(args[0].node().inputs()) if args[0].node().kind() == "prim::ListConstruct" else []
        axes = set().union(*(time_axes(v, x, depth + 1) for v in items))
        if kind == "aten::stack":  # a new axis at dim; and a list appended once per time step is one
            axes = {a + 1 if a >= dim else a for a in axes}
            if _appended_per_step(args[0], x, depth):
                axes.add(dim)
        return axes
    return set()


def _appended_per_step(items: Any, x: Any, depth: int) -> bool:
    """Whether the list `items` is appended to inside a loop over x's time axis."""
    for use in items.uses():
        if use.user.kind() != "aten::append":
            continue
        block = use.user.owningBlock()
        while block is not None and block.owningNode() is not None:
            owner = block.owningNode()
            if owner.kind() == "prim::Loop" and _over_seq(owner, x, depth + 1):
                return True
            block = owner.owningBlock()
    return False


def reads_seq_axis(value: Any, x: Any, depth: int = 0) -> bool:
    """Whether `value` is computed from the length of x's time axis: x.size(1), x.shape[1],
    len(x.unbind(1)), steps.size(0) of steps = x.transpose(0, 1), ... (through any arithmetic)."""
    seen: set[str] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        if current.debugName() in seen:
            continue
        seen.add(current.debugName())
        node = current.node()
        kind, args = node.kind(), list(node.inputs())
        dim = _constant_int(args[1]) if len(args) == 2 else None
        if kind == "aten::size" and dim is not None and dim % X_RANK in time_axes(args[0], x, depth):
            return True
        if kind == "aten::__getitem__" and dim is not None and args[0].node().kind() == "aten::size":
            if dim % X_RANK in time_axes(next(args[0].node().inputs()), x, depth):
                return True
        if kind == "aten::len" and args:
            source = args[0].node()
            if args[0].type().kind() == "TensorType" and 0 in time_axes(args[0], x, depth):
                return True
            source_args = list(source.inputs())
            if source.kind() == "aten::unbind" and (_constant_int(source_args[1]) or 0) % X_RANK in time_axes(
                    source_args[0], x, depth):
                return True
        if kind != "prim::Param":
            stack.extend(args)
    return False


def _over_seq(loop: Any, x: Any, depth: int = 0) -> bool:
    """A loop whose trip count, first condition or per-step condition reads x's time axis."""
    if depth > 64:
        return False
    trip, condition = list(loop.inputs())[:2]
    body = next(loop.blocks())
    return any(reads_seq_axis(v, x, depth) for v in (trip, condition, next(body.outputs())))


def check_recurrence(scripted: "torch.jit.ScriptModule", reference: str) -> str:
    """How the recurrence is kept: 'loop' (a prim::Loop over x's time axis, x.size(1), that
    carries state from step to step) or the recurrent operator's name.

    CheckFailed, naming the file and line: a loop outside the time loop that carries state but
    runs a fixed number of times (or over another axis): the model would be one length's;
    no recurrence at all (no state-carrying time loop, no recurrent operator)."""
    if not hasattr(scripted, "forward"):
        raise UserInputError(f"{reference}: its scripted form has no single forward (torch.nn.GRU/LSTM on their "
                             "own overload it): wrap it in a module whose forward takes x")
    graph = scripted.forward.inlined_graph
    inputs = list(graph.inputs())
    if len(inputs) < 2:
        raise CheckFailed(f"{reference}: forward takes no input tensor")
    x = inputs[1]
    nodes = list(_walk(graph))
    recurrent = sorted({n.kind() for n, _ in nodes if n.kind() in RECURRENT_OPS})
    loops = [(n, inside) for n, inside in nodes if n.kind() == "prim::Loop"]
    over_seq = {n for n, _ in loops if _over_seq(n, x)}
    carries = {n for n, _ in loops if len(list(n.inputs())) > 2}  # inputs: trip count, condition, state...
    for loop, inside in loops:
        if loop not in over_seq and loop in carries and not over_seq.intersection(inside):
            where = _where(loop.sourceRange())
            raise CheckFailed(f"{reference}: the loop at {where or 'an unknown line'} carries state from step to step "
                              "but runs a fixed number of times (or over another axis), not over the input's time "
                              "axis: the model would accept one sequence length only; loop over "
                              "`range(x.size(1))`")
    if over_seq & carries:
        return "loop"
    if recurrent:
        return recurrent[0].split("::")[1]
    stateless = [_where(n.sourceRange()) for n in over_seq]
    raise CheckFailed(f"{reference}: no recurrence over the input's time axis (neither a loop over x.size(1) that "
                      "carries state from step to step nor a recurrent operator such as torch.nn.GRU)"
                      + (f"; the loop at {stateless[0] or 'an unknown line'} carries nothing from one step to the "
                         "next" if stateless else "") + "; gru-deploy exports recurrent models")


@dataclass
class UserSignature:
    """Inputs and outputs as the manifest records them: name, dtype, shape (dynamic dims named)."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs}

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
                for t in self.inputs + self.outputs}


def as_outputs(value: Any, reference: str) -> tuple["torch.Tensor", ...]:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise UserInputError(f"{reference}: forward must return a tensor or a tuple of tensors, got "
                         f"{type(value).__name__}")


def discover_signature(module: "torch.nn.Module", input_size: int, reference: str,
                       output_names: list[str] | None = None) -> UserSignature:
    """Run the module at two (batch, seq) probes and name each output axis: 'batch' where it
    follows the batch, 'seq' where it follows the sequence length, a size where it is fixed."""
    import torch

    shapes = []
    for batch, seq in PROBES:
        x = torch.randn(batch, seq, input_size, generator=torch.Generator().manual_seed(batch))
        try:
            with torch.no_grad():
                outputs = as_outputs(module(x), reference)
        except UserInputError:
            raise
        except Exception as exc:
            raise UserInputError(f"{reference} fails on an input of shape [{batch}, {seq}, {input_size}]: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                 "is --input-size right?") from None
        for i, out in enumerate(outputs):
            if out.dtype != torch.float32:
                raise UserInputError(f"{reference}: output {i} is {out.dtype}; gru-deploy exports float32 outputs")
        shapes.append([list(out.shape) for out in outputs])
    if len(shapes[0]) != len(shapes[1]) or any(len(a) != len(b) for a, b in zip(*shapes)):
        raise UserInputError(f"{reference}: the number or rank of outputs changes with the input's shape")
    names = output_names or (["logits"] if len(shapes[0]) == 1 else [f"output_{i}" for i in range(len(shapes[0]))])
    if len(names) != len(shapes[0]) or len(set(names)) != len(names) or INPUT_NAME in names:
        raise UserInputError(f"--output-names: give {len(shapes[0])} distinct names other than {INPUT_NAME!r}")
    outputs = []
    for name, first, second in zip(names, *shapes):
        dims: list[Any] = []
        for a, b in zip(first, second):
            if (a, b) == (PROBES[0][0], PROBES[1][0]):
                dims.append("batch")
            elif (a, b) == (PROBES[0][1], PROBES[1][1]):
                dims.append("seq")
            elif a == b:
                dims.append(a)
            else:
                raise UserInputError(f"{reference}: output {name!r} has an axis of size {a} then {b} that follows "
                                     "neither the batch nor the sequence length")
        if not dims or dims[0] != "batch":
            raise UserInputError(f"{reference}: output {name!r} must have the batch as its first axis, got {dims}")
        outputs.append({"name": name, "dtype": "float32", "shape": dims})
    inputs = [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", "seq", input_size]}]
    return UserSignature(inputs, outputs)


@contextlib.contextmanager
def _quiet_stdout_fd():
    """Send file descriptor 1 (C++ writes too) to a scratch file for the duration."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def example_args(signature: UserSignature, seq: int) -> tuple["torch.Tensor", ...]:
    """Example inputs at batch 2 for the exporter: x, and lengths (seq and seq - 1) when the
    signature takes them."""
    import torch

    args = []
    for tensor in signature.inputs:
        if tensor["name"] == LENGTHS_NAME:
            args.append(torch.tensor([seq, max(1, seq - 1)], dtype=torch.int64))
        elif tensor["name"] == STATE_IN:
            args.append(torch.zeros(2, *tensor["shape"][1:]))
        else:
            args.append(torch.zeros(2, seq, tensor["shape"][2]))
    return tuple(args)


def export_user_onnx(scripted: "torch.jit.ScriptModule", signature: UserSignature, opset: int,
                     kind: str = "user") -> tuple[bytes, dict]:
    """The scripted module as ONNX (TorchScript exporter), exported at two example lengths and
    refused when its node count changes between them or it holds no recurrence."""
    import onnx
    import torch

    from gru_deploy.convert.graphs import (GUARD_LENGTHS, check_not_unrolled, check_opset, finish_export,
                                           set_io_shapes)
    from gru_deploy.convert.script import quiet_torchscript_deprecation

    check_opset(opset)
    models = []
    for seq in GUARD_LENGTHS:
        buffer = io.BytesIO()
        # The exporter warns that a GRU/LSTM exported at batch 2 may fail at other batch sizes:
        # the parity grid runs batches 1, 2 and 3 and is what decides, so the warning is not shown.
        try:  # the exporter prints the whole IR graph on stdout (from C++) when it fails
            with quiet_torchscript_deprecation(), _quiet_stdout_fd(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*batch_size other than 1.*", category=UserWarning)
                # a model.pt loaded back (verify --data) has no Python signature to read; x is given by position
                warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
                torch.onnx.export(scripted, example_args(signature, seq), buffer, dynamo=False,
                                  opset_version=opset, input_names=[t["name"] for t in signature.inputs],
                                  output_names=signature.output_names,
                                  dynamic_axes=signature.dynamic_axes(), do_constant_folding=True)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            hint = (" (seen with a scripted torch.nn.GRUCell, whose forward compares input.dim() with a tuple: "
                    "write the cell out, as the tutorial does, or use torch.nn.GRU)"
                    if "expected node type prim::ListConstruct" in first else "")
            raise CheckFailed(f"the ONNX exporter failed on the scripted model: {type(exc).__name__}: "
                              f"{first[:300]}{hint}") from None
        models.append(onnx.load_from_string(buffer.getvalue()))
    unused = [t["name"] for t in signature.inputs if t["name"] not in {i.name for i in models[0].graph.input}]
    if unused:  # the exporter drops an input the graph never reads
        raise CheckFailed(f"the exported graph does not read its input(s) {unused}: the model ignores "
                          f"{'them' if len(unused) > 1 else 'it'}")
    op_types = check_not_unrolled(models, needs=None)
    if not any(op in op_types for op in ONNX_RECURRENCE):
        raise CheckFailed("refusing to write a graph without a Loop or recurrent node: the time loop was unrolled")
    model = models[0]
    set_io_shapes(model, {t["name"]: t["shape"] for t in signature.inputs + signature.outputs})
    model.producer_name = "gru-deploy"
    result = finish_export(model, "loop", opset, op_types, {"gru_deploy.model": kind})
    return result.onnx_bytes, {"opset": result.opset, "ir_version": result.ir_version,
                               "node_count": result.node_count, "op_types": result.op_types}


# --- parity ---------------------------------------------------------------------------------

REFERENCE_FILE = "reference_float64.npz"
# The lengths variant's grid: (batch, seq), lengths spread over 1..seq (the first sample full).
LENGTHS_CASES = ((3, 7), (4, 100), (3, 2048))
# A method a module may define (with @torch.jit.export) for gru-deploy to export its lengths
# variant: forward_lengths(x [batch, seq, I] padded, lengths int64 [batch]) -> the outputs of
# forward, each sample's as it gets them alone, unpadded.
LENGTHS_HOOK = "forward_lengths"

# The stream variant's hooks: initial_state(batch) -> the state forward starts from ([batch,
# ...] zeros; None when the module cannot stream), and @torch.jit.export forward_stream(x, h0)
# -> (forward's outputs..., h_n).
STREAM_HOOK = "forward_stream"
STATE_HOOK = "initial_state"
STREAM_CASES = ((1, 1), (3, 7), (2, 100), (1, 2048))
# The stream's promise, checked on the float64 module: from the initial state, one chunk is
# forward's answer, and chunks of these sizes carried through h_n are the one pass.
CHUNK_SIZES = (1, 7)
CONTRACT_CASES = ((2, 9), (1, 100))

Feed = dict  # input name -> numpy array


def reference_key(variant: str, batch: int, seq: int, name: str) -> str:
    """Where REFERENCE_FILE keeps a case's float64 output ('BxS/name' for the classifier)."""
    return f"{batch}x{seq}/{name}" if variant == "classifier" else f"{variant}/{batch}x{seq}/{name}"


def case_feed(signature: UserSignature, batch: int, seq: int) -> Feed:
    """The parity grid's inputs for (batch, seq): the same at export and at verify."""
    import numpy as np

    feed = {INPUT_NAME: case_input(batch, seq, signature.inputs[0]["shape"][2])}
    state = next((t for t in signature.inputs if t["name"] == STATE_IN), None)
    if state is not None:  # a state from somewhere in a sequence: uniform in [-1, 1]
        rng = np.random.default_rng(batch * 104729 + seq)
        feed[STATE_IN] = rng.uniform(-1, 1, (batch, *state["shape"][1:])).astype(np.float32)
    if any(t["name"] == LENGTHS_NAME for t in signature.inputs):
        rng = np.random.default_rng(batch * 7919 + seq)
        lengths = rng.integers(1, seq + 1, batch).astype(np.int64)
        lengths[0] = seq
        feed[LENGTHS_NAME] = lengths
    return feed


def user_runners(module: "torch.nn.Module | None", scripted: "torch.jit.ScriptModule", onnx_bytes: bytes,
                 signature: UserSignature, stored: dict[str, "np.ndarray"] | None = None,
                 method: str = "forward", variant: str = "classifier"
                 ) -> dict[str, Callable[[Feed], list["np.ndarray"]]]:
    """Callables of a feed (numpy, by input name) returning every output as numpy: eager and
    float64 (the user's module's `method`, and a float64 copy of it) when the module is at
    hand, TorchScript, onnxruntime and onnx's reference evaluator. Without the module
    (verify), float64 answers from `stored`: the float64 outputs the export computed from the
    module (REFERENCE_FILE)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx.reference import ReferenceEvaluator

    from gru_deploy.check.runners import reference_gaps, session_options

    names_in = [t["name"] for t in signature.inputs]

    def torch_call(fn: Any, dtype: "torch.dtype") -> Callable:
        def run(feed: Feed) -> list["np.ndarray"]:
            args = [torch.from_numpy(feed[n]) for n in names_in]
            args = [a.to(dtype) if a.is_floating_point() else a for a in args]
            with torch.no_grad():
                out = as_outputs(fn(*args), "the model")
            return [o.detach().double().numpy() for o in out]
        return run

    session = ort.InferenceSession(onnx_bytes, session_options(1), providers=["CPUExecutionProvider"])
    gap = reference_gaps(onnx.load_from_string(onnx_bytes))
    names = signature.output_names
    runners: dict[str, Callable] = {}
    if module is not None:
        runners["eager"] = torch_call(getattr(module, method), torch.float32)
    runners["torchscript"] = torch_call(scripted, torch.float32)
    runners["onnxruntime"] = lambda feed: [np.asarray(o, np.float64) for o in session.run(names, feed)]
    if not gap:  # else it would compute something else: user_parity says it was not run, and why
        reference = ReferenceEvaluator(onnx_bytes)
        runners["onnx-reference"] = lambda feed: [np.asarray(o, np.float64) for o in reference.run(names, feed)]
    else:
        runners["onnx-reference (not run)"] = gap  # type: ignore[assignment]
    if module is not None:
        runners["float64"] = torch_call(getattr(copy.deepcopy(module).double(), method), torch.float64)
    elif stored is not None:
        def recorded(feed: Feed) -> list["np.ndarray"]:
            batch, seq = feed[INPUT_NAME].shape[:2]
            keys = [reference_key(variant, batch, seq, name) for name in names]
            if keys[0] not in stored:
                raise CheckFailed(f"{REFERENCE_FILE} holds no float64 {variant} outputs for batch {batch}, seq {seq}")
            return [stored[key] for key in keys]
        runners["float64"] = recorded
    return runners


def case_input(batch: int, seq: int, input_size: int) -> "np.ndarray":
    """The parity grid's input for (batch, seq): the same at export and at verify."""
    import numpy as np

    return np.random.default_rng(batch * 1009 + seq).standard_normal((batch, seq, input_size)).astype(np.float32)


def recording(run: Callable, signature: UserSignature, variant: str = "classifier"
              ) -> tuple[Callable, dict[str, "np.ndarray"]]:
    """`run`, and the dict it fills with every output it returns (keys as reference_key): the
    float64 module's outputs are stored as parity computes them."""
    seen: dict[str, "np.ndarray"] = {}

    def run_and_keep(feed: Feed) -> list["np.ndarray"]:
        outputs = run(feed)
        batch, seq = feed[INPUT_NAME].shape[:2]
        for name, out in zip(signature.output_names, outputs):
            seen[reference_key(variant, batch, seq, name)] = out
        return outputs
    return run_and_keep, seen


def npz_bytes(arrays: dict[str, "np.ndarray"]) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _summarise(results: list[dict[str, Any]], summary: dict[str, Any], key: str, batch: int, seq: int,
               comparison: Any) -> None:
    results.append({"pair": key, "batch": batch, "seq": seq, **comparison.to_json()})
    entry = summary.setdefault(key, {"max_abs": 0.0, "cases": 0, "passed": True, "applied_atol": comparison.atol})
    entry["max_abs"] = max(entry["max_abs"], comparison.max_abs)
    entry["cases"] += 1
    entry["passed"] = entry["passed"] and comparison.passed


def user_parity(runners: dict[str, Callable], signature: UserSignature, atol: float, rtol: float,
                cases: tuple[tuple[int, int], ...] = USER_CASES,
                on_case: Callable[[str], None] | None = None,
                alone: Callable[[Feed, int], list["np.ndarray"]] | None = None,
                variant: str = "classifier") -> dict[str, Any]:
    """Every runner against float64 (and each against eager or TorchScript) on every case, every
    output, by `check.compare` (an element fails only when it exceeds both atol and rtol, as for
    the tutorial model). Empty axes are not run: a user graph's recurrent kernel may abort on
    them (onnxruntime's GRU does). With `alone(feed, b)` (the lengths variant: the module in
    float64 on sample b alone, unpadded), float64's padded answer for each sample is held to it
    too, on the sample's valid steps: padding must change nothing."""
    from gru_deploy.check.compare import compare

    skipped = {name: why for name, why in runners.items() if isinstance(why, str)}
    runners = {name: run for name, run in runners.items() if name not in skipped}
    first = "eager" if "eager" in runners else "torchscript"
    pairs = [("float64", name) for name in runners if name != "float64"] + \
            [(first, name) for name in runners if name not in (first, "float64")]
    results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for batch, seq in cases:
        if on_case:
            on_case(f"batch {batch}, seq {seq}")
        feed = case_feed(signature, batch, seq)
        outs = {}
        for name, run in runners.items():
            if name == "onnx-reference" and seq > REFERENCE_MAX_SEQ:
                continue
            try:
                outs[name] = run(feed)
            except (UserInputError, CheckFailed):
                raise
            except Exception as exc:
                if name == "float64":
                    raise UserInputError(
                        f"the float64 reference (your module after .double()) failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}; create tensors inside forward with the "
                        "input's dtype (e.g. x.new_zeros)") from None
                raise CheckFailed(f"{name} failed at batch {batch}, seq {seq}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        for ref, got in pairs:
            if ref not in outs or got not in outs:
                continue
            for name, a, b in zip(signature.output_names, outs[got], outs[ref]):
                _summarise(results, summary, f"{ref}->{got}[{name}]", batch, seq, compare(b, a, atol, rtol))
        if alone is not None and "float64" in outs:
            lengths = feed[LENGTHS_NAME]
            for index in range(batch):
                single = alone(feed, index)
                for output, padded, want in zip(signature.outputs, outs["float64"], single):
                    got = padded[index:index + 1]
                    if "seq" in output["shape"]:  # a per-step output: the sample's own steps only
                        axis = output["shape"].index("seq")
                        got = got.take(range(int(lengths[index])), axis=axis)
                    _summarise(results, summary, f"float64 alone->float64 padded[{output['name']}]", batch, seq,
                               compare(want, got, atol, rtol))
    passed = all(entry["passed"] for entry in summary.values())
    notes = [f"onnx's reference evaluator runs up to {REFERENCE_MAX_SEQ} steps (it is pure Python)",
             "empty batches and sequences are not run: a recurrent kernel may abort on them"]
    notes += [f"{name.split(' ')[0]} not run: {why}" for name, why in skipped.items()]
    if alone is not None:
        notes.append("lengths spread over 1..seq; 'float64 alone': the module's forward in float64 on each sample "
                     "alone, unpadded, against its padded answer on its valid steps")
    # No widening here: every comparison is held to atol itself, so every case run is verified.
    return {"passed": passed, "atol": atol, "rtol": rtol, "applied_atol": atol,
            "verified_max_seq": {variant: max((seq for _, seq in cases), default=-1)}, "unverifiable": [],
            "cases": [list(c) for c in cases], "summary": summary, "results": results, "notes": notes}


def failures(parity: dict[str, Any]) -> list[str]:
    return [f"{key}: max abs error {entry['max_abs']:.3g} (atol {entry.get('applied_atol', parity['atol']):.3g}, "
            f"rtol {parity['rtol']:.3g})" for key, entry in parity["summary"].items() if not entry["passed"]]


# --- the export folder ----------------------------------------------------------------------

MODULE_STRATEGIES = ("loop", "fused", "auto")


def _once(run: Callable[[Feed], list["np.ndarray"]]) -> Callable[[Feed], list["np.ndarray"]]:
    """`run`, answering each parity case (a feed is fixed by its (batch, seq): case_feed) once."""
    answers: dict[tuple[int, ...], list["np.ndarray"]] = {}

    def cached(feed: Feed) -> list["np.ndarray"]:
        key = tuple(feed[INPUT_NAME].shape[:2])
        if key not in answers:
            answers[key] = run(feed)
        return answers[key]
    return cached


def _time_user_graphs(graphs: dict[str, bytes], signature: UserSignature, typical: tuple[int, int],
                      budget_s: float) -> dict[str, float]:
    """Median onnxruntime latency (µs, one thread) of each graph at the typical (batch, seq)."""
    import onnxruntime as ort

    from gru_deploy.check.timing import median_us
    from gru_deploy.check.runners import session_options

    x = case_input(typical[0], typical[1], signature.inputs[0]["shape"][2])
    timings = {}
    for name, data in graphs.items():
        session = ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
        timings[name] = round(median_us(lambda: session.run(signature.output_names, {INPUT_NAME: x}), budget_s), 1)
    return timings


def check_module_strategy(strategy: str) -> None:
    if strategy not in MODULE_STRATEGIES:
        raise UserInputError(f"--strategy {strategy} maps the tutorial model's single cell; a module exports as "
                             f"{', '.join(MODULE_STRATEGIES)} (fused: the tutorial cell families and torch.nn.GRU)")


def module_graphs(model: "UserModel", scripted: "torch.jit.ScriptModule", kept: str, signature: UserSignature,
                  opset: int, strategy: str, step: Callable[[str], None]) -> dict[str, tuple[bytes, dict]]:
    """The candidate ONNX graphs for `strategy`: {"loop": …} and/or {"fused": …}, each (bytes,
    graph record). fused where it applies (convert.families.fused_plan); auto takes both when
    they differ, and loop alone when fused does not apply."""
    from gru_deploy.convert.families import build_stacked_fused, fused_plan
    from gru_deploy.convert.graphs import count_ops, finish_export

    plan = None
    if strategy in ("fused", "auto"):
        try:
            plan = fused_plan(model.module, kept, model.reference)
        except UserInputError:
            if strategy == "fused":
                raise
    graphs: dict[str, tuple[bytes, dict]] = {}
    kind = model.record()["kind"]
    if strategy in ("loop", "auto") or plan == "exporter":
        step(f"exporting to ONNX opset {opset} (the recurrence kept: {kept})")
        exported = export_user_onnx(scripted, signature, opset, kind)
        if plan == "exporter":  # torch.nn.GRU: the exporter's graph is the fused form, unless a Loop remains
            if "Loop" not in exported[1]["op_types"]:
                return {"loop" if strategy == "loop" else "fused": exported}
            if strategy == "fused":
                raise UserInputError(f"--strategy fused: {model.reference} has a loop besides torch.nn.GRU; "
                                     "export it with --strategy loop")
        graphs["loop"] = exported
    if plan == "build":
        step(f"building the fused graph: one ONNX GRU node per layer (opset {opset})")
        onnx_model = build_stacked_fused(model.module, signature.inputs[0]["shape"][2], signature.output_names[0],
                                         opset)
        op_types = count_ops(onnx_model.graph)
        result = finish_export(onnx_model, "fused", opset, op_types, {"gru_deploy.model": model.record()["kind"]})
        graphs["fused"] = (result.onnx_bytes, {"opset": result.opset, "ir_version": result.ir_version,
                                               "node_count": result.node_count, "op_types": result.op_types})
    return graphs


def _builds_fused(model: "UserModel") -> bool:
    """True when gru-deploy builds this module's fused graph itself (the tutorial-cell family)."""
    from gru_deploy.models.families import StackedGRUClassifier

    return isinstance(model.module, StackedGRUClassifier)


def _script_hook(model: "UserModel", wrapper: Any, hook: str) -> "torch.jit.ScriptModule":
    """torch.jit.script of `wrapper(module)`, whose forward is the module's `hook`."""
    import torch

    from gru_deploy.convert.script import quiet_torchscript_deprecation

    try:
        with quiet_torchscript_deprecation():
            return torch.jit.script(wrapper(model.module).eval())
    except Exception as exc:
        raise UserInputError(f"TorchScript cannot compile {model.reference}.{hook}: "
                             f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None


def lengths_signature(signature: UserSignature) -> UserSignature:
    return UserSignature(signature.inputs + [{"name": LENGTHS_NAME, "dtype": "int64", "shape": ["batch"]}],
                         signature.outputs)


def export_lengths_variant(model: "UserModel", signature: UserSignature, form: str, opset: int, atol: float,
                           rtol: float, step: Callable[[str], None]) -> dict[str, Any]:
    """The lengths variant of a module that defines the hook (LENGTHS_HOOK, @torch.jit.export):
    scripted through models.variants.LengthsOf, exported in `form` (fused: the tutorial-cell
    family's GRU nodes given sequence_lens; otherwise the exporter's graph of the scripted
    hook), and proved on LENGTHS_CASES against the float64 module's hook, whose padded answer
    is itself held to the module's forward on each sample alone. Returns its files, parity,
    stored float64 outputs and manifest entries."""
    import torch

    from gru_deploy.convert import script
    from gru_deploy.convert.families import build_stacked_fused
    from gru_deploy.convert.graphs import count_ops, finish_export
    from gru_deploy.models.variants import LengthsOf

    sig = lengths_signature(signature)
    step(f"the lengths variant ({LENGTHS_HOOK}): scripting and exporting it ({form})")
    scripted = _script_hook(model, LengthsOf, LENGTHS_HOOK)
    kind = model.record()["kind"]
    if form == "fused":
        onnx_model = build_stacked_fused(model.module, sig.inputs[0]["shape"][2], sig.output_names[0], opset,
                                         lengths=True)
        result = finish_export(onnx_model, "fused", opset, count_ops(onnx_model.graph), {"gru_deploy.model": kind})
        onnx_bytes = result.onnx_bytes
        graph = {"opset": result.opset, "ir_version": result.ir_version, "node_count": result.node_count,
                 "op_types": result.op_types}
    else:
        onnx_bytes, graph = export_user_onnx(scripted, sig, opset, kind)
    step("checking the lengths variant's parity: padded = alone, every runner against float64")
    runners = user_runners(model.module, scripted, onnx_bytes, sig, method=LENGTHS_HOOK, variant="lengths")
    runners["float64"], stored = recording(runners["float64"], sig, "lengths")
    double = copy.deepcopy(model.module).double()

    def alone(feed: Feed, index: int) -> list["np.ndarray"]:
        x = torch.from_numpy(feed[INPUT_NAME][index:index + 1, :int(feed[LENGTHS_NAME][index])]).double()
        with torch.no_grad():
            return [o.detach().numpy() for o in as_outputs(double(x), model.reference)]

    parity = user_parity(runners, sig, atol, rtol, cases=LENGTHS_CASES, alone=alone, variant="lengths")
    if not parity["passed"]:
        raise CheckFailed("the lengths variant's parity failed, nothing written: " + "; ".join(failures(parity)))
    return {"signature": sig, "pt": script.to_bytes(scripted), "onnx": onnx_bytes, "graph": graph, "form": form,
            "parity": parity, "stored": stored}


def stream_signature(signature: UserSignature, state_dims: list[int]) -> UserSignature:
    if STATE_OUT in signature.output_names:
        raise UserInputError(f"an output is named {STATE_OUT!r}, the stream variant's state: rename it "
                             "(--output-names)")
    state = {"dtype": "float32", "shape": ["batch", *state_dims]}
    return UserSignature(signature.inputs + [{"name": STATE_IN, **state}],
                         signature.outputs + [{"name": STATE_OUT, **state}])


def _stream_contract(model: "UserModel", signature: UserSignature, atol: float, rtol: float,
                     results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The stream's promise on the float64 module: from initial_state, one chunk gives
    forward's outputs; chunks carried through h_n give the one pass's outputs and state."""
    import numpy as np
    import torch

    from gru_deploy.check.compare import compare

    double = copy.deepcopy(model.module).double()
    names = signature.output_names
    per_step = ["seq" in o["shape"] for o in signature.outputs]

    def numpy(values: Any) -> list["np.ndarray"]:
        return [v.detach().numpy() for v in as_outputs(values, model.reference)]

    for batch, seq in CONTRACT_CASES:
        x = torch.from_numpy(case_input(batch, seq, signature.inputs[0]["shape"][2])).double()
        h0 = getattr(double, STATE_HOOK)(batch).double()
        with torch.no_grad():
            whole = numpy(double(x))
            one = numpy(getattr(double, STREAM_HOOK)(x, h0))
            for name, want, got in zip(names, whole, one):
                _summarise(results, summary, f"float64 forward->float64 stream[{name}]", batch, seq,
                           compare(want, got, atol, rtol))
            for size in CHUNK_SIZES:
                state, parts = h0, []
                for start in range(0, seq, size):
                    out = numpy(getattr(double, STREAM_HOOK)(x[:, start:start + size], state))
                    state = torch.from_numpy(out[-1])
                    parts.append(out)
                chunked = [np.concatenate([p[i] for p in parts], axis=signature.outputs[i]["shape"].index("seq"))
                           if per_step[i] else parts[-1][i] for i in range(len(names))] + [parts[-1][-1]]
                for name, want, got in zip(names + [STATE_OUT], one, chunked):
                    _summarise(results, summary, f"float64 one pass->float64 chunks of {size}[{name}]", batch, seq,
                               compare(want, got, atol, rtol))


def export_stream_variant(model: "UserModel", signature: UserSignature, opset: int, atol: float, rtol: float,
                          step: Callable[[str], None]) -> dict[str, Any] | str:
    """The stream variant of a module with the stream hooks (STATE_HOOK, STREAM_HOOK): scripted
    through models.variants.StreamOf, exported as the exporter writes it, proved on
    STREAM_CASES (from a state in [-1, 1]) against the float64 hook, the hook itself held to
    forward and to its own chunked runs (_stream_contract). Returns what export_lengths_variant
    does, or why the module does not stream."""
    import torch

    from gru_deploy.convert import script
    from gru_deploy.models.variants import StreamOf

    initial = getattr(model.module, STATE_HOOK, None)
    state = initial(2) if callable(initial) else None
    if state is None:
        return f"{STATE_HOOK}(batch) returned None: the module cannot stream (e.g. bidirectional)"
    if not isinstance(state, torch.Tensor) or state.dim() < 2 or state.shape[0] != 2 or bool(state.any()):
        raise UserInputError(f"{model.reference}.{STATE_HOOK}(2) must return zeros of shape [2, ...] (the state "
                             f"forward starts from), got {getattr(state, 'shape', type(state).__name__)}")
    sig = stream_signature(signature, [int(d) for d in state.shape[1:]])
    step(f"the stream variant ({STREAM_HOOK}, state {list(state.shape[1:])}): scripting and exporting it")
    scripted = _script_hook(model, StreamOf, STREAM_HOOK)
    onnx_bytes, graph = export_user_onnx(scripted, sig, opset, model.record()["kind"])
    step("checking the stream variant's parity: one pass = forward = chunks, every runner against float64")
    runners = user_runners(model.module, scripted, onnx_bytes, sig, method=STREAM_HOOK, variant="stream")
    runners["float64"], stored = recording(runners["float64"], sig, "stream")
    parity = user_parity(runners, sig, atol, rtol, cases=STREAM_CASES, variant="stream")
    _stream_contract(model, signature, atol, rtol, parity["results"], parity["summary"])
    parity["passed"] = all(entry["passed"] for entry in parity["summary"].values())
    parity["notes"].append(f"from {STATE_HOOK}: one chunk = forward, and chunks of {CHUNK_SIZES} steps carried "
                           f"through {STATE_OUT} = the one pass, on the float64 module at {list(CONTRACT_CASES)}")
    if not parity["passed"]:
        raise CheckFailed("the stream variant's parity failed, nothing written: " + "; ".join(failures(parity)))
    return {"signature": sig, "pt": script.to_bytes(scripted), "onnx": onnx_bytes, "graph": graph, "form": "loop",
            "parity": parity, "stored": stored}


def export_user_model(model: "UserModel", out: Path, opset: int = 17, atol: float = 1e-5, rtol: float = 1e-5,
                      input_size: int | None = None, output_names: list[str] | None = None,
                      on_step: Callable[[str], None] | None = None, labels: tuple[str, ...] = (),
                      metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                      strategy: str = "loop", typical: tuple[int, int] = (1, 100)) -> dict[str, Any]:
    """Write model.pt, model.onnx, parity.json and manifest.json for a user's model into `out`,
    all at once and only when every check passes; return the manifest. `labels`, `metrics`
    and `training` are recorded as given (a built-in family's checkpoint carries them).
    `strategy` loop, fused (where it applies) or auto (the faster of the two that pass parity
    at `typical` (batch, seq))."""
    from gru_deploy.versions import __version__
    from gru_deploy.check.verify import check_tolerances
    from gru_deploy.convert import script
    from gru_deploy.convert.folder import KEEP
    from gru_deploy.manifest import (MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, atomic_write_bytes,
                                     atomic_write_json, file_entry, staged_dir)
    from gru_deploy.models.user import input_size_of
    from gru_deploy.versions import library_versions

    check_tolerances(atol, rtol)
    check_module_strategy(strategy)
    step = on_step or (lambda message: None)
    size = input_size or input_size_of(model.module)
    if size is None:
        raise UserInputError(f"{model.reference}: cannot read the input size off its layers; pass --input-size")
    step(f"scripting {model.reference} with torch.jit.script")
    scripted = script_user(model)
    kept = check_recurrence(scripted, model.reference)
    step(f"reading the signature off the module (input [batch, seq, {size}])")
    signature = discover_signature(model.module, size, model.reference, output_names)
    if labels and (len(signature.outputs) != 1 or signature.outputs[0]["shape"][-1] != len(labels)):
        raise UserInputError(f"{len(labels)} labels do not fit the outputs {signature.to_dict()['outputs']}")
    candidates = module_graphs(model, scripted, kept, signature, opset, strategy, step)
    pt_bytes = script.to_bytes(scripted)
    parities, module_side = {}, {}
    stored: dict[str, "np.ndarray"] = {}
    for form, (data, _) in candidates.items():
        step(f"checking parity of every output ({form}): eager, TorchScript, onnxruntime, onnx reference, float64")
        runners = user_runners(model.module, scripted, data, signature)
        if not module_side:  # the module's own runners answer alike for every form: run them once
            runners["float64"], stored = recording(runners["float64"], signature)
            module_side = {name: _once(runners[name]) for name in ("eager", "torchscript", "float64")}
        runners.update(module_side)
        parities[form] = user_parity(runners, signature, atol, rtol)
        if not parities[form]["passed"]:
            raise CheckFailed(f"parity failed ({form}), nothing written: " + "; ".join(failures(parities[form])))
    auto = None
    chosen = next(iter(candidates))
    if strategy == "auto":
        from gru_deploy.convert.folder import choose_fastest

        step(f"timing {', '.join(candidates)} at batch {typical[0]}, seq {typical[1]}")
        chosen, auto = choose_fastest({k: v[0] for k, v in candidates.items()},
                                      lambda graphs, budget: _time_user_graphs(graphs, signature, typical, budget),
                                      on_step=step)
        auto.update({"typical_batch": typical[0], "typical_seq": typical[1], "candidates": list(candidates)})
    onnx_bytes, graph = candidates[chosen]
    parity = parities[chosen]
    stored = dict(stored)
    notes: list[str] = []
    files = {"model.pt": pt_bytes, "model.onnx": onnx_bytes}
    models = {
        "model.pt": {"variant": "classifier", "format": "torchscript", "precision": "fp32"},
        "model.onnx": {"variant": "classifier", "format": "onnx", "precision": "fp32", "strategy": chosen,
                       "opset": graph["opset"], "ir_version": graph["ir_version"]},
    }
    variants: dict[str, Any] = {}
    exported: dict[str, Any] = {}
    if hasattr(scripted, LENGTHS_HOOK):
        built = "fused" if chosen == "fused" and _builds_fused(model) else "loop"
        exported["lengths"] = export_lengths_variant(model, signature, built, opset, atol, rtol, step)
    else:
        notes.append(f"the lengths variant is absent: the module defines no @torch.jit.export {LENGTHS_HOOK}"
                     "(x, lengths)")
    if hasattr(scripted, STREAM_HOOK):
        result = export_stream_variant(model, signature, opset, atol, rtol, step)
        if isinstance(result, str):
            notes.append(f"the stream variant is absent: {result}")
        else:
            exported["stream"] = result
    else:
        notes.append(f"the stream variant is absent: the module defines no @torch.jit.export {STREAM_HOOK}"
                     f"(x, {STATE_IN}) (and {STATE_HOOK}(batch))")
    for variant, done in exported.items():
        stored.update(done["stored"])
        parity.setdefault("variants", {})[variant] = done["parity"]
        parity["verified_max_seq"].update(done["parity"]["verified_max_seq"])
        pt, onnx_name = f"model_{variant}.pt", f"model_{variant}.onnx"
        files[pt], files[onnx_name] = done["pt"], done["onnx"]
        models[pt] = {"variant": variant, "format": "torchscript", "precision": "fp32"}
        models[onnx_name] = {"variant": variant, "format": "onnx", "precision": "fp32", "strategy": done["form"],
                             "opset": done["graph"]["opset"], "ir_version": done["graph"]["ir_version"]}
        variants[variant] = {"signature": done["signature"].to_dict(), "strategy": done["form"],
                             "torchscript": pt, "onnx": onnx_name, "onnx_node_count": done["graph"]["node_count"],
                             "op_types": done["graph"]["op_types"]}
    step("converting the ONNX models to ORT format (onnxruntime's converter)")
    from gru_deploy.convert.graphs import add_ort_models, to_ort_format
    from gru_deploy.errors import WriteFailed

    try:
        add_ort_models(files, models, to_ort_format({n: d for n, d in files.items() if n.endswith(".onnx")}))
    except WriteFailed as exc:  # an op the ORT-format writer does not take: the edge bundle goes without
        notes.append(f"no ORT-format copy: {exc}")
    files[REFERENCE_FILE] = npz_bytes(stored)
    with staged_dir(Path(out), keep=KEEP) as stage:
        for name, data in files.items():
            atomic_write_bytes(stage / name, data)
        atomic_write_json(stage / "parity.json", parity)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "gru_deploy_version": __version__,
            "model": {**model.record(), "recurrence": kept},
            "strategy": chosen,
            "auto": auto,
            "opset": graph["opset"],
            "ir_version": graph["ir_version"],
            "onnx": {"node_count": graph["node_count"], "op_types": graph["op_types"]},
            "signature": signature.to_dict(),
            "models": models,
            "variants": variants,
            "config": {"input_size": size},
            "labels": list(labels),
            "metrics": {k: v for k, v in (metrics or {}).items() if k != "loss_history"},
            "training": dict(training or {}),
            "source_checkpoint": {"sha256": model.checkpoint_sha256},
            "versions": library_versions(),
            "notes": notes,
            "reference": {"file": REFERENCE_FILE, "computed_by": f"{model.reference} in float64 (module.double())",
                          "cases": [list(c) for c in USER_CASES],
                          **({"lengths_cases": [list(c) for c in LENGTHS_CASES]} if "lengths" in variants else {}),
                          **({"stream_cases": [list(c) for c in STREAM_CASES]} if "stream" in variants else {})},
            "files": {name: file_entry(stage / name) for name in (*files, "parity.json")},
            "parity": {"passed": True, "atol": atol, "rtol": rtol, "applied_atol": parity["applied_atol"],
                       "verified_max_seq": parity["verified_max_seq"], "unverifiable": [], "notes": parity["notes"],
                       "summary": parity["summary"],
                       **({"variants": {v: {"passed": r["passed"], "summary": r["summary"]}
                                        for v, r in parity["variants"].items()}} if variants else {})},
        }
        atomic_write_json(stage / MANIFEST_NAME, manifest)
    return manifest


def export_family(ckpt: Any, out: Path, opset: int = 17, atol: float = 1e-5, rtol: float = 1e-5,
                  on_step: Callable[[str], None] | None = None, strategy: str = "loop",
                  typical: tuple[int, int] = (1, 100)) -> dict[str, Any]:
    """Export a built-in family's checkpoint (train.FamilyCheckpoint) by the generic path."""
    from gru_deploy.models import families
    from gru_deploy.models.user import UserModel

    reference = families.family_reference(ckpt.family)
    model = UserModel(ckpt.model(), reference, families.__file__, dict(ckpt.model_args), ckpt.sha256,
                      family=ckpt.family)
    return export_user_model(model, out, opset=opset, atol=atol, rtol=rtol, on_step=on_step, labels=ckpt.labels,
                             metrics=ckpt.metrics, training=ckpt.training, strategy=strategy, typical=typical)


def is_user_export(manifest: dict[str, Any]) -> bool:
    from gru_deploy.manifest import is_module_export

    return is_module_export(manifest)


def verify_user_export(folder: Path, manifest: dict[str, Any], atol: float, rtol: float,
                       on_case: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Parity of a user export's files, without the user's code: TorchScript (model*.pt) is the
    PyTorch side, and the float64 outputs the export computed from the user's module (its
    REFERENCE_FILE, checksum-verified) the reference; the classifier and, where the export has
    it, the lengths variant (under "variants")."""
    import numpy as np

    from gru_deploy.manifest import verified_path

    reference = manifest.get("reference") or {}
    with np.load(verified_path(folder, manifest, reference.get("file", REFERENCE_FILE)), allow_pickle=False) as data:
        stored = {key: data[key] for key in data.files}
    signature = UserSignature(manifest["signature"]["inputs"], manifest["signature"]["outputs"])
    recorded = (manifest.get("onnx") or {}).get("op_types")
    report = _verify_variant(folder, manifest, "classifier", signature, recorded, stored,
                             _cases(folder, reference.get("cases", USER_CASES)), atol, rtol, on_case)
    defaults = {"lengths": LENGTHS_CASES, "stream": STREAM_CASES}
    for name, entry in (manifest.get("variants") or {}).items():
        if name not in defaults:
            raise UserInputError(f"{folder}/manifest.json: unknown variant {name!r}")
        sig = UserSignature(entry["signature"]["inputs"], entry["signature"]["outputs"])
        variant = _verify_variant(folder, manifest, name, sig, entry.get("op_types"), stored,
                                  _cases(folder, reference.get(f"{name}_cases", defaults[name])), atol, rtol, on_case)
        report.setdefault("variants", {})[name] = variant
        report["passed"] = report["passed"] and variant["passed"]
        report["verified_max_seq"].update(variant["verified_max_seq"])
    return report


def _cases(folder: Path, cases: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(cases, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and all(type(v) is int and 1 <= v <= 100_000 for v in c)
            for c in cases):
        raise UserInputError(f"{folder}/manifest.json: reference cases must be a list of [batch, seq] pairs")
    return tuple((int(c[0]), int(c[1])) for c in cases)


def _verify_variant(folder: Path, manifest: dict[str, Any], variant: str, signature: UserSignature, recorded: Any,
                    stored: dict[str, "np.ndarray"], cases: tuple[tuple[int, int], ...], atol: float, rtol: float,
                    on_case: Callable[[str], None] | None) -> dict[str, Any]:
    from gru_deploy.convert import script
    from gru_deploy.convert.graphs import check_onnx_bytes
    from gru_deploy.manifest import select_model, verified_path

    pt = verified_path(folder, manifest, select_model(manifest, variant, "torchscript", where=str(folder)))
    onnx_path = verified_path(folder, manifest, select_model(manifest, variant, "onnx", where=str(folder)))
    if not isinstance(recorded, dict):
        raise UserInputError(f"{folder}/manifest.json: the {variant} model's op_types are missing; re-export the model")
    onnx_bytes = onnx_path.read_bytes()
    check_onnx_bytes(onnx_bytes, f"{folder}: {onnx_path.name}", known=frozenset(recorded))
    scripted = script.load(pt)
    check_recurrence(scripted, str(pt))
    runners = user_runners(None, scripted, onnx_bytes, signature, stored, variant=variant)
    return user_parity(runners, signature, atol, rtol, cases=cases, on_case=on_case, variant=variant)
