"""Built-in model families beyond the tutorial's one-layer classifier.

* `StackedGRUClassifier`: the tutorial's own cell (`GRUCell`, reset before W_hh), stacked
  `layers` deep and optionally bidirectional, each direction an explicit `for` loop over
  time. Parameters are named `layers.{i}.fw.W_xz.weight` (and `.bw.` for the backward
  direction), `fc.weight`, `fc.bias`.
* `TorchGRUClassifier`: `torch.nn.GRU` (batch_first, any depth, optionally bidirectional)
  and a Linear head on the last layer's final state(s). torch's GRU applies the reset after
  its hidden projection (ONNX `linear_before_reset=1`): not the tutorial's cell.

Both take `normalization=(mean, std)` per input channel as the tutorial classifier does
(baked in, not in the state_dict) and define `forward_lengths(x, lengths)`, the padded-batch
form used in training on variable-length data: steps past a sample's length do not change
its state, and the backward direction starts at each sample's last valid step.

They reach export through the generic path for a user's module (gru_deploy.convert.user),
named by `FAMILIES`; `gru-deploy train --layers N --bidirectional --family torch-gru` makes
their checkpoints, which name the family and hold the constructor arguments.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from gru_deploy.errors import UserInputError
from gru_deploy.models.tutorial import GRUCell, GRUClassifier


class _Normalized(nn.Module):
    """Per-channel (x - mean) / std baked into the model, as GRUClassifier does it."""

    def _set_normalization(self, input_size: int, normalization: Any) -> None:
        self.normalize = normalization is not None
        mean, std = normalization if normalization is not None else ((0.0,) * input_size, (1.0,) * input_size)
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("norm_scale", 1.0 / torch.tensor(std, dtype=torch.float32), persistent=False)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            return (x - self.norm_mean.to(x.dtype)) * self.norm_scale.to(x.dtype)
        return x


class DirectionCell(GRUCell):
    """The tutorial cell, stepped over time in one direction by an explicit loop.

    With `hoist` (the default; the `loop` form) every step's input projections are computed in
    one matmul before the loop, as the tutorial classifier's export form does; without it (the
    `stepwise` form) the cell runs as written, once per step: no [seq, batch, 3H] buffer, the
    form that wins at large batch x long sequences (docs/performance.md).
    """

    __constants__ = ["reverse", "hoist"]

    def __init__(self, input_size: int, hidden_size: int, reverse: bool = False) -> None:
        super().__init__(input_size, hidden_size)
        self.reverse = reverse
        self.hoist = True

    def inputs(self, steps: torch.Tensor) -> torch.Tensor:
        """What each step reads: [seq, batch, 3H] projections (hoist), else the steps themselves."""
        if self.hoist:
            weight = torch.cat([self.W_xz.weight, self.W_xr.weight, self.W_xh.weight], 0)
            bias = torch.cat([self.W_xz.bias, self.W_xr.bias, self.W_xh.bias], 0)
            return torch.nn.functional.linear(steps, weight, bias)
        return steps

    def step(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.hoist:
            hidden = self.hidden_size
            z = torch.sigmoid(x_t.narrow(1, 0, hidden) + self.W_hz(h))
            r = torch.sigmoid(x_t.narrow(1, hidden, hidden) + self.W_hr(h))
            h_tilde = torch.tanh(x_t.narrow(1, 2 * hidden, hidden) + self.W_hh(r * h))
            return (1 - z) * h + z * h_tilde
        return self.forward(x_t, h)

    def run(self, steps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """steps [seq, batch, input] (time-major) -> (every step's state [seq, batch, hidden],
        the final state)."""
        if self.reverse:
            steps = steps.flip(0)
        h = steps.new_zeros(steps.size(1), self.hidden_size)
        xs = self.inputs(steps)
        outputs: List[torch.Tensor] = []
        for k in range(steps.size(0)):
            h = self.step(xs[k], h)
            outputs.append(h)
        out = torch.stack(outputs)
        if self.reverse:
            out = out.flip(0)
        return out, h

    def run_from(self, steps: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`run` (forward direction) from state h: the stream variant's step through a chunk."""
        xs = self.inputs(steps)
        outputs: List[torch.Tensor] = []
        for k in range(steps.size(0)):
            h = self.step(xs[k], h)
            outputs.append(h)
        return torch.stack(outputs), h

    def run_masked(self, steps: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`run` where steps t >= lengths[b] leave sample b's state as it is; in reverse, the
        loop runs over the flipped sequence, so each sample's state stays 0 through its
        padding and then walks from its last valid step back to step 0."""
        seq = steps.size(0)
        if self.reverse:
            steps = steps.flip(0)
        h = steps.new_zeros(steps.size(1), self.hidden_size)
        xs = self.inputs(steps)
        outputs: List[torch.Tensor] = []
        for k in range(seq):
            t = seq - 1 - k if self.reverse else k
            h = torch.where((lengths > t).unsqueeze(1), self.step(xs[k], h), h)
            outputs.append(h)
        out = torch.stack(outputs)
        if self.reverse:
            out = out.flip(0)
        return out, h


def stepwise(module: nn.Module) -> nn.Module:
    """A copy of a tutorial-cell model (cell_layers) whose cells run as written, once per step
    (the `stepwise` form); the same weights and the same function."""
    import copy

    out = copy.deepcopy(module)
    for part in out.modules():
        if isinstance(part, (DirectionCell, GRUClassifier)):
            part.hoist = False
    return out


def cell_layers(module: nn.Module) -> "list[list[str]] | None":
    """Where a tutorial-cell model keeps its cells: per layer, each direction's parameter prefix
    (`{prefix}W_xz.weight`, …); the tutorial classifier is the one-layer, one-direction member.
    None for any other model (gru-deploy then cannot build its fused or stepwise form)."""
    if isinstance(module, GRUClassifier):
        return [["gru."]]
    if isinstance(module, StackedGRUClassifier):
        return [[f"layers.{i}.{d}." for d in (("fw", "bw") if module.bidirectional else ("fw",))]
                for i in range(len(module.layers))]
    return None


class UniLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.fw = DirectionCell(input_size, hidden_size)

    def forward(self, steps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.fw.run(steps)

    def masked(self, steps: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.fw.run_masked(steps, lengths)

    def stream(self, steps: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.fw.run_from(steps, h)


class BiLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.fw = DirectionCell(input_size, hidden_size)
        self.bw = DirectionCell(input_size, hidden_size, reverse=True)

    def forward(self, steps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out_fw, h_fw = self.fw.run(steps)
        out_bw, h_bw = self.bw.run(steps)
        return torch.cat([out_fw, out_bw], 2), torch.cat([h_fw, h_bw], 1)

    def masked(self, steps: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out_fw, h_fw = self.fw.run_masked(steps, lengths)
        out_bw, h_bw = self.bw.run_masked(steps, lengths)
        return torch.cat([out_fw, out_bw], 2), torch.cat([h_fw, h_bw], 1)

    def stream(self, steps: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("a bidirectional layer cannot stream: its backward direction needs the whole sequence")


class StackedGRUClassifier(_Normalized):
    """The tutorial cell, `layers` deep (and both directions when bidirectional), then a Linear
    head on the last layer's final state(s): [batch, seq, input] -> logits [batch, output]."""

    __constants__ = ["normalize", "bidirectional", "hidden_size"]

    def __init__(self, input_size: int = 8, hidden_size: int = 16, output_size: int = 4, layers: int = 2,
                 bidirectional: bool = False, normalization: Any = None) -> None:
        super().__init__()
        if layers < 1:
            raise UserInputError(f"layers must be at least 1, got {layers}")
        directions = 2 if bidirectional else 1
        self.bidirectional = bidirectional
        self.hidden_size = hidden_size
        kind = BiLayer if bidirectional else UniLayer
        self.layers = nn.ModuleList([kind(input_size if i == 0 else hidden_size * directions, hidden_size)
                                     for i in range(layers)])
        self.fc = nn.Linear(hidden_size * directions, output_size)
        self._set_normalization(input_size, normalization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.normalized(x).transpose(0, 1)
        final = steps.new_zeros(0)
        for layer in self.layers:
            steps, final = layer(steps)
        return self.fc(final)

    def initial_state(self, batch: int) -> "torch.Tensor | None":
        """The state forward starts from, [batch, layers, hidden] zeros; None when bidirectional
        (a backward direction cannot stream): gru-deploy then exports no stream variant."""
        if self.bidirectional:
            return None
        return torch.zeros(batch, len(self.layers), self.hidden_size)

    @torch.jit.export
    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A chunk from state h0 [batch, layers, hidden] -> (logits, h_n): chunks carried
        through h_n give one pass's answer. gru-deploy exports it as the stream variant."""
        steps = self.normalized(x).transpose(0, 1)
        finals: List[torch.Tensor] = []
        index = 0
        for layer in self.layers:
            steps, h = layer.stream(steps, h0[:, index])
            finals.append(h)
            index += 1
        return self.fc(finals[-1]), torch.stack(finals, 1)

    @torch.jit.export
    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The padded batch: gru-deploy exports it as the lengths variant (model_lengths.*)."""
        steps = self.normalized(x).transpose(0, 1)
        final = steps.new_zeros(0)
        for layer in self.layers:
            steps, final = layer.masked(steps, lengths)
        return self.fc(final)


class TorchGRUClassifier(_Normalized):
    """torch.nn.GRU (batch_first) and a Linear head on the last layer's final state(s).

    Its variants, through the generic path's hooks (gru_deploy.models.variants):
    * lengths (`forward_lengths`, also what training on variable-length data runs): one
      direction, the last layer's output at step lengths[b] - 1 is sample b's final state
      (later padding cannot reach earlier steps), a gather. Both directions: each layer runs
      per direction (the same weights, torch.gru one direction at a time), the backward one on
      each sample's valid steps reversed in place (a gather; padding stays behind them), so it
      starts at the sample's last valid step; its output is gathered back. Equal to torch's
      packed sequences (lengths clamped to >= 1, as training always did), and exported by
      TorchScript's exporter as ONNX GRU nodes and gathers, over a dynamic seq.
    * stream (`initial_state`, `forward_stream`): one direction only; the state is
      [batch, layers, hidden] (torch's h is [layers, batch, hidden]) and a chunk runs self.gru
      from it, exported as GRU nodes given initial_h. Bidirectional: initial_state is None.
    """

    __constants__ = ["normalize", "bidirectional", "layer_indices"]

    def __init__(self, input_size: int = 8, hidden_size: int = 16, output_size: int = 4, layers: int = 1,
                 bidirectional: bool = False, normalization: Any = None) -> None:
        super().__init__()
        if layers < 1:
            raise UserInputError(f"layers must be at least 1, got {layers}")
        self.bidirectional = bidirectional
        self.layer_indices = tuple(range(layers))  # a tuple constant: TorchScript unrolls loops over it
        self.gru = nn.GRU(input_size, hidden_size, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), output_size)
        self._set_normalization(input_size, normalization)

    def last(self, h_n: torch.Tensor) -> torch.Tensor:
        if self.bidirectional:
            return torch.cat([h_n[-2], h_n[-1]], 1)
        return h_n[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.gru(self.normalized(x))
        return self.fc(self.last(h_n))

    def _one_direction(self, steps: torch.Tensor, layer: int, direction: int) -> torch.Tensor:
        """Layer `layer`'s direction `direction` (1: its reverse weights) run forward in time
        over steps [batch, seq, in] from zeros: its output [batch, seq, hidden]."""
        first = (layer * (2 if self.bidirectional else 1) + direction) * 4  # w_ih, w_hh, b_ih, b_hh each
        w = self.gru._flat_weights
        out, _ = torch.gru(steps, steps.new_zeros(1, steps.size(0), self.gru.hidden_size),
                           [w[first], w[first + 1], w[first + 2], w[first + 3]], True, 1, float(self.gru.dropout),
                           self.training, False, True)
        return out

    @staticmethod
    def _take(steps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """steps [batch, seq, C] at flat step indices rows [batch, k] (b * seq + t) -> [batch, k, C].
        index_select exports as ONNX Gather (GatherElements along a seq over 64 steps fails in
        onnx's reference evaluator, which gathers by np.choose)."""
        picked = steps.reshape(-1, steps.size(2)).index_select(0, rows.reshape(-1))
        return picked.view(rows.size(0), rows.size(1), steps.size(2))

    @torch.jit.export
    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The padded batch: x [batch, seq, I], lengths int64 [batch] -> each sample's logits as
        alone (lengths below 1 count as 1). Training's form on variable-length data, and the
        lengths variant gru-deploy exports (model_lengths.*)."""
        steps = self.normalized(x)
        seq = steps.size(1)
        start = torch.arange(steps.size(0), device=steps.device).unsqueeze(1) * seq  # [batch, 1]: b * seq
        end = lengths.clamp(min=1).unsqueeze(1) - 1  # [batch, 1]: each sample's last valid step
        if not self.bidirectional:
            out, _ = self.gru(steps)
            return self.fc(self._take(out, start + end).squeeze(1))
        t = torch.arange(seq, device=steps.device).unsqueeze(0)  # [1, seq]
        # sample b's steps 0..end reversed in place, its padding left where it is: a permutation
        # that is its own inverse, so the same gather puts the backward outputs back in order
        order = start + torch.where(t <= end, end - t, t)  # [batch, seq]
        fw, bw = steps, steps
        for layer in self.layer_indices:
            fw = self._one_direction(steps, layer, 0)
            bw = self._take(self._one_direction(self._take(steps, order), layer, 1), order)
            steps = torch.cat([fw, bw], 2)
        # forward's final state is at the last valid step; backward's at step 0
        return self.fc(torch.cat([self._take(fw, start + end).squeeze(1), bw[:, 0]], 1))

    def initial_state(self, batch: int) -> "torch.Tensor | None":
        """The state forward starts from, [batch, layers, hidden] zeros; None when bidirectional
        (a backward direction cannot stream): gru-deploy then exports no stream variant."""
        if self.bidirectional:
            return None
        return torch.zeros(batch, len(self.layer_indices), self.gru.hidden_size)

    @torch.jit.export
    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A chunk from state h0 [batch, layers, hidden] -> (logits, h_n [batch, layers, hidden]):
        chunks carried through h_n give one pass's answer. gru-deploy exports it as the stream
        variant."""
        if self.bidirectional:
            raise RuntimeError("a bidirectional torch.nn.GRU cannot stream: its backward direction needs the whole "
                               "sequence")
        _, h_n = self.gru(self.normalized(x), h0.transpose(0, 1).contiguous())
        return self.fc(h_n[-1]), h_n.transpose(0, 1)


# family name -> (reference for the generic export path, class)
FAMILIES = {
    "tutorial": ("gru_deploy.models.families:StackedGRUClassifier", StackedGRUClassifier),
    "torch-gru": ("gru_deploy.models.families:TorchGRUClassifier", TorchGRUClassifier),
}


def family_reference(name: str) -> str:
    if name not in FAMILIES:
        raise UserInputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name][0]


def build_family(name: str, args: dict[str, Any]) -> nn.Module:
    family_reference(name)
    try:
        return FAMILIES[name][1](**args)
    except TypeError as exc:
        raise UserInputError(f"family {name!r}: {exc}") from None
