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
