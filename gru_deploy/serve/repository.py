"""What `serve` serves: every ONNX model of one precision that an export's or a bundle's
manifest lists, under its Triton name and with its config.pbtxt, read in one pass.

A server bundle's models keep their own `model_repository/NAME/config.pbtxt`. An export
folder or an edge bundle has no Triton repository: each model gets the name and the config
the server bundle builder would write for it (bundle.triton.triton_name and triton_config, from
the model's signature), whatever the model. A bundle
archive is extracted once and every checksum checked once; the models are then built from
the bytes read here. Files are chosen by what the manifest says they are, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from gru_deploy.errors import UserInputError

VARIANTS = ("classifier", "lengths", "stream")  # the order models are served and listed in


@dataclass
class ServedFile:
    """One ONNX model to serve."""

    name: str  # its Triton model name
    file: str  # the model file, as the manifest names it
    variant: str  # classifier, lengths or stream
    data: bytes  # sha256 checked against the manifest; the graph checked (check_onnx_bytes)
    config: str  # its config.pbtxt (Triton's ModelConfig, text format)


@dataclass
class Repository:
    """The models of one precision of an export or bundle, and what the rest of it says."""

    where: str
    precision: str
    signatures: dict[str, dict[str, Any]]  # per variant served
    labels: list[str]
    answers_empty: bool  # manifest.answers_empty: the grid ran empty sequences and lengths of 0
    files: list[ServedFile]
    left: list[str] = field(default_factory=list)  # listed models serve does not run, and who does

    def get(self, variant: str) -> ServedFile | None:
        return next((f for f in self.files if f.variant == variant), None)


def read_repository(path: Path, precision: str = "fp32") -> Repository:
    """The served models of the export folder or bundle (folder or .tar.gz) at `path`: every
    file checked against the manifest first; UserInputError when it has no ONNX model of
    `precision` to serve."""
    from gru_deploy.serve.user import opened

    with opened(path, precision) as (manifest, where, read, bundle):  # a bundle's every sha256, once
        return _collect(manifest, where, str(Path(path)), precision, read, bundle)


def _collect(manifest: dict[str, Any], where: str, path: str, precision: str, read: Callable[[str], bytes],
             bundle: bool) -> Repository:
    from gru_deploy.bundle.parts import REPOSITORY
    from gru_deploy.bundle.triton import triton_config, triton_name
    from gru_deploy.manifest import answers_empty, find_models, labels_of, model_name, select_model
    from gru_deploy.serve.user import check_module_graph, signature_of

    base = model_name(manifest)
    files, signatures = [], {}
    for variant in VARIANTS:
        if not find_models(manifest, variant, "onnx", precision, where):
            continue
        name = select_model(manifest, variant, "onnx", precision, where)
        data = read(name)
        signatures[variant] = signature_of(manifest, variant, where)
        check_module_graph(data, manifest, name, variant, where, path)
        parts = PurePosixPath(name).parts
        if bundle and manifest["target"] == "server" and len(parts) == 4 and parts[0] == REPOSITORY:
            triton, config_file = parts[1], f"{REPOSITORY}/{parts[1]}/config.pbtxt"  # Triton's repository layout
            if config_file not in manifest["files"]:
                raise UserInputError(f"{where}: {name} has no {config_file}; re-package the bundle")
            config = read(config_file).decode()
        else:
            triton = triton_name(base, variant)
            config = triton_config(triton, "onnxruntime_onnx", signatures[variant])
        files.append(ServedFile(triton, name, variant, data, config))
    if not any(f.variant != "stream" for f in files):
        hint = ("; package the export with `gru-deploy package DIR --target edge --quantize int8` for int8 models"
                if precision == "int8" else "")
        raise UserInputError(f"{where}: no {precision} ONNX classifier or lengths model to serve{hint}")
    left = []
    for name, info in sorted(manifest["models"].items()):
        if isinstance(info, dict) and info.get("format") == "torchscript":
            parts = PurePosixPath(name).parts
            label = parts[1] if bundle and len(parts) == 4 and parts[0] == REPOSITORY else name
            left.append(f"{label} (TorchScript: Triton's pytorch_libtorch backend runs it)")
    return Repository(where, precision, signatures, labels_of(manifest), answers_empty(manifest), files, left)
