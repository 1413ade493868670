"""The classifier: the tutorial's names and math, and the fast form held to the tutorial's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gru_deploy.models.tutorial import PARAMETER_NAMES, GRUCell, GRUClassifier, tutorial_forward, weights_numpy
from gru_deploy.check.runners import Float64Runner
from gru_deploy.spec import ModelSpec


class TutorialCell(torch.nn.Module):
    """The tutorial's code, written out again here as the independent reference."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.W_xz = torch.nn.Linear(input_size, hidden_size)
        self.W_hz = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_xr = torch.nn.Linear(input_size, hidden_size)
        self.W_hr = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_xh = torch.nn.Linear(input_size, hidden_size)
        self.W_hh = torch.nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x, h):
        z = torch.sigmoid(self.W_xz(x) + self.W_hz(h))
        r = torch.sigmoid(self.W_xr(x) + self.W_hr(h))
        h_tilde = torch.tanh(self.W_xh(x) + self.W_hh(r * h))
        return (1 - z) * h + z * h_tilde


class TutorialModel(torch.nn.Module):
    def __init__(self, input_size=8, hidden_size=16, output_size=4):
        super().__init__()
        self.hidden_size = hidden_size
        self.gru = TutorialCell(input_size, hidden_size)
        self.fc = torch.nn.Linear(hidden_size, output_size)

    def forward(self, x):
        h = torch.zeros(x.size(0), self.hidden_size)
        for t in range(x.size(1)):
            h = self.gru(x[:, t, :], h)
        return self.fc(h)


def test_state_dict_keys_are_the_tutorials():
    assert tuple(GRUClassifier().state_dict()) == PARAMETER_NAMES
    assert set(TutorialModel().state_dict()) == set(PARAMETER_NAMES)


def test_hidden_projections_have_no_bias():
    cell = GRUCell(8, 16)
    assert cell.W_hz.bias is None and cell.W_hr.bias is None and cell.W_hh.bias is None
    assert cell.W_xz.bias is not None


@pytest.mark.parametrize("sizes", [(8, 16, 4), (3, 5, 2), (12, 32, 9)])
@pytest.mark.parametrize("seq", [0, 1, 7, 60])
def test_fast_form_equals_tutorial_code(sizes, seq):
    torch.manual_seed(1)
    tutorial = TutorialModel(*sizes)
    ours = GRUClassifier(*sizes)
    ours.load_state_dict(tutorial.state_dict())  # a tutorial state_dict loads unchanged
    x = torch.randn(3, seq, sizes[0]) * 3
    with torch.no_grad():
        expected = tutorial(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(tutorial_forward(ours, x), expected, atol=0, rtol=0)


def test_update_direction_follows_the_code_not_the_prose():
    """z near 1 takes the candidate (the code), not the old state (the prose)."""
    cell = GRUCell(1, 1)
    with torch.no_grad():
        for layer in (cell.W_xz, cell.W_hz, cell.W_xr, cell.W_hr, cell.W_xh, cell.W_hh):
            layer.weight.zero_()
        cell.W_xz.bias.fill_(50.0)  # z = 1
        cell.W_xr.bias.zero_()
        cell.W_xh.bias.fill_(0.5)  # h~ = tanh(0.5)
    h = torch.tensor([[0.9]])
    out = cell(torch.zeros(1, 1), h)
    assert out.item() == pytest.approx(np.tanh(0.5), abs=1e-6)


def test_float64_reference_matches_torch():
    torch.manual_seed(2)
    model = GRUClassifier().eval()
    x = np.random.default_rng(0).standard_normal((4, 30, 8)).astype(np.float32)
    ref = Float64Runner(ModelSpec(), weights_numpy(model)).run({"x": x})["logits"]
    with torch.no_grad():
        got = tutorial_forward(model, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_streaming_form_carries_state_across_chunks():
    from cli_helpers import variant_module
    from gru_deploy.models.tutorial import tutorial_state

    torch.manual_seed(3)
    model = GRUClassifier().eval()
    stream = variant_module(model, "stream")
    x = torch.randn(2, 30, 8)
    h = torch.zeros(2, 16)
    with torch.no_grad():
        for start in range(0, 30, 7):
            logits, h = stream(x[:, start:start + 7], h)
        torch.testing.assert_close(h, tutorial_state(model, x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits, tutorial_forward(model, x), atol=1e-6, rtol=1e-6)


def test_lengths_form_equals_each_sample_alone():
    from cli_helpers import variant_module

    torch.manual_seed(4)
    model = GRUClassifier().eval()
    masked = variant_module(model, "lengths")
    x = torch.randn(4, 12, 8)
    lengths = torch.tensor([12, 1, 0, 5])
    with torch.no_grad():
        out = masked(x, lengths)
        for b, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(out[b], tutorial_forward(model, x[b:b + 1, :n])[0], atol=1e-6, rtol=1e-6)
    assert tuple(masked.state_dict()) == tuple(f"inner.{name}" for name in PARAMETER_NAMES)  # the hook's wrapper
    assert tuple(model.state_dict()) == PARAMETER_NAMES  # the tutorial's own names, as its checkpoints hold them


def test_the_tutorial_classifier_declares_the_hooks_any_module_may(tmp_path):
    """One model interface: exported as a module (the path a family and your own model take),
    the tutorial classifier's hooks give its lengths and stream variants, state [batch, hidden],
    each proved against the module in float64."""
    import gru_deploy

    torch.manual_seed(5)
    manifest = gru_deploy.export(GRUClassifier(3, 6, 2).eval(), out=tmp_path / "e")
    assert set(manifest["variants"]) == {"lengths", "stream"} and manifest["model"]["recurrence"] == "loop"
    state = manifest["variants"]["stream"]["signature"]["inputs"][1]
    assert state == {"name": "h0", "dtype": "float32", "shape": ["batch", 6]}
    summary = manifest["parity"]["summary"]
    assert manifest["parity"]["passed"] and "lengths:float64 alone->float64 padded" in summary
    assert "stream:float64 one pass->float64 chunks of 7[h_n]" in summary
