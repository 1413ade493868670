"""Data sets: built-in generators, .npz loading and validation, splitting."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from gru_deploy.data import Dataset, load_data, load_npz, seed_random, split, synthetic
from gru_deploy.errors import UserInputError


def _xy(n=6, t=5, i=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, t, i)).astype(np.float32), (np.arange(n) % classes).astype(np.int64)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


# --- built-in data sets -------------------------------------------------------------

def test_synthetic_shapes_and_dtypes():
    data = synthetic(n=50, seq_len=12, input_size=5, seed=3)
    assert data.x.shape == (50, 12, 5) and data.x.dtype == np.float32
    assert data.y.shape == (50,) and data.y.dtype == np.int64
    assert len(data) == 50 and data.input_size == 5
    assert len(data.labels) == 4 and set(np.unique(data.y)) <= {0, 1, 2, 3}


def test_synthetic_is_deterministic_per_seed():
    a, b, c = synthetic(n=40, seed=1), synthetic(n=40, seed=1), synthetic(n=40, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_seed_random_matches_tutorial():
    data = seed_random()
    assert data.train.x.shape == (1000, 10, 8) and data.train.x.dtype == np.float32
    assert data.test.x.shape == (100, 10, 8)
    assert data.train.y.shape == (1000,) and data.test.y.shape == (100,)
    assert data.train.labels == data.test.labels == ("class_0", "class_1", "class_2", "class_3")
    assert data.train.y.max() <= 3 and data.train.y.min() >= 0
    np.testing.assert_array_equal(seed_random().train.x, data.train.x)


# --- load_npz -----------------------------------------------------------------------

def test_load_npz_without_labels(tmp_path):
    x, y = _xy(classes=3)
    data = load_npz(_npz(tmp_path / "d.npz", x=x, y=y))
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    assert data.labels == ("class_0", "class_1", "class_2")


def test_load_npz_with_labels(tmp_path):
    x, y = _xy(classes=2)
    data = load_npz(_npz(tmp_path / "d.npz", x=x, y=y, labels=np.array(["cat", "dog", "eel"])))
    assert data.labels == ("cat", "dog", "eel")
    assert len(data) == 6


def _bad_cases():
    x, y = _xy()
    return {
        "x missing": ({"y": y}, "missing array.*'x'"),
        "y missing": ({"x": x}, "missing array.*'y'"),
        "x rank 2": ({"x": x[:, :, 0], "y": y}, "rank 3"),
        "x float64": ({"x": x.astype(np.float64), "y": y}, "float32"),
        "y float": ({"x": x, "y": y.astype(np.float32)}, "integer"),
        "y float with labels": ({"x": x, "y": y.astype(np.float32), "labels": np.array(["a", "b", "c"])},
                                "integer"),
        "label negative": ({"x": x, "y": np.array([0, 1, -1, 0, 1, 2])}, r"labels must lie in"),
        "label too big": ({"x": x, "y": y, "labels": np.array(["a", "b"])}, r"labels must lie in \[0, 1\]"),
        "nan in x": ({"x": np.where(np.arange(6)[:, None, None] == 4, np.nan, x).astype(np.float32), "y": y},
                     "NaN or inf.*sample 4"),
        "inf in x": ({"x": np.where(np.arange(6)[:, None, None] == 2, np.inf, x).astype(np.float32), "y": y},
                     "NaN or inf.*sample 2"),
        "empty": ({"x": x[:0], "y": y[:0]}, "N=0|empty"),
        "empty with labels": ({"x": x[:0], "y": y[:0], "labels": np.array(["a"])}, "N=0"),
        "length mismatch": ({"x": x, "y": y[:4]}, "6 samples but y has 4"),
        "labels not strings": ({"x": x, "y": y, "labels": np.array([0, 1, 2])}, "strings"),
        "labels 2-D": ({"x": x, "y": y, "labels": np.array([["a", "b", "c"]])}, "1-D array of strings"),
        "object array": ({"x": x, "y": y, "labels": np.array(["a", "b", None], dtype=object)}, "not a readable"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD)
def test_load_npz_rejects(tmp_path, case):
    arrays, match = BAD[case]
    path = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserInputError, match=match):
        load_npz(path)


def test_load_npz_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_npz(tmp_path / "nope.npz")


@pytest.mark.parametrize("content", [b"", b"x,y\n1,2\n", b"PK\x03\x04 truncated zip"])
def test_load_npz_not_a_zip(tmp_path, content):
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match="not a readable .npz"):
        load_npz(path)


def test_load_npz_object_array_is_refused(tmp_path):
    # allow_pickle=False must turn a pickled array into a clean UserInputError.
    x, _ = _xy()
    path = _npz(tmp_path / "d.npz", x=x, y=np.array([1, "a", None, 0, 0, 0], dtype=object))
    with pytest.raises(UserInputError, match="not a readable .npz"):
        load_npz(path)


def test_load_npz_zip_without_arrays(tmp_path):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(UserInputError, match="missing array"):
        load_npz(path)


def test_load_npz_npy_payload_is_user_error(tmp_path):
    path = tmp_path / "d.npz"
    with open(path, "wb") as handle:
        np.save(handle, _xy()[0])
    with pytest.raises(UserInputError, match="single .npy array"):
        load_npz(path)


# --- load_data ----------------------------------------------------------------------

def test_load_data_unknown_name():
    with pytest.raises(UserInputError, match="unknown data set 'mnist'.*synthetic"):
        load_data("mnist")


def test_load_data_wrong_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2\n")
    with pytest.raises(UserInputError, match="unsupported data file type '.csv'"):
        load_data(str(path))


def test_load_data_npz_and_input_size_mismatch(tmp_path):
    x, y = _xy(n=10, i=3)
    path = _npz(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(path), input_size=3, test_fraction=0.2)
    assert (len(data.train), len(data.test)) == (8, 2)
    with pytest.raises(UserInputError, match="3 input channels but the model takes 8"):
        load_data(str(path), input_size=8)


def test_load_data_builtins():
    assert load_data("synthetic", input_size=5).train.input_size == 5
    assert len(load_data("seed-random").train) == 1000


# --- split --------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_fraction(fraction):
    with pytest.raises(UserInputError, match="test fraction"):
        split(Dataset("d", *_xy(), ("a", "b", "c")), fraction, seed=0)


@pytest.mark.parametrize("n, fraction, n_test", [(100, 0.2, 20), (10, 0.25, 2), (3, 0.01, 1)])
def test_split_sizes_add_up(n, fraction, n_test):
    data = Dataset("d", *_xy(n=n), ("a", "b", "c"))
    parts = split(data, fraction, seed=0)
    assert len(parts.test) == n_test and len(parts.train) + len(parts.test) == n
    # every sample lands in exactly one part
    both = np.concatenate([parts.train.x, parts.test.x]).reshape(n, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, data.x.reshape(n, -1)))
    assert parts.describe()["train_samples"] == n - n_test


def test_split_is_seeded():
    data = Dataset("d", *_xy(n=50), ("a", "b", "c"))
    a, b, c = split(data, 0.2, seed=4), split(data, 0.2, seed=4), split(data, 0.2, seed=5)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert not np.array_equal(a.test.x, c.test.x)


def test_split_rejects_a_single_sample():
    with pytest.raises(UserInputError, match="too few"):
        split(Dataset("d", *_xy(n=1), ("a", "b", "c")), 0.2, seed=0)


@pytest.mark.parametrize("lengths,fragment", [
    (np.array([1, 2, 3, 99]), "must lie in"),
    (np.array([1, 2, -1, 0]), "must lie in"),
    (np.array([1, 2, 3]), "entries"),
    (np.array([1.0, 2.0, 3.0, 4.0]), "integer"),
    (np.array([[1, 2, 3, 4]]), "1-D"),
])
def test_load_npz_rejects_bad_lengths(tmp_path, lengths, fragment):
    path = tmp_path / "v.npz"
    np.savez(path, x=np.zeros((4, 5, 8), np.float32), y=np.zeros(4, np.int64), lengths=lengths)
    with pytest.raises(UserInputError, match=fragment):
        load_npz(path)


def test_load_npz_keeps_lengths_through_the_split(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, x=np.zeros((10, 5, 8), np.float32), y=np.zeros(10, np.int64), lengths=np.arange(10) % 6)
    split = load_data(str(path), seed=0)
    assert sorted(np.concatenate([split.train.lengths, split.test.lengths]).tolist()) == sorted((np.arange(10) % 6).tolist())
