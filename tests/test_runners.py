"""Runners: one interface; the onnxruntime runner refuses bad feeds before the runtime sees them."""

from __future__ import annotations

import numpy as np
import pytest

from gru_deploy.errors import UserInputError
from gru_deploy.manifest import read_manifest
from cli_helpers import tutorial_runners

GOOD = np.zeros((2, 5, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def runners(export_dir):
    return tutorial_runners(export_dir)


def _nan():
    x = GOOD.copy()
    x[1, 2, 3] = np.nan
    return {"x": x}


def _inf():
    x = GOOD.copy()
    x[0, 0, 0] = -np.inf
    return {"x": x}


BAD_FEEDS = {
    "wrong name": ({"input": GOOD}, "takes inputs"),
    "extra input": ({"x": GOOD, "h0": GOOD}, "takes inputs"),
    "not an array": ({"x": GOOD.tolist()}, "numpy array"),
    "float64": ({"x": GOOD.astype(np.float64)}, "float32"),
    "int": ({"x": GOOD.astype(np.int64)}, "float32"),
    "rank 2": ({"x": GOOD[0]}, "rank 3"),
    "rank 4": ({"x": GOOD[None]}, "rank 3"),
    "channels": ({"x": np.zeros((2, 5, 7), np.float32)}, "channels"),
    "nan": (_nan(), "non-finite"),
    "inf": (_inf(), "non-finite"),
}


@pytest.mark.parametrize("name", ["eager", "torchscript", "onnxruntime", "float64"])
@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_every_runner_rejects_bad_feeds(runners, name, case):
    feed, message = BAD_FEEDS[case]
    with pytest.raises(UserInputError, match=message):
        runners[name].run(feed)


@pytest.mark.parametrize("name", ["eager", "torchscript", "onnxruntime", "onnx-reference", "float64"])
def test_empty_batch_and_empty_sequence(runners, name):
    empty_batch = runners[name].run({"x": np.zeros((0, 5, 8), np.float32)})["logits"]
    assert empty_batch.shape == (0, 4)
    # seq 0: h stays 0, so the logits are fc's bias.
    bias = runners["float64"].w["fc.bias"]
    out = runners[name].run({"x": np.zeros((3, 0, 8), np.float32)})["logits"]
    np.testing.assert_allclose(out, np.tile(bias, (3, 1)), atol=1e-6)


def test_onnxruntime_runner_rejects_an_unloadable_model(tmp_path):
    from gru_deploy.check.runners import OnnxRuntimeRunner
    from gru_deploy.spec import ModelSpec

    with pytest.raises(UserInputError, match="onnxruntime cannot load"):
        OnnxRuntimeRunner(ModelSpec(), b"not an onnx model")
