"""The parts of a bundle (bundle.package builds it, bundle.read reads it): the format, paths,
golden-vector encoding, the int8 step, runtime records and the --check-with run."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from gru_deploy.errors import CheckFailed, UserInputError

BUNDLE_FORMAT = "gru-deploy-bundle"
BUNDLE_VERSION = 1
TARGETS = ("edge", "server")
GOLDEN_DIR = "golden"
REPOSITORY = "model_repository"
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
INT8_GOLDEN_TOL = 1e-4  # an int8 model against its own recorded outputs (runtime rounding may differ)
# Below this share of weight bytes in int8, a "quantised" model is not one: refuse it.
MIN_INT8_SHARE = 0.5


def tensor_json(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}


def onnx_info(data: bytes) -> dict[str, Any]:
    import onnx

    from gru_deploy.convert.graphs import count_ops

    model = onnx.load_from_string(data)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"ir_version": int(model.ir_version), "opset": opset, "op_types": count_ops(model.graph)}


def runtime_record(models: dict[str, dict[str, Any]], golden: dict[str, Any], converted_with: str) -> dict[str, Any]:
    """What the manifest may say about runtimes: what produced the golden outputs, the newest
    opset and IR version its ONNX models use (read off the models) and, added only when they
    happened, runs in other runtimes. No floor release is claimed: none was run."""
    import onnxruntime

    onnx_models = [info for info in models.values() if info["format"] == "onnx"]
    record: dict[str, Any] = {"golden_outputs": golden, "bundle_made_with": onnxruntime.__version__}
    if onnx_models:
        record["onnx_compatibility"] = {"max_opset": max(info["opset"] for info in onnx_models),
                                        "max_ir_version": max(info["ir_version"] for info in onnx_models)}
    ort_files = sorted(name for name, info in models.items() if info["format"] == "ort")
    if ort_files:
        record["ort_format"] = {"files": ort_files, "converted_with_onnxruntime": converted_with}
    record["checked_with"] = []
    return record


def web_files() -> dict[str, bytes]:
    """The page files (gru_deploy/web/, shipped as package data), as bundle paths and bytes."""
    from importlib import resources

    folder = resources.files("gru_deploy") / "web"
    return {f"web/{name}": (folder / name).read_bytes() for name in ("index.html", "app.js")}


def _quantize(files: dict[str, bytes], models: dict[str, dict[str, Any]], source: dict[str, Any],
              step: Callable[[str], None]) -> tuple[dict[str, tuple[str, bytes]], dict[str, Any]]:
    """int8 copies of the bundle's fp32 ONNX models; refuses a model the quantiser barely touches."""
    from gru_deploy.bundle.quantize import quantize_int8

    int8: dict[str, tuple[str, bytes]] = {}
    record: dict[str, Any] = {"models": {}}
    for path, info in list(models.items()):
        if info["format"] != "onnx" or info["precision"] != "fp32":
            continue
        step(f"quantising {path} to int8")
        q_bytes, report = quantize_int8(files[path])
        share = report["weight_bytes_quantized_share"]
        if share < MIN_INT8_SHARE:
            kept = report["float_weight_consumers"]
            recurrent = [op for op in ("GRU", "LSTM", "RNN") if op in kept]
            # a module whose recurrence is torch.nn.GRU/LSTM exports as that operator in every form
            operator_only = (source.get("model") or {}).get("recurrence") not in (None, "loop")
            raise UserInputError(
                f"--quantize int8: onnxruntime's dynamic quantiser would store only {share:.0%} of {path}'s weight "
                f"bytes as int8 (ops kept in float: {', '.join(kept) or 'none'}); "
                + (f"ONNX's {'/'.join(recurrent)} operator has no int8 kernel in onnxruntime (onnxruntime#9796). "
                   if recurrent else "")
                + ("Package without --quantize." if operator_only else
                   "Export with `--strategy loop` and package that for int8, or package without --quantize."))
        q_path = str(PurePosixPath(path).with_suffix(".int8.onnx"))
        files[q_path] = q_bytes
        int8[info["variant"]] = (q_path, q_bytes)
        models[q_path] = {"variant": info["variant"], "format": "onnx", "precision": "int8", "quantized_from": path,
                          **onnx_info(q_bytes)}
        record["settings"] = report["settings"]
        record["models"][q_path] = {k: report[k] for k in (
            "weight_bytes_fp32", "weight_bytes_quantized", "weight_bytes_quantized_share", "size_before",
            "size_after", "quantized_op_types", "float_weight_consumers", "int8_weights_in_subgraphs")}
    return int8, record


def check_elsewhere(check_with: tuple[str, ...], files: dict[str, bytes], models: dict[str, dict[str, Any]],
                    runtimes: dict[str, Any], step: Callable[[str], None]) -> None:
    """--check-with: the golden vectors in each of those Pythons' onnxruntime, recorded under
    runtimes["checked_with"]; CheckFailed (nothing written) when one fails."""
    for python in check_with:
        step(f"running the golden vectors with {python}")
        result = check_golden_elsewhere(python, files, models)
        runtimes["checked_with"].append(result)
        if not result["passed"]:
            raise CheckFailed(f"the golden vectors fail in {python} (onnxruntime {result.get('onnxruntime')}): "
                              f"{result['failures'][0] if result['failures'] else result.get('error')}; nothing written")


def check_golden_elsewhere(python: str, files: dict[str, bytes], models: dict[str, dict[str, Any]],
                           timeout_s: float = 600) -> dict[str, Any]:
    """Run the bundle's golden cases on its ONNX and ORT-format models with another Python
    (numpy + onnxruntime, e.g. a venv holding an older onnxruntime), via golden_check.py.

    Every case runs on every .onnx / .ort model of its variant and precision. Returns what
    happened: that Python's onnxruntime version, cases run, passed, failures.
    """
    import os
    import subprocess
    import tempfile

    from gru_deploy.bundle import golden_check

    document = json.loads(files[f"{GOLDEN_DIR}/golden.json"])
    cases = []
    for case in document["cases"]:
        precision = case.get("precision", "fp32")
        for path, info in models.items():
            if info["variant"] == case["variant"] and info["precision"] == precision and info["format"] in ("onnx", "ort"):
                cases.append({**case, "model": path, "atol": case.get("atol", document["atol"]),
                              "rtol": case.get("rtol", document["rtol"])})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    with tempfile.TemporaryDirectory(prefix="gru-deploy-check-") as tmp:
        folder = Path(tmp)
        for path in {c["model"] for c in cases}:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(files[path])
        (folder / "cases.json").write_text(json.dumps({"cases": cases}))
        try:
            proc = subprocess.run([python, golden_check.__file__, str(folder), str(folder / "cases.json"),
                                   "--json", str(folder / "results.json")],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserInputError(f"--check-with {python}: cannot run it ({exc})") from None
        results_path = folder / "results.json"
        if proc.returncode not in (0, 1) or not results_path.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise UserInputError(f"--check-with {python}: golden_check did not run there (exit {proc.returncode}: "
                                 f"{tail}); it needs numpy and onnxruntime")
        results = json.loads(results_path.read_text())
    failures = [f"{r['model']}: {r.get('error', '')}" for r in results["results"] if not r["passed"]]
    return {"python": python, "onnxruntime": results["onnxruntime"], "numpy": results.get("numpy"),
            "cases": len(results["results"]), "passed": not failures and proc.returncode == 0,
            "failures": failures[:10]}
