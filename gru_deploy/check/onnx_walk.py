"""Walking an ONNX graph and its sub-graphs (Loop and Scan bodies, If branches): what the
check layer reads (a runner's gaps) and what convert and bundle count and rewrite."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gru_deploy.errors import CheckFailed

if TYPE_CHECKING:
    import onnx


def subgraphs(node: "onnx.NodeProto") -> list["onnx.GraphProto"]:
    """The graphs held in a node's attributes (Loop and Scan bodies, If branches)."""
    import onnx

    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def all_graphs(graph: "onnx.GraphProto") -> list["onnx.GraphProto"]:
    """The graph and every sub-graph below it, outermost first."""
    out, stack = [], [graph]
    while stack:
        current = stack.pop(0)
        out.append(current)
        for node in current.node:
            stack.extend(subgraphs(node))
    return out


def count_ops(graph: "onnx.GraphProto") -> dict[str, int]:
    """Op types and counts in a graph, sub-graphs (Loop/Scan/If bodies) included."""
    counts: dict[str, int] = {}
    for current in all_graphs(graph):
        for node in current.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# Op types our exporters write (loop, fused, the variants, ORT's quantiser): a model from
# elsewhere with any other op is refused before a runtime loads it.
KNOWN_OPS = frozenset({
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "DequantizeLinear", "Div", "DynamicQuantizeLinear",
    "Equal", "Expand", "Gather", "Gemm", "Greater", "GRU", "Identity", "If", "Less", "Loop", "MatMul", "Max", "Scan",
    "MatMulInteger", "Mul", "Neg", "QuantizeLinear", "Range", "Reshape", "Shape", "Sigmoid", "Slice", "Split", "Squeeze",
    "Sub", "Tanh", "Transpose", "Unsqueeze", "Where", "DynamicQuantizeMatMul",
})


def parse_onnx(data: bytes, where: str, error: type[Exception] = CheckFailed) -> "onnx.ModelProto":
    """Parse ONNX bytes, refusing an empty file, garbage or a model without nodes with `error`."""
    import onnx
    from google.protobuf.message import DecodeError

    if not data:
        raise error(f"{where}: the ONNX file is empty")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise error(f"{where}: not an ONNX model ({str(exc).splitlines()[0][:200]})") from None
    if not model.graph.node:
        raise error(f"{where}: the ONNX model has no graph nodes")
    return model


def check_onnx_bytes(data: bytes, where: str, known: frozenset[str] | None = None) -> "onnx.ModelProto":
    """Refuse an ONNX file we did not make: empty, unparsable, external data, ops outside the
    default domain, ops other than `known` (default: the ops our exporters write for the
    tutorial model; for a user's model, the ops its export recorded in the manifest)."""
    import onnx

    model = parse_onnx(data, where)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise CheckFailed(f"{where}: tensor {tensor.name!r} refers to external data; bundles hold "
                              "self-contained models only")
    domains = sorted({node.domain for g in all_graphs(model.graph) for node in g.node} - {"", "ai.onnx"})
    if domains and known is not None:
        raise CheckFailed(f"{where}: ops of domain(s) {domains}; gru-deploy runs standard ONNX ops only")
    unknown = sorted(set(count_ops(model.graph)) - (KNOWN_OPS if known is None else known))
    if unknown:
        raise CheckFailed(f"{where}: op type(s) {unknown} are not ones gru-deploy writes; refusing the model")
    return model
