"""Bundles of the user's own model: the export's files chosen through its manifest, golden
vectors from the float64 outputs the export computed from the user's module, and for the
server a Triton repository whose configs follow the recorded signature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gru_deploy import __version__
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import json_bytes, sha256_bytes

# Golden cases (batch, seq): a subset of the export's parity grid, whose float64 outputs it stored.
USER_GOLDEN = ((3, 7), (2, 100))
SERVER_NAME = "model"


def _dims(shape: list[Any]) -> str:
    return "[ " + ", ".join("-1" if isinstance(d, str) else str(d) for d in shape[1:]) + " ]"


def user_triton_config(name: str, platform: str, signature: dict[str, Any], libtorch_names: bool = False,
                       max_batch: int = 64) -> str:
    """config.pbtxt from the signature: the batch axis is Triton's, other named axes are -1."""
    def block(kind: str, tensors: list[dict[str, Any]]) -> str:
        items = []
        for index, tensor in enumerate(tensors):
            label = f"{tensor['name']}__{index}" if libtorch_names else tensor["name"]
            items.append(f'  {{\n    name: "{label}"\n    data_type: TYPE_FP32\n    dims: {_dims(tensor["shape"])}\n  }}')
        return f"{kind} [\n" + ",\n".join(items) + "\n]\n"

    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
            + block("input", signature["inputs"]) + block("output", signature["outputs"])
            + "dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n"
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")


def _golden(export_dir: Path, source: dict[str, Any], model_path: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    from gru_deploy.bundle.package import GOLDEN_DIR, npy_bytes, tensor_json
    from gru_deploy.convert.user import REFERENCE_FILE, case_input
    from gru_deploy.manifest import verified_path

    reference = source.get("reference") or {}
    with np.load(verified_path(export_dir, source, reference.get("file", REFERENCE_FILE)),
                 allow_pickle=False) as data:
        stored = {key: data[key] for key in data.files}
    signature = source["signature"]
    size = signature["inputs"][0]["shape"][2]
    files: dict[str, bytes] = {}
    cases = []
    for index, (batch, seq) in enumerate(USER_GOLDEN):
        name = f"classifier_{index}"
        case: dict[str, Any] = {"name": name, "variant": "classifier", "model": model_path, "inputs": {},
                                "outputs": {}}
        tensors = {"inputs": {"x": case_input(batch, seq, size)}, "outputs": {}}
        for output in signature["outputs"]:
            key = f"{batch}x{seq}/{output['name']}"
            if key not in stored:
                raise UserInputError(f"{export_dir}: {REFERENCE_FILE} lacks {key}; re-export the model")
            tensors["outputs"][output["name"]] = stored[key].astype(np.float32)
        for kind, arrays in tensors.items():
            for tensor_name, array in arrays.items():
                path = f"{GOLDEN_DIR}/{name}.{tensor_name}.npy"
                files[path] = npy_bytes(np.ascontiguousarray(array))
                case[kind][tensor_name] = {**tensor_json(array), "npy": path}
        cases.append(case)
    computed_by = reference.get("computed_by", "the user's module in float64")
    document = {"format_version": 1, "atol": source["parity"]["atol"], "rtol": source["parity"]["rtol"],
                "reference": {"fp32": f"{computed_by}, at export, rounded to float32"}, "cases": cases}
    files[f"{GOLDEN_DIR}/golden.json"] = json_bytes(document)
    return files, document


def build_user_bundle(export_dir: Path, source: dict[str, Any], target: str,
                      step: Callable[[str], None]) -> dict[str, bytes]:
    """Every file of a bundle of a user's model, manifest included, as {relative path: bytes}."""
    from gru_deploy.bundle.package import BUNDLE_FORMAT, BUNDLE_VERSION, REPOSITORY, onnx_info, runtime_record
    from gru_deploy.manifest import find_models, select_model
    from gru_deploy.versions import library_versions

    where = str(export_dir)
    signature = source["signature"]
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}

    def add(path: str, name: str, fmt: str) -> None:
        files[path] = (export_dir / name).read_bytes()
        models[path] = {"variant": "classifier", "format": fmt, "precision": "fp32", "source": name,
                        **(onnx_info(files[path]) if fmt == "onnx" else {})}

    step(f"building the {target} files")
    if target == "edge":
        onnx_path = select_model(source, "classifier", "onnx", where=where)
        add(onnx_path, onnx_path, "onnx")
        for name in find_models(source, "classifier", "ort"):
            add(name, name, "ort")
    else:
        onnx_path = f"{REPOSITORY}/{SERVER_NAME}/1/model.onnx"
        add(onnx_path, select_model(source, "classifier", "onnx", where=where), "onnx")
        files[f"{REPOSITORY}/{SERVER_NAME}/config.pbtxt"] = user_triton_config(
            SERVER_NAME, "onnxruntime_onnx", signature).encode()
        add(f"{REPOSITORY}/{SERVER_NAME}_torchscript/1/model.pt",
            select_model(source, "classifier", "torchscript", where=where), "torchscript")
        files[f"{REPOSITORY}/{SERVER_NAME}_torchscript/config.pbtxt"] = user_triton_config(
            f"{SERVER_NAME}_torchscript", "pytorch_libtorch", signature, libtorch_names=True).encode()
    step("golden vectors from the float64 outputs the export computed from your module")
    golden, document = _golden(export_dir, source, onnx_path)
    files.update(golden)
    runtimes = runtime_record(models, document["reference"], source["versions"].get("onnxruntime", "unknown"))
    files["README.txt"] = (
        f"gru-deploy {target} bundle of {source['model'].get('reference')}\n\n"
        + "".join(f"  {t['name']} {t['dtype']} {t['shape']}\n" for t in signature["inputs"] + signature["outputs"])
        + "\nCheck it: gru-deploy verify <this folder or archive>\n").encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "target": target,
        "gru_deploy_version": __version__,
        "model_name": SERVER_NAME,
        "model": source["model"],
        "signatures": {"classifier": signature},
        "config": source["config"],
        "labels": list(source.get("labels") or []),
        "models": dict(sorted(models.items())),
        "onnxruntime": runtimes,
        "golden": {"file": "golden/golden.json", "atol": document["atol"], "rtol": document["rtol"]},
        "quantization": None,
        "source_export": {"manifest_sha256": sha256_bytes((export_dir / "manifest.json").read_bytes()),
                          "strategy": source["strategy"]},
        "parity": {"passed": source["parity"]["passed"], "atol": document["atol"], "rtol": document["rtol"]},
        "versions": library_versions(),
        "files": {path: {"sha256": sha256_bytes(data), "size": len(data)} for path, data in sorted(files.items())},
    }
    files["manifest.json"] = json_bytes(manifest)
    json.loads(files["manifest.json"])  # a manifest that does not round-trip is a bug here, not later
    return files


def is_user_bundle(manifest: dict[str, Any]) -> bool:
    from gru_deploy.manifest import is_module_export

    return is_module_export(manifest)
