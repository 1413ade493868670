"""ONNX export: the `loop` strategy (scripted classifier → ONNX Loop) and `fused` (ONNX GRU op).

The TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) turns the scripted
`prim::Loop` into an ONNX `Loop` whose trip count is the input's sequence length. Two
guards refuse a bad graph before it is written: it must contain a Loop, and its node
count must not change with the example's sequence length (an unrolled graph would).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.check.onnx_walk import all_graphs, count_ops, subgraphs  # noqa: F401  (re-exported for convert, bundle)
from gru_deploy.convert.script import quiet_torchscript_deprecation
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN, STATE_OUT
from gru_deploy.check.onnx_walk import (  # noqa: F401  (re-exported: convert's callers read them here too)
    KNOWN_OPS, check_onnx_bytes, parse_onnx)

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

# Opsets the test suite exports and checks for parity with onnxruntime.
SUPPORTED_OPSETS = range(13, 21)  # the TorchScript exporter stops at 20
STRATEGIES = ("loop", "fused", "stepwise")
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

    def record(self) -> dict[str, Any]:
        """What the manifest records of the graph."""
        return {"opset": self.opset, "ir_version": self.ir_version, "node_count": self.node_count,
                "op_types": self.op_types}


def min_ir_version(opset: int) -> int:
    """The lowest ONNX IR version that can carry `opset` (from onnx's own version table):
    8 up to opset 18, 9 for 19 and 20. Older runtimes read what needs no newer IR."""
    from onnx import helper

    return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def check_opset(opset: int) -> int:
    if opset not in SUPPORTED_OPSETS:
        raise UserInputError(
            f"--opset {opset} is outside the verified range "
            f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    return opset


@contextlib.contextmanager
def _quiet_stdout_fd() -> Iterator[None]:
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


def example_args(signature: dict[str, Any], seq: int) -> tuple["torch.Tensor", ...]:
    """Example inputs at batch 2 for the exporter, in the signature's order: x, lengths (seq and
    seq - 1) and the state (zeros) where the signature takes them."""
    import torch

    args = []
    for tensor in signature["inputs"]:
        if tensor["name"] == LENGTHS_NAME:
            args.append(torch.tensor([seq, max(1, seq - 1)], dtype=torch.int64))
        elif tensor["name"] == STATE_IN:
            args.append(torch.zeros(2, *tensor["shape"][1:]))
        else:
            args.append(torch.zeros(2, seq, tensor["shape"][2]))
    return tuple(args)


def _export_once(module: "torch.nn.Module", signature: dict[str, Any], opset: int, seq: int) -> bytes:
    """One export with TorchScript's exporter at example length `seq`; CheckFailed with its first
    line when it fails (it prints the whole IR graph on stdout, from C++: kept off the terminal)."""
    import warnings

    import torch

    names = [t["name"] for t in signature["inputs"] + signature["outputs"]]
    dynamic = {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
               for t in signature["inputs"] + signature["outputs"]}
    buffer = io.BytesIO()
    try:
        with quiet_torchscript_deprecation(), _quiet_stdout_fd(), warnings.catch_warnings():
            # a GRU/LSTM exported at batch 2 "may fail at other batch sizes": the parity grid decides
            warnings.filterwarnings("ignore", message=".*batch_size other than 1.*", category=UserWarning)
            # a model.pt loaded back (verify --data) has no Python signature to read; x is given by position
            warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
            torch.onnx.export(module, example_args(signature, seq), buffer, dynamo=False, opset_version=opset,
                              input_names=names[:len(signature["inputs"])],
                              output_names=names[len(signature["inputs"]):], dynamic_axes=dynamic,
                              do_constant_folding=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        hint = (" (seen with a scripted torch.nn.GRUCell, whose forward compares input.dim() with a tuple: "
                "write the cell out, as the tutorial does, or use torch.nn.GRU)"
                if "expected node type prim::ListConstruct" in first else "")
        raise CheckFailed(f"the ONNX exporter failed on the scripted model: {type(exc).__name__}: "
                          f"{first[:300]}{hint}") from None
    return buffer.getvalue()


def export_scripted(scripted: "torch.jit.ScriptModule", signature: dict[str, Any], opset: int,
                    needs: tuple[str, ...] = ("Loop",)) -> tuple["onnx.ModelProto", dict[str, int]]:
    """A scripted module (the tutorial model's variants, a family's, your own) as ONNX, exported at
    each of GUARD_LENGTHS and refused when its node count changes between them, when it drops an
    input, or when it holds none of the `needs` ops (the recurrence); its inputs and outputs
    shaped as the signature says. Returns the model and its op counts."""
    import onnx

    check_opset(opset)
    models = [onnx.load_from_string(_export_once(scripted, signature, opset, n)) for n in GUARD_LENGTHS]
    unused = [t["name"] for t in signature["inputs"] if t["name"] not in {i.name for i in models[0].graph.input}]
    if unused:  # the exporter drops an input the graph never reads
        raise CheckFailed(f"the exported graph does not read its input(s) {unused}: the model ignores "
                          f"{'them' if len(unused) > 1 else 'it'}")
    op_types = check_not_unrolled(models, needs=None)
    if not any(op in op_types for op in needs):
        what = needs[0] if len(needs) == 1 else "Loop or recurrent"
        raise CheckFailed(f"refusing to write a graph without a {what} node: the time loop was unrolled")
    model = models[0]
    set_io_shapes(model, {t["name"]: t["shape"] for t in signature["inputs"] + signature["outputs"]})
    model.producer_name = "gru-deploy"
    return model, op_types


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


def set_io_shapes(model: "onnx.ModelProto", shapes: dict[str, list[Any]]) -> None:
    """Each graph input's and output's shape as `shapes` names it (str: a named dynamic dim)."""
    for value in list(model.graph.input) + list(model.graph.output):
        shape = value.type.tensor_type.shape
        wanted = shapes[value.name]
        del shape.dim[:]
        for size in wanted:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def add_metadata(model: "onnx.ModelProto", metadata: dict[str, Any]) -> None:
    """Record plain values in `metadata_props` (JSON for anything that is not a string)."""
    del model.metadata_props[:]
    for key in sorted(metadata):
        value = metadata[key]
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


# --- fused: the cell mapped onto ONNX's GRU operator --------------------------------------
# Fused graphs carry the lowest IR version their opset allows (min_ir_version), so that
# older runtimes read them.


def tutorial_cell_gru_weights(w: dict[str, "np.ndarray"], prefix: str) -> tuple["np.ndarray", ...]:
    """ONNX GRU's W [3H, in], R [3H, H] and B [6H] (one direction) from a tutorial cell's
    float32 parameters named `{prefix}W_xz.weight`, ….

    Gate order z, r, h. ONNX computes h' = (1−z)⊙h~ + z⊙h, so our z is ONNX's 1−z: the z
    rows of W and R and the z bias are negated (σ(−a) = 1 − σ(a)). The hidden-side
    Linear layers have no bias, so the recurrent biases are 0.
    """
    import numpy as np

    hidden = w[f"{prefix}W_hz.weight"].shape[0]
    return (np.concatenate([-w[f"{prefix}W_xz.weight"], w[f"{prefix}W_xr.weight"], w[f"{prefix}W_xh.weight"]]),
            np.concatenate([-w[f"{prefix}W_hz.weight"], w[f"{prefix}W_hr.weight"], w[f"{prefix}W_hh.weight"]]),
            np.concatenate([-w[f"{prefix}W_xz.bias"], w[f"{prefix}W_xr.bias"], w[f"{prefix}W_xh.bias"],
                            np.zeros(3 * hidden, np.float32)]))


def float32_arrays(state_dict: dict[str, Any]) -> dict[str, "np.ndarray"]:
    import numpy as np

    return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
            for k, v in state_dict.items()}


def empty_input_branch(outputs: list[str], empty: "onnx.GraphProto", full: "onnx.GraphProto"
                       ) -> list["onnx.NodeProto"]:
    """The nodes that branch (`If`) on batch·seq of x being 0: `empty` answers without the
    recurrent kernel (onnxruntime's GRU aborts the process on an empty axis), `full` runs it.
    They read the int64 constants `zero` and `one` and name x's batch size `batch_dim`."""
    from onnx import helper

    return [helper.make_node("Shape", [INPUT_NAME], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch_dim"], axis=0),
            helper.make_node("Gather", ["shape", "one"], ["seq_dim"], axis=0),
            helper.make_node("Mul", ["batch_dim", "seq_dim"], ["elements"]),
            helper.make_node("Equal", ["elements", "zero"], ["is_empty"]),
            helper.make_node("If", ["is_empty"], outputs, then_branch=empty, else_branch=full)]


def fused_stack_graph(layers: list[tuple["np.ndarray", "np.ndarray", "np.ndarray"]], fc_weight: "np.ndarray",
                      fc_bias: "np.ndarray", input_size: int, output_name: str, opset: int,
                      variant: str = "classifier", normalization: tuple["np.ndarray", "np.ndarray"] | None = None,
                      layered_state: bool = True) -> "onnx.ModelProto":
    """A stack of GRU layers and a linear head as ONNX, one `GRU` node per layer: the fused form of
    the tutorial model (one layer) and of the tutorial-cell family (convert.families), in one of
    three variants. `layers`: each layer's W [D, 3H, in], R [D, 3H, H], B [D, 6H] (D = 1 or 2
    directions, tutorial_cell_gru_weights); `normalization`: (mean, 1/std) applied to x first.

    * classifier: x [batch, seq, input] -> output [batch, classes];
    * lengths: (x padded, lengths int64 [batch]) -> output, every GRU node given the lengths as
      its sequence_lens (each direction runs over each sample's own steps, the backward one from
      its last valid step). The kernel gets max(lengths, 1) (a sequence_lens of 0 has read out of
      bounds in onnxruntime) and a length-0 sample's features are set back to 0 after it;
    * stream (one direction only): (x, h0) -> (output, h_n), layer l's GRU node starting from
      its part of h0 (initial_h): h0 is [batch, layers, H], or [batch, H] without `layered_state`.

    Layer l's Y [seq, D, batch, H] becomes the next layer's input [seq, batch, D·H] (both
    directions side by side); the last layer's Y_h [D, batch, H] becomes [batch, D·H] for the
    head. onnxruntime's GRU kernel aborts the process on an empty batch or sequence, so the graph
    branches (`If`) on batch·seq == 0 and answers without the kernel: fc(0) = fc.bias, and for the
    stream fc(h0's last layer) with h_n = h0. No input can reach the abort, whoever runs the file.
    Over 60 lines: one graph, built in the order it runs.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    directions, hidden = int(layers[0][1].shape[0]), int(layers[0][1].shape[2])
    count, classes = len(layers), int(fc_weight.shape[0])
    if variant == "stream" and directions == 2:
        raise UserInputError("a bidirectional model cannot stream: its backward direction needs the whole sequence")
    consts: dict[str, Any] = {"fc_weight": fc_weight, "fc_bias": fc_bias, "zero": np.array(0, np.int64),
                              "one": np.array(1, np.int64), "zero_f": np.array(0.0, np.float32),
                              "last_layer": np.array(count - 1, np.int64), "axis0": np.array([0], np.int64),
                              "axis1": np.array([1], np.int64), "out_dim": np.array([classes], np.int64),
                              "merge_directions": np.array([0, 0, directions * hidden], np.int64),
                              "batch_features": np.array([0, directions * hidden], np.int64)}
    nodes = []
    x_in = INPUT_NAME
    if normalization is not None:
        consts["norm_mean"], consts["norm_scale"] = normalization
        nodes += [helper.make_node("Sub", [INPUT_NAME, "norm_mean"], ["x_centered"]),
                  helper.make_node("Mul", ["x_centered", "norm_scale"], ["x_normalized"])]
        x_in = "x_normalized"
    nodes.append(helper.make_node("Transpose", [x_in], ["steps_0"], perm=[1, 0, 2]))
    sequence_lens = []
    if variant == "lengths":
        nodes += [helper.make_node("Max", [LENGTHS_NAME, "one"], ["lengths_at_least_1"]),
                  helper.make_node("Cast", ["lengths_at_least_1"], ["sequence_lens"], to=TensorProto.INT32)]
        sequence_lens = ["sequence_lens"]
    for layer, (W, R, B) in enumerate(layers):
        consts.update({f"W_{layer}": W, f"R_{layer}": R, f"B_{layer}": B})
        initial = []
        if variant == "stream":  # this layer's [batch, H] of h0 -> initial_h [1, batch, H]
            part = STATE_IN
            if layered_state:
                consts[f"index_{layer}"] = np.array(layer, np.int64)
                nodes.append(helper.make_node("Gather", [STATE_IN, f"index_{layer}"], [f"h0_{layer}"], axis=1))
                part = f"h0_{layer}"
            nodes.append(helper.make_node("Unsqueeze", [part, "axis0"], [f"initial_h_{layer}"]))
            initial = ["", f"initial_h_{layer}"]  # sequence_lens (none), initial_h
        nodes.append(helper.make_node(
            "GRU", [f"steps_{layer}", f"W_{layer}", f"R_{layer}", f"B_{layer}", *(sequence_lens or initial)],
            # the last layer's Y (every step's state) is not read: unnamed, the kernel does not write it
            [f"Y_{layer}" if layer + 1 < count else "", f"Y_h_{layer}"], hidden_size=hidden, linear_before_reset=0,
            direction="bidirectional" if directions == 2 else "forward", name=f"gru_layer_{layer}"))
        if layer + 1 < count:  # [seq, D, batch, H] -> [seq, batch, D*H]
            nodes += [helper.make_node("Transpose", [f"Y_{layer}"], [f"Y_{layer}_tb"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"Y_{layer}_tb", "merge_directions"], [f"steps_{layer + 1}"])]
    if directions == 1:  # Y_h [1, batch, H] -> [batch, H]: one node (measured: Transpose + Reshape cost 0.7 µs
        # a call more at (1, 1))
        nodes.append(helper.make_node("Squeeze", [f"Y_h_{count - 1}", "axis0"], ["features"]))
    else:
        nodes += [helper.make_node("Transpose", [f"Y_h_{count - 1}"], ["final_bd"], perm=[1, 0, 2]),
                  helper.make_node("Reshape", ["final_bd", "batch_features"], ["features"])]
    if variant == "lengths":  # a length-0 sample ran one step in the kernel: its state is 0
        nodes += [helper.make_node("Equal", [LENGTHS_NAME, "zero"], ["no_steps"]),
                  helper.make_node("Unsqueeze", ["no_steps", "axis1"], ["no_steps_2d"]),
                  helper.make_node("Where", ["no_steps_2d", "zero_f", "features"], ["features_kept"])]
    nodes.append(helper.make_node("Gemm", ["features_kept" if variant == "lengths" else "features", "fc_weight",
                                           "fc_bias"], ["logits_full"], transB=1))
    state = ["batch", count, hidden] if layered_state else ["batch", hidden]
    outputs = [output_name]

    def value(name: str, shape: list[Any] | None = None) -> "onnx.ValueInfoProto":
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape or ["batch", classes])

    full_outputs = [value("logits_full")]
    empty_nodes = [helper.make_node("Unsqueeze", ["batch_dim", "axis0"], ["batch_1d"]),
                   helper.make_node("Concat", ["batch_1d", "out_dim"], ["empty_shape"], axis=0),
                   helper.make_node("Expand", ["fc_bias", "empty_shape"], ["logits_empty"])]
    empty_outputs = [value("logits_empty")]
    if variant == "stream":  # every layer's Y_h [1, batch, H] -> h_n
        if layered_state:
            nodes += [helper.make_node("Transpose", [f"Y_h_{layer}"], [f"h_n_{layer}"], perm=[1, 0, 2])
                      for layer in range(count)]
            nodes.append(helper.make_node("Concat", [f"h_n_{layer}" for layer in range(count)], ["h_n_full"], axis=1))
        else:
            nodes.append(helper.make_node("Identity", ["features"], ["h_n_full"]))
        full_outputs.append(value("h_n_full", state))
        # nothing to step through: the state stays h0, the output is fc(h0's last layer)
        last = STATE_IN
        empty_nodes = []
        if layered_state:
            empty_nodes.append(helper.make_node("Gather", [STATE_IN, "last_layer"], ["h0_last"], axis=1))
            last = "h0_last"
        empty_nodes += [helper.make_node("Gemm", [last, "fc_weight", "fc_bias"], ["logits_empty"], transB=1),
                        helper.make_node("Identity", [STATE_IN], ["h_n_empty"])]
        empty_outputs.append(value("h_n_empty", state))
        outputs.append(STATE_OUT)
    full = helper.make_graph(nodes, "gru", [], full_outputs)
    empty = helper.make_graph(empty_nodes, "empty_input", [], empty_outputs)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", "seq", input_size])]
    if variant == "lengths":
        inputs.append(helper.make_tensor_value_info(LENGTHS_NAME, TensorProto.INT64, ["batch"]))
    if variant == "stream":
        inputs.append(helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, state))
    top = empty_input_branch(outputs, empty, full)
    used = {name for node in nodes + empty_nodes + top for name in node.input}
    graph = helper.make_graph(
        top, f"gru_{variant}_fused", inputs,
        [value(output_name)] + ([value(STATE_OUT, state)] if variant == "stream" else []),
        [numpy_helper.from_array(np.array(v, dtype=np.asarray(v).dtype, copy=True), k)
         for k, v in consts.items() if k in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=min_ir_version(opset),
                             producer_name="gru-deploy")


def step_graph(layers: list[tuple["np.ndarray", "np.ndarray", "np.ndarray"]], fc_weight: "np.ndarray",
               fc_bias: "np.ndarray", output_name: str, opset: int,
               normalization: tuple["np.ndarray", "np.ndarray"] | None = None) -> "onnx.ModelProto":
    """One streaming step of a one-direction tutorial-cell model as ONNX, with nothing but the
    work: one `GRU` node per layer, the head, state in and out, in the layout ONNX's GRU reads
    (so no Transpose, Gather or Unsqueeze runs around it). `layers` as fused_stack_graph takes
    them (one direction); `normalization` (mean, 1/std) is folded into the first layer's input
    weights. Like the fused graphs it branches (`If`) on an empty batch, so that no input of
    the file reaches the kernel's abort; `Stream.step` (batch >= 1) runs the full branch alone
    (without_empty_guard).

    x [1, batch, input] (the step, time-major: for one step the same memory as [batch, 1, input]),
    h0 [layers, batch, H] -> output [batch, classes], h_n [layers, batch, H]. Layer l's Y_h is
    layer l+1's one-step input as it stands. Over 60 lines: one graph and its guard, built in
    the order they run."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    count, hidden, classes = len(layers), int(layers[0][1].shape[2]), int(fc_weight.shape[0])
    input_size = int(layers[0][0].shape[2])
    consts: dict[str, Any] = {"fc_weight": fc_weight, "fc_bias": fc_bias, "axis0": np.array([0], np.int64)}
    for layer, (W, R, B) in enumerate(layers):
        if layer == 0 and normalization is not None:  # W (x - mean) scale + b = (W scale) x + (b - W scale mean)
            mean, scale = (np.asarray(a, np.float64) for a in normalization)
            folded = W.astype(np.float64) * scale
            B = B.astype(np.float64).copy()
            B[:, :3 * hidden] -= folded @ mean
            W, B = folded.astype(np.float32), B.astype(np.float32)
        consts.update({f"W_{layer}": W, f"R_{layer}": R, f"B_{layer}": B})
    nodes = []
    if count > 1:
        nodes.append(helper.make_node("Split", [STATE_IN], [f"h0_{layer}" for layer in range(count)], axis=0,
                                      **({"num_outputs": count} if opset >= 18 else {})))
    step_in = INPUT_NAME
    for layer in range(count):
        state_in, state_out = (STATE_IN, "h_n_full") if count == 1 else (f"h0_{layer}", f"h_n_{layer}")
        nodes.append(helper.make_node("GRU", [step_in, f"W_{layer}", f"R_{layer}", f"B_{layer}", "", state_in],
                                      ["", state_out], hidden_size=hidden, linear_before_reset=0,
                                      name=f"gru_layer_{layer}"))
        step_in = state_out
    if count > 1:
        nodes.append(helper.make_node("Concat", [f"h_n_{layer}" for layer in range(count)], ["h_n_full"], axis=0))
    nodes += [helper.make_node("Squeeze", [step_in, "axis0"], ["features"]),
              helper.make_node("Gemm", ["features", "fc_weight", "fc_bias"], ["logits_full"], transB=1)]
    state = [count, "batch", hidden]

    def value(name: str, shape: list[Any]) -> "onnx.ValueInfoProto":
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    # an empty batch never reaches the kernel (it aborts the process): the output is [0, classes]
    # and the state stays h0
    empty = helper.make_graph(
        [helper.make_node("Unsqueeze", ["batch_dim", "axis0"], ["batch_1d"]),
         helper.make_node("Concat", ["batch_1d", "out_dim"], ["empty_shape"], axis=0),
         helper.make_node("Expand", ["fc_bias", "empty_shape"], ["logits_empty"]),
         helper.make_node("Identity", [STATE_IN], ["h_n_empty"])],
        "empty_batch", [], [value("logits_empty", ["batch", classes]), value("h_n_empty", state)])
    full = helper.make_graph(nodes, "gru_step", [], [value("logits_full", ["batch", classes]),
                                                     value("h_n_full", state)])
    consts.update({"zero": np.array(0, np.int64), "one": np.array(1, np.int64),
                   "out_dim": np.array([classes], np.int64)})
    guard = [helper.make_node("Shape", [INPUT_NAME], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["batch_dim"], axis=0),
             helper.make_node("Equal", ["batch_dim", "zero"], ["is_empty"]),
             helper.make_node("If", ["is_empty"], [output_name, STATE_OUT], then_branch=empty, else_branch=full)]
    graph = helper.make_graph(
        guard, "gru_step",
        [value(INPUT_NAME, [1, "batch", input_size]), value(STATE_IN, state)],
        [value(output_name, ["batch", classes]), value(STATE_OUT, state)],
        [numpy_helper.from_array(np.array(v, copy=True), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=min_ir_version(opset),
                             producer_name="gru-deploy")


def without_empty_guard(onnx_bytes: bytes) -> bytes | None:
    """The non-empty branch of a guarded graph (fused_stack_graph's `If` on batch·seq == 0) as a graph of its own, for a caller that never feeds an empty axis (the
    streaming API steps batch >= 1, one step at a time); None for a graph without the guard.

    The nodes are the branch's own, so it computes exactly what the guarded graph computes on
    non-empty inputs; it only skips the Shape/Gather/Equal/If work each call.
    """
    import onnx
    from onnx import helper

    model = onnx.load_from_string(onnx_bytes)
    top = model.graph
    guard = [n for n in top.node if n.op_type == "If" and len(n.input) == 1 and n.input[0] in ("is_empty",
                                                                                                 "guard_is_empty")]
    if len(guard) != 1:
        return None
    branch = next(a.g for a in guard[0].attribute if a.name == "else_branch")
    rename = dict(zip((o.name for o in branch.output), guard[0].output))
    nodes = []
    for node in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.output[:] = [rename.get(o, o) for o in copy.output]
        nodes.append(copy)
    # a renamed output may feed other nodes too, and the nodes' sub-graphs read initializers of
    # the top graph
    inner = [n for node in nodes for sub in subgraphs(node) for g in all_graphs(sub) for n in g.node]
    for node in nodes + inner:
        node.input[:] = [rename.get(i, i) for i in node.input]
    used = {name for g in all_graphs(branch) for node in g.node for name in node.input}
    graph = helper.make_graph(nodes, f"{top.name}_nonempty", list(top.input), list(top.output),
                              [t for t in top.initializer if t.name in used], value_info=list(branch.value_info))
    step = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             producer_name="gru-deploy")
    onnx.checker.check_model(step)
    return step.SerializeToString()


def finish_export(model: "onnx.ModelProto", strategy: str, opset: int, op_types: dict[str, int],
            metadata: dict[str, Any] | None) -> ExportResult:
    import onnx

    add_metadata(model, metadata or {})
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckFailed(f"the exported ONNX graph failed onnx.checker: {str(exc).splitlines()[0]}") from None
    return ExportResult(model.SerializeToString(), strategy, opset, int(model.ir_version),
                        sum(op_types.values()), op_types)


def to_ort_format(onnx_files: dict[str, bytes]) -> dict[str, bytes]:
    """ORT-format models and the minimal-build operator config, via onnxruntime's own tool.

    onnxruntime's ORT-format writer is not byte-deterministic (two conversions of one model
    differ in layout), so this runs once, at export, and packaging copies the result: the
    same export then always packages to the same bytes.
    """
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.mkdir()
        for name, data in onnx_files.items():
            (src / name).write_bytes(data)
        quiet = logging.getLogger("ort_format_model.utils")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:  # onnxruntime's own Fail type; e.g. a full disk while it writes
            from gru_deploy.errors import WriteFailed

            raise WriteFailed(f"onnxruntime could not write the ORT-format models: "
                              f"{str(exc).strip().splitlines()[0][:300]}") from None
        finally:
            quiet.setLevel(level)
        out = {}
        for name in onnx_files:
            out[Path(name).with_suffix(".ort").name] = (dst / Path(name).with_suffix(".ort").name).read_bytes()
        config = (dst / "required_operators.config").read_text()
        # The tool names the models by absolute temp paths in its comments: keep only file names.
        lines = [f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line for line in config.splitlines()]
        out["required_operators.config"] = ("\n".join(lines) + "\n").encode()
    return out


def add_ort_models(files: dict[str, bytes], models: dict[str, dict[str, Any]], converted: dict[str, bytes]) -> None:
    """Put to_ort_format's output into an export's `files`, and list each .ort model in `models`
    as the variant and precision of the .onnx it was converted from."""
    for name, data in converted.items():
        files[name] = data
        source = str(Path(name).with_suffix(".onnx"))
        if name.endswith(".ort") and source in models:
            models[name] = {**{k: models[source][k] for k in ("variant", "precision")}, "format": "ort",
                            "converted_from": source}
