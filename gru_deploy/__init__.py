"""gru-deploy: take an explicit-loop GRU classifier from PyTorch to where it runs.

Importing this package is cheap: torch, onnx and onnxruntime load only inside the
functions that need them, so `gru-deploy --help` stays fast.
"""

__version__ = "0.1.0"

from gru_deploy.errors import CheckFailed, GruDeployError, UserInputError  # noqa: E402

__all__ = ["__version__", "GruDeployError", "UserInputError", "CheckFailed"]
