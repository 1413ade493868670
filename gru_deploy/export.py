"""ONNX export of the scripted classifier (the `loop` strategy) and the guards around it.

The TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) turns the scripted
`prim::Loop` into an ONNX `Loop` whose trip count is the input's sequence length. Two
guards refuse a bad graph before it is written: it must contain a Loop, and its node
count must not change with the example's sequence length (an unrolled graph would).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.script import quiet_torchscript_deprecation
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, ModelSpec

if TYPE_CHECKING:
    import onnx
    import torch

DEFAULT_OPSET = 17
# Opsets the test suite exports and checks for parity with onnxruntime.
SUPPORTED_OPSETS = range(13, 21)  # the TorchScript exporter stops at 20
STRATEGIES = ("loop",)
# Example sequence lengths used to trace the export twice; they must differ.
GUARD_LENGTHS = (3, 5)


@dataclass
class ExportResult:
    """One ONNX graph, serialised, with what the guards found."""

    onnx_bytes: bytes
    strategy: str
    opset: int
    ir_version: int
    node_count: int
    op_types: dict[str, int] = field(default_factory=dict)


def check_opset(opset: int) -> int:
    if opset not in SUPPORTED_OPSETS:
        raise UserInputError(
            f"--opset {opset} is outside the verified range "
            f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    return opset


def count_ops(graph: "onnx.GraphProto") -> dict[str, int]:
    """Op types and counts in a graph, sub-graphs (Loop/Scan/If bodies) included."""
    import onnx

    counts: dict[str, int] = {}
    stack = [graph]
    while stack:
        current = stack.pop()
        for node in current.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    return counts


def _export_once(scripted: "torch.jit.ScriptModule", spec: ModelSpec, opset: int, seq_len: int) -> bytes:
    import torch

    example = torch.zeros(2, seq_len, spec.input_size)
    buffer = io.BytesIO()
    with quiet_torchscript_deprecation():
        torch.onnx.export(
            scripted,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "seq"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return buffer.getvalue()


def check_not_unrolled(models: list["onnx.ModelProto"], needs: str | None = "Loop") -> dict[str, int]:
    """Refuse graphs exported at different example lengths whose op counts differ, or that lack `needs`."""
    counts = [count_ops(model.graph) for model in models]
    if any(c != counts[0] for c in counts[1:]):
        sizes = ", ".join(str(sum(c.values())) for c in counts)
        raise CheckFailed(
            f"refusing to write an unrolled graph: its node count changes with the example "
            f"sequence length ({sizes} nodes for lengths {GUARD_LENGTHS}); the time loop must stay a loop"
        )
    if needs is not None and needs not in counts[0]:
        raise CheckFailed(f"refusing to write a graph without a {needs} node: the time loop was unrolled")
    return counts[0]


def add_metadata(model: "onnx.ModelProto", metadata: dict[str, Any]) -> None:
    """Record plain values in `metadata_props` (JSON for anything that is not a string)."""
    del model.metadata_props[:]
    for key in sorted(metadata):
        value = metadata[key]
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def export_loop(
    scripted: "torch.jit.ScriptModule",
    spec: ModelSpec,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> ExportResult:
    """Export the scripted classifier to an ONNX Loop graph, guarded and checked."""
    import onnx

    check_opset(opset)
    models = [onnx.load_from_string(_export_once(scripted, spec, opset, n)) for n in GUARD_LENGTHS]
    op_types = check_not_unrolled(models)
    model = models[0]
    model.producer_name = "gru-deploy"
    add_metadata(model, metadata or {})
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckFailed(f"the exported ONNX graph failed onnx.checker: {str(exc).splitlines()[0]}") from None
    return ExportResult(
        onnx_bytes=model.SerializeToString(),
        strategy="loop",
        opset=opset,
        ir_version=int(model.ir_version),
        node_count=sum(op_types.values()),
        op_types=op_types,
    )
