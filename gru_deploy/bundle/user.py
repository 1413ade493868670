"""Bundles of the user's own model: the export's files chosen through its manifest, golden
vectors from the float64 outputs the export computed from the user's module, and for the
server a Triton repository whose configs follow the recorded signature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gru_deploy.versions import __version__
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import json_bytes, sha256_bytes

# Golden cases (batch, seq) per variant: a subset of the export's parity grid, whose float64
# outputs it stored (convert.user.USER_CASES, LENGTHS_CASES).
GOLDEN_BY_VARIANT = {"classifier": ((3, 7), (2, 100)), "lengths": ((3, 7), (4, 100)), "stream": ((3, 7), (2, 100))}
# The variants each target carries, where the export has them. On the server, the stream model
# is served by Triton's sequence batcher with its state kept implicitly (ONNX only, as for the
# tutorial model's bundle).
BUNDLE_VARIANTS = {"edge": ("lengths", "stream"), "server": ("lengths", "stream")}
from gru_deploy.manifest import MODULE_MODEL_NAME as SERVER_NAME  # noqa: E402  (the Triton base name)


def _golden(export_dir: Path, source: dict[str, Any], model_paths: dict[str, str],
            int8: tuple[str, bytes] | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Golden cases from the export's stored float64 outputs, for each variant in `model_paths`
    (variant -> the bundle's model file its cases name); with `int8` (bundle path, bytes), an
    int8 case per classifier input holding the int8 model's own outputs."""
    from gru_deploy.bundle.parts import GOLDEN_DIR, INT8_GOLDEN_TOL, npy_bytes, tensor_json
    from gru_deploy.convert.user import REFERENCE_FILE, UserSignature, case_feed, reference_key
    from gru_deploy.manifest import verified_path

    reference = source.get("reference") or {}
    with np.load(verified_path(export_dir, source, reference.get("file", REFERENCE_FILE)),
                 allow_pickle=False) as data:
        stored = {key: data[key] for key in data.files}
    signatures = {"classifier": source["signature"],
                  **{v: entry["signature"] for v, entry in (source.get("variants") or {}).items()}}
    files: dict[str, bytes] = {}
    cases = []
    if int8 is not None:
        import onnxruntime as ort

        from gru_deploy.check.runners import session_options

        int8_session = ort.InferenceSession(int8[1], session_options(1), providers=["CPUExecutionProvider"])
    golden = [(v, b, s) for v in model_paths for b, s in GOLDEN_BY_VARIANT[v]]
    for index, (variant, batch, seq) in enumerate(golden):
        signature = signatures[variant]
        name = f"{variant}_{index}"
        case: dict[str, Any] = {"name": name, "variant": variant, "model": model_paths[variant], "inputs": {},
                                "outputs": {}}
        tensors = {"inputs": case_feed(UserSignature(signature["inputs"], signature["outputs"]), batch, seq),
                   "outputs": {}}
        for output in signature["outputs"]:
            key = reference_key(variant, batch, seq, output["name"])
            if key not in stored:
                raise UserInputError(f"{export_dir}: {REFERENCE_FILE} lacks {key}; re-export the model")
            tensors["outputs"][output["name"]] = stored[key].astype(np.float32)
        for kind, arrays in tensors.items():
            for tensor_name, array in arrays.items():
                path = f"{GOLDEN_DIR}/{name}.{tensor_name}.npy"
                files[path] = npy_bytes(np.ascontiguousarray(array))
                case[kind][tensor_name] = {**tensor_json(array), "npy": path}
        cases.append(case)
        if int8 is not None and variant == "classifier":
            q_name, q_outputs = f"{name}_int8", {}
            out_names = [o["name"] for o in signature["outputs"]]
            for out_name, got in zip(out_names, int8_session.run(out_names, {"x": tensors["inputs"]["x"]})):
                path = f"{GOLDEN_DIR}/{q_name}.{out_name}.npy"
                files[path] = npy_bytes(np.ascontiguousarray(got))
                q_outputs[out_name] = {**tensor_json(got), "npy": path}
            cases.append({"name": q_name, "variant": "classifier", "model": int8[0], "precision": "int8",
                          "eager_case": name, "atol": INT8_GOLDEN_TOL, "rtol": INT8_GOLDEN_TOL,
                          "inputs": case["inputs"], "outputs": q_outputs})
    computed_by = reference.get("computed_by", "the user's module in float64")
    references = {"fp32": f"{computed_by}, at export, rounded to float32"}
    if int8 is not None:
        import onnxruntime

        references["int8"] = f"the int8 model in onnxruntime {onnxruntime.__version__}"
    document = {"format_version": 1, "atol": source["parity"]["atol"], "rtol": source["parity"]["rtol"],
                "reference": references, "cases": cases}
    files[f"{GOLDEN_DIR}/golden.json"] = json_bytes(document)
    return files, document


def _int8_gates(export_dir: Path, source: dict[str, Any], int8_bytes: bytes,
                files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """The int8 gate of every output against the export's TorchScript classifier (fp32;
    checksum-verified): the user's module is not at hand when packaging. Returns the verdicts by
    output; their reference rows go into `files`."""
    import torch

    from gru_deploy.bundle.parts import GOLDEN_DIR
    from gru_deploy.bundle.quantize import judge_int8
    from gru_deploy.convert import script
    from gru_deploy.convert.user import as_outputs
    from gru_deploy.manifest import select_model, verified_path

    name = select_model(source, "classifier", "torchscript", where=str(export_dir))
    scripted = script.load(verified_path(export_dir, source, name))
    signature = source["signature"]
    outputs = [o["name"] for o in signature["outputs"]]

    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {o: t.numpy() for o, t in zip(outputs, as_outputs(scripted(torch.from_numpy(feed["x"])), name))}

    gates = {}
    for output, (gate, rows) in judge_int8(reference, int8_bytes, outputs, signature["inputs"][0]["shape"][2]).items():
        gate["reference_file"] = f"{GOLDEN_DIR}/int8_gate.classifier.{output}.npy"
        gate["reference"] = f"{name} (TorchScript, fp32)"
        files[gate["reference_file"]] = rows
        gates[output] = gate
    return gates


def build_user_bundle(export_dir: Path, source: dict[str, Any], target: str,
                      step: Callable[[str], None], quantize: str | None = None,
                      check_with: tuple[str, ...] = (), deploy: Any = None) -> dict[str, bytes]:
    """Every file of a bundle of a user's model, manifest included, as {relative path: bytes}.
    With quantize="int8" (edge), an int8 copy of the ONNX model, gated against the export's
    TorchScript on the int8 gate's sequences, every output held to the gate."""
    from gru_deploy.bundle.parts import (BUNDLE_FORMAT, BUNDLE_VERSION, REPOSITORY, _quantize,
                                           check_elsewhere, onnx_info, runtime_record, web_files)
    from gru_deploy.bundle.triton import triton_config, triton_name
    from gru_deploy.errors import CheckFailed
    from gru_deploy.manifest import find_models, select_model
    from gru_deploy.versions import library_versions

    where = str(export_dir)
    signature = source["signature"]
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}

    def add(path: str, name: str, fmt: str, variant: str) -> None:
        files[path] = (export_dir / name).read_bytes()
        models[path] = {"variant": variant, "format": fmt, "precision": "fp32", "source": name,
                        **(onnx_info(files[path]) if fmt == "onnx" else {})}

    variants = ["classifier"] + [v for v in BUNDLE_VARIANTS[target] if v in (source.get("variants") or {})]
    signatures = {"classifier": signature, **{v: source["variants"][v]["signature"] for v in variants[1:]}}
    step(f"building the {target} files ({', '.join(variants)})")
    onnx_paths: dict[str, str] = {}
    for variant in variants:
        if target == "edge":
            onnx_paths[variant] = select_model(source, variant, "onnx", where=where)
            add(onnx_paths[variant], onnx_paths[variant], "onnx", variant)
            for name in find_models(source, variant, "ort"):
                add(name, name, "ort", variant)
        else:
            triton = triton_name(SERVER_NAME, variant)
            onnx_paths[variant] = f"{REPOSITORY}/{triton}/1/model.onnx"
            add(onnx_paths[variant], select_model(source, variant, "onnx", where=where), "onnx", variant)
            files[f"{REPOSITORY}/{triton}/config.pbtxt"] = triton_config(
                triton, "onnxruntime_onnx", signatures[variant]).encode()
            if variant == "stream":
                continue  # the stream model runs in onnxruntime under the sequence batcher only
            torchscript = triton_name(SERVER_NAME, variant, "torchscript")
            add(f"{REPOSITORY}/{torchscript}/1/model.pt",
                select_model(source, variant, "torchscript", where=where), "torchscript", variant)
            files[f"{REPOSITORY}/{torchscript}/config.pbtxt"] = triton_config(
                torchscript, "pytorch_libtorch", signatures[variant], libtorch_names=True).encode()
    if target == "edge":  # the page that runs the first golden case in a browser (onnxruntime-web)
        files.update(web_files())
    quantization = None
    int8 = None
    if quantize == "int8":
        classifier = {onnx_paths["classifier"]: models[onnx_paths["classifier"]]}  # the classifier only
        quantized, quantization = _quantize(files, classifier, source, step)
        models.update(classifier)
        int8 = quantized["classifier"]
    step("golden vectors from the float64 outputs the export computed from your module")
    golden, document = _golden(export_dir, source, onnx_paths, int8)
    files.update(golden)
    if int8 is not None:
        step("judging the int8 model against model.pt on the int8 gate's sequences")
        gates = quantization["models"][int8[0]]["gates_vs_eager"] = _int8_gates(export_dir, source, int8[1], files)
        for output, gate in gates.items():
            if not gate["passed"]:
                raise CheckFailed(f"int8 {int8[0]} fails its gate against TorchScript (fp32) on output {output}, "
                                  f"{gate['rows']} rows of sequences of 1 to "
                                  f"{max(c[1] for c in gate['inputs']['cases']):,} steps: {gate['reason']}; "
                                  "nothing written")
    runtimes = runtime_record(models, document["reference"], source["versions"].get("onnxruntime", "unknown"))
    check_elsewhere(check_with, files, models, runtimes, step)  # golden cases in other Pythons' onnxruntime
    files["README.txt"] = (
        f"gru-deploy {target} bundle of {source['model'].get('reference')}\n\n"
        + "".join(f"  {t['name']} {t['dtype']} {t['shape']}\n" for t in signature["inputs"] + signature["outputs"])
        + "\nCheck it: gru-deploy verify <this folder or archive>\n"
        + ("Serve it: gru-deploy serve <this folder or archive> --grpc-port 8001\n"
           "Scale it: kubectl apply -f deploy/kserve-inferenceservice.yaml (Triton; model_repository/ uploaded to "
           "its storageUri)\n          or kubectl apply -f deploy/gru-deploy-serve.yaml (the image from "
           "deploy/Dockerfile)\n" if target == "server" else "")).encode()
    deployment = None
    if target == "server":
        from gru_deploy.bundle.kubernetes import Deploy, deploy_files

        deployment = deploy_files(SERVER_NAME, deploy or Deploy(), files)
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "target": target,
        "gru_deploy_version": __version__,
        "model_name": SERVER_NAME,
        "model": source["model"],
        "signatures": signatures,
        "config": source["config"],
        "labels": list(source.get("labels") or []),
        "models": dict(sorted(models.items())),
        "onnxruntime": runtimes,
        "golden": {"file": "golden/golden.json", "atol": document["atol"], "rtol": document["rtol"]},
        "quantization": quantization,
        "deploy": deployment,
        "source_export": {"manifest_sha256": sha256_bytes((export_dir / "manifest.json").read_bytes()),
                          "strategy": source["strategy"]},
        "parity": {"passed": source["parity"]["passed"], "atol": document["atol"], "rtol": document["rtol"]},
        "versions": library_versions(),
        "files": {path: {"sha256": sha256_bytes(data), "size": len(data)} for path, data in sorted(files.items())},
    }
    files["manifest.json"] = json_bytes(manifest)
    json.loads(files["manifest.json"])  # a manifest that does not round-trip is a bug here, not later
    return files
