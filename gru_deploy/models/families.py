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
from gru_deploy.models.tutorial import GRUCell


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
    """The tutorial cell, stepped over time in one direction by an explicit loop."""

    __constants__ = ["reverse"]

    def __init__(self, input_size: int, hidden_size: int, reverse: bool = False) -> None:
        super().__init__(input_size, hidden_size)
        self.reverse = reverse

    def run(self, steps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """steps [seq, batch, input] (time-major) -> (every step's state [seq, batch, hidden],
        the final state)."""
        if self.reverse:
            steps = steps.flip(0)
        h = steps.new_zeros(steps.size(1), self.hidden_size)
        outputs: List[torch.Tensor] = []
        for k in range(steps.size(0)):
            h = self.forward(steps[k], h)
            outputs.append(h)
        out = torch.stack(outputs)
        if self.reverse:
            out = out.flip(0)
        return out, h

    def run_from(self, steps: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """`run` (forward direction) from state h: the stream variant's step through a chunk."""
        outputs: List[torch.Tensor] = []
        for k in range(steps.size(0)):
            h = self.forward(steps[k], h)
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
        outputs: List[torch.Tensor] = []
        for k in range(seq):
            t = seq - 1 - k if self.reverse else k
            h = torch.where((lengths > t).unsqueeze(1), self.forward(steps[k], h), h)
            outputs.append(h)
        out = torch.stack(outputs)
        if self.reverse:
            out = out.flip(0)
        return out, h


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
    """torch.nn.GRU (batch_first) and a Linear head on the last layer's final state(s)."""

    __constants__ = ["normalize", "bidirectional"]

    def __init__(self, input_size: int = 8, hidden_size: int = 16, output_size: int = 4, layers: int = 1,
                 bidirectional: bool = False, normalization: Any = None) -> None:
        super().__init__()
        if layers < 1:
            raise UserInputError(f"layers must be at least 1, got {layers}")
        self.bidirectional = bidirectional
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

    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Padded batch (eager only, for training): torch's packed sequences. Not a TorchScript
        method (no @torch.jit.export), so this family exports without a lengths variant."""
        packed = nn.utils.rnn.pack_padded_sequence(self.normalized(x), lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h_n = self.gru(packed)
        return self.fc(self.last(h_n))


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
