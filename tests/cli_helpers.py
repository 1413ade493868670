"""Run the real `gru-deploy` console script from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXPORT_FILES = ["golden.npz", "manifest.json", "model.onnx", "model.ort", "model.pt", "model_lengths.onnx", "model_lengths.ort", "model_lengths.pt",
                "model_stream.onnx", "model_stream.ort", "model_stream.pt", "parity.json", "required_operators.config"]


def gru_deploy_exe() -> str:
    exe = shutil.which("gru-deploy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the gru-deploy console script is not installed (pip install -e .)"
    return exe


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console script; return the completed process (text mode)."""
    return subprocess.run([gru_deploy_exe(), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL)
