"""Library versions recorded in checkpoints and manifests."""

from __future__ import annotations

import platform
from importlib import metadata


def library_versions() -> dict[str, str]:
    from gru_deploy import __version__

    found = {"python": platform.python_version(), "gru-deploy": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


# onnxruntime releases and the newest ONNX opset (default domain) and IR version each one
# implements, from onnxruntime's compatibility table (docs/reference/compatibility.md). A
# model needs the first release that covers both its opset and its IR version.
ORT_OPSET_IR = (
    ("1.10", 15, 8), ("1.11", 16, 8), ("1.12", 17, 8), ("1.13", 17, 8), ("1.14", 18, 8), ("1.15", 19, 9),
    ("1.16", 19, 9), ("1.17", 20, 9), ("1.18", 21, 10), ("1.19", 21, 10), ("1.20", 21, 10),
)


def onnxruntime_floor(opset: int, ir_version: int) -> str | None:
    """The oldest onnxruntime release (in ORT_OPSET_IR) that implements `opset` at `ir_version`;
    None when no release in the table does (a newer one is needed)."""
    for release, max_opset, max_ir in ORT_OPSET_IR:
        if opset <= max_opset and ir_version <= max_ir:
            return release
    return None
