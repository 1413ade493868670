#!/usr/bin/env python
"""Check ONNX / ORT-format models against golden outputs in whatever onnxruntime this Python has.

Standalone on purpose (numpy and onnxruntime only, nothing else of gru_deploy) so that it
runs in a bare venv holding another runtime, e.g. onnxruntime 1.17.3; `gru-deploy package
--check-with PYTHON` runs it that way and records the result in the bundle manifest:

    python gru_deploy/bundle/golden_check.py MODEL_DIR golden.json [--json results.json]

golden.json:

    {"cases": [{"model": "model.onnx",
                "inputs":  {"x": {"dtype": "float32", "shape": [2, 5, 8], "data": [...]}},
                "outputs": {"logits": {"dtype": "float32", "shape": [2, 4], "data": [...]}},
                "atol": 1e-5, "rtol": 0}]}

`model` is relative to MODEL_DIR (.onnx or .ort). Each case prints one line, PASS or FAIL
with the reason (load error, run error, wrong shape/dtype, worst error); the last line is
"N passed, N failed". Exit 0 when every case passed, 1 when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def tensor(spec: dict) -> np.ndarray:
    return np.asarray(spec["data"], dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])


def check_case(folder: Path, case: dict) -> tuple[bool, str, dict]:
    """(passed, one-line detail, result record) for one golden case."""
    model = case["model"]
    path = folder / model
    record: dict = {"model": model, "passed": False}
    if not path.is_file():
        return False, f"{model}: file not found", record
    atol = float(case.get("atol", 1e-5))
    rtol = float(case.get("rtol", 0.0))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        record["error"] = "load: " + first_line(exc)
        return False, f"{model}: cannot load: {first_line(exc)}", record
    try:
        feed = {name: tensor(spec) for name, spec in case["inputs"].items()}
        wanted = case["outputs"]
        results = session.run(list(wanted), feed)
    except Exception as exc:
        record["error"] = "run: " + first_line(exc)
        return False, f"{model}: run failed: {first_line(exc)}", record
    problems, errors = [], {}
    for (name, spec), got in zip(wanted.items(), results):
        expected = tensor(spec)
        got = np.asarray(got)
        if got.dtype != expected.dtype or got.shape != expected.shape:
            problems.append(f"{name} is {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}")
            continue
        err = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) if got.size else 0.0
        errors[name] = err
        if not np.allclose(got, expected, atol=atol, rtol=rtol):
            problems.append(f"{name} max abs error {err:.3g} > atol {atol:g} (rtol {rtol:g})")
    record["max_abs_error"] = errors
    summary = ", ".join(f"{n} {e:.3g}" for n, e in errors.items())
    if problems:
        record["error"] = "; ".join(problems)
        return False, f"{model}: " + "; ".join(problems), record
    record["passed"] = True
    return True, f"{model}: max abs error {summary} (atol {atol:g})", record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("folder", type=Path, help="folder holding the .onnx / .ort files")
    parser.add_argument("golden", type=Path, help="golden JSON: {\"cases\": [...]}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        cases = json.loads(args.golden.read_text())["cases"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: cannot read golden cases from {args.golden}: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}: {len(cases)} case(s) from {args.golden}")
    passed = failed = 0
    records = []
    for case in cases:
        try:
            ok, detail, record = check_case(args.folder, case)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed case fails alone
            ok, detail, record = False, f"{case.get('model', '?')}: bad case: {first_line(exc)}", {
                "model": case.get("model"), "passed": False, "error": first_line(exc)}
        records.append(record)
        passed, failed = passed + ok, failed + (not ok)
        print(("PASS " if ok else "FAIL ") + detail)
    covered = {case.get("model") for case in cases}
    unchecked = sorted(p.name for p in args.folder.iterdir()
                       if p.suffix in (".onnx", ".ort") and p.name not in covered)
    if unchecked:
        print(f"note: no case for {', '.join(unchecked)}")
    print(f"{passed} passed, {failed} failed")
    if args.json is not None:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "numpy": np.__version__, "results": records},
                                        indent=2))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
