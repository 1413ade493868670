"""compare(): the Polygraphy pass rule, error statistics and the minimal tolerances."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gru_deploy.check.compare import compare

REF = np.array([[1.0, 2.0, -3.0], [0.5, 4.0, 10.0]], dtype=np.float32)


def test_identical_passes_with_zero_error():
    c = compare(REF, REF.copy())
    assert c.passed and bool(c) and c.reason == ""
    assert c.max_abs == c.mean_abs == c.p99_abs == c.max_rel == 0.0
    assert c.min_atol == c.min_rtol == 0.0
    assert c.argmax_agreement == 1.0 and c.shape == (2, 3)


@pytest.mark.parametrize(
    "test_value, atol, rtol, passed",
    [
        (100.5, 1e-3, 1e-2, True),    # diff 0.5 > atol, but rel 0.005 <= rtol
        (100.5, 1.0, 1e-4, True),     # rel 0.005 > rtol, but diff 0.5 <= atol
        (100.5, 1e-3, 1e-4, False),   # exceeds both
        (100.0, 0.0, 0.0, True),      # exact
    ],
)
def test_polygraphy_rule(test_value, atol, rtol, passed):
    ref = np.array([100.0, 1.0])
    c = compare(ref, np.array([test_value, 1.0]), atol=atol, rtol=rtol)
    assert c.passed is passed and bool(c) is passed
    assert (c.reason == "") is passed
    if not passed:
        assert "1 element(s) exceed both" in c.reason


def _noisy(seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((16, 4))
    return ref, ref + rng.normal(0, 1e-3, ref.shape)


@pytest.mark.parametrize("rtol", [1e-4, 1e-3, 1e-2])
def test_min_atol_is_the_smallest_passing_atol(rtol):
    ref, test = _noisy()
    m = compare(ref, test, atol=1e-6, rtol=rtol).min_atol
    assert m > 0
    assert compare(ref, test, atol=m, rtol=rtol).passed
    assert not compare(ref, test, atol=m * (1 - 1e-9), rtol=rtol).passed


@pytest.mark.parametrize("atol", [1e-5, 1e-4, 1e-3])
def test_min_rtol_is_the_smallest_passing_rtol(atol):
    ref, test = _noisy(1)
    m = compare(ref, test, atol=atol, rtol=1e-6).min_rtol
    assert m > 0
    assert compare(ref, test, atol=atol, rtol=m).passed
    assert not compare(ref, test, atol=atol, rtol=m * (1 - 1e-9)).passed


def test_statistics():
    c = compare(np.array([1.0, 2.0, 4.0, 8.0]), np.array([1.0, 2.5, 4.0, 7.0]))
    assert c.max_abs == pytest.approx(1.0)
    assert c.mean_abs == pytest.approx(0.375)
    assert c.max_rel == pytest.approx(0.25)
    assert c.mean_rel == pytest.approx((0.25 + 0.125) / 4)


def test_shape_mismatch_fails_with_reason():
    c = compare(REF, REF[:, :2])
    assert not c.passed and not c
    assert "shape [2, 2] differs from reference [2, 3]" in c.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["ref", "test", "both"])
def test_non_finite_never_passes(bad, where):
    ref, test = REF.copy(), REF.copy()
    if where in ("ref", "both"):
        ref[0, 1] = bad
    if where in ("test", "both"):
        test[0, 1] = bad
    c = compare(ref, test, atol=1e9, rtol=1e9)
    assert not c.passed and "non-finite" in c.reason


def test_empty_arrays_pass():
    c = compare(np.zeros((0, 4)), np.zeros((0, 4)))
    assert c.passed and c.shape == (0, 4)


def test_argmax_agreement():
    ref = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.7], [0.5, 0.4, 0.1]])
    test = ref.copy()
    test[1] = [0.9, 0.1, 0.0]  # row 1 now picks class 0
    test[3] = [0.1, 0.2, 0.3]  # row 3 now picks class 2
    assert compare(ref, test).argmax_agreement == pytest.approx(0.5)
    assert compare(ref, ref).argmax_agreement == 1.0


@pytest.mark.parametrize("case", ["shape", "nan", "value"])
def test_to_json_is_strict_json(case):
    test = {"shape": REF[:1], "nan": np.full_like(REF, np.nan), "value": REF + 1}[case]
    c = compare(REF, test)
    data = c.to_json()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["passed"] is False
    assert data["shape"] == [2, 3]
    if case != "value":
        assert data["max_abs"] is None and data["min_atol"] is None


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_to_json_strict_when_reference_has_zeros():
    """A nonzero answer where the reference is 0 has unbounded relative error: null in JSON."""
    c = compare(np.array([0.0, 0.0]), np.array([1.0, 1.0]))
    assert not c and c.max_rel == float("inf") and c.min_rtol == float("inf")
    data = c.to_json()
    json.dumps(data, allow_nan=False)
    assert data["max_rel"] is None and data["min_rtol"] is None and data["max_abs"] == 1.0


def test_truthiness_equals_passed():
    for c in (compare(REF, REF), compare(REF, REF + 1), compare(REF, REF[0])):
        assert bool(c) is c.passed


def _int8_rows(n: int = 280, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 3, (n, classes))
    lengths = np.repeat([1, 7, 25, 100, 1000, 2048], [64, 64, 64, 64, 16, 8])[:n]
    return ref, lengths


def test_int8_class_agreement_is_a_bound_of_its_own():
    """Small errors that flip many near-tie classes: the error clauses hold, the class clause
    alone fails (the old gate let every flip within twice the bound pass)."""
    from gru_deploy.check.compare import INT8_MIN_AGREEMENT, int8_gate

    ref, lengths = _int8_rows()
    ref[:, 1] = ref[:, 0] + 0.05  # class 1 just ahead of class 0 on every row
    ref[:, 2:] = ref[:, :2].min(axis=1, keepdims=True) - 1
    test = ref.copy()
    flipped = np.arange(len(ref)) % 4 == 0  # 25% of rows: class 0 now ahead by 0.05
    test[flipped, 0], test[flipped, 1] = ref[flipped, 1], ref[flipped, 0]
    gate = int8_gate(ref, test, lengths=lengths)
    assert gate["quantile_abs"] <= gate["max_abs_bound"] and max(gate["median_abs_by_length"].values()) <= 0.06
    assert not gate["passed"] and gate["argmax_agreement"] == pytest.approx(0.75)
    assert gate["reason"] == f"argmax agreement 75.0% < {INT8_MIN_AGREEMENT:.0%}"
    test[flipped] = ref[flipped]
    assert int8_gate(ref, test, lengths=lengths)["passed"]


def test_int8_gate_fails_a_model_broken_at_one_length_and_bounds_the_rest():
    from gru_deploy.check.compare import int8_gate

    ref, lengths = _int8_rows()
    broken = ref.copy()
    broken[lengths == 2048] = ref[lengths == 2048][:, ::-1]  # 8 of 280 rows wrong: under the 5% the quantile allows
    gate = int8_gate(ref, broken, lengths=lengths)
    assert gate["quantile_abs"] == 0 and not gate["passed"] and "median error at 2048 steps" in gate["reason"]
    outlier = ref.copy()
    outlier[0] += 5.0  # one row far off (the dynamic quantiser's per-tensor scale does this): recorded, not fatal
    gate = int8_gate(ref, outlier, lengths=lengths)
    assert gate["passed"] and gate["max_abs"] == pytest.approx(5.0) and gate["max_abs"] > gate["max_abs_bound"]
    wrong = int8_gate(ref, np.random.default_rng(1).normal(0, 3, ref.shape), lengths=lengths)
    assert not wrong["passed"] and "p95" in wrong["reason"] and "argmax agreement" in wrong["reason"]
