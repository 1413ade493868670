"""ModelSpec: defaults, validation, plain-data round trip and the I/O signature."""

from __future__ import annotations

import pytest

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, ModelSpec


def test_defaults():
    spec = ModelSpec()
    assert (spec.input_size, spec.hidden_size, spec.output_size) == (8, 16, 4)
    assert spec.labels == ("class_0", "class_1", "class_2", "class_3")
    assert ModelSpec(output_size=2).labels == ("class_0", "class_1")


def test_labels_are_stringified_tuple():
    assert ModelSpec(output_size=2, labels=["a", 7]).labels == ("a", "7")


@pytest.mark.parametrize("field", ["input_size", "hidden_size", "output_size"])
@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "4", None])
def test_rejects_bad_sizes(field, value):
    with pytest.raises(UserInputError, match=field):
        ModelSpec(**{field: value})


@pytest.mark.parametrize("labels", [("a",), ("a", "b", "c", "d", "e")])
def test_rejects_wrong_label_count(labels):
    with pytest.raises(UserInputError, match="labels"):
        ModelSpec(labels=labels)


def test_dict_round_trip():
    spec = ModelSpec(input_size=5, hidden_size=7, output_size=3, labels=("x", "y", "z"))
    data = spec.to_dict()
    assert data == {"input_size": 5, "hidden_size": 7, "output_size": 3, "labels": ["x", "y", "z"]}
    assert ModelSpec.from_dict(data) == spec
    assert ModelSpec.from_dict(ModelSpec().to_dict()) == ModelSpec()


def test_from_dict_without_labels_uses_defaults():
    assert ModelSpec.from_dict({"input_size": 1, "hidden_size": 1, "output_size": 2}).labels == ("class_0", "class_1")


GOOD = {"input_size": 8, "hidden_size": 16, "output_size": 2, "labels": ["a", "b"]}


@pytest.mark.parametrize(
    "data, match",
    [
        (None, "mapping"),
        ([1, 2, 3], "mapping"),
        ("config", "mapping"),
        ({**GOOD, "dropout": 0.1}, "unknown fields.*dropout"),
        ({k: v for k, v in GOOD.items() if k != "hidden_size"}, "lacks fields.*hidden_size"),
        ({"labels": ["a"]}, "lacks fields"),
        ({**GOOD, "labels": "ab"}, "labels"),
        ({**GOOD, "labels": {"a": 0, "b": 1}}, "labels"),
        ({**GOOD, "input_size": "8"}, "input_size"),
    ],
)
def test_from_dict_rejects(data, match):
    with pytest.raises(UserInputError, match=match):
        ModelSpec.from_dict(data)


def test_signature():
    sig = ModelSpec(input_size=5, output_size=3).signature()
    assert sig == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", "seq", 5]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
    }
    assert (INPUT_NAME, OUTPUT_NAME) == ("x", "logits")
