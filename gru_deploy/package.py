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

from gru_deploy import __version__
from gru_deploy.errors import UserInputError
from gru_deploy.manifest import atomic_write_bytes, json_bytes, sha256_bytes, staged_dir
from gru_deploy.spec import OUTPUT_NAME, STATE_IN, STATE_OUT, VARIANT_IO, ModelSpec

BUNDLE_FORMAT = "gru-deploy-bundle"
BUNDLE_VERSION = 1
TARGETS = ("edge", "server")
MIN_ONNXRUNTIME = "1.17"
TESTED_OLD_ONNXRUNTIME = "1.17.3"  # tests/test_ort117.py runs the edge bundle's golden vectors there
MODEL_NAME = "gru_classifier"
GOLDEN_DIR = "golden"
# (variant, batch, seq) of the golden cases; lengths cases use lengths {seq, 1, 0}.
GOLDEN_CASES = (("classifier", 1, 10), ("classifier", 2, 25), ("classifier", 3, 1),
                ("stream", 2, 12), ("lengths", 3, 15))
EDGE_VARIANTS = ("classifier", "stream")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _tensor_json(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}


INT8_GOLDEN_TOL = 1e-4  # an int8 model against its own recorded outputs (runtime rounding may differ)


def golden_vectors(export_dir: Path, manifest: dict[str, Any], variants: tuple[str, ...], files: dict[str, str],
                   atol: float, rtol: float, int8: dict[str, tuple[str, bytes]] | None = None
                   ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Fixed inputs and the outputs eager PyTorch (the tutorial's loop) gives for them.

    Written as `.npy` and as plain JSON, so C++, JavaScript or mobile tests can read them
    without Python. `files` maps each variant to the bundle file the case is checked on.
    `int8` maps a variant to its quantised model (path, bytes): its cases record the int8
    model's own outputs (checked at 1e-4), and the int8-vs-eager error is returned as parity.
    """
    from gru_deploy.compare import compare
    from gru_deploy.runners import OnnxRuntimeRunner
    from gru_deploy.verify import export_runners, make_feed

    spec = ModelSpec.from_dict(manifest["config"])
    out: dict[str, bytes] = {}
    cases: list[dict[str, Any]] = []
    parity: dict[str, list[dict[str, Any]]] = {}
    for index, (variant, batch, seq) in enumerate(GOLDEN_CASES):
        if variant not in variants:
            continue
        eager = export_runners(export_dir, manifest, variant=variant)["eager"]
        feed = make_feed(spec, variant, batch, seq, seed=1000 + index)
        result = eager.run(feed)
        name = f"{variant}_{index}"
        case: dict[str, Any] = {"name": name, "variant": variant, "model": files[variant],
                                "inputs": {}, "outputs": {}}
        for kind, tensors in (("inputs", feed), ("outputs", result)):
            for tensor_name, array in tensors.items():
                path = f"{GOLDEN_DIR}/{name}.{tensor_name}.npy"
                out[path] = _npy(np.ascontiguousarray(array))
                case[kind][tensor_name] = {**_tensor_json(array), "npy": path}
        cases.append(case)
        if int8 and variant in int8:
            model_path, model_bytes = int8[variant]
            got = OnnxRuntimeRunner(spec, model_bytes, variant=variant).run(feed)
            q_name = f"{name}_int8"
            q_case = {"name": q_name, "variant": variant, "model": model_path, "quantized": "int8",
                      "atol": INT8_GOLDEN_TOL, "rtol": INT8_GOLDEN_TOL, "inputs": case["inputs"], "outputs": {}}
            for tensor_name, array in got.items():
                path = f"{GOLDEN_DIR}/{q_name}.{tensor_name}.npy"
                out[path] = _npy(np.ascontiguousarray(array))
                q_case["outputs"][tensor_name] = {**_tensor_json(array), "npy": path}
            cases.append(q_case)
            c = compare(result[OUTPUT_NAME], got[OUTPUT_NAME])
            parity.setdefault(variant, []).append({"case": name, "max_abs": c.max_abs,
                                                   "argmax_agreement": c.argmax_agreement})
    document = {"format_version": 1, "atol": atol, "rtol": rtol,
                "reference": "eager PyTorch (the tutorial's loop); int8 cases: the int8 model's own outputs",
                "cases": cases}
    out[f"{GOLDEN_DIR}/golden.json"] = json_bytes(document)
    summary = {v: {"max_abs_vs_eager": max(r["max_abs"] for r in rows),
                   "argmax_agreement": min(r["argmax_agreement"] for r in rows), "cases": rows}
               for v, rows in parity.items()}
    return out, summary


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _onnx_info(data: bytes) -> dict[str, Any]:
    import onnx

    from gru_deploy.export import count_ops

    model = onnx.load_from_string(data)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"ir_version": int(model.ir_version), "opset": opset, "op_types": count_ops(model.graph)}


def _dims(shape: list[Any]) -> str:
    return "[ " + ", ".join("-1" if isinstance(d, str) else str(d) for d in shape[1:]) + " ]"


_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def _io_block(kind: str, spec: ModelSpec, names: tuple[str, ...], rename: Callable[[str, int], str]) -> str:
    blocks = []
    for index, name in enumerate(names):
        tensor = spec.tensor(name)
        extra = ""
        if len(tensor["shape"]) == 1:  # a per-sample scalar ([batch]): Triton wants dims [1]
            dims, extra = "[ 1 ]", "\n    reshape: { shape: [ ] }"
        else:
            dims = _dims(tensor["shape"])
        blocks.append(f'  {{\n    name: "{rename(name, index)}"\n    data_type: {_TYPES[tensor["dtype"]]}\n'
                      f"    dims: {dims}{extra}\n  }}")
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"


def triton_config(name: str, platform: str, spec: ModelSpec, variant: str, max_batch: int = 64,
                  libtorch_names: bool = False) -> str:
    """config.pbtxt for one model: variable dims as -1, max_batch_size, dynamic or sequence batching."""
    inputs, outputs = VARIANT_IO[variant]
    if libtorch_names:  # the pytorch backend maps tensors by position: <name>__<index>
        def rename(n: str, i: int) -> str:
            return f"{n}__{i}"
    else:
        def rename(n: str, i: int) -> str:
            return n
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
    if variant == "stream":
        # Implicit state: Triton keeps h between the requests of one sequence (zeros at start).
        state = [n for n in inputs if n == STATE_IN]
        inputs = tuple(n for n in inputs if n != STATE_IN)
        outputs = tuple(n for n in outputs if n != STATE_OUT)
        text += _io_block("input", spec, inputs, rename) + _io_block("output", spec, outputs, rename)
        hidden = spec.hidden_size
        text += (
            "sequence_batching {\n  max_sequence_idle_microseconds: 60000000\n"
            "  state [\n    {\n"
            f'      input_name: "{state[0]}"\n      output_name: "{STATE_OUT}"\n'
            f"      data_type: TYPE_FP32\n      dims: [ {hidden} ]\n"
            "      initial_state: {\n        data_type: TYPE_FP32\n"
            f'        dims: [ {hidden} ]\n        zero_data: true\n        name: "zeros"\n      }}\n'
            "    }\n  ]\n}\n"
        )
    else:
        text += _io_block("input", spec, inputs, rename) + _io_block("output", spec, outputs, rename)
        text += "dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n"
    text += "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    return text


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
Needs onnxruntime >= {min_ort} (IR and opset of each file are in manifest.json).
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
  manifest.json                          signatures, labels, sha256 of every file, versions

Labels (index order): {labels}
Run:    tritonserver --model-repository=$PWD/model_repository
Check:  gru-deploy verify <this folder or archive>
"""


# The edge bundle's static page (web/): onnxruntime-web (WASM) runs model.onnx on the first golden
# classifier case and shows the label, the class probabilities and whether the logits match.
# onnxruntime-web itself is not shipped (its wasm is 10+ MB): the page loads ort.min.js from
# ?ort=URL, by default ./ort/ort.min.js (onnxruntime-web's dist/ copied to web/ort/).
# tests/test_examples_browser.py opens it in headless Chromium.

def web_files() -> dict[str, bytes]:
    """The page files (gru_deploy/web/, shipped as package data), as bundle paths and bytes."""
    from importlib import resources

    folder = resources.files("gru_deploy") / "web"
    return {f"web/{name}": (folder / name).read_bytes() for name in ("index.html", "app.js")}


def _readme(target: str, spec: ModelSpec) -> bytes:
    template = README_EDGE if target == "edge" else README_SERVER
    title = f"gru-deploy {target} bundle — {MODEL_NAME}"
    return template.format(name=MODEL_NAME, rule="=" * len(title), i=spec.input_size, o=spec.output_size,
                           h=spec.hidden_size, labels=", ".join(spec.labels), min_ort=MIN_ONNXRUNTIME).encode()


EDGE_FILES = ("model.onnx", "model.ort", "model_stream.onnx", "model_stream.ort", "required_operators.config")


def _edge_files(export_dir: Path, manifest: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, str]]:
    missing = [name for name in EDGE_FILES if name not in manifest["files"]]
    if missing:
        raise UserInputError(f"{export_dir}: the export lacks {missing}; re-export it with this gru-deploy")
    files = {name: (export_dir / name).read_bytes() for name in EDGE_FILES}
    files.update(web_files())
    return files, {"classifier": "model.onnx", "stream": "model_stream.onnx"}


def _server_files(export_dir: Path, manifest: dict[str, Any], spec: ModelSpec) -> tuple[dict[str, bytes], dict[str, str]]:
    repo = "model_repository"
    models = {  # Triton model name: (variant, platform, source file, file name in the version folder)
        MODEL_NAME: ("classifier", "onnxruntime_onnx", "model.onnx", "model.onnx"),
        f"{MODEL_NAME}_lengths": ("lengths", "onnxruntime_onnx", "model_lengths.onnx", "model.onnx"),
        f"{MODEL_NAME}_stream": ("stream", "onnxruntime_onnx", "model_stream.onnx", "model.onnx"),
        f"{MODEL_NAME}_torchscript": ("classifier", "pytorch_libtorch", "model.pt", "model.pt"),
    }
    files: dict[str, bytes] = {}
    for name, (variant, platform, source, target) in models.items():
        files[f"{repo}/{name}/1/{target}"] = (export_dir / source).read_bytes()
        files[f"{repo}/{name}/config.pbtxt"] = triton_config(
            name, platform, spec, variant, libtorch_names=platform == "pytorch_libtorch").encode()
    golden_files = {"classifier": f"{repo}/{MODEL_NAME}/1/model.onnx",
                    "lengths": f"{repo}/{MODEL_NAME}_lengths/1/model.onnx",
                    "stream": f"{repo}/{MODEL_NAME}_stream/1/model.onnx"}
    return files, golden_files


def build_bundle(export_dir: Path, target: str, on_step: Callable[[str], None] | None = None,
                 quantize: str | None = None) -> dict[str, bytes]:
    """Every file of a bundle, manifest included, as {relative path: bytes}."""
    from gru_deploy.manifest import check_files, read_manifest
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
    missing = [v for v in ("stream", "lengths") if v not in (source.get("variants") or {})]
    if missing:
        raise UserInputError(f"{export_dir}: the export lacks the {', '.join(missing)} model(s); re-export it")
    spec = ModelSpec.from_dict(source["config"])
    step(f"building the {target} files")
    if target == "edge":
        files, golden_models = _edge_files(export_dir, source)
    else:
        files, golden_models = _server_files(export_dir, source, spec)
    int8: dict[str, tuple[str, bytes]] = {}
    quantization: dict[str, Any] | None = None
    if quantize == "int8":
        from gru_deploy.quantize import quantize_int8

        quantization = {"method": "onnxruntime dynamic quantisation, QInt8 weights, reduce_range, "
                                  "Loop bodies included", "models": {}}
        for variant, fp32_name in golden_models.items():
            step(f"quantising {fp32_name} to int8")
            q_name = fp32_name.replace(".onnx", ".int8.onnx")
            files[q_name], report = quantize_int8(files[fp32_name])
            int8[variant] = (q_name, files[q_name])
            quantization["models"][q_name] = {k: report[k] for k in (
                "weight_bytes_fp32", "weight_bytes_quantized_share", "size_before", "size_after")}
    step("computing golden vectors with eager PyTorch")
    atol, rtol = source["parity"]["atol"], source["parity"]["rtol"]
    golden, int8_parity = golden_vectors(export_dir, source, tuple(golden_models), golden_models, atol, rtol, int8)
    files.update(golden)
    if quantization is not None:
        for variant, (q_name, _) in int8.items():
            quantization["models"][q_name]["parity_vs_eager"] = int8_parity[variant]
    files["README.txt"] = _readme(target, spec)
    models = {}
    formats = {".onnx": "onnx", ".ort": "ort", ".pt": "torchscript"}
    for path, data in sorted(files.items()):
        fmt = formats.get(Path(path).suffix)
        if fmt is None:
            continue
        variant = "stream" if "stream" in path else "lengths" if "lengths" in path else "classifier"
        models[path] = {"format": fmt, "variant": variant, **(_onnx_info(data) if fmt == "onnx" else {})}
        if ".int8." in path:
            models[path]["quantized"] = "int8"
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
        "models": models,
        "onnxruntime": {"min_version": MIN_ONNXRUNTIME, "tested": [TESTED_OLD_ONNXRUNTIME, _ort_version()]},
        "golden": {"file": f"{GOLDEN_DIR}/golden.json", "atol": atol, "rtol": rtol},
        "quantization": quantization,
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
            on_step: Callable[[str], None] | None = None, quantize: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Build a bundle from an export folder and write it (folder, or .tar.gz with `archive`)."""
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
    files = build_bundle(export_dir, target, on_step, quantize)
    if archive:
        atomic_write_bytes(out, archive_bytes(files, out.name[: -len(".tar.gz")]))
    else:
        with staged_dir(out) as stage:
            for path, data in files.items():
                atomic_write_bytes(stage / path, data)
    return out, json.loads(files["manifest.json"])


__all__ = ["package", "build_bundle", "archive_bytes", "triton_config", "golden_vectors", "TARGETS"]
