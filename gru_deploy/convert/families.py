"""The fused form (ONNX's `GRU` operator) for modules exported by the generic path.

Where it applies, and how:
* `StackedGRUClassifier` (the tutorial cell stacked, optionally bidirectional): built from its
  weights by the tutorial model's fused writer (convert.graphs.fused_stack_graph), one `GRU` node per layer (`direction="bidirectional"` for both
  directions), the tutorial cell's mapping per direction (z negated, linear_before_reset=0).
* A module whose only recurrence is `torch.nn.GRU` (TorchGRUClassifier, or the user's own):
  TorchScript's ONNX exporter already writes each `aten::gru` as ONNX `GRU` nodes with
  `linear_before_reset=1`, so its export is the fused form as it stands (the dynamo exporter
  gets linear_before_reset wrong, pytorch#189225; gru-deploy uses the TorchScript one).
* Anything else is refused: gru-deploy cannot map an arbitrary cell onto ONNX's GRU.

Either way the parity grid against the module run in float64 decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gru_deploy.errors import UserInputError

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch


def fused_plan(module: "torch.nn.Module", recurrence: str, reference: str) -> str:
    """'build' (gru-deploy writes the GRU graph) or 'exporter' (the exporter's graph is one);
    UserInputError saying why for any other model."""
    from gru_deploy.models.families import cell_layers

    if cell_layers(module) is not None:
        return "build"
    if recurrence == "gru":
        return "exporter"
    raise UserInputError(f"--strategy fused maps the tutorial cell families and torch.nn.GRU onto ONNX's GRU "
                         f"operator; {reference} recurs by {'a loop over its own cell' if recurrence == 'loop' else recurrence}, "
                         "which gru-deploy cannot map: export it with --strategy loop")


def build_stacked_fused(module: "torch.nn.Module", input_size: int, output_name: str,
                        opset: int, variant: str = "classifier") -> "onnx.ModelProto":
    """A tutorial-cell model (models.families.cell_layers: the tutorial classifier, the stacked
    family) as ONNX, one `GRU` node per layer (convert.graphs.fused_stack_graph), in the
    classifier, lengths or stream variant; the stream's state has the shape of the model's
    initial_state ([batch, layers, H] for the family, [batch, H] for the tutorial classifier)."""
    from gru_deploy.convert.graphs import fused_stack_graph

    layers, fc_weight, fc_bias, normalization = gru_node_weights(module)
    state = module.initial_state(1)
    return fused_stack_graph(layers, fc_weight, fc_bias, input_size, output_name, opset, variant, normalization,
                             layered_state=state is None or state.dim() == 3)


def gru_node_weights(module: "torch.nn.Module") -> tuple[list, "np.ndarray", "np.ndarray", tuple | None]:
    """A tutorial-cell model's weights as ONNX's GRU nodes take them: per layer (W, R, B) with the
    directions stacked (convert.graphs.tutorial_cell_gru_weights), the head, and (mean, 1/std)
    where the model normalises its input."""
    import numpy as np

    from gru_deploy.convert.graphs import float32_arrays, tutorial_cell_gru_weights
    from gru_deploy.models.families import cell_layers

    weights = float32_arrays(module.state_dict())
    layers = []
    for prefixes in cell_layers(module) or []:
        per_direction = [tutorial_cell_gru_weights(weights, prefix) for prefix in prefixes]
        layers.append(tuple(np.stack([arrays[i] for arrays in per_direction]) for i in range(3)))
    normalization = None
    if module.normalize:
        normalization = (module.norm_mean.detach().numpy().astype(np.float32),
                         module.norm_scale.detach().numpy().astype(np.float32))
    return layers, weights["fc.weight"], weights["fc.bias"], normalization


def build_step(module: "torch.nn.Module", output_name: str, opset: int) -> "onnx.ModelProto | None":
    """The one-step model (convert.graphs.step_graph) of a tutorial-cell model that streams (one
    direction); None for any other model."""
    from gru_deploy.convert.graphs import step_graph
    from gru_deploy.models.families import cell_layers

    layers = cell_layers(module)
    if not layers or len(layers[0]) != 1 or module.initial_state(1) is None:
        return None
    weight_layers, fc_weight, fc_bias, normalization = gru_node_weights(module)
    return step_graph(weight_layers, fc_weight, fc_bias, output_name, opset, normalization)
