"""Your own model, deployed with gru-deploy: a two-layer GRU written out as the tutorial writes
its cell, stepped by one loop over time.

    python examples/own_model/my_models.py ck.pt          # a short training run; saves ck.pt
    gru-deploy export --model examples/own_model/my_models.py:TwoLayerGRU --checkpoint ck.pt --out mine/
    gru-deploy verify mine/

The checkpoint holds the state_dict and the constructor arguments (`model_args`), so export
needs no --model-args; it is plain data (gru-deploy loads it with weights_only=True).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class Cell(nn.Module):
    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.update_x, self.update_h = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_hidden, bias=False)
        self.reset_x, self.reset_h = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_hidden, bias=False)
        self.cand_x, self.cand_h = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.update_x(x) + self.update_h(h))
        r = torch.sigmoid(self.reset_x(x) + self.reset_h(h))
        candidate = torch.tanh(self.cand_x(x) + self.cand_h(r * h))
        return (1 - z) * h + z * candidate


class TwoLayerGRU(nn.Module):
    def __init__(self, input_size: int = 5, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.lower, self.upper = Cell(input_size, hidden), Cell(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = x.new_zeros(x.size(0), self.hidden)  # new_zeros: the state follows x's dtype (float64 checks)
        h2 = x.new_zeros(x.size(0), self.hidden)
        for t in range(x.size(1)):  # over x's time axis: the loop stays a loop in every export
            h1 = self.lower(x[:, t], h1)
            h2 = self.upper(h1, h2)
        return self.head(h2)


if __name__ == "__main__":
    args = {"input_size": 5, "hidden": 12, "classes": 3}
    torch.manual_seed(0)
    model = TwoLayerGRU(**args)
    x = torch.randn(256, 30, 5)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0).long()  # 3 classes a GRU can learn
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(30):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    out = sys.argv[1] if len(sys.argv) > 1 else "ck.pt"
    torch.save({"state_dict": model.state_dict(), "model_args": args}, out)
    print(f"saved {out}: train loss {loss.item():.3f}, train accuracy {accuracy:.1%}")
