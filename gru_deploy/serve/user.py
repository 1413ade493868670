"""Inference on an export of the user's own model: every output of the signature the manifest
records, from the ONNX file it lists, with the input checked before onnxruntime sees it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.check.runners import check_user_input, check_user_lengths, check_user_state  # noqa: F401
from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN


@dataclass
class UserPrediction:
    outputs: dict[str, np.ndarray]
    signature: dict[str, Any]
    model: str  # the model file that ran, as the manifest names it

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "signature": self.signature,
                "outputs": {name: {"shape": list(value.shape), "data": value.tolist()}
                            for name, value in self.outputs.items()}}

    def lines(self, limit: int = 8) -> list[str]:
        """A readable summary: per sample, the argmax of each class-like output (per step for a
        per-step output), else the values; at most `limit` samples."""
        out = []
        for spec in self.signature["outputs"]:
            name, shape = spec["name"], spec["shape"]
            value = self.outputs[name]
            out.append(f"{name} {list(value.shape)} ({', '.join(str(d) for d in shape)})")
            for i, row in enumerate(value[:limit]):
                if row.ndim == 1 and row.size > 1:
                    out.append(f"  sample {i}: argmax {int(row.argmax())}  " + " ".join(f"{v:.4f}" for v in row[:8])
                               + (" ..." if row.size > 8 else ""))
                elif row.ndim == 2 and shape[1] == "seq":
                    steps = row.argmax(axis=-1)
                    out.append(f"  sample {i}: argmax per step " + " ".join(str(int(s)) for s in steps[:40])
                               + (" ..." if steps.size > 40 else ""))
                else:
                    flat = np.ravel(row)
                    out.append(f"  sample {i}: " + " ".join(f"{v:.4f}" for v in flat[:8]) + (" ..." if flat.size > 8 else ""))
            if value.shape[0] > limit:
                out.append(f"  ... {value.shape[0] - limit} more samples (--json prints all)")
        return out


HOOKS = {"lengths": "forward_lengths", "stream": "forward_stream (and initial_state)"}


def requested_variant(lengths: Any, stream: bool = False) -> str:
    """'lengths' when lengths are given, 'stream' when a state goes in or out, else 'classifier'."""
    if lengths is not None and stream:
        raise UserInputError("give lengths or a state (--state-in/--state-out), not both: the stream model takes "
                             "unpadded chunks")
    return "lengths" if lengths is not None else "stream" if stream else "classifier"


def signature_of(manifest: dict[str, Any], variant: str, where: str) -> dict[str, Any]:
    """A variant's signature in an export's or a bundle's manifest; a variant the module does
    not define is a user error saying which hook it lacks."""
    if variant == "classifier":
        return manifest.get("signature") or manifest.get("signatures", {}).get("classifier")
    signature = (manifest.get("variants") or {}).get(variant, {}).get("signature") \
        or (manifest.get("signatures") or {}).get(variant)
    if signature is None:
        raise UserInputError(f"{where}: this model has no {variant} variant (its module defines no "
                             f"@torch.jit.export {HOOKS[variant]})" + (
                                 ": send each sequence unpadded, without lengths" if variant == "lengths" else
                                 ": send whole sequences, without a state (--state-in/--state-out)"))
    return signature


@dataclass
class ModuleFile:
    """One ONNX model of a module's export or bundle, as its manifest describes it."""

    name: str  # as the manifest lists it
    data: bytes  # checksum-checked, its op types the recorded ones
    variant: str
    signature: dict[str, Any]
    labels: list[str]
    where: str


def module_file(path: Path, variants: str | tuple[str, ...], precision: str = "fp32",
                manifest: dict[str, Any] | None = None) -> ModuleFile:
    """The ONNX model of the first of `variants` that a module's export or bundle at `path` has
    in `precision` (the last one is required: its absence is the user error signature_of
    gives), read through the manifest: checksums checked, and its graph refused if it holds an
    op type other than the ones the manifest records. `manifest`: an export's, already read."""
    from gru_deploy.bundle.read import check_bundle_files, is_bundle, open_bundle
    from gru_deploy.manifest import find_models, select_model, verified_path

    wanted = (variants,) if isinstance(variants, str) else variants

    def choose(manifest: dict[str, Any], where: str) -> tuple[str, str]:
        variant = next((v for v in wanted[:-1] if find_models(manifest, v, "onnx", precision, where)), wanted[-1])
        signature_of(manifest, variant, where)
        return variant, select_model(manifest, variant, "onnx", precision, where=where)

    path = Path(path)
    if manifest is None and is_bundle(path):
        with open_bundle(path) as (folder, manifest):
            check_bundle_files(folder, manifest)
            where = f"{path} ({manifest['target']} bundle)"
            variant, name = choose(manifest, where)
            data = (folder / name).read_bytes()
    else:
        manifest = manifest if manifest is not None else user_export(path)
        where = str(path)
        variant, name = choose(manifest, where)
        data = verified_path(path, manifest, name).read_bytes()
    check_module_graph(data, manifest, name, variant, where, str(path))
    return ModuleFile(name, data, variant, signature_of(manifest, variant, where), list(manifest.get("labels") or []),
                      where)


def check_module_graph(data: bytes, manifest: dict[str, Any], name: str, variant: str, where: str, path: str) -> None:
    """Refuse a module's ONNX graph (`name`, of `variant`, as the manifest of an export or a
    bundle lists it) that holds an op type other than the ones the manifest records."""
    from gru_deploy.bundle.package import BUNDLE_FORMAT
    from gru_deploy.convert.graphs import check_onnx_bytes

    if manifest.get("format") == BUNDLE_FORMAT:  # a bundle records each file's op types
        recorded = manifest["models"][name].get("op_types")
    else:
        recorded = ((manifest.get("onnx") or {}) if variant == "classifier"
                    else (manifest.get("variants") or {}).get(variant, {})).get("op_types")
    if not isinstance(recorded, (dict, list)):
        raise UserInputError(f"{where}: the manifest does not record {name}'s op types; re-export or re-package it")
    check_onnx_bytes(data, f"{path}: {name}", known=frozenset(recorded))


def _run(file: ModuleFile, x: Any, threads: int, lengths: Any, state: Any) -> UserPrediction:
    """Every output of `file`'s model on x (and lengths or a state, as its variant takes), each
    input checked before onnxruntime sees it."""
    import onnxruntime as ort

    from gru_deploy.check.runners import session_options

    signature = file.signature
    x = check_user_input(x, signature)
    feed = {INPUT_NAME: x}
    if file.variant == "lengths":
        feed[LENGTHS_NAME] = check_user_lengths(lengths, x)
    if file.variant == "stream":
        feed[STATE_IN] = check_user_state(state, x, signature)
    session = ort.InferenceSession(file.data, session_options(threads), providers=["CPUExecutionProvider"])
    names = [o["name"] for o in signature["outputs"]]
    return UserPrediction(dict(zip(names, session.run(names, feed))), signature, file.name)


def infer_user(folder: Path, manifest: dict[str, Any], x: Any, threads: int = 1,
               lengths: Any = None, state: Any = None, stream: bool = False) -> UserPrediction:
    """Run the ONNX model an export's manifest lists (checksum checked) on x — with `lengths`,
    its lengths variant on the padded x; with `stream` (or a `state`), its stream variant from
    that state (zeros when None), h_n among the outputs — and return every output by name."""
    variant = requested_variant(lengths, stream or state is not None)
    return _run(module_file(folder, variant, manifest=manifest), x, threads, lengths, state)


def infer_user_bundle(path: Path, x: Any, threads: int = 1, precision: str = "fp32",
                      lengths: Any = None, state: Any = None, stream: bool = False) -> UserPrediction:
    """The same on a bundle of a user's model (folder or archive), every file checked first;
    `precision` int8 runs the bundle's int8 model (package --quantize int8)."""
    variant = requested_variant(lengths, stream or state is not None)
    return _run(module_file(path, variant, precision), x, threads, lengths, state)


def user_model_kind(path: Path) -> str | None:
    """'export' or 'bundle' when `path` holds the user's own model; None otherwise (the tutorial
    path reports what is wrong with anything else)."""
    from gru_deploy.bundle.read import is_bundle, open_bundle
    from gru_deploy.bundle.user import is_user_bundle

    path = Path(path)
    if not path.exists():
        return None
    try:
        bundle = is_bundle(path)
    except UserInputError:
        return None
    if bundle:
        with open_bundle(path) as (_, manifest):
            return "bundle" if is_user_bundle(manifest) else None
    return "export" if user_export(path) is not None else None


def user_export(path: Path) -> dict[str, Any] | None:
    """The manifest of an export folder of the user's own model; None for anything else (a
    bundle, a tutorial export, a path that is not an export folder: the tutorial path reports
    those)."""
    from gru_deploy.bundle.read import is_bundle
    from gru_deploy.convert.user import is_user_export
    from gru_deploy.manifest import MANIFEST_NAME, read_manifest

    path = Path(path)
    if not path.is_dir() or not (path / MANIFEST_NAME).is_file() or is_bundle(path):
        return None
    manifest = read_manifest(path)
    return manifest if is_user_export(manifest) else None
