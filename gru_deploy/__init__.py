"""gru-deploy: take an explicit-loop GRU classifier from PyTorch to where it runs.

Importing this package is cheap: torch, onnx and onnxruntime load only inside the
functions that need them, so `gru-deploy --help` stays fast.
"""

from gru_deploy.versions import __version__  # noqa: E402  (the contract layer holds it)

from gru_deploy.errors import CheckFailed, GruDeployError, UserInputError  # noqa: E402

from gru_deploy.api import export, load, package, verify  # noqa: E402  (torch loads inside them)

__all__ = ["__version__", "GruDeployError", "UserInputError", "CheckFailed", "Stream", "export", "verify",
           "package", "load"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import gru_deploy` loads no onnxruntime
    if name == "Stream":
        from gru_deploy.serve.stream import Stream

        return Stream
    raise AttributeError(f"module 'gru_deploy' has no attribute {name!r}")
