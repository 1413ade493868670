"""Shared by tests/test_examples_*.py: cached tool folders under ~/.cache/gru-deploy and the
system tools the examples need (.ci/run installs them with apt-get)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CACHE = Path(os.environ.get("GRU_DEPLOY_CACHE", Path.home() / ".cache" / "gru-deploy"))
APT_HINT = "apt-get install cmake g++ nlohmann-json3-dev nodejs npm chromium (.ci/run does it)"


def require_tools(*tools: str) -> None:
    """Fail (not skip: CI must run these tests) when a system tool is missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None and not Path(tool).is_file()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}; {APT_HINT}")


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def npm_folder(name: str, source: Path, timeout: float = 600) -> Path:
    """Copy an example's npm project to CACHE/name and `npm install --ignore-scripts` there.

    node_modules is reused while package.json and package-lock.json are unchanged (a stamp
    file, written last, holds their hash); the example's other files are copied every time.
    --ignore-scripts: no install script runs, so nothing (browsers, CUDA libraries) is
    downloaded beyond the npm packages themselves.
    """
    require_tools("node", "npm")
    dest = CACHE / name
    dest.mkdir(parents=True, exist_ok=True)
    locks = [source / "package.json", source / "package-lock.json"]
    key = digest(*(p.read_bytes() for p in locks if p.is_file()))
    stamp = dest / ".gru-deploy-npm-ready"
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    if stamp.is_file() and stamp.read_text().strip() == key and (dest / "node_modules").is_dir():
        return dest
    stamp.unlink(missing_ok=True)
    shutil.rmtree(dest / "node_modules", ignore_errors=True)
    proc = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                          cwd=dest, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        shutil.rmtree(dest / "node_modules", ignore_errors=True)
        pytest.fail(f"npm install in {dest} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    stamp.write_text(key + "\n")
    return dest
