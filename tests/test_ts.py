"""UEA/UCR .ts files and the real data sets, through training, export and deployment accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from gru_deploy.data import load_data, load_ts
from gru_deploy.errors import UserInputError

HEADER = "# a comment\n@problemName Toy\n@timeStamps false\n@missing false\n@univariate false\n@dimensions 2\n"


def write(tmp_path, body, equal="true", name="toy.ts", labels="a b"):
    path = tmp_path / name
    path.write_text(HEADER + f"@equalLength {equal}\n@classLabel true {labels}\n@data\n" + body)
    return path


def test_equal_length_file(tmp_path):
    data = load_ts(write(tmp_path, "1,2,3:4,5,6:a\n7,8,9:10,11,12:b\n"))
    assert data.x.shape == (2, 3, 2) and data.lengths is None and data.labels == ("a", "b")
    np.testing.assert_array_equal(data.x[0, :, 1], [4, 5, 6])
    np.testing.assert_array_equal(data.y, [0, 1])


def test_unequal_lengths_are_padded_with_lengths(tmp_path):
    data = load_ts(write(tmp_path, "1,2:3,4:a\n5,6,7,8:9,10,11,12:b\n", equal="false"))
    assert data.x.shape == (2, 4, 2) and data.lengths.tolist() == [2, 4]
    assert not data.x[0, 2:].any()  # padding is zeros


@pytest.mark.parametrize("body,equal,line,fragment", [
    ("1,2:3,4:c\n", "true", 10, "class label 'c'"),
    ("1,?:3,4:a\n", "true", 10, "missing value"),
    ("1,x:3,4:a\n", "true", 10, "'x' in dimension 1 is not a number"),
    ("1,2:a\n", "true", 10, "1 dimensions, the file declares 2"),
    ("1,2:3:a\n", "true", 10, "differ in length"),
    ("1,2:3,4:a\n1,2,3:4,5,6:b\n", "true", 11, "@equalLength is true"),
    ("1,2:3,4:a\n\n1,NaN:3,4:b\n", "false", 12, "missing value"),
])
def test_format_errors_name_their_line(tmp_path, body, equal, line, fragment):
    path = write(tmp_path, body, equal=equal)
    with pytest.raises(UserInputError, match=fragment) as info:
        load_ts(path)
    assert f"toy.ts:{line}:" in str(info.value)
    proc = run_cli("train", "--data", str(path), "--epochs", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and f":{line}:" in proc.stderr


@pytest.mark.parametrize("text,fragment", [
    ("@problemName x\n@classLabel true a\n", "no @data"),
    ("@problemName x\n@classLabel true a\n@data\n", "no cases"),
    ("@problemName x\n@data\n1,2:a\n", "before any @classLabel"),
    ("1,2,3\n@data\n", "expected a @header"),
    ("@timeStamps true\n@classLabel true a\n@data\n", "time-stamped"),
    ("@classLabel false\n@data\n", "@classLabel must be 'true'"),
])
def test_header_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.ts"
    path.write_text(text)
    with pytest.raises(UserInputError, match=fragment):
        load_ts(path)


def test_train_and_test_files(tmp_path):
    train = write(tmp_path, "1,2:3,4:a\n5,6:7,8:b\n", name="t_TRAIN.ts")
    test = write(tmp_path, "1,2,3:3,4,5:b\n", equal="false", name="t_TEST.ts")
    split = load_data(str(train), test=str(test))
    assert split.train.x.shape == (2, 3, 2) and split.test.x.shape == (1, 3, 2)
    assert split.train.lengths.tolist() == [2, 2] and split.test.lengths.tolist() == [3]
    with pytest.raises(UserInputError, match="--test goes with"):
        load_data("synthetic", test=str(test))


@pytest.mark.slow
@pytest.mark.parametrize("name,floor", [("japanesevowels", 0.96), ("basicmotions", 0.95)])
def test_real_data_sets_train_export_and_keep_their_accuracy(tmp_path, name, floor):
    ckpt, out = tmp_path / "c.pt", tmp_path / "exp"
    proc = run_cli("train", "--data", name, "--hidden-size", "32", "--out", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    accuracy = json.loads(proc.stdout)["metrics"]["test_accuracy"]
    assert accuracy >= floor
    assert run_cli("export", "--checkpoint", str(ckpt), "--out", str(out), "-q").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["test_accuracy"] == accuracy and "normalization" in manifest["config"]
    proc = run_cli("verify", str(out), "--data", name, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["deployment_accuracy"]
    rows = report["runtimes"]
    assert rows["eager"]["accuracy"] == pytest.approx(accuracy)
    assert {"onnxruntime fp32 (loop, exported)", "onnxruntime fp32 (fused)", "onnxruntime fp32 (stepwise)",
            "onnxruntime int8 (loop form)"} <= set(rows)
    for runtime, row in rows.items():
        if "int8" in runtime:
            assert row["accuracy"] >= rows["eager"]["accuracy"] - 0.01  # int8 loses at most 1 point
        else:
            assert row["agreement_with_torchscript"] == 1.0  # fp32 agrees on every test case
