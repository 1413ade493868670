"""The Python API: gru_deploy.export / verify / package / load, for the tutorial model and a user's own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import gru_deploy
from gru_deploy.errors import UserInputError


def test_importing_gru_deploy_for_the_api_loads_no_torch():
    code = ("import sys, gru_deploy; fns = [gru_deploy.export, gru_deploy.verify, gru_deploy.package, gru_deploy.load]; "
            "print('torch' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_export_verify_load_a_module_instance(tmp_path):
    """Your own module, passed as it is: exported, verified, loaded and run from Python."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    try:
        from user_models import TwoLayerGRU
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    module = TwoLayerGRU()
    manifest = gru_deploy.export(module, out=tmp_path / "mine")
    assert manifest["model"]["kind"] == "user" and manifest["signature"]["outputs"][0]["shape"] == ["batch", 3]
    report = gru_deploy.verify(tmp_path / "mine")
    assert report["passed"]
    x = np.random.default_rng(0).standard_normal((2, 11, 5)).astype(np.float32)
    got = gru_deploy.load(tmp_path / "mine").predict(x)["logits"]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserInputError, match="no stream variant"):
        gru_deploy.load(tmp_path / "mine").stream()
    bundle, _ = gru_deploy.package(tmp_path / "mine", "edge", out=tmp_path / "mine-edge")
    assert gru_deploy.verify(bundle)["passed"]
    np.testing.assert_allclose(gru_deploy.load(bundle).predict(x)["logits"], got, atol=1e-6)


def test_the_api_on_the_tutorial_export_matches_the_cli_path(export_dir, tmp_path):
    from gru_deploy.serve.infer import infer

    model = gru_deploy.load(export_dir)
    x = np.random.default_rng(1).standard_normal((3, 20, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x)["logits"], infer(export_dir, x).logits)
    stream = model.stream(batch=3)
    for t in range(x.shape[1]):
        logits = stream.step(x[:, t])
    np.testing.assert_allclose(logits, model.predict(x)["logits"], atol=1e-5)
    assert gru_deploy.verify(export_dir)["passed"]
    bundle, manifest = gru_deploy.package(export_dir, "edge", out=tmp_path / "edge")
    assert gru_deploy.verify(bundle)["passed"] and manifest["target"] == "edge"


def test_api_errors_are_the_clis(tmp_path):
    with pytest.raises(UserInputError, match="give checkpoint="):
        gru_deploy.export(out=tmp_path / "o")
    with pytest.raises(UserInputError, match="--strategy stepwise runs the tutorial cell as written"):
        gru_deploy.export(torch.nn.GRU(2, 2), strategy="stepwise", out=tmp_path / "o")
    with pytest.raises(UserInputError, match="no such export folder"):
        gru_deploy.load(tmp_path / "missing")
    assert not (tmp_path / "o").exists()
