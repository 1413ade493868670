"""TorchScript: script the classifier (its time loop proved a loop, check.torchscript) and save it.

TorchScript is deprecated upstream: `torch.jit.script` warns on every call. We silence
that warning where we call it and report what torch said once, as a note in the export's
manifest and output, because `model.pt` is still what libtorch runtimes (C++, Triton's
pytorch backend) load.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from gru_deploy.check.torchscript import (  # noqa: F401  (re-exported: convert's callers read them here too)
    check_loop, depends_on, load, quiet_torchscript_deprecation, take_deprecations)

if TYPE_CHECKING:
    import torch


def torchscript(model: "torch.nn.Module") -> "torch.jit.ScriptModule":
    """`torch.jit.script` the classifier and check its loop survived."""
    import torch

    with quiet_torchscript_deprecation():
        scripted = torch.jit.script(model.eval())
    check_loop(scripted)
    return scripted


def to_bytes(scripted: "torch.jit.ScriptModule") -> bytes:
    """Serialise in memory (torch.jit.save into a file aborts the process on a full disk)."""
    import torch

    buffer = io.BytesIO()
    with quiet_torchscript_deprecation():
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()
