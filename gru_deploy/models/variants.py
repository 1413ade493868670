"""Wrappers that make a module's variant hook its `forward`, so TorchScript scripts it and the
ONNX exporter exports it as a model of its own.

A module opts in to a variant by defining the hook with `@torch.jit.export` (so TorchScript
compiles it even though `forward` does not call it):

    @torch.jit.export
    def forward_lengths(self, x, lengths):   # x [batch, seq, I] padded, lengths int64 [batch]
        ...                                  # the outputs of forward, each sample's as alone

    def initial_state(self, batch):          # the state forward starts from, [batch, ...]
        ...                                  # (None: this module cannot stream)

    @torch.jit.export
    def forward_stream(self, x, h0):         # a chunk from state h0 -> (outputs..., h_n)
        ...

gru-deploy checks the promises: the float64 module's padded answer for every sample equals
its `forward` on that sample alone, unpadded, on the sample's valid steps; and its stream,
from the initial state, gives forward's answer, in one chunk and carried chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LengthsOf(nn.Module):
    """forward(x, lengths) = inner.forward_lengths(x, lengths)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Any:
        return self.inner.forward_lengths(x, lengths)


class StreamOf(nn.Module):
    """forward(x, h0) = inner.forward_stream(x, h0)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> Any:
        return self.inner.forward_stream(x, h0)
