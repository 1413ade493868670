"""Atomic writes, staged folders, manifest validation and file checksums."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gru_deploy import manifest as mf
from gru_deploy.errors import CheckFailed, UserInputError, WriteFailed
from gru_deploy.manifest import atomic_write_bytes, check_files, read_manifest, staged_dir


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- atomic_write_bytes -------------------------------------------------------------

def test_atomic_write_exact_bytes_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    data = bytes(range(256)) * 3
    atomic_write_bytes(path, data)
    assert path.read_bytes() == data
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["f.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(mf.os, "replace", boom)
    with pytest.raises(WriteFailed, match="disk on fire"):  # one line, exit 1
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


# --- staged_dir ---------------------------------------------------------------------

def _old_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.onnx").write_bytes(b"old model")
    (target / "README.md").write_text("my notes\n")
    (target / "stale.txt").write_text("gone after success")
    return target


def test_staged_dir_success_replaces_and_keeps_readme(tmp_path):
    target = _old_target(tmp_path)
    with staged_dir(target, keep=("README.md",)) as stage:
        assert stage.parent == tmp_path and stage != target
        (stage / "model.onnx").write_bytes(b"new model")
    assert _tree(target) == {"model.onnx": b"new model", "README.md": b"my notes\n"}
    assert os.listdir(tmp_path) == ["out"]


def test_staged_dir_rewritten_kept_file_wins(tmp_path):
    target = _old_target(tmp_path)
    with staged_dir(target, keep=("README.md",)) as stage:
        (stage / "README.md").write_text("fresh\n")
    assert (target / "README.md").read_text() == "fresh\n"


def test_staged_dir_creates_new_target(tmp_path):
    target = tmp_path / "a" / "out"
    with staged_dir(target, keep=("README.md",)) as stage:
        (stage / "f").write_text("x")
    assert _tree(target) == {"f": b"x"}
    assert os.listdir(target.parent) == ["out"]


def test_staged_dir_failure_leaves_target_intact(tmp_path):
    target = _old_target(tmp_path)
    before = _tree(target)
    with pytest.raises(RuntimeError, match="export failed"):
        with staged_dir(target, keep=("README.md",)) as stage:
            (stage / "model.onnx").write_bytes(b"half written")
            raise RuntimeError("export failed")
    assert _tree(target) == before
    assert os.listdir(tmp_path) == ["out"]


def test_staged_dir_refuses_a_file_target(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(UserInputError, match="not a folder"):
        with staged_dir(target):
            pytest.fail("must not yield")
    assert target.read_text() == "not a folder"
    assert os.listdir(tmp_path) == ["out"]


# --- read_manifest ------------------------------------------------------------------

def test_read_manifest_on_export(export_copy):
    manifest = read_manifest(export_copy)
    assert manifest["format"] == "gru-deploy-export" and manifest["format_version"] == 2
    assert "model.onnx" in manifest["files"]
    check_files(export_copy, manifest)  # untouched export checks out


def _edit(folder: Path, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BAD_MANIFESTS = {
    "not json": (lambda f: (f / "manifest.json").write_text("{not json"), "not valid JSON"),
    "binary": (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    "a list": (lambda f: (f / "manifest.json").write_text("[1, 2]"), "JSON object"),
    "no manifest": (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    "missing files": (lambda f: _edit(f, lambda d: d.pop("files")), r"lacks field.*'files'"),
    "missing signature": (lambda f: _edit(f, lambda d: d.pop("signature")), r"lacks field.*'signature'"),
    "wrong format": (lambda f: _edit(f, lambda d: d.update(format="something-else")), "format is 'something-else'"),
    "format_version 1": (lambda f: _edit(f, lambda d: d.update(format_version=1)), "format_version 1"),
    "missing models": (lambda f: _edit(f, lambda d: d.pop("models")), r"lacks field.*'models'"),
    "format_version str": (lambda f: _edit(f, lambda d: d.update(format_version="2")), "format_version '2'"),
    "format_version bool": (lambda f: _edit(f, lambda d: d.update(format_version=True)), "format_version True"),
    "format_version 3": (lambda f: _edit(f, lambda d: d.update(format_version=3)), "format_version 3"),
    "format_version float": (lambda f: _edit(f, lambda d: d.update(format_version=2.0)), "format_version 2.0"),
    "files not a dict": (lambda f: _edit(f, lambda d: d.update(files=["model.onnx"])), "'files' must map"),
    "entry lacks sha": (lambda f: _edit(f, lambda d: d["files"].update(x={"size": 1})), "'files' must map"),
}
for _name in ("../model.onnx", "sub/model.onnx", "/etc/passwd", "..", ".", "manifest.json", ""):
    BAD_MANIFESTS[f"entry {_name}"] = (
        lambda f, n=_name: _edit(f, lambda d: d["files"].update({n: {"sha256": "0" * 64, "size": 1}})),
        "not a plain file name",
    )


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_read_manifest_rejects(export_copy, case):
    corrupt, match = BAD_MANIFESTS[case]
    corrupt(export_copy)
    with pytest.raises(UserInputError, match=match):
        read_manifest(export_copy)


def test_read_manifest_missing_folder(tmp_path):
    with pytest.raises(UserInputError, match="no such folder"):
        read_manifest(tmp_path / "nope")


def test_read_manifest_folder_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserInputError, match="not a folder"):
        read_manifest(tmp_path / "f")


# --- check_files --------------------------------------------------------------------

def _flip_byte(folder):
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _delete(folder):
    (folder / "model.onnx").unlink()


def _symlink(folder):
    path = folder / "model.onnx"
    real = folder.parent / "elsewhere.onnx"
    path.rename(real)
    path.symlink_to(real)  # same bytes, but not a regular file


@pytest.mark.parametrize("corrupt, match", [(_flip_byte, "sha256 does not match"),
                                            (_delete, "missing"), (_symlink, "not a regular file")])
def test_check_files_detects(export_copy, corrupt, match):
    manifest = read_manifest(export_copy)
    corrupt(export_copy)
    with pytest.raises(CheckFailed, match=match):
        check_files(export_copy, manifest)
    with pytest.raises(CheckFailed):
        mf.verified_path(export_copy, manifest, "model.onnx")


def test_check_files_unlisted_name(export_copy):
    with pytest.raises(UserInputError, match="lists no file 'other.bin'"):
        check_files(export_copy, read_manifest(export_copy), ("other.bin",))


def test_models_are_chosen_by_the_manifest_not_by_name(export_copy):
    """select_model reads the "models" record: renaming what a record says moves the choice."""
    from gru_deploy.manifest import select_model

    manifest = read_manifest(export_copy)
    assert select_model(manifest, "classifier") == "model.onnx"
    assert select_model(manifest, "lengths", "torchscript") == "model_lengths.pt"
    manifest["models"]["model_stream.onnx"]["variant"] = "classifier"
    with pytest.raises(UserInputError, match="several"):
        select_model(manifest, "classifier")
    with pytest.raises(UserInputError, match="no int8 onnx model for the stream variant"):
        select_model(manifest, "stream", precision="int8")
