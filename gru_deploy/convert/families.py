"""The fused form (ONNX's `GRU` operator) for modules exported by the generic path.

Where it applies, and how:
* `StackedGRUClassifier` (the tutorial cell stacked, optionally bidirectional): built here
  from its weights, one `GRU` node per layer (`direction="bidirectional"` for both
  directions), the tutorial cell's mapping per direction (z negated, linear_before_reset=0).
* A module whose only recurrence is `torch.nn.GRU` (TorchGRUClassifier, or the user's own):
  TorchScript's ONNX exporter already writes each `aten::gru` as ONNX `GRU` nodes with
  `linear_before_reset=1`, so its export is the fused form as it stands (the dynamo exporter
  gets linear_before_reset wrong, pytorch#189225; gru-deploy uses the TorchScript one).
* Anything else is refused: gru-deploy cannot map an arbitrary cell onto ONNX's GRU.

Either way the parity grid against the module run in float64 decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN, STATE_OUT

if TYPE_CHECKING:
    import onnx
    import torch


def fused_plan(module: "torch.nn.Module", recurrence: str, reference: str) -> str:
    """'build' (gru-deploy writes the GRU graph) or 'exporter' (the exporter's graph is one);
    UserInputError saying why for any other model."""
    from gru_deploy.models.families import StackedGRUClassifier

    if isinstance(module, StackedGRUClassifier):
        return "build"
    if recurrence == "gru":
        return "exporter"
    raise UserInputError(f"--strategy fused maps the tutorial cell families and torch.nn.GRU onto ONNX's GRU "
                         f"operator; {reference} recurs by {'a loop over its own cell' if recurrence == 'loop' else recurrence}, "
                         "which gru-deploy cannot map: export it with --strategy loop")


def build_stacked_fused(module: "torch.nn.Module", input_size: int, output_name: str,
                        opset: int, variant: str = "classifier") -> "onnx.ModelProto":
    """StackedGRUClassifier as ONNX, one `GRU` node per layer, in one of three variants:

    * classifier: x [batch, seq, input] -> output [batch, classes];
    * lengths: (x padded, lengths int64 [batch]) -> output, every GRU node given the lengths as
      its sequence_lens (each direction then runs over each sample's own steps, the backward one
      from its last valid step, as forward_lengths does). The kernel gets max(lengths, 1): a
      sequence_lens of 0 has read out of bounds in onnxruntime; inputs refuse length 0 anyway;
    * stream (one direction only): (x, h0 [batch, layers, H]) -> (output, h_n [batch, layers,
      H]), layer l's GRU node starting from h0[:, l] (its initial_h), as forward_stream does.

    Layer l runs one GRU node over the time-major sequence; its Y [seq, D, batch, H] becomes
    the next layer's input [seq, batch, D·H] (both directions side by side, as the module
    concatenates them); the last layer's Y_h [D, batch, H] becomes [batch, D·H] for the head.
    onnxruntime's GRU kernel aborts the process on an empty batch or sequence, so the graph
    branches (`If`) on batch·seq == 0 and answers without the kernel: fc(0) = fc.bias, and for
    the stream fc(h0's last layer) with h_n = h0.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from gru_deploy.convert.graphs import (empty_input_branch, float32_arrays, min_ir_version,
                                           tutorial_cell_gru_weights)

    weights = float32_arrays(module.state_dict())
    layers = len(module.layers)
    directions = 2 if hasattr(module.layers[0], "bw") else 1
    if variant == "stream" and directions == 2:
        raise UserInputError("a bidirectional model cannot stream: its backward direction needs the whole sequence")
    hidden = int(module.layers[0].fw.hidden_size)
    classes = int(module.fc.out_features)
    consts: dict[str, Any] = {"fc_weight": weights["fc.weight"], "fc_bias": weights["fc.bias"],
                              "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
                              "last_layer": np.array(layers - 1, np.int64),
                              "axis0": np.array([0], np.int64), "out_dim": np.array([classes], np.int64),
                              "merge_directions": np.array([0, 0, directions * hidden], np.int64),
                              "batch_features": np.array([0, directions * hidden], np.int64)}
    nodes = []
    x_in = INPUT_NAME
    if module.normalize:
        consts["norm_mean"] = module.norm_mean.detach().numpy().astype(np.float32)
        consts["norm_scale"] = module.norm_scale.detach().numpy().astype(np.float32)
        nodes += [helper.make_node("Sub", [INPUT_NAME, "norm_mean"], ["x_centered"]),
                  helper.make_node("Mul", ["x_centered", "norm_scale"], ["x_normalized"])]
        x_in = "x_normalized"
    nodes.append(helper.make_node("Transpose", [x_in], ["steps_0"], perm=[1, 0, 2]))
    sequence_lens = []
    if variant == "lengths":
        nodes += [helper.make_node("Max", [LENGTHS_NAME, "one"], ["lengths_at_least_1"]),
                  helper.make_node("Cast", ["lengths_at_least_1"], ["sequence_lens"], to=TensorProto.INT32)]
        sequence_lens = ["sequence_lens"]
    for layer in range(layers):
        per_direction = [tutorial_cell_gru_weights(weights, f"layers.{layer}.{d}.")
                         for d in ("fw", "bw")[:directions]]
        for i, name in enumerate("WRB"):
            consts[f"{name}_{layer}"] = np.stack([arrays[i] for arrays in per_direction])
        initial = []
        if variant == "stream":  # h0[:, l] [batch, H] -> initial_h [1, batch, H]
            consts[f"index_{layer}"] = np.array(layer, np.int64)
            nodes += [helper.make_node("Gather", [STATE_IN, f"index_{layer}"], [f"h0_{layer}"], axis=1),
                      helper.make_node("Unsqueeze", [f"h0_{layer}", "axis0"], [f"initial_h_{layer}"])]
            initial = ["", f"initial_h_{layer}"]  # sequence_lens (none), initial_h
        nodes.append(helper.make_node(
            "GRU", [f"steps_{layer}", f"W_{layer}", f"R_{layer}", f"B_{layer}", *(sequence_lens or initial)],
            [f"Y_{layer}", f"Y_h_{layer}"],
            hidden_size=hidden, linear_before_reset=0,
            direction="bidirectional" if directions == 2 else "forward", name=f"gru_layer_{layer}"))
        if layer + 1 < layers:  # [seq, D, batch, H] -> [seq, batch, D*H]
            nodes += [helper.make_node("Transpose", [f"Y_{layer}"], [f"Y_{layer}_tb"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"Y_{layer}_tb", "merge_directions"], [f"steps_{layer + 1}"])]
    last = f"Y_h_{layers - 1}"  # [D, batch, H] -> [batch, D*H]
    nodes += [helper.make_node("Transpose", [last], ["final_bd"], perm=[1, 0, 2]),
              helper.make_node("Reshape", ["final_bd", "batch_features"], ["features"]),
              helper.make_node("Gemm", ["features", "fc_weight", "fc_bias"], ["logits_full"], transB=1)]
    outputs = [output_name]
    state = ["batch", layers, hidden]

    def value(name: str, shape: list[Any] | None = None) -> "onnx.ValueInfoProto":
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape or ["batch", classes])

    full_outputs = [value("logits_full")]
    empty_nodes = [helper.make_node("Unsqueeze", ["batch_dim", "axis0"], ["batch_1d"]),
                   helper.make_node("Concat", ["batch_1d", "out_dim"], ["empty_shape"], axis=0),
                   helper.make_node("Expand", ["fc_bias", "empty_shape"], ["logits_empty"])]
    empty_outputs = [value("logits_empty")]
    if variant == "stream":  # every layer's Y_h [1, batch, H] -> h_n [batch, layers, H]
        nodes += [helper.make_node("Transpose", [f"Y_h_{layer}"], [f"h_n_{layer}"], perm=[1, 0, 2])
                  for layer in range(layers)]
        nodes.append(helper.make_node("Concat", [f"h_n_{layer}" for layer in range(layers)], ["h_n_full"], axis=1))
        full_outputs.append(value("h_n_full", state))
        # nothing to step through: the state stays h0, the output is fc(h0's last layer)
        empty_nodes = [helper.make_node("Gather", [STATE_IN, "last_layer"], ["h0_last"], axis=1),
                       helper.make_node("Gemm", ["h0_last", "fc_weight", "fc_bias"], ["logits_empty"], transB=1),
                       helper.make_node("Identity", [STATE_IN], ["h_n_empty"])]
        empty_outputs.append(value("h_n_empty", state))
        outputs.append(STATE_OUT)
    full = helper.make_graph(nodes, "stacked_gru", [], full_outputs)
    empty = helper.make_graph(empty_nodes, "empty_input", [], empty_outputs)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", "seq", input_size])]
    if variant == "lengths":
        inputs.append(helper.make_tensor_value_info(LENGTHS_NAME, TensorProto.INT64, ["batch"]))
    if variant == "stream":
        inputs.append(helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, state))
    top = empty_input_branch(outputs, empty, full)
    used = {name for node in nodes + empty_nodes + top for name in node.input}
    graph = helper.make_graph(
        top, "stacked_gru_fused", inputs,
        [value(output_name)] + ([value(STATE_OUT, state)] if variant == "stream" else []),
        [numpy_helper.from_array(np.array(v, copy=True), k) for k, v in consts.items() if k in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=min_ir_version(opset),
                             producer_name="gru-deploy")
