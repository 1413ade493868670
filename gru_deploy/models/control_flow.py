"""The control-flow form of a built-in family's model: the same weights, its time loop written
with `torch.while_loop`, so that `torch.export` keeps the loop a loop (it unrolls a Python `for`
loop to the example's length, as tracing does, and torch.nn.GRU's kernel too). gru-deploy
writes it from the weights, as it writes the fused ONNX graph, for the successors of
TorchScript (convert.programs).

Two cells: the tutorial's (reset before W_hh) and torch.nn.GRU's (reset after its hidden
projection, its own biases). One direction, any depth: every step runs each layer in turn
([layers, batch, H] carried through one loop), which is the stacked model's function, since
layer l+1's step t reads only layer l's step t. Both directions: each layer runs a loop per
direction over the whole sequence, collecting its outputs for the next layer (the backward
direction needs every step of the layer below). Each loop's input projections are hoisted
before it, as the loop form hoists them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gru_deploy.models.families import TorchGRUClassifier, cell_layers

TUTORIAL_CELL, TORCH_CELL = "tutorial", "torch.nn.GRU"


def recurrent_weights(module: nn.Module) -> tuple[str, list[list[dict[str, torch.Tensor]]], int] | None:
    """(the cell, per layer per direction its weights, hidden size) of a built-in family's model:
    `w_x` [3H, I] and `b_x` the input projections (gate order z, r, h for the tutorial cell; r,
    z, n for torch's), `w_h` the hidden ones ([2H, H] z, r and `w_hh` for the tutorial cell;
    [3H, H] and `b_h` for torch's). None for any other model."""
    weights = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
    layers = cell_layers(module)
    if layers:
        def tutorial(prefix: str) -> dict[str, torch.Tensor]:
            def w(name: str) -> torch.Tensor:
                return weights[f"{prefix}{name}"]
            return {"w_x": torch.cat([w("W_xz.weight"), w("W_xr.weight"), w("W_xh.weight")]),
                    "b_x": torch.cat([w("W_xz.bias"), w("W_xr.bias"), w("W_xh.bias")]),
                    "w_h": torch.cat([w("W_hz.weight"), w("W_hr.weight")]), "w_hh": w("W_hh.weight")}
        return TUTORIAL_CELL, [[tutorial(p) for p in layer] for layer in layers], int(module.hidden_size)
    if isinstance(module, TorchGRUClassifier):
        gru = module.gru
        directions = ("", "_reverse") if gru.bidirectional else ("",)
        return TORCH_CELL, [[{"w_x": weights[f"gru.weight_ih_l{i}{d}"], "b_x": weights[f"gru.bias_ih_l{i}{d}"],
                              "w_h": weights[f"gru.weight_hh_l{i}{d}"], "b_h": weights[f"gru.bias_hh_l{i}{d}"]}
                             for d in directions] for i in range(gru.num_layers)], int(gru.hidden_size)
    return None


class ControlFlowStack(nn.Module):
    """A built-in family's model (recurrent_weights) as `torch.while_loop` over time. Its methods
    are the model's variants: `forward` (x -> logits), `forward_lengths` (x, lengths -> logits;
    a sample's state holds from its length on) and, one direction only, `forward_stream` (x, h0
    -> logits, h_n; the state in the model's own layout, `layered`: [batch, layers, H], else
    [batch, H]); and for ExecuTorch, `forward_scan` and (one direction) `forward_one_step`."""

    def __init__(self, module: nn.Module, cell: str, layers: list[list[dict[str, torch.Tensor]]],
                 hidden: int) -> None:
        super().__init__()
        self.cell, self.hidden = cell, hidden
        self.count, self.directions = len(layers), len(layers[0])
        for i, layer in enumerate(layers):
            for d, tensors in enumerate(layer):
                for name, value in tensors.items():
                    self.register_buffer(f"{name}_{self._key(i, d)}", value)
        self.register_buffer("fc_weight", module.fc.weight.detach().clone().float())
        self.register_buffer("fc_bias", module.fc.bias.detach().clone().float())
        self.normalize = bool(module.normalize)
        self.register_buffer("norm_mean", module.norm_mean.detach().clone().float())
        self.register_buffer("norm_scale", module.norm_scale.detach().clone().float())
        # torch.nn.GRU's family counts a length below 1 as 1 (models.families.TorchGRUClassifier)
        self.least_length = 1 if cell == TORCH_CELL else 0
        state = module.initial_state(1)
        self.layered = state is not None and state.dim() == 3

    @staticmethod
    def _key(layer: int, direction: int) -> str:
        return f"{layer}" if direction == 0 else f"{layer}_r"

    def _cell(self, key: str, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One cell's step: `projected` = its input projections [batch, 3H], h [batch, H]."""
        hidden = self.hidden
        if self.cell == TORCH_CELL:
            g = nn.functional.linear(h, getattr(self, f"w_h_{key}"), getattr(self, f"b_h_{key}"))
            rz = torch.sigmoid(projected[:, :2 * hidden] + g[:, :2 * hidden])
            r, z = rz[:, :hidden], rz[:, hidden:]
            n = torch.tanh(projected[:, 2 * hidden:] + r * g[:, 2 * hidden:])
            return (1 - z) * n + z * h
        zr = torch.sigmoid(projected[:, :2 * hidden] + nn.functional.linear(h, getattr(self, f"w_h_{key}")))
        z, r = zr[:, :hidden], zr[:, hidden:]
        h_tilde = torch.tanh(projected[:, 2 * hidden:] + nn.functional.linear(r * h, getattr(self, f"w_hh_{key}")))
        return (1 - z) * h + z * h_tilde

    def _project(self, key: str, steps: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(steps, getattr(self, f"w_x_{key}"), getattr(self, f"b_x_{key}"))

    def _steps(self, x: torch.Tensor) -> torch.Tensor:
        """x normalized as the model does, time-major [seq, batch, I]."""
        if self.normalize:
            x = (x - self.norm_mean) * self.norm_scale
        return x.transpose(0, 1)

    def _lengths(self, lengths: Any) -> Any:
        return lengths.clamp(min=self.least_length) if lengths is not None and self.least_length else lengths

    # --- one direction: every layer on each step, one loop ---

    def _step(self, projected: torch.Tensor, h: torch.Tensor, t: Any = None, lengths: Any = None) -> torch.Tensor:
        """One step of every layer: `projected` = layer 0's input projections [batch, 3H], h the
        states [layers, batch, H]; with `lengths`, a sample's state holds from its length on."""
        states: list[torch.Tensor] = []
        for i in range(self.count):
            if i > 0:
                projected = self._project(self._key(i, 0), states[-1])
            new = self._cell(self._key(i, 0), projected, h[i])
            if lengths is not None:
                new = torch.where((lengths > t).unsqueeze(1), new, h[i])
            states.append(new)
        return torch.stack(states)

    def _recur(self, x: torch.Tensor, h0: torch.Tensor, lengths: Any = None) -> torch.Tensor:
        """The loop over x's steps from h0 [layers, batch, H]; the last states, same layout."""
        projected = self._project("0", self._steps(x))

        def more(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return t < projected.size(0)

        def step(t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return t + 1, self._step(projected.index_select(0, t.reshape(1)).squeeze(0), h, t, lengths)

        return torch.while_loop(more, step, (torch.zeros((), dtype=torch.int64), h0))[1]

    # --- both directions: a loop per layer and direction ---

    def _direction(self, key: str, projected: torch.Tensor, reverse: bool, lengths: Any, collect: bool
                   ) -> tuple[Any, torch.Tensor]:
        """One direction of one layer over projected [seq, batch, 3H] from zeros: (its output
        at every step [seq, batch, H] when `collect`, else None; its final state). In reverse
        it walks from the last step to the first; with `lengths` a sample's state stays as it
        is at steps >= its length (so in reverse it starts at the sample's last valid step)."""
        seq = projected.size(0)

        def more(t: torch.Tensor, h: torch.Tensor, *out: torch.Tensor) -> torch.Tensor:
            return t < seq

        def step(t: torch.Tensor, h: torch.Tensor, *out: torch.Tensor) -> tuple[torch.Tensor, ...]:
            s = (seq - 1 - t) if reverse else t
            new = self._cell(key, projected.index_select(0, s.reshape(1)).squeeze(0), h)
            if lengths is not None:
                new = torch.where((lengths > s).unsqueeze(1), new, h)
            if collect:
                return t + 1, new, out[0].index_copy(0, s.reshape(1), new.unsqueeze(0))
            return t + 1, new

        h0 = projected.new_zeros(projected.size(1), self.hidden)
        carried = (torch.zeros((), dtype=torch.int64), h0) + ((projected.new_zeros(seq, h0.size(0), self.hidden),)
                                                               if collect else ())
        result = torch.while_loop(more, step, carried)
        return (result[2] if collect else None), result[1]

    def _both(self, x: torch.Tensor, lengths: Any = None) -> torch.Tensor:
        """Every layer's two directions in turn; the last layer's final states [batch, 2H]."""
        steps = self._steps(x)
        finals: list[torch.Tensor] = []
        for i in range(self.count):
            last = i == self.count - 1
            outs, finals = [], []
            for d in range(2):
                key = self._key(i, d)
                out, h = self._direction(key, self._project(key, steps), d == 1, lengths, not last)
                outs.append(out)
                finals.append(h)
            if not last:
                steps = torch.cat(outs, 2)
        return torch.cat(finals, 1)

    # --- the variants ---

    def _layer_major(self, h0: torch.Tensor) -> torch.Tensor:
        """h0 as the loop carries it, [layers, batch, H], stacked as each step stacks it (one
        layer's transposed state would keep strides that torch.while_loop refuses as a change)."""
        return torch.stack([h0[:, i] for i in range(self.count)]) if self.layered else h0.unsqueeze(0)

    def _model_layout(self, h: torch.Tensor) -> torch.Tensor:
        return h.transpose(0, 1) if self.layered else h[0]

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.count, x.size(0), self.hidden)

    def head(self, final: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(final, self.fc_weight, self.fc_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.directions == 2:
            return self.head(self._both(x))
        return self.head(self._recur(x, self._zeros(x))[-1])

    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.directions == 2:
            return self.head(self._both(x, self._lengths(lengths)))
        return self.head(self._recur(x, self._zeros(x), self._lengths(lengths))[-1])

    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._recur(x, self._layer_major(h0))
        return self.head(h[-1]), self._model_layout(h)

    def forward_scan(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with the loops `scan`s (torch._higher_order_ops.scan): the form ExecuTorch
        lowers (it does not take while_loop), at a static batch and a bounded seq."""
        from torch._higher_order_ops.scan import scan

        if self.directions == 1:
            def combine(h: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                new = self._step(projected, h)
                return new, new[-1].clone()
            return self.head(scan(combine, self._zeros(x), self._project("0", self._steps(x)))[0][-1])
        steps = self._steps(x)
        finals: list[torch.Tensor] = []
        for i in range(self.count):
            outs, finals = [], []
            for d in range(2):
                key = self._key(i, d)
                projected = self._project(key, steps)

                def one(h: torch.Tensor, p: torch.Tensor, key: str = key) -> tuple[torch.Tensor, torch.Tensor]:
                    new = self._cell(key, p, h)
                    return new, new.clone()
                h, out = scan(one, projected.new_zeros(projected.size(1), self.hidden),
                              projected.flip(0) if d == 1 else projected)
                outs.append(out.flip(0) if d == 1 else out)
                finals.append(h)
            steps = torch.cat(outs, 2)
        return self.head(torch.cat(finals, 1))

    def forward_one_step(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream variant on one step (x [batch, 1, I]), without a loop: ExecuTorch's step."""
        h = self._step(self._project("0", self._steps(x))[0], self._layer_major(h0))
        return self.head(h[-1]), self._model_layout(h)


class Variant(nn.Module):
    """One method of a module as `forward` (torch.export exports a module's forward)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: torch.Tensor) -> Any:
        return getattr(self.module, self.method)(*args)


def control_flow_form(module: nn.Module) -> ControlFlowStack | None:
    """The control-flow form of a built-in family's model (the tutorial classifier, the
    tutorial-cell stacks in either direction, torch.nn.GRU's family); None for any other model
    (your own module)."""
    plan = recurrent_weights(module)
    return None if plan is None else ControlFlowStack(module, *plan)
