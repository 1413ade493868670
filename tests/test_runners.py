"""The inputs' checks (check.runners.check_user_*), on the path every runtime call takes (infer,
serve, Stream): a bad input is refused, in every variant, before onnxruntime sees it."""

from __future__ import annotations

import numpy as np
import pytest

from gru_deploy.errors import UserInputError
from gru_deploy.serve.infer import infer

GOOD = np.zeros((2, 5, 8), dtype=np.float32)


def _with(value, index=(1, 2, 3)):
    x = GOOD.copy()
    x[index] = value
    return x


BAD_X = {
    "not an array": (GOOD.tolist(), "float32 array"),
    "float64": (GOOD.astype(np.float64), "float32 array"),
    "int": (GOOD.astype(np.int64), "float32 array"),
    "rank 2": (GOOD[0], r"shape \[batch, seq, 8\]"),
    "rank 4": (GOOD[None], r"shape \[batch, seq, 8\]"),
    "channels": (np.zeros((2, 5, 7), np.float32), r"shape \[batch, seq, 8\]"),
    "empty batch": (np.zeros((0, 5, 8), np.float32), "empty batch"),
    "nan": (_with(np.nan), "non-finite"),
    "inf": (_with(-np.inf, (0, 0, 0)), "non-finite"),
}
VARIANTS = {"classifier": {}, "lengths": {"lengths": np.array([5, 1])}, "stream": {"stream": True}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(BAD_X))
def test_every_variant_refuses_a_bad_input(export_dir, variant, case):
    x, message = BAD_X[case]
    with pytest.raises(UserInputError, match=message):
        infer(export_dir, x, **VARIANTS[variant])


@pytest.mark.parametrize("lengths,message", [(np.array([5, 6]), r"0\.\.5"), (np.array([5, -1]), r"0\.\.5"),
                                             (np.array([5]), r"shape \[2\]"), (np.array([5.0, 1.0]), "INT64")])
def test_bad_lengths_are_refused(export_dir, lengths, message):
    with pytest.raises(UserInputError, match=message):
        infer(export_dir, GOOD, lengths=lengths)


@pytest.mark.parametrize("h0,message", [(np.zeros((2, 15), np.float32), r"shape \[2, 16\]"),
                                        (np.full((2, 16), np.nan, np.float32), "non-finite")])
def test_a_bad_state_is_refused(export_dir, h0, message):
    with pytest.raises(UserInputError, match=message):
        infer(export_dir, GOOD, h0=h0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_an_empty_sequence_answers_the_head_on_the_zero_state(export_dir, variant):
    """The tutorial export's grid ran empty sequences (its record says so), so they are
    answered: h stays 0, so the logits are fc's bias."""
    import torch

    bias = torch.jit.load(str(export_dir / "model.pt")).state_dict()["fc.bias"].numpy()
    options = {"lengths": np.array([0, 0, 0])} if variant == "lengths" else VARIANTS[variant]
    out = infer(export_dir, np.zeros((3, 0, 8), np.float32), **options).outputs["logits"]
    np.testing.assert_allclose(out, np.tile(bias, (3, 1)), atol=1e-6)


def test_stage_clock_counts_each_second_once_in_the_innermost_stage(monkeypatch):
    """Nested stages: the inner one's seconds are not also the outer one's; the rest is `other`;
    outside `measuring` a stage times nothing."""
    from gru_deploy.check import timing

    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def wait(seconds):
        now[0] += seconds

    with timing.stage("unmeasured"):
        wait(5)
    with timing.measuring() as clock:
        wait(1)  # other
        with timing.stage("parity"):
            wait(2)
            with timing.stage("float32 noise"):
                wait(3)
            wait(4)
        with timing.stage("parity"):
            wait(0.5)
    assert clock.record() == {"total_s": 10.5, "stages_s": {"parity": 6.5, "float32 noise": 3.0}, "other_s": 1.0}
    assert timing.stage_line(clock.record()) == "time 10.5 s: parity 6.5 s, float32 noise 3.0 s, other 1.0 s"
