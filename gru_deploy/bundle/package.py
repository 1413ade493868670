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
from gru_deploy.bundle.parts import (  # noqa: F401  (shared with bundle.user; read here by callers)
    BUNDLE_FORMAT, BUNDLE_VERSION, GOLDEN_DIR, INT8_GOLDEN_TOL, MIN_INT8_SHARE, PLATFORMS, REPOSITORY, TARGETS, _quantize, check_elsewhere, check_golden_elsewhere, npy_bytes, onnx_info, runtime_record, tensor_json, web_files)
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import atomic_write_bytes, json_bytes, sha256_bytes, staged_dir
from gru_deploy.spec import OUTPUT_NAME, ModelSpec

from gru_deploy.manifest import TUTORIAL_MODEL_NAME as MODEL_NAME  # noqa: E402  (the Triton base name)
# (variant, batch, seq) of the golden cases; lengths cases use lengths {seq, 1, 0}.
GOLDEN_CASES = (("classifier", 1, 10), ("classifier", 2, 25), ("classifier", 3, 1),
                ("stream", 2, 12), ("lengths", 3, 15))
EDGE_VARIANTS = ("classifier", "stream")


def golden_vectors(export_dir: Path, manifest: dict[str, Any], files: dict[str, str], atol: float, rtol: float,
                   int8: dict[str, tuple[str, bytes]] | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Fixed inputs and the outputs eager PyTorch gives for them, per variant in `files`.

    Written as `.npy` and as plain JSON, so C++, JavaScript or mobile tests can read them
    without Python. `files` maps each variant to the bundle file its cases name. `int8`
    maps a variant to its quantised model (bundle path, bytes): its cases record the int8
    model's own outputs (checked at 1e-4 on reproduction) and name the fp32 case holding
    eager's outputs for the same inputs. The int8 gate is judged apart, against eager on the
    gate's few hundred sequences (quantize.judge_int8), whose eager rows the bundle keeps
    (golden/int8_gate.VARIANT.npy). Returns the files and, per int8 variant, the gate's verdict.
    """
    import onnxruntime
    import torch

    from gru_deploy.bundle.quantize import judge_int8
    from gru_deploy.check.runners import OnnxRuntimeRunner
    from gru_deploy.check.verify import export_runners, make_feed

    spec = ModelSpec.from_dict(manifest["config"])
    out: dict[str, bytes] = {}
    cases: list[dict[str, Any]] = []
    # each variant's eager runner, built once (export_runners loads and checks every file of it)
    eagers = {variant: export_runners(export_dir, manifest, variant=variant)["eager"]
              for variant in dict.fromkeys(v for v, _, _ in GOLDEN_CASES) if variant in files}
    for index, (variant, batch, seq) in enumerate(GOLDEN_CASES):
        if variant not in files:
            continue
        eager = eagers[variant]
        feed = make_feed(spec, variant, batch, seq, seed=1000 + index)
        result = eager.run(feed)
        name = f"{variant}_{index}"
        case: dict[str, Any] = {"name": name, "variant": variant, "model": files[variant],
                                "inputs": {}, "outputs": {}}
        for kind, tensors in (("inputs", feed), ("outputs", result)):
            for tensor_name, array in tensors.items():
                path = f"{GOLDEN_DIR}/{name}.{tensor_name}.npy"
                out[path] = npy_bytes(np.ascontiguousarray(array))
                case[kind][tensor_name] = {**tensor_json(array), "npy": path}
        cases.append(case)
        if int8 and variant in int8:
            model_path, model_bytes = int8[variant]
            got = OnnxRuntimeRunner(spec, model_bytes, variant=variant).run(feed)
            q_name = f"{name}_int8"
            q_case = {"name": q_name, "variant": variant, "model": model_path, "precision": "int8",
                      "eager_case": name, "atol": INT8_GOLDEN_TOL, "rtol": INT8_GOLDEN_TOL,
                      "inputs": case["inputs"], "outputs": {}}
            for tensor_name, array in got.items():
                path = f"{GOLDEN_DIR}/{q_name}.{tensor_name}.npy"
                out[path] = npy_bytes(np.ascontiguousarray(array))
                q_case["outputs"][tensor_name] = {**tensor_json(array), "npy": path}
            cases.append(q_case)
    references = {"fp32": f"eager PyTorch {torch.__version__}"}
    gates = {}
    for variant, (_, model_bytes) in (int8 or {}).items():
        eager = eagers[variant]
        state = (spec.hidden_size,) if variant == "stream" else None
        [(gates[variant], rows)] = judge_int8(eager.run, model_bytes, [OUTPUT_NAME], spec.input_size, state).values()
        gates[variant]["reference_file"] = f"{GOLDEN_DIR}/int8_gate.{variant}.npy"
        out[gates[variant]["reference_file"]] = rows
    if gates:
        references["int8"] = f"the int8 model in onnxruntime {onnxruntime.__version__}"
    document = {"format_version": 1, "atol": atol, "rtol": rtol, "reference": references, "cases": cases}
    out[f"{GOLDEN_DIR}/golden.json"] = json_bytes(document)
    return out, gates


README_EDGE = """gru-deploy edge bundle — {name}
{rule}
A GRU sequence classifier for onnxruntime on devices and in browsers.

  model.onnx / model.ort                 classifier: x float32 [batch, seq, {i}] -> logits [batch, {o}]
  model_stream.onnx / model_stream.ort   streaming: (x [batch, chunk, {i}], h0 [batch, {h}]) -> (logits, h_n)
  required_operators.config              operators for an onnxruntime minimal build (ORT format)
  golden/                                fixed inputs and expected outputs (.npy and golden.json)
  web/index.html, web/app.js             a static page: onnxruntime-web (WASM) on the first golden case
  manifest.json                          signature, labels, sha256 of every file, versions

Labels (index order): {labels}
{runtime_line}
Streaming: start with h0 = zeros, feed chunks of any length, pass h_n on as the next h0.

Python:      onnxruntime.InferenceSession("model.onnx").run(["logits"], {{"x": x}})
JavaScript:  const s = await ort.InferenceSession.create("model.onnx");   // onnxruntime-web / -node
             const out = await s.run({{ x: new ort.Tensor("float32", data, [1, seq, {i}]) }});
Browser:     serve this folder over HTTP, copy onnxruntime-web's dist/ to web/ort/ (or open
             web/index.html?ort=URL/ort.min.js), open http://HOST:PORT/web/index.html
Mobile:      load model.ort with onnxruntime-mobile (or a minimal build from required_operators.config).
Check it:    gru-deploy verify <this folder or archive>
"""

README_SERVER = """gru-deploy server bundle — {name}
{rule}
A Triton Inference Server model repository (also loadable by KServe with Triton):

  model_repository/{name}/               onnxruntime_onnx: x [-1, {i}] -> logits [{o}]; dynamic batching
  model_repository/{name}_lengths/       onnxruntime_onnx: x (padded) + lengths [1] -> logits
  model_repository/{name}_stream/        onnxruntime_onnx with the sequence batcher's implicit state (h0 -> h_n)
  model_repository/{name}_torchscript/   pytorch_libtorch: x__0 -> logits__0 (model.pt, for libtorch / C++)
  golden/                                fixed inputs and expected outputs (.npy and golden.json)
  deploy/kserve-inferenceservice.yaml    KServe InferenceService: Triton reading model_repository/ from storageUri
  deploy/gru-deploy-serve.yaml           Kubernetes Deployment + Service running `gru-deploy serve` on this bundle
  deploy/Dockerfile                      the image that Deployment runs
  manifest.json                          signatures, labels, sha256 of every file, versions

Labels (index order): {labels}
Run:    tritonserver --model-repository=$PWD/model_repository
        or: gru-deploy serve <this folder or archive> --grpc-port 8001
Scale:  kubectl apply -f deploy/kserve-inferenceservice.yaml (model_repository/ uploaded to its storageUri)
        or: kubectl apply -f deploy/gru-deploy-serve.yaml (the image built with deploy/Dockerfile)
Check:  gru-deploy verify <this folder or archive>
"""


# The edge bundle's static page (web/): onnxruntime-web (WASM) runs model.onnx on the first golden
# classifier case and shows the label, the class probabilities and whether the logits match.
# onnxruntime-web itself is not shipped (its wasm is 10+ MB): the page loads ort.min.js from
# ?ort=URL, by default ./ort/ort.min.js (onnxruntime-web's dist/ copied to web/ort/).
# tests/test_examples_browser.py opens it in headless Chromium.


def runtime_line(runtimes: dict[str, Any]) -> str:
    """The bundle README's line on runtimes: only what ran, and what the models use."""
    ran = [f"onnxruntime {runtimes['bundle_made_with']} (packaging)"] + [
        f"onnxruntime {run['onnxruntime']} (--check-with)" for run in runtimes["checked_with"] if run["passed"]]
    compat = runtimes.get("onnx_compatibility") or {}
    uses = (f"; its ONNX models use opset {compat['max_opset']} at IR {compat['max_ir_version']} at most "
            "(a runtime must support both; each file's are in manifest.json)" if compat else "")
    return f"Made with {', '.join(ran)}{uses}. `gru-deploy verify` reruns the golden vectors in yours."


def _readme(target: str, spec: ModelSpec, runtime_line: str) -> bytes:
    template = README_EDGE if target == "edge" else README_SERVER
    title = f"gru-deploy {target} bundle — {MODEL_NAME}"
    return template.format(name=MODEL_NAME, rule="=" * len(title), i=spec.input_size, o=spec.output_size,
                           h=spec.hidden_size, labels=", ".join(spec.labels),
                           runtime_line=runtime_line).encode()


# A model in a bundle: its path there, the export file it is copied from, and what it is.
Model = tuple[str, str, str, str]  # (bundle path, export file, variant, format)


def _edge_models(source: dict[str, Any], where: str) -> list[Model]:
    """The classifier and stream models, .onnx and .ort, as the export's manifest lists them."""
    from gru_deploy.manifest import select_model

    out = []
    for variant in EDGE_VARIANTS:
        for fmt in ("onnx", "ort"):
            name = select_model(source, variant, fmt, where=where)
            out.append((name, name, variant, fmt))
    return out


def _server_models(source: dict[str, Any], where: str) -> list[Model]:
    """A Triton repository: the ONNX classifier, lengths and stream models and the TorchScript classifier."""
    from gru_deploy.bundle.triton import triton_name
    from gru_deploy.manifest import select_model

    layout = (("classifier", "onnx", "model.onnx"), ("lengths", "onnx", "model.onnx"),
              ("stream", "onnx", "model.onnx"), ("classifier", "torchscript", "model.pt"))
    return [(f"{REPOSITORY}/{triton_name(MODEL_NAME, variant, fmt)}/1/{file}",
             select_model(source, variant, fmt, where=where), variant, fmt) for variant, fmt, file in layout]


def build_bundle(export_dir: Path, target: str, on_step: Callable[[str], None] | None = None,
                 quantize: str | None = None, check_with: tuple[str, ...] = (),
                 deploy: Deploy | None = None) -> dict[str, bytes]:
    """Every file of a bundle, manifest included, as {relative path: bytes}.

    Models are chosen by what the export's manifest says they are. With `quantize`, int8
    models are added and gated against eager (quantize.judge_int8, compare.int8_gate). With
    `check_with`, the golden vectors are also run by each of those Python interpreters (a
    venv with another onnxruntime) and the results recorded: a failure writes nothing.
    A server bundle also holds deploy/ (bundle.kubernetes), where `deploy` says.
    """
    from gru_deploy.bundle.triton import triton_config
    from gru_deploy.manifest import check_files, is_module_export, read_manifest
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
    if is_module_export(source):  # your own model: its one model, golden vectors from its float64 outputs
        from gru_deploy.bundle.user import build_user_bundle

        return build_user_bundle(export_dir, source, target, step, quantize, check_with, deploy)
    missing = [v for v in ("stream", "lengths") if v not in (source.get("variants") or {})]
    if missing:
        raise UserInputError(f"{export_dir}: the export lacks the {', '.join(missing)} model(s); re-export it")
    spec = ModelSpec.from_dict(source["config"])
    step(f"building the {target} files")
    where = str(export_dir)
    chosen = _edge_models(source, where) if target == "edge" else _server_models(source, where)
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}
    for path, name, variant, fmt in chosen:
        files[path] = (export_dir / name).read_bytes()
        models[path] = {"variant": variant, "format": fmt, "precision": "fp32", "source": name,
                        **(onnx_info(files[path]) if fmt == "onnx" else {})}
    if target == "edge":
        files["required_operators.config"] = (export_dir / "required_operators.config").read_bytes()
        files.update(web_files())
    else:
        for path, _, variant, fmt in chosen:
            triton = PurePosixPath(path).parts[1]
            files[f"{REPOSITORY}/{triton}/config.pbtxt"] = triton_config(
                triton, PLATFORMS[fmt], spec.signature(variant), libtorch_names=fmt == "torchscript").encode()
    # golden cases name each variant's fp32 ONNX model; verify runs them on every model of the variant
    golden_models = {info["variant"]: path for path, info in models.items() if info["format"] == "onnx"}
    int8: dict[str, tuple[str, bytes]] = {}
    quantization: dict[str, Any] | None = None
    if quantize == "int8":
        int8, quantization = _quantize(files, models, source, step)
    step("computing golden vectors with eager PyTorch")
    atol, rtol = source["parity"]["atol"], source["parity"]["rtol"]
    golden, gates = golden_vectors(export_dir, source, golden_models, atol, rtol, int8)
    files.update(golden)
    if quantization is not None:
        for variant, (q_path, _) in int8.items():
            gate = gates[variant]
            quantization["models"][q_path]["gate_vs_eager"] = gate
            if not gate["passed"]:
                raise CheckFailed(f"int8 {q_path} fails its gate against eager on {gate['rows']} sequences of 1 to "
                                  f"{max(c[1] for c in gate['inputs']['cases']):,} steps: "
                                  f"{gate['reason']}; nothing written")
    golden_doc = json.loads(golden[f"{GOLDEN_DIR}/golden.json"])
    runtimes = runtime_record(models, golden_doc["reference"], source["versions"].get("onnxruntime", "unknown"))
    check_elsewhere(check_with, files, models, runtimes, step)
    files["README.txt"] = _readme(target, spec, runtime_line(runtimes))
    deployment = deploy_files(MODEL_NAME, deploy or Deploy(), files) if target == "server" else None
    variants = {v: spec.signature(v) for v in golden_models}
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "target": target,
        "gru_deploy_version": __version__,
        "model_name": MODEL_NAME,
        "signatures": variants,
        "config": spec.to_dict(),
        "labels": list(spec.labels),
        "models": dict(sorted(models.items())),
        "onnxruntime": runtimes,
        "golden": {"file": f"{GOLDEN_DIR}/golden.json", "atol": atol, "rtol": rtol},
        "quantization": quantization,
        "deploy": deployment,
        "source_export": {"manifest_sha256": sha256_bytes((export_dir / "manifest.json").read_bytes()),
                          "strategy": source["strategy"], "metrics": {k: v for k, v in source["metrics"].items()
                                                                        if k != "loss_history"}},
        "parity": {"passed": source["parity"]["passed"], "atol": atol, "rtol": rtol},
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
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode = len(data), 0o644
            _fix(info)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _fix(info: tarfile.TarInfo) -> None:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""


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


__all__ = ["package", "build_bundle", "archive_bytes", "golden_vectors", "TARGETS"]
