"""TorchScript: the loop survives scripting, save/load round-trips, warnings are not sprayed."""

from __future__ import annotations

import warnings

import pytest
import torch

from gru_deploy.convert import script
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.models.tutorial import GRUClassifier, tutorial_forward


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GRUClassifier().eval()


def test_scripted_graph_keeps_a_loop_over_the_input_length(model):
    scripted = script.torchscript(model)
    loops = [n for n in scripted.forward.inlined_graph.nodes() if n.kind() == "prim::Loop"]
    assert len(loops) == 1
    trip = next(loops[0].inputs()).node()
    assert trip.kind() == "aten::size"  # the trip count is read off the input at run time


def test_scripting_does_not_spray_deprecation_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        script.torchscript(model)
    assert not [w for w in caught if "deprecated" in str(w.message).lower()]


@pytest.mark.parametrize("seq", [0, 1, 13, 250])
def test_save_load_round_trip_matches_eager(model, tmp_path, seq):
    path = tmp_path / "model.pt"
    path.write_bytes(script.to_bytes(script.torchscript(model)))
    loaded = script.load(path)
    script.check_loop(loaded)
    x = torch.randn(2, seq, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tutorial_forward(model, x), atol=1e-5, rtol=1e-5)


class FixedLength(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, 0]
        for t in range(5):
            h = h + x[:, t]
        return h


class NoLoop(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)


def test_check_loop_rejects_a_constant_trip_count():
    with pytest.raises(CheckFailed, match="trip count"):
        script.torchscript(FixedLength())


def test_check_loop_rejects_a_graph_without_a_loop():
    with pytest.raises(CheckFailed, match="no prim::Loop"):
        script.torchscript(NoLoop())


def test_load_rejects_a_file_that_is_not_torchscript(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(UserInputError, match="not a loadable TorchScript"):
        script.load(bad)


def test_the_deprecation_note_is_what_torch_said(model):
    """The export's note quotes the warnings torch raised while scripting, not a fixed sentence;
    other warnings pass through."""
    import warnings

    from gru_deploy.convert.script import take_deprecations, torchscript

    take_deprecations()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchscript(model)
        with script.quiet_torchscript_deprecation():
            warnings.warn("an unrelated warning", RuntimeWarning)
    heard = take_deprecations()
    assert heard and all("deprecated" in m.lower() or "removed" in m.lower() for m in heard)
    assert take_deprecations() == []
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
