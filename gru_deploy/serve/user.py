"""Choosing a model file of an export or a bundle through its manifest, by variant and
precision, with its signature and its graph checked against what the manifest records (every
model alike); and telling a module's export or bundle (for the streaming API) apart."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from gru_deploy.errors import UserInputError


HOOKS = {"lengths": "forward_lengths", "stream": "forward_stream (and initial_state)"}


def requested_variant(lengths: Any, stream: bool = False) -> str:
    """'lengths' when lengths are given, 'stream' when a state goes in or out, else 'classifier'."""
    if lengths is not None and stream:
        raise UserInputError("--lengths cannot be combined with --state-in/--state-out (give lengths or a state, "
                             "not both): pad and use lengths, or stream unpadded chunks")
    return "lengths" if lengths is not None else "stream" if stream else "classifier"


def signature_of(manifest: dict[str, Any], variant: str, where: str) -> dict[str, Any]:
    """A variant's signature in an export's or a bundle's manifest; a variant the module does
    not define is a user error saying which hook it lacks."""
    if variant == "classifier":
        return manifest.get("signature") or manifest.get("signatures", {}).get("classifier")
    from gru_deploy.manifest import variant_record

    signature = variant_record(manifest, variant).get("signature") or (manifest.get("signatures") or {}).get(variant)
    if signature is None:
        raise UserInputError(f"{where}: this model has no {variant} variant (its module defines no "
                             f"@torch.jit.export {HOOKS[variant]})" + (
                                 ": send each sequence unpadded, without lengths" if variant == "lengths" else
                                 ": send whole sequences, without a state (--state-in/--state-out)"))
    return signature


@contextmanager
def opened(path: Path, precision: str, manifest: dict[str, Any] | None = None
           ) -> Iterator[tuple[dict[str, Any], str, Callable[[str], bytes], bool]]:
    """The manifest of the export or bundle (folder or .tar.gz) at `path` (`manifest`: an export's,
    already read), where it is for messages, a reader of its files that checks them against the
    manifest (a bundle's every checksum checked once, on opening), and whether it is a bundle."""
    from gru_deploy.bundle.read import check_bundle_files, is_bundle, open_bundle
    from gru_deploy.manifest import PRECISIONS, read_manifest, verified_path

    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    path = Path(path)
    if manifest is None and is_bundle(path):
        with open_bundle(path) as (folder, manifest):
            check_bundle_files(folder, manifest)
            yield manifest, f"{path} ({manifest['target']} bundle)", lambda name: (folder / name).read_bytes(), True
    else:
        manifest = manifest if manifest is not None else read_manifest(path)
        yield manifest, str(path), lambda name: verified_path(path, manifest, name).read_bytes(), False


@dataclass
class ModuleFile:
    """One ONNX model of a module's export or bundle, as its manifest describes it."""

    name: str  # as the manifest lists it
    data: bytes  # checksum-checked, its op types the recorded ones
    variant: str
    signature: dict[str, Any]
    labels: list[str]
    where: str
    answers_empty: bool  # manifest.answers_empty
    module: bool  # manifest.is_module_export: a module's export or bundle (a family's, your own)
    step_listed: bool = False  # the manifest lists a one-step model of this precision (model_step.onnx)


def module_file(path: Path, variants: str | tuple[str, ...], precision: str = "fp32",
                manifest: dict[str, Any] | None = None) -> ModuleFile:
    """The ONNX model of the first of `variants` that the export or bundle at `path` has in
    `precision` (the last one is required: its absence is the user error signature_of gives),
    read through the manifest: checksums checked, and its graph refused if it holds an op type
    other than the ones the manifest records. `manifest`: an export's, already read."""
    from gru_deploy.manifest import answers_empty, find_models, is_module_export, labels_of, select_model

    wanted = (variants,) if isinstance(variants, str) else variants

    def choose(manifest: dict[str, Any], where: str) -> tuple[str, str]:
        variant = next((v for v in wanted[:-1] if find_models(manifest, v, "onnx", precision, where)), wanted[-1])
        signature_of(manifest, variant, where)
        try:
            return variant, select_model(manifest, variant, "onnx", precision, where=where)
        except UserInputError as exc:
            hint = ("; an export holds fp32 models (package --quantize int8 makes an int8 one: `gru-deploy package "
                    "DIR --target edge --quantize int8`)" if precision == "int8" else
                    "; an edge bundle carries the classifier and stream models only: use an export folder or a "
                    "server bundle (`gru-deploy package DIR --target server`)"
                    if manifest.get("target") == "edge" and variant == "lengths" else "")
            raise UserInputError(f"{exc}{hint}") from None

    path = Path(path)
    with opened(path, precision, manifest) as (manifest, where, read, _):
        variant, name = choose(manifest, where)
        data = read(name)
    check_module_graph(data, manifest, name, variant, where, str(path))
    return ModuleFile(name, data, variant, signature_of(manifest, variant, where), labels_of(manifest), where,
                      answers_empty(manifest), is_module_export(manifest),
                      bool(find_models(manifest, "step", "onnx", precision, where)))


def check_module_graph(data: bytes, manifest: dict[str, Any], name: str, variant: str, where: str, path: str) -> None:
    """Refuse a module's ONNX graph (`name`, of `variant`, as the manifest of an export or a
    bundle lists it) that holds an op type other than the ones the manifest records."""
    from gru_deploy.bundle.package import BUNDLE_FORMAT
    from gru_deploy.convert.graphs import check_onnx_bytes
    from gru_deploy.manifest import variant_record

    if manifest.get("format") == BUNDLE_FORMAT:  # a bundle records each file's op types
        recorded = manifest["models"][name].get("op_types")
    else:
        recorded = ((manifest.get("onnx") or {}) if variant == "classifier"
                    else variant_record(manifest, variant)).get("op_types")
    if not isinstance(recorded, (dict, list)):
        raise UserInputError(f"{where}: the manifest does not record {name}'s op types; re-export or re-package it")
    check_onnx_bytes(data, f"{path}: {name}", known=frozenset(recorded))
