"""Bundles: what the user ships, for edge runtimes (ORT format, onnxruntime-web/mobile) and
for server runtimes (a Triton model repository), each with a manifest, checksums, golden
vectors and a README. A bundle is read back only through its manifest.

Everything is built in memory, then written atomically: a folder through a staging folder
that replaces the target, an archive as one temp file renamed into place. Archives are
deterministic (sorted entries, fixed times, owners and modes, gzip without a timestamp).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from gru_deploy.versions import __version__
from gru_deploy.bundle.kubernetes import Deploy, deploy_files
from gru_deploy.bundle.parts import (
    BUNDLE_FORMAT, BUNDLE_VERSION, GOLDEN_DIR, INT8_GOLDEN_TOL, PLATFORMS, REPOSITORY, TARGETS, _quantize,
    check_elsewhere, onnx_info, runtime_record, tensor_json, web_files)
from gru_deploy.bundle.quantize import npy_bytes
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import atomic_write_bytes, json_bytes, sha256_bytes, staged_dir
from gru_deploy.spec import STATE_IN, STATE_OUT

# The variants a bundle carries, where the export has them, and those --quantize int8 quantises.
BUNDLE_VARIANTS = ("classifier", "lengths", "stream")
INT8_VARIANTS = ("classifier", "stream")
# Where a server bundle keeps the export's AOTInductor packages.
AOTI_DIR = "aoti"
# A model in a bundle: its path there, the export file it is copied from, and what it is.
Model = tuple[str, str, str, str]  # (bundle path, export file, variant, format)


def signatures_of(source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each variant's signature, as the export's manifest records it."""
    return {"classifier": source["signature"],
            **{v: entry["signature"] for v, entry in (source.get("variants") or {}).items()}}


def chosen_models(source: dict[str, Any], target: str, where: str) -> list[Model]:
    """What a bundle carries, chosen by what the export's manifest says each file is. Edge: each
    variant's ONNX model, its ORT-format copies and the ExecuTorch programs the export has
    (`--targets executorch`). Server: a Triton repository holding each
    variant in onnxruntime and, but for the stream model (served under the sequence batcher's
    implicit state, onnxruntime only), in libtorch; and the AOTInductor packages the export has
    (`--targets aoti`), under aoti/ (libtorch's AOTIModelPackageLoader loads them; not Triton).
    A program model's export has no TorchScript: its server bundle serves onnxruntime alone."""
    from gru_deploy.bundle.triton import triton_name
    from gru_deploy.manifest import find_models, model_name, select_model

    name = model_name(source)
    out: list[Model] = []
    present = signatures_of(source)
    for variant in (v for v in BUNDLE_VARIANTS if v in present):
        if target == "edge":
            onnx = select_model(source, variant, "onnx", where=where)
            out += [(onnx, onnx, variant, "onnx")] + [(n, n, variant, fmt) for fmt in ("ort", "executorch")
                                                      for n in find_models(source, variant, fmt)]
            continue
        for fmt, file in (("onnx", "model.onnx"), ("torchscript", "model.pt"))[: 1 if variant == "stream" else 2]:
            if fmt == "torchscript" and not find_models(source, variant, fmt):
                continue  # a program model's export: no TorchScript (its programs do not run in Triton's libtorch)
            out.append((f"{REPOSITORY}/{triton_name(name, variant, fmt)}/1/{file}",
                        select_model(source, variant, fmt, where=where), variant, fmt))
        out += [(f"{AOTI_DIR}/{n}", n, variant, "aoti") for n in find_models(source, variant, "aoti")]
    return out


def golden_files(cases: list[dict[str, Any]], model_paths: dict[str, str], int8: dict[str, tuple[str, bytes]],
                 signatures: dict[str, dict[str, Any]]) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """The export's golden cases (check.module_parity.golden_load) for the variants in
    `model_paths` (variant -> the bundle's fp32 ONNX model its cases name), as .npy files and
    golden.json entries: C++, JavaScript or mobile tests read them without Python. Each case of
    an `int8` variant (bundle path, bytes) gets a twin holding the int8 model's own outputs
    (checked at INT8_GOLDEN_TOL on reproduction) and naming the fp32 case."""
    import onnxruntime as ort

    from gru_deploy.check.runners import session_options

    files: dict[str, bytes] = {}
    entries = []

    def entry(name: str, variant: str, model: str, tensors: dict[str, dict[str, np.ndarray]], **extra: Any) -> None:
        case: dict[str, Any] = {"name": name, "variant": variant, "model": model, **extra}
        for kind, arrays in tensors.items():
            case[kind] = case.get(kind) or {}
            for tensor, array in arrays.items():
                path = f"{GOLDEN_DIR}/{name}.{tensor}.npy"
                files[path] = npy_bytes(np.ascontiguousarray(array))
                case[kind][tensor] = {**tensor_json(array), "npy": path}
        entries.append(case)

    sessions = {v: ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
                for v, (_, data) in int8.items()}
    for case in cases:
        variant = case["variant"]
        if variant not in model_paths:
            continue
        entry(case["name"], variant, model_paths[variant], {"inputs": case["inputs"], "outputs": case["outputs"]})
        if variant in int8:
            names = [o["name"] for o in signatures[variant]["outputs"]]
            got = dict(zip(names, sessions[variant].run(names, case["inputs"])))
            entry(f"{case['name']}_int8", variant, int8[variant][0], {"outputs": got}, precision="int8",
                  eager_case=case["name"], atol=INT8_GOLDEN_TOL, rtol=INT8_GOLDEN_TOL,
                  inputs=entries[-1]["inputs"])
    return files, entries


def int8_gates(export_dir: Path, source: dict[str, Any], variant: str, int8_bytes: bytes,
               files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """The int8 gate (quantize.judge_int8) of each output of a quantised variant but its state,
    against the export's TorchScript model of that variant in fp32 (a program model's: its
    torch.export program; checksum-verified: the model's source is not at hand when
    packaging). Returns the verdicts by output; their
    reference rows go into `files`."""
    from gru_deploy.bundle.quantize import gated_outputs, judge_int8
    from gru_deploy.check.module_parity import pytorch_reference
    from gru_deploy.check.runners import run_module

    fmt, name, module = pytorch_reference(export_dir, source, variant)
    signature = signatures_of(source)[variant]
    state = next((tuple(t["shape"][1:]) for t in signature["inputs"] if t["name"] == STATE_IN), None)
    gates = {}
    for output, (gate, rows) in judge_int8(lambda feed: run_module(module, signature, feed), int8_bytes,
                                           gated_outputs(signature), signature["inputs"][0]["shape"][2], state).items():
        gate["reference_file"] = f"{GOLDEN_DIR}/int8_gate.{variant}.{output}.npy"
        gate["reference"] = f"{name} ({'TorchScript' if fmt == 'torchscript' else 'torch.export program'}, fp32)"
        files[gate["reference_file"]] = rows
        gates[output] = gate
    return gates


def runtime_line(runtimes: dict[str, Any]) -> str:
    """The bundle README's line on runtimes: only what ran, and what the models use."""
    ran = [f"onnxruntime {runtimes['bundle_made_with']} (packaging)"] + [
        f"onnxruntime {run['onnxruntime']} (--check-with)" for run in runtimes["checked_with"] if run["passed"]]
    compat = runtimes.get("onnx_compatibility") or {}
    uses = (f"; its ONNX models use opset {compat['max_opset']} at IR {compat['max_ir_version']} at most "
            "(a runtime must support both; each file's are in manifest.json)" if compat else "")
    return f"Made with {', '.join(ran)}{uses}. `gru-deploy verify` reruns the golden vectors in yours."


def readme(target: str, name: str, models: dict[str, dict[str, Any]], signatures: dict[str, dict[str, Any]],
           labels: list[str], runtimes: dict[str, Any], reference: str | None) -> bytes:
    """The bundle's README.txt, written from what the bundle holds."""
    def tensors(entries: list[dict[str, Any]]) -> str:
        return ", ".join(f"{t['name']} {t['dtype']} [{', '.join(map(str, t['shape']))}]" for t in entries)

    title = f"gru-deploy {target} bundle — {name}" + (f" ({reference})" if reference else "")
    lines = [title, "=" * len(title), "", "Models (manifest.json records each one's variant, format, precision, sha256):"]
    lines += [f"  {path:<56} {info['variant']}, {info['format']}, {info['precision']}"
              for path, info in sorted(models.items())]
    lines += ["", "Signatures (a size, or an axis the caller chooses):"]
    lines += [f"  {variant:<11} {tensors(sig['inputs'])} -> {tensors(sig['outputs'])}" for variant, sig in signatures.items()]
    if "stream" in signatures:
        lines.append(f"Streaming: start with {STATE_IN} = zeros, feed chunks of any length, pass {STATE_OUT} on as the "
                     f"next {STATE_IN}.")
    if labels:
        lines.append(f"Labels (index order): {', '.join(labels)}")
    lines += ["", f"  {GOLDEN_DIR}/  fixed inputs and their expected outputs (.npy and golden.json)"]
    if target == "edge":
        lines += ["  web/index.html, web/app.js  a static page: onnxruntime-web (WASM) on the first golden case; serve",
                  "      this folder over HTTP with onnxruntime-web's dist/ copied to web/ort/ (or ?ort=URL/ort.min.js)"]
        if any(info["format"] == "ort" for info in models.values()):
            lines.append("  *.ort, required_operators.config  for onnxruntime mobile or a minimal build")
    else:
        lines += ["  deploy/kserve-inferenceservice.yaml  KServe InferenceService: Triton reading model_repository/",
                  "  deploy/gru-deploy-serve.yaml         Kubernetes Deployment + Service running `gru-deploy serve`",
                  "  deploy/Dockerfile                    the image that Deployment runs",
                  "", "Run:    tritonserver --model-repository=$PWD/model_repository",
                  "        or: gru-deploy serve <this folder or archive> --grpc-port 8001",
                  "Scale:  kubectl apply -f deploy/kserve-inferenceservice.yaml (model_repository/ uploaded to its "
                  "storageUri)", "        or: kubectl apply -f deploy/gru-deploy-serve.yaml (the image from "
                  "deploy/Dockerfile)"]
    lines += ["", runtime_line(runtimes), "Check:  gru-deploy verify <this folder or archive>", ""]
    return "\n".join(lines).encode()


def build_bundle(export_dir: Path, target: str, on_step: Callable[[str], None] | None = None,
                 quantize: str | None = None, check_with: tuple[str, ...] = (),
                 deploy: Deploy | None = None) -> dict[str, bytes]:
    """Every file of a bundle, manifest included, as {relative path: bytes}: the same for the
    tutorial model, a built-in family and your own model.

    Models are chosen by what the export's manifest says they are (chosen_models); golden
    vectors are the export's golden cases (eager PyTorch at export). With `quantize`, int8 copies of the
    classifier and stream models are added and each output but the state is gated against the
    export's TorchScript (int8_gates). With `check_with`, the golden vectors are also run by
    each of those Python interpreters (a venv with another onnxruntime) and the results
    recorded: a failure writes nothing. A server bundle also holds deploy/ (bundle.kubernetes).
    Over 60 lines: one pass from the export's manifest to the bundle's, each step a call.
    """
    from gru_deploy.bundle.triton import triton_config
    from gru_deploy.check.module_parity import golden_load
    from gru_deploy.manifest import check_files, labels_of, model_name, read_manifest
    from gru_deploy.versions import library_versions

    if target not in TARGETS:
        raise UserInputError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if quantize not in (None, "int8"):
        raise UserInputError(f"unknown --quantize {quantize!r}; the choice is int8")
    if quantize and target != "edge":
        raise UserInputError("--quantize int8 is for --target edge (server runtimes run the fp32 models)")
    step = on_step or (lambda message: None)
    export_dir = Path(export_dir)
    source = read_manifest(export_dir)
    check_files(export_dir, source)  # every sha256, before any file is used
    cases = golden_load(export_dir, source)
    name, where = model_name(source), str(export_dir)
    chosen = chosen_models(source, target, where)
    signatures = {v: s for v, s in signatures_of(source).items() if any(m[2] == v for m in chosen)}
    step(f"building the {target} files ({', '.join(signatures)})")
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}
    for path, file, variant, fmt in chosen:
        files[path] = (export_dir / file).read_bytes()
        models[path] = {"variant": variant, "format": fmt, "precision": "fp32", "source": file,
                        **(onnx_info(files[path]) if fmt == "onnx" else {}),
                        **({k: source["models"][file][k] for k in ("backend", "batch", "seq", "form")}
                           if fmt == "executorch" else {})}
        if target == "server" and fmt in PLATFORMS:
            triton = PurePosixPath(path).parts[1]
            files[f"{REPOSITORY}/{triton}/config.pbtxt"] = triton_config(
                triton, PLATFORMS[fmt], signatures[variant], libtorch_names=fmt == "torchscript").encode()
    if target == "edge":
        files.update(web_files())
        if "required_operators.config" in source["files"]:
            files["required_operators.config"] = (export_dir / "required_operators.config").read_bytes()
    # golden cases name each variant's fp32 ONNX model; verify runs them on every model of the variant
    model_paths = {info["variant"]: path for path, info in models.items() if info["format"] == "onnx"}
    int8: dict[str, tuple[str, bytes]] = {}
    quantization: dict[str, Any] | None = None
    if quantize == "int8":
        chosen_fp32 = {model_paths[v]: models[model_paths[v]] for v in INT8_VARIANTS if v in model_paths}
        int8, quantization = _quantize(files, chosen_fp32, source, step)
        models.update(chosen_fp32)
    step("golden vectors: the export's golden cases")
    golden, entries = golden_files(cases, model_paths, int8, signatures)
    files.update(golden)
    references = {"fp32": source["golden"]["computed_by"]}
    if int8:
        import onnxruntime

        references["int8"] = f"the int8 model in onnxruntime {onnxruntime.__version__}"
    for variant, (q_path, q_bytes) in int8.items():
        step(f"judging {q_path} against the export's TorchScript on the int8 gate's sequences")
        gates = quantization["models"][q_path]["gates_vs_eager"] = int8_gates(export_dir, source, variant, q_bytes, files)
        for output, gate in gates.items():
            if not gate["passed"]:
                raise CheckFailed(f"int8 {q_path} fails its gate against {gate['reference']} on output {output}, "
                                  f"{gate['rows']} rows of sequences of 1 to "
                                  f"{max(c[1] for c in gate['inputs']['cases']):,} steps: {gate['reason']}; "
                                  "nothing written")
    atol, rtol = source["parity"]["atol"], source["parity"]["rtol"]
    files[f"{GOLDEN_DIR}/golden.json"] = json_bytes({"format_version": 1, "atol": atol, "rtol": rtol,
                                                    "reference": references, "cases": entries})
    runtimes = runtime_record(models, references, source["versions"].get("onnxruntime", "unknown"))
    check_elsewhere(check_with, files, models, runtimes, step)
    labels = labels_of(source)
    files["README.txt"] = readme(target, name, models, signatures, labels, runtimes,
                                 (source.get("model") or {}).get("reference"))
    deployment = deploy_files(name, deploy or Deploy(), files) if target == "server" else None
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "target": target,
        "gru_deploy_version": __version__,
        "model_name": name,
        **({"model": source["model"]} if "model" in source else {}),
        "signatures": signatures,
        "config": source["config"],
        "labels": labels,
        "models": dict(sorted(models.items())),
        "onnxruntime": runtimes,
        "golden": {"file": f"{GOLDEN_DIR}/golden.json", "atol": atol, "rtol": rtol},
        "quantization": quantization,
        "deploy": deployment,
        "source_export": {"manifest_sha256": sha256_bytes((export_dir / "manifest.json").read_bytes()),
                          "strategy": source["strategy"], "metrics": {k: v for k, v in (source.get("metrics") or {}).items()
                                                                        if k != "loss_history"}},
        "parity": {"passed": source["parity"]["passed"], "atol": atol, "rtol": rtol,
                   **({"empty_inputs_verified": source["parity"]["empty_inputs_verified"]}
                      if "empty_inputs_verified" in source["parity"] else {})},
        "versions": library_versions(),
        "files": {path: {"sha256": sha256_bytes(data), "size": len(data)} for path, data in sorted(files.items())},
    }
    files["manifest.json"] = json_bytes(manifest)
    return files


def archive_bytes(files: dict[str, bytes], root: str) -> bytes:
    """A deterministic .tar.gz: entries under `root/` sorted by name (each folder before its
    contents), mtime 0, owner 0:0 without names, modes 755/644, gzip without a timestamp."""
    entries: dict[str, bytes | None] = {f"{root}/{path}": data for path, data in files.items()}
    for path in list(entries):
        for parent in PurePosixPath(path).parents:
            if str(parent) != ".":
                entries.setdefault(str(parent), None)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            data = entries[name]
            info = tarfile.TarInfo(name)  # its defaults: mtime 0, owner 0:0 without names, mode 644
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def package(export_dir: Path, target: str, out: Path | None = None, archive: bool = False, force: bool = False,
            on_step: Callable[[str], None] | None = None, quantize: str | None = None,
            check_with: tuple[str, ...] = (), deploy: Deploy | None = None) -> tuple[Path, dict[str, Any]]:
    """Build a bundle from an export folder and write it (folder, or .tar.gz with `archive`)."""
    if deploy is not None and (deploy.storage_uri or deploy.image) and target != "server":
        raise UserInputError("--storage-uri and --image are for --target server (its deploy/ files)")
    export_dir = Path(export_dir)
    if out is None:
        out = export_dir.parent / (f"{export_dir.name}-{target}" + (".tar.gz" if archive else ""))
    out = Path(out)
    if archive and not out.name.endswith(".tar.gz"):
        raise UserInputError(f"--archive writes a .tar.gz; give --out ending in .tar.gz, not {out.name}")
    if out.exists() and not force:
        raise UserInputError(f"{out} exists; choose another --out or pass --force to replace it")
    if out.exists() and archive and not out.is_file():
        raise UserInputError(f"{out} exists and is not a file; choose another --out")
    files = build_bundle(export_dir, target, on_step, quantize, check_with, deploy)
    if archive:
        atomic_write_bytes(out, archive_bytes(files, out.name[: -len(".tar.gz")]))
    else:
        with staged_dir(out) as stage:
            for path, data in files.items():
                atomic_write_bytes(stage / path, data)
    return out, json.loads(files["manifest.json"])


__all__ = ["package", "build_bundle", "archive_bytes", "TARGETS"]
