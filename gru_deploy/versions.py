"""Library versions recorded in checkpoints and manifests."""

from __future__ import annotations

import platform
from importlib import metadata

# The package's version: here, in the contract layer, so every layer reads it without importing
# gru_deploy/__init__.py (which is the public face and imports the API).
__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "gru-deploy": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found
