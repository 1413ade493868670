"""Walking an ONNX graph and its sub-graphs (Loop and Scan bodies, If branches): what the
check layer reads (a runner's gaps) and what convert and bundle count and rewrite."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
