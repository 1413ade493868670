"""Models a user of the tutorial writes next, loaded by the tests through `--model tests/user_models.py:Name`.

Each is the user's own code, with its own attribute names; none is gru-deploy's.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


class Cell(nn.Module):
    """The tutorial's cell, renamed: what a user copies into a file of their own."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.update_x = nn.Linear(n_in, n_hidden)
        self.update_h = nn.Linear(n_hidden, n_hidden, bias=False)
        self.reset_x = nn.Linear(n_in, n_hidden)
        self.reset_h = nn.Linear(n_hidden, n_hidden, bias=False)
        self.cand_x = nn.Linear(n_in, n_hidden)
        self.cand_h = nn.Linear(n_hidden, n_hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.update_x(x) + self.update_h(h))
        r = torch.sigmoid(self.reset_x(x) + self.reset_h(h))
        candidate = torch.tanh(self.cand_x(x) + self.cand_h(r * h))
        return (1 - z) * h + z * candidate


class TwoLayerGRU(nn.Module):
    """Two stacked cells stepped by one loop over time, a head on the top layer's last state."""

    def __init__(self, input_size: int = 5, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.lower = Cell(input_size, hidden)
        self.upper = Cell(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = x.new_zeros(x.size(0), self.hidden)
        h2 = x.new_zeros(x.size(0), self.hidden)
        for t in range(x.size(1)):
            h1 = self.lower(x[:, t], h1)
            h2 = self.upper(h1, h2)
        return self.head(h2)


class TorchGRUClassifier(nn.Module):
    """torch.nn.GRU (two layers, batch first) and a head on the last step's output."""

    def __init__(self, input_size: int = 6, hidden: int = 10, classes: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


class LSTMLoop(nn.Module):
    """An nn.LSTMCell stepped by a loop; returns the logits and the final hidden state."""

    def __init__(self, input_size: int = 4, hidden: int = 8, classes: int = 2) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(input_size, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.size(0), self.hidden)
        c = x.new_zeros(x.size(0), self.hidden)
        for t in range(x.size(1)):
            h, c = self.cell(x[:, t], (h, c))
        return self.out(h), h


class Tagger(nn.Module):
    """A per-step output: one label per time step, [batch, seq, tags]."""

    def __init__(self, input_size: int = 3, hidden: int = 8, tags: int = 5) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = Cell(input_size, hidden)
        self.tag = nn.Linear(hidden, tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        steps: List[torch.Tensor] = []
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
            steps.append(self.tag(h))
        return torch.stack(steps, 1)


class TwoHeads(nn.Module):
    """Two outputs from one cell loop: a class per sequence and a tag per step."""

    def __init__(self, input_size: int = 3, hidden: int = 8, classes: int = 3, tags: int = 4) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = Cell(input_size, hidden)
        self.head = nn.Linear(hidden, classes)
        self.tag = nn.Linear(hidden, tags)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.size(0), self.hidden)
        steps: List[torch.Tensor] = []
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
            steps.append(self.tag(h))
        return self.head(h), torch.stack(steps, 1)


class FixedSteps(nn.Module):
    """A loop of ten steps whatever the input: the model accepts one length only."""

    def __init__(self, input_size: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(input_size, hidden)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        for t in range(10):
            h = self.cell(x[:, t], h)
        return self.fc(h)


class Unscriptable(nn.Module):
    """A forward TorchScript cannot compile (try/except)."""

    def __init__(self, input_size: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(input_size, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        try:
            for t in range(x.size(1)):
                h = self.cell(x[:, t], h)
        except RuntimeError:
            pass
        return h


def tagger_factory(tags: int = 5) -> nn.Module:
    """A factory function, not a class: `--model tests/user_models.py:tagger_factory`."""
    return Tagger(tags=tags)


class TorchCellLoop(nn.Module):
    """torch.nn.GRUCell stepped by a loop."""

    def __init__(self, input_size: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(input_size, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
        return h


class MaskedTagger(nn.Module):
    """A per-step tagger that also defines the lengths hook: padded steps leave the state alone,
    and each step's tags come from the state at that step."""

    def __init__(self, input_size: int = 4, hidden: int = 6, tags: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = Cell(input_size, hidden)
        self.tags = nn.Linear(hidden, tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        states: List[torch.Tensor] = []
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
            states.append(h)
        return self.tags(torch.stack(states, 1))

    @torch.jit.export
    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        states: List[torch.Tensor] = []
        for t in range(x.size(1)):
            h = torch.where((lengths > t).unsqueeze(1), self.cell(x[:, t], h), h)
            states.append(h)
        return self.tags(torch.stack(states, 1))

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.hidden)

    @torch.jit.export
    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = h0
        states: List[torch.Tensor] = []
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
            states.append(h)
        return self.tags(torch.stack(states, 1)), h


class ForgetfulStream(LSTMLoop):
    """A stream hook that breaks its promise: it halves the hidden state it is given, so a
    sequence fed in chunks forgets part of itself at every chunk boundary (from the zero
    initial state, one chunk is still forward's answer)."""

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 2, self.hidden)

    @torch.jit.export
    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = h0[:, 0] * 0.5
        c = h0[:, 1]
        for t in range(x.size(1)):
            h, c = self.cell(x[:, t], (h, c))
        return self.out(h), h, torch.stack([h, c], 1)


class LeakyLengths(nn.Module):
    """A classifier whose lengths hook breaks its promise: it ignores the lengths, so a padded
    sample's last state has stepped through its padding."""

    def __init__(self, input_size: int = 4, hidden: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = Cell(input_size, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
        return self.head(h)

    @torch.jit.export
    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward(x) + 0.0 * lengths.unsqueeze(1).to(x.dtype)


class WhileLoop(nn.Module):
    """A genuine recurrence written as a while loop over the time axis."""

    def __init__(self, input_size: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(input_size, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        t = 0
        while t < x.size(1):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            t += 1
        return self.fc(h)


class FixedStepsAndBatchLoop(FixedSteps):
    """Three fixed steps carrying the state, plus a loop over the batch that does nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.size(0), self.hidden)
        for t in range(3):
            h = self.cell(x[:, t], h)
        for b in range(x.size(0)):
            pass
        return self.fc(h)


class PerSample(nn.Module):
    """A loop over the samples with no recurrence at all: each sample's mean over time."""

    def __init__(self, input_size: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(input_size, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for b in range(x.size(0)):
            out.append(self.fc(x[b].mean(0)))
        return torch.stack(out)


class StatelessSteps(PerSample):
    """A loop over the time axis that carries nothing from one step to the next."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for t in range(x.size(1)):
            out.append(self.fc(x[:, t]))
        return torch.stack(out, 1)


class HoistedProjection(nn.Module):
    """The tutorial model's way: every step's input projection in one matmul before the loop,
    returned through a helper's tuple; the loop runs over the projection's time axis."""

    def __init__(self, input_size: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, hidden)
        self.fc = nn.Linear(hidden, 2)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        steps = self.proj(x.transpose(0, 1))  # [seq, batch, hidden]
        return steps, torch.zeros(x.size(0), steps.size(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, h = self.project(x)
        for t in range(steps.size(0)):
            h = torch.tanh(steps[t] + h)
        return self.fc(h)


class LoopOverProjectedAxis(nn.Module):
    """A loop over an axis that a matmul made of the time axis (x^T x sums the steps away; its
    size is the input's): not a recurrence over time."""

    def __init__(self, input_size: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(input_size, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gram = torch.matmul(x.transpose(1, 2), x)  # [batch, input, input]
        h = torch.zeros(x.size(0), gram.size(2))
        for k in range(gram.size(2)):
            h = torch.tanh(gram[:, k] + h)
        return self.fc(h)


class WhileLoopRNN(WhileLoop):
    """WhileLoop's recurrence written with torch.while_loop, which TorchScript cannot compile and
    torch.export keeps a loop: gru-deploy exports it without TorchScript. Its stream variant
    carries the state through the same loop."""

    def run(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        def more(t, h):
            return t < x.size(1)

        def step(t, h):
            return t + 1, torch.tanh(self.inp(x.index_select(1, t.reshape(1)).squeeze(1)) + self.rec(h))
        return torch.while_loop(more, step, (torch.zeros((), dtype=torch.int64), h0))[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.run(x, x.new_zeros(x.size(0), self.hidden)))

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.hidden)

    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor):
        h = self.run(x, h0)
        return self.fc(h), h


class ScanRNN(WhileLoopRNN):
    """WhileLoopRNN's recurrence as a scan (torch._higher_order_ops.scan), which ExecuTorch lowers."""

    def run(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops.scan import scan

        def combine(h, x_t):
            new = torch.tanh(self.inp(x_t) + self.rec(h))
            return new, new.clone()
        return scan(combine, h0, x.transpose(0, 1))[0]
