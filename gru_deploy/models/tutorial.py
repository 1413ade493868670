"""The tutorial's explicit-loop GRU classifier, in the two forms we keep side by side.

`GRUCell` is the tutorial's cell, line for line: six Linear layers, the hidden-side ones
without bias, and

    z  = σ(W_xz x + W_hz h)
    r  = σ(W_xr x + W_hr h)
    h~ = tanh(W_xh x + W_hh (r ⊙ h))
    h' = (1 − z) ⊙ h + z ⊙ h~

`GRUClassifier.forward` computes the same function in a form that exports well: it walks
time-major (one transpose, then `x[t]`, so the exported Loop does not copy the whole input
every step), projects all inputs for z, r and h~ in one matmul before the loop, and merges
the z and r hidden projections into one. The parameters and their names are the
tutorial's (`gru.W_xz.weight`, …, `fc.bias`), so the tutorial's state_dict loads unchanged.
`tutorial_forward` runs the cell exactly as the tutorial's loop does; tests hold the two
forms to each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from gru_deploy.errors import UserInputError
from gru_deploy.spec import ModelSpec

if TYPE_CHECKING:
    import numpy as np

PARAMETER_NAMES = (
    "gru.W_xz.weight", "gru.W_xz.bias", "gru.W_hz.weight",
    "gru.W_xr.weight", "gru.W_xr.bias", "gru.W_hr.weight",
    "gru.W_xh.weight", "gru.W_xh.bias", "gru.W_hh.weight",
    "fc.weight", "fc.bias",
)


class GRUCell(nn.Module):
    """The tutorial's GRU cell (reset applied before W_hh)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.W_xz = nn.Linear(input_size, hidden_size)
        self.W_hz = nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_xr = nn.Linear(input_size, hidden_size)
        self.W_hr = nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_xh = nn.Linear(input_size, hidden_size)
        self.W_hh = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.W_xz(x) + self.W_hz(h))
        r = torch.sigmoid(self.W_xr(x) + self.W_hr(h))
        h_tilde = torch.tanh(self.W_xh(x) + self.W_hh(r * h))
        return (1 - z) * h + z * h_tilde


class GRUClassifier(nn.Module):
    """GRU cell stepped over time by a `for` loop from h=0, then a Linear head on the last h.

    Input `x` float32 [batch, seq, input_size]; output logits [batch, output_size].
    Scripted with `torch.jit.script`, the loop stays a `prim::Loop` whose trip count is
    the input's sequence length.
    """

    # Constants to TorchScript: the gate slices are static, the normalisation branch folds away.
    __constants__ = ["hidden_size", "normalize", "hoist"]

    def __init__(self, input_size: int = 8, hidden_size: int = 16, output_size: int = 4,
                 normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gru = GRUCell(input_size, hidden_size)
        self.fc = nn.Linear(hidden_size, output_size)
        # Not in the state_dict (persistent=False): the tutorial's state_dict still loads as is;
        # the values travel in the config and are baked into the scripted and exported graphs.
        self.normalize = normalization is not None
        mean, std = normalization if normalization is not None else ((0.0,) * input_size, (1.0,) * input_size)
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("norm_scale", 1.0 / torch.tensor(std, dtype=torch.float32), persistent=False)
        # True: the input projections of every step in one matmul before the loop (fastest at
        # small batch); False: the cell as written, once per step, time-major (the `stepwise`
        # export; no [seq, batch, 3H] buffer, faster at large batch x long sequences).
        self.hoist = True

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, when the model was trained on normalised data."""
        if self.normalize:
            return (x - self.norm_mean) * self.norm_scale
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
        return self.fc(self.recur(x, h0))

    # The variant hooks every model may declare (models.variants), the tutorial model's too.

    def initial_state(self, batch: int) -> torch.Tensor:
        """The state forward starts from: [batch, hidden] zeros."""
        return torch.zeros(batch, self.hidden_size)

    @torch.jit.export
    def forward_stream(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk from state h0 [batch, hidden] -> (logits, h_n): feeding a sequence chunk by
        chunk, carrying h_n into the next h0, gives one pass's logits and final state."""
        h = self.recur(x, h0)
        return self.fc(h), h

    @torch.jit.export
    def forward_lengths(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, input] padded, lengths int64 [batch] -> logits: each sample's as it gets
        them alone, unpadded; a length of 0 gives fc(0)."""
        h0 = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
        return self.fc(self.recur_masked(x, h0, lengths))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input projections of every step, time-major, and the merged hidden weights."""
        cell = self.gru
        steps = self.normalized(x).transpose(0, 1)  # time-major [seq, batch, input]
        # Input projections for every step at once, outside the loop.
        w_x_zr = torch.cat([cell.W_xz.weight, cell.W_xr.weight], 0)
        b_x_zr = torch.cat([cell.W_xz.bias, cell.W_xr.bias], 0)
        x_zr = torch.nn.functional.linear(steps, w_x_zr, b_x_zr)  # [seq, batch, 2H]
        x_h = cell.W_xh(steps)  # [seq, batch, H]
        # Hidden projections of z and r merged into one matmul per step.
        w_h_zr = torch.cat([cell.W_hz.weight, cell.W_hr.weight], 0).t()
        return x_zr, x_h, w_h_zr, cell.W_hh.weight.t()

    def step(self, x_zr: torch.Tensor, x_h: torch.Tensor, h: torch.Tensor, w_h_zr: torch.Tensor,
             w_hh: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_size
        zr = torch.sigmoid(x_zr + torch.mm(h, w_h_zr))
        z = zr.narrow(1, 0, hidden)
        r = zr.narrow(1, hidden, hidden)
        h_tilde = torch.tanh(x_h + torch.mm(r * h, w_hh))
        return (1 - z) * h + z * h_tilde

    def recur(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The time loop from state `h`; returns the last state."""
        if not self.hoist:
            steps = self.normalized(x).transpose(0, 1)
            for t in range(steps.size(0)):
                h = self.gru(steps[t], h)
            return h
        x_zr, x_h, w_h_zr, w_hh = self.project(x)
        for t in range(x_zr.size(0)):
            h = self.step(x_zr[t], x_h[t], h, w_h_zr, w_hh)
        return h

    def recur_masked(self, x: torch.Tensor, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The time loop where steps t >= lengths[b] leave sample b's state unchanged."""
        if not self.hoist:
            steps = self.normalized(x).transpose(0, 1)
            for t in range(steps.size(0)):
                h = torch.where((lengths > t).unsqueeze(1), self.gru(steps[t], h), h)
            return h
        x_zr, x_h, w_h_zr, w_hh = self.project(x)
        for t in range(x_zr.size(0)):
            valid = (lengths > t).unsqueeze(1)
            h = torch.where(valid, self.step(x_zr[t], x_h[t], h, w_h_zr, w_hh), h)
        return h


def tutorial_forward(model: GRUClassifier, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """The tutorial's own loop: batch-major slicing, one cell call per step."""
    return model.fc(tutorial_state(model, x, h))


def tutorial_state(model: GRUClassifier, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """The last state of the tutorial's loop, from `h` (zeros when None)."""
    if h is None:
        h = torch.zeros(x.size(0), model.hidden_size, dtype=x.dtype, device=x.device)
    x = model.normalized(x)
    for t in range(x.size(1)):
        h = model.gru(x[:, t, :], h)
    return h


def build_model(spec: ModelSpec) -> GRUClassifier:
    return GRUClassifier(spec.input_size, spec.hidden_size, spec.output_size, spec.normalization)


def spec_from_state_dict(state_dict: Mapping[str, Any], labels: tuple[str, ...] = ()) -> ModelSpec:
    """Read the sizes off a tutorial-style state_dict (e.g. one saved by the tutorial itself)."""
    check_state_dict_keys(state_dict)
    w_xz = state_dict["gru.W_xz.weight"]
    fc = state_dict["fc.weight"]
    if getattr(w_xz, "ndim", None) != 2 or getattr(fc, "ndim", None) != 2:
        raise UserInputError("state_dict weights gru.W_xz.weight and fc.weight must be 2-D tensors")
    hidden, input_size = (int(n) for n in w_xz.shape)
    return ModelSpec(input_size=input_size, hidden_size=hidden, output_size=int(fc.shape[0]), labels=labels)


def check_state_dict_keys(state_dict: Mapping[str, Any]) -> None:
    keys = set(state_dict)
    missing = [k for k in PARAMETER_NAMES if k not in keys]
    extra = sorted(keys - set(PARAMETER_NAMES))
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        raise UserInputError(
            "state_dict does not match the tutorial GRU classifier (" + "; ".join(detail) + ")"
        )


def load_weights(spec: ModelSpec, state_dict: Mapping[str, Any]) -> GRUClassifier:
    """Build the classifier and load weights, refusing wrong keys, shapes or non-finite values."""
    check_state_dict_keys(state_dict)
    model = build_model(spec)
    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserInputError(f"state_dict entry {name} is {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserInputError(
                f"state_dict entry {name} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise UserInputError(f"state_dict entry {name} has dtype {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"state_dict entry {name} holds NaN or inf; refusing to deploy it")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    return model.eval()


def tutorial_parameters(state: Mapping[str, Any]) -> dict[str, Any]:
    """Only the tutorial's parameters (a scripted module's state_dict also lists its buffers; a
    variant's module holds the model as `inner`: models.variants)."""
    state = {k.removeprefix("inner."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k in PARAMETER_NAMES}


def weights_numpy(model: nn.Module) -> dict[str, "np.ndarray"]:
    """The parameters as float64 numpy arrays, keyed by the tutorial's names."""
    return {k: v.detach().cpu().double().numpy() for k, v in tutorial_parameters(model.state_dict()).items()}
