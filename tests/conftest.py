"""Shared fixtures: a tiny trained checkpoint and one export of it, made once per session."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (the README's test command): N workers share the cores, so each runs torch
    # (and the CLIs it starts) on one thread. Set before torch is imported; with torch's default
    # of a thread per core, two workers on 2 cores spent 5x the CPU time spinning.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import shutil
from pathlib import Path

import pytest

from gru_deploy.data import load_data
from gru_deploy.spec import ModelSpec
from gru_deploy.train import Checkpoint, TrainOptions, train


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Checkpoint:
    """Two epochs on the synthetic data: weights that are not an init, made in about a second."""
    split = load_data("synthetic", seed=0)
    spec = ModelSpec(labels=split.train.labels)
    return train(spec, split, TrainOptions(epochs=2, seed=0))


@pytest.fixture(scope="session")
def checkpoint_file(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    tiny_checkpoint.sha256 = tiny_checkpoint.save(path)
    return path


@pytest.fixture(scope="session")
def export_dir(checkpoint_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the tiny checkpoint; tests that change files copy it first."""
    from gru_deploy.convert.folder import export_to_dir
    from gru_deploy.train import load_checkpoint

    out = tmp_path_factory.mktemp("export") / "exported"
    export_to_dir(load_checkpoint(checkpoint_file), out)
    return out


@pytest.fixture()
def export_copy(export_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session export, free to corrupt."""
    dest = tmp_path / "exported"
    shutil.copytree(export_dir, dest)
    return dest


KINDS = ("tutorial", "family", "user")


@pytest.fixture(scope="session")
def every_kind(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One export folder per kind of model, for the tests of a stage that every model goes
    through: the tutorial classifier (the session export), a built-in family's model with every
    variant (2 layers), and your own model with two outputs and no hooks (tests/user_models.py)."""
    import torch

    import gru_deploy
    from gru_deploy.models.families import StackedGRUClassifier
    from user_models import TwoHeads

    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    family = StackedGRUClassifier(3, 5, 2, layers=2).eval()
    gru_deploy.export(family, out=root / "family")
    torch.manual_seed(0)
    user = TwoHeads().eval()
    gru_deploy.export(user, out=root / "user")
    return {"tutorial": (export_dir, None), "family": (root / "family", family), "user": (root / "user", user)}
