"""Manifests, hashing and atomic writes: the contract between stages.

A later stage reads only the manifest and the files it lists, and checks every sha256
before using a file. Every write goes to a temporary path in the target's folder and is
renamed into place, so an interrupted run leaves the earlier result whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gru_deploy.errors import CheckFailed, UserInputError, WriteFailed

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gru-deploy-export"
MANIFEST_VERSION = 2  # 2: a "models" record names each model file's variant, format and precision
REQUIRED_FIELDS = ("format", "format_version", "gru_deploy_version", "strategy", "signature", "files", "config",
                   "models")
PRECISIONS = ("fp32", "int8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a synced temp file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteFailed(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk (ENOSPC), a file size limit (EFBIG), a read-only folder
        Path(tmp).unlink(missing_ok=True)
        raise WriteFailed(f"cannot write {path}: {exc.strerror or exc}; nothing was changed there") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json_bytes(data))


@contextmanager
def staged_dir(target: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; on success it replaces `target`.

    Files in `target` whose names are in `keep` (and are not rewritten) are carried
    over. On any error the temp folder is removed and `target` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(f"cannot create {target.parent}: {exc.strerror or exc}") from None
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{target} exists and is not a folder; choose another --out")
    recover_interrupted_runs(target)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise WriteFailed(f"cannot write beside {target}: {exc.strerror or exc}") from None
    try:
        yield stage
        if target.is_dir():
            for name in keep:
                old = target / name
                if old.is_file() and not (stage / name).exists():
                    shutil.copy2(old, stage / name)
        _fsync_dir(stage)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, backup / target.name)
            os.replace(stage, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(stage, target)
        _fsync_dir(target.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def recover_interrupted_runs(target: Path) -> None:
    """Repair what a run killed mid-way (kill -9, power loss) left beside `target`.

    Its hidden folders are named `.NAME.staging-PID-*` and `.NAME.old-PID-*`; those whose
    process is gone are the killed run's. If it died between moving the old folder aside and
    moving the new one in, `target` is missing: the newest moved-aside folder goes back. Then
    every staging or moved-aside folder of a dead run is deleted (a swap that had moved the new
    folder in left the old one behind; a run killed while building left its staging folder).
    Folders of a live process (a concurrent run) are left alone.
    """
    parent = target.parent
    dead = [p for kind in ("staging", "old") for p in parent.glob(f".{target.name}.{kind}-*")
            if p.is_dir() and not _owner_alive(p.name.split(f".{kind}-", 1)[1])]
    backups = [p for p in dead if ".old-" in p.name and (p / target.name).is_dir()]
    if not target.exists() and backups:
        newest = max(backups, key=lambda p: p.stat().st_mtime_ns)
        os.replace(newest / target.name, target)
    for path in dead:
        shutil.rmtree(path, ignore_errors=True)


def _owner_alive(suffix: str) -> bool:
    """Whether the process whose PID starts `suffix` (`PID-random`) is running; False for a
    name without one (an older gru-deploy's)."""
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return int(pid) != 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


# Exports made by the generic path for a module: the user's own (`export --model`) or a
# built-in family's (gru_deploy.models.families); both carry a signature read off the module.
MODULE_KINDS = ("user", "family")


def is_module_export(manifest: dict[str, Any]) -> bool:
    """True for a manifest (export or bundle) of a module exported by the generic path."""
    model = manifest.get("model")
    return isinstance(model, dict) and model.get("kind") in MODULE_KINDS


# The Triton base name of an export's or bundle's models (bundles record it as model_name):
# the tutorial model's is gru_classifier, a module's model (README: the names clients call).
TUTORIAL_MODEL_NAME, MODULE_MODEL_NAME = "gru_classifier", "model"


def model_name(manifest: dict[str, Any]) -> str:
    """The base of the Triton names an export's or bundle's models are served under, as its
    manifest records it (an export or bundle from before the record: by its kind of model)."""
    return manifest.get("model_name") or (MODULE_MODEL_NAME if is_module_export(manifest) else TUTORIAL_MODEL_NAME)


def answers_empty(manifest: dict[str, Any]) -> bool:
    """True when the export's parity grid ran empty sequences (and lengths of 0) in every variant
    and passed, as its parity record says (`empty_inputs_verified`): then its inputs accept them;
    otherwise they are refused (a GRU/LSTM kernel may abort the process on an empty axis). An
    export or bundle from before the record: the tutorial model's grid ran them, a module's not."""
    recorded = (manifest.get("parity") or {}).get("empty_inputs_verified")
    return bool(recorded) if recorded is not None else not is_module_export(manifest)


def variant_record(manifest: dict[str, Any], variant: str) -> dict[str, Any]:
    """What an export's manifest records of a variant's model besides the classifier (its
    signature, form, op types): under `variants`; the stream's one-step model ("step") under
    variants.stream.step_model. Empty where it records none."""
    variants = manifest.get("variants") or {}
    if variant == "step":
        return (variants.get("stream") or {}).get("step_model") or {}
    return variants.get(variant) or {}


def labels_of(manifest: dict[str, Any]) -> list[str]:
    """The class labels an export or bundle records (top level; older tutorial manifests: in config)."""
    return list(manifest.get("labels") or (manifest.get("config") or {}).get("labels") or [])


def labelled_output(signature: dict[str, Any], labels: Any) -> str | None:
    """The output that scores `labels`: the one output besides the state (h_n), of shape
    [batch, len(labels)], when there are labels; None otherwise (probabilities and a label per
    sample are offered for it)."""
    from gru_deploy.spec import STATE_OUT

    outputs = [o for o in signature["outputs"] if o["name"] != STATE_OUT]
    if labels and len(outputs) == 1 and list(outputs[0]["shape"][1:]) == [len(labels)]:
        return outputs[0]["name"]
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load and validate `folder/manifest.json`; raise UserInputError naming what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise UserInputError(f"{folder}: no such folder; run `gru-deploy export --out {folder}` first")
    if not folder.is_dir():
        raise UserInputError(f"{folder}: not a folder; give an export folder")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise UserInputError(f"{folder}: no {MANIFEST_NAME}; this is not a gru-deploy export folder")
    manifest = parse_manifest(path.read_bytes(), str(path), MANIFEST_FORMAT, MANIFEST_VERSION, REQUIRED_FIELDS)
    check_file_entries(manifest["files"], str(path), nested=False)
    return manifest


def parse_manifest(raw: bytes, where: str, fmt: str, version: int, fields: tuple[str, ...]) -> dict[str, Any]:
    """JSON object with the required fields, the expected format and a supported version."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise UserInputError(f"{where}: must hold a JSON object")
    missing = [key for key in fields if key not in manifest]
    if missing:
        raise UserInputError(f"{where}: lacks field(s) {missing}")
    if manifest["format"] != fmt:
        raise UserInputError(f"{where}: format is {manifest['format']!r}, expected {fmt!r}")
    if type(manifest["format_version"]) is not int or manifest["format_version"] != version:
        raise UserInputError(
            f"{where}: format_version {manifest['format_version']!r} is not supported (this gru-deploy reads {version})"
        )
    return manifest


def check_file_entries(files: Any, where: str, nested: bool) -> None:
    """'files' maps names to {sha256, size}; names are plain file names, or with `nested`,
    relative paths without '..', '.', empty parts or backslashes."""
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and type(v.get("size")) is int and v["size"] >= 0
        for v in files.values()
    ):
        raise UserInputError(f"{where}: 'files' must map names to {{sha256, size}}")
    for name in files:
        if name == MANIFEST_NAME or not safe_relative_name(name, nested):
            kind = "an unsafe path" if nested else "not a plain file name"
            raise UserInputError(f"{where}: file entry {name!r} is {kind}")


def safe_relative_name(name: str, nested: bool) -> bool:
    if not name or "\\" in name:
        return False
    parts = name.split("/")
    if not nested and len(parts) != 1:
        return False
    return not name.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def check_files(folder: Path, manifest: dict[str, Any], names: tuple[str, ...] | None = None) -> None:
    """Check size and sha256 of the listed files (all by default); CheckFailed on mismatch."""
    folder = Path(folder)
    for name in names if names is not None else tuple(manifest["files"]):
        entry = manifest["files"].get(name)
        if entry is None:
            raise UserInputError(f"{folder / MANIFEST_NAME}: lists no file {name!r}")
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise CheckFailed(f"{path}: listed in the manifest but missing (or not a regular file)")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CheckFailed(f"{path}: sha256 does not match the manifest; the file was changed or corrupted")


def find_models(manifest: dict[str, Any], variant: str, fmt: str = "onnx", precision: str = "fp32",
                where: str = "") -> list[str]:
    """Every model file the manifest's "models" record lists for (variant, format, precision)."""
    models = manifest.get("models")
    if not isinstance(models, dict):
        raise UserInputError(f"{where}: the manifest has no 'models' record; re-export or re-package it "
                             "with this gru-deploy")
    return [name for name, info in models.items() if isinstance(info, dict) and info.get("variant") == variant
            and info.get("format") == fmt and info.get("precision", "fp32") == precision]


def select_model(manifest: dict[str, Any], variant: str, fmt: str = "onnx", precision: str = "fp32",
                 where: str = "") -> str:
    """The one model file the manifest lists for (variant, format, precision).

    Files are chosen by what the manifest says they are, never by their names or order;
    UserInputError when the manifest lists none (or, a manifest gru-deploy did not write,
    several).
    """
    found = find_models(manifest, variant, fmt, precision, where)
    if not found:
        have = sorted({f"{i.get('variant')} {i.get('format')} {i.get('precision', 'fp32')}"
                       for i in manifest["models"].values() if isinstance(i, dict)})
        raise UserInputError(f"{where}: no {precision} {fmt} model for the {variant} variant here "
                             f"(it holds: {', '.join(have)})")
    if len(found) > 1:
        raise UserInputError(f"{where}: the manifest lists several {precision} {fmt} {variant} models {found}; "
                             "it is not one gru-deploy wrote")
    return found[0]


def verified_path(folder: Path, manifest: dict[str, Any], name: str) -> Path:
    """The path of a manifest-listed file, after its checksum is checked."""
    check_files(folder, manifest, (name,))
    return Path(folder) / name
