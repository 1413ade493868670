"""Is a scripted module recurrent over its input's time axis? Read off its TorchScript graph
(it builds nothing, so it is check's: export calls it on what it scripted, verify on the files)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from gru_deploy.errors import CheckFailed, UserInputError

if TYPE_CHECKING:
    import torch


RECURRENT_OPS = ("aten::gru", "aten::lstm", "aten::rnn_tanh", "aten::rnn_relu")


def source_line(text: str) -> str:
    """'file:line' from a TorchScript message or source range, or '' when it names none."""
    match = re.search(r'File "([^"]+)", line (\d+)', text)
    if match:
        return f"{match.group(1)}:{match.group(2)}"
    match = re.search(r"at (\S+\.py):(\d+)", text)
    return f"{match.group(1)}:{match.group(2)}" if match else ""


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
    if kind == "prim::TupleUnpack" and args[0].node().kind() == "prim::TupleConstruct":  # a helper's tuple
        return time_axes(list(args[0].node().inputs())[list(node.outputs()).index(value)], x, depth + 1)
    if kind in ("aten::linear", "aten::matmul"):  # the last axis is projected; the leading ones stay
        return {axis for axis in time_axes(args[0], x, depth + 1) if axis != X_RANK - 1}
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
            where = source_line(loop.sourceRange())
            raise CheckFailed(f"{reference}: the loop at {where or 'an unknown line'} carries state from step to step "
                              "but runs a fixed number of times (or over another axis), not over the input's time "
                              "axis: the model would accept one sequence length only; loop over "
                              "`range(x.size(1))`")
    if over_seq & carries:
        return "loop"
    if recurrent:
        return recurrent[0].split("::")[1]
    stateless = [source_line(n.sourceRange()) for n in over_seq]
    raise CheckFailed(f"{reference}: no recurrence over the input's time axis (neither a loop over x.size(1) that "
                      "carries state from step to step nor a recurrent operator such as torch.nn.GRU)"
                      + (f"; the loop at {stateless[0] or 'an unknown line'} carries nothing from one step to the "
                         "next" if stateless else "") + "; gru-deploy exports recurrent models")
