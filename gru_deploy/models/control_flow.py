"""The control-flow form of a tutorial-cell model: the same weights, its time loop written with
`torch.while_loop`, so that `torch.export` keeps the loop a loop (it unrolls a Python `for`
loop to the example's length, as tracing does). gru-deploy writes it from the weights, as it
writes the fused ONNX graph, for the successors of TorchScript (convert.programs).

One direction, any depth: every step runs each layer in turn ([layers, batch, H] carried
through the loop), which is the stacked model's function, since layer l+1's step t reads only
layer l's step t. Layer 0's input projections are hoisted before the loop, as the loop form
hoists them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gru_deploy.models.families import cell_layers


class ControlFlowStack(nn.Module):
    """A one-direction tutorial-cell model (cell_layers) as `torch.while_loop` over time. Its
    methods are the model's variants: `forward` (x -> logits), `forward_lengths` (x, lengths ->
    logits; a sample's state holds from its length on) and `forward_stream` (x, h0 -> logits,
    h_n; the state in the model's own layout, `layered`: [batch, layers, H], else [batch, H]);
    and for ExecuTorch, `forward_scan` and `forward_one_step`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        weights = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        layers = cell_layers(module) or []
        self.count, self.hidden = len(layers), int(module.hidden_size)
        for i, (prefix,) in enumerate(layers):
            def w(name: str) -> torch.Tensor:
                return weights[f"{prefix}{name}"]
            self.register_buffer(f"w_x_{i}", torch.cat([w("W_xz.weight"), w("W_xr.weight"), w("W_xh.weight")]))
            self.register_buffer(f"b_x_{i}", torch.cat([w("W_xz.bias"), w("W_xr.bias"), w("W_xh.bias")]))
            self.register_buffer(f"w_h_zr_{i}", torch.cat([w("W_hz.weight"), w("W_hr.weight")]))
            self.register_buffer(f"w_hh_{i}", w("W_hh.weight"))
        self.register_buffer("fc_weight", weights["fc.weight"])
        self.register_buffer("fc_bias", weights["fc.bias"])
        self.normalize = bool(module.normalize)
        self.register_buffer("norm_mean", module.norm_mean.detach().clone().float())
        self.register_buffer("norm_scale", module.norm_scale.detach().clone().float())
        state = module.initial_state(1)
        self.layered = state is not None and state.dim() == 3

    def _cell(self, i: int, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Layer i's tutorial cell on one step: `projected` = its input projections [batch, 3H]."""
        hidden = self.hidden
        zr = torch.sigmoid(projected[:, :2 * hidden] + nn.functional.linear(h, getattr(self, f"w_h_zr_{i}")))
        z, r = zr[:, :hidden], zr[:, hidden:]
        h_tilde = torch.tanh(projected[:, 2 * hidden:] + nn.functional.linear(r * h, getattr(self, f"w_hh_{i}")))
        return (1 - z) * h + z * h_tilde

    def _step(self, projected: torch.Tensor, h: torch.Tensor, t: Any = None, lengths: Any = None) -> torch.Tensor:
        """One step of every layer: `projected` = layer 0's input projections [batch, 3H], h the
        states [layers, batch, H]; with `lengths`, a sample's state holds from its length on."""
        states: list[torch.Tensor] = []
        for i in range(self.count):
            if i > 0:
                projected = nn.functional.linear(states[-1], getattr(self, f"w_x_{i}"), getattr(self, f"b_x_{i}"))
            new = self._cell(i, projected, h[i])
            if lengths is not None:
                new = torch.where((lengths > t).unsqueeze(1), new, h[i])
            states.append(new)
        return torch.stack(states)

    def _projected(self, x: torch.Tensor) -> torch.Tensor:
        """Layer 0's input projections of every step, time-major [seq, batch, 3H], hoisted."""
        if self.normalize:
            x = (x - self.norm_mean) * self.norm_scale
        return nn.functional.linear(x.transpose(0, 1), self.w_x_0, self.b_x_0)

    def _recur(self, x: torch.Tensor, h0: torch.Tensor, lengths: Any = None) -> torch.Tensor:
        """The loop over x's steps from h0 [layers, batch, H]; the last states, same layout."""
        projected = self._projected(x)

        def more(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return t < projected.size(0)

        def step(t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return t + 1, self._step(projected.index_select(0, t.reshape(1)).squeeze(0), h, t, lengths)

        return torch.while_loop(more, step, (torch.zeros((), dtype=torch.int64), h0))[1]

    def _layer_major(self, h0: torch.Tensor) -> torch.Tensor:
        return h0.transpose(0, 1).contiguous() if self.layered else h0.unsqueeze(0)

    def _model_layout(self, h: torch.Tensor) -> torch.Tensor:
        return h.transpose(0, 1) if self.layered else h[0]

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.count, x.size(0), self.hidden)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h[-1], self.fc_weight, self.fc_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._recur(x, self._zeros(x)))

    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self._recur(x, self._zeros(x), lengths))

    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._recur(x, self._layer_major(h0))
        return self.head(h), self._model_layout(h)

    def forward_scan(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with the loop a `scan` (torch._higher_order_ops.scan): the form ExecuTorch
        lowers (it does not take while_loop), at a static batch and a bounded seq."""
        from torch._higher_order_ops.scan import scan

        def combine(h: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            new = self._step(projected, h)
            return new, new[-1].clone()
        return self.head(scan(combine, self._zeros(x), self._projected(x))[0])

    def forward_one_step(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream variant on one step (x [batch, 1, I]), without a loop: ExecuTorch's step."""
        h = self._step(self._projected(x)[0], self._layer_major(h0))
        return self.head(h), self._model_layout(h)


class Variant(nn.Module):
    """One method of a module as `forward` (torch.export exports a module's forward)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: torch.Tensor) -> Any:
        return getattr(self.module, self.method)(*args)


def control_flow_form(module: nn.Module) -> ControlFlowStack | None:
    """The control-flow form of a one-direction tutorial-cell model; None for any other model
    (a bidirectional stack, torch.nn.GRU's family, your own module)."""
    layers = cell_layers(module)
    if not layers or len(layers[0]) != 1:
        return None
    return ControlFlowStack(module)
