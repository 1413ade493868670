"""Parity: run every runtime on a grid of cases and compare each pair; verify export dirs.

The grid is batch {1, 3, 64} × seq {0, 1, 7, 100, 1000} plus one 2,048-step case, with
inputs of both signs at scales from 0.01 to 10 and fixed seeds. Pairs compared:
eager (the tutorial's loop) against TorchScript and onnxruntime, a float64 numpy
re-implementation of the equations against onnxruntime, and eager against onnx's
ReferenceEvaluator on the small cases (it is pure Python and slow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

from gru_deploy.compare import DEFAULT_ATOL, DEFAULT_RTOL, compare
from gru_deploy.errors import UserInputError
from gru_deploy.runners import Runner
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, ModelSpec

if TYPE_CHECKING:
    import torch

GRID_BATCHES = (1, 3, 64)
GRID_SEQS = (0, 1, 7, 100, 1000)
EXTRA_CASES = ((2, 2048),)
# (reference, test, largest batch*seq it runs on: None for every case)
PAIRS: tuple[tuple[str, str, int | None], ...] = (
    ("eager", "torchscript", None),
    ("eager", "onnxruntime", None),
    ("float64", "onnxruntime", None),
    ("eager", "onnx-reference", 21),
)


def grid_cases() -> list[tuple[int, int]]:
    return [(b, s) for b in GRID_BATCHES for s in GRID_SEQS] + list(EXTRA_CASES)


def make_input(batch: int, seq: int, input_size: int, seed: int) -> np.ndarray:
    """Normal values of both signs, each sample at its own scale in [0.01, 10]."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 1, size=(batch, 1, 1))
    return (rng.standard_normal((batch, seq, input_size)) * scale).astype(np.float32)


@dataclass
class ParityReport:
    """Per-case, per-pair comparisons; truthy when every comparison passed."""

    atol: float
    rtol: float
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for case in self.cases for c in case["pairs"].values())

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per pair: the worst of each statistic over all cases, and the worst case."""
        out: dict[str, dict[str, Any]] = {}
        for case in self.cases:
            for pair, c in case["pairs"].items():
                s = out.setdefault(pair, {"passed": True, "cases": 0, "max_abs": 0.0, "mean_abs": 0.0,
                                          "p99_abs": 0.0, "max_rel": 0.0, "p99_rel": 0.0, "min_atol": 0.0,
                                          "min_rtol": 0.0, "argmax_agreement": 1.0, "worst_case": None})
                s["cases"] += 1
                s["passed"] = s["passed"] and c["passed"]
                for key in ("max_abs", "mean_abs", "p99_abs", "max_rel", "p99_rel", "min_atol", "min_rtol"):
                    value = c[key]
                    if value is None or value > s[key]:
                        if key == "max_abs":
                            s["worst_case"] = {"batch": case["batch"], "seq": case["seq"]}
                        s[key] = value if value is not None else float("inf")
                s["argmax_agreement"] = min(s["argmax_agreement"], c["argmax_agreement"])
                if not c["passed"] and s.get("first_failure") is None:
                    s["first_failure"] = {"batch": case["batch"], "seq": case["seq"], "reason": c["reason"]}
        return out

    def failures(self) -> list[str]:
        lines = []
        for pair, s in self.summary().items():
            if not s["passed"]:
                f = s["first_failure"]
                lines.append(
                    f"{pair}: worst max_abs {s['max_abs']:.3g} at batch={s['worst_case']['batch']} "
                    f"seq={s['worst_case']['seq']}; first failure batch={f['batch']} seq={f['seq']}: {f['reason']}"
                )
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol,
                "summary": _json_safe(self.summary()), "cases": self.cases}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def run_parity(
    runners: Mapping[str, Runner],
    spec: ModelSpec,
    cases: Iterable[tuple[int, int]] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    pairs: Iterable[tuple[str, str, int | None]] = PAIRS,
    seed: int = 0,
    on_case: Callable[[int, int], None] | None = None,
) -> ParityReport:
    """Run each case through the runners named by `pairs` and compare."""
    check_tolerances(atol, rtol)
    pairs = [p for p in pairs if p[0] in runners and p[1] in runners]
    report = ParityReport(atol, rtol)
    for index, (batch, seq) in enumerate(cases if cases is not None else grid_cases()):
        feed = {INPUT_NAME: make_input(batch, seq, spec.input_size, seed + index)}
        outputs: dict[str, np.ndarray] = {}
        result: dict[str, Any] = {}
        for ref, test, limit in pairs:
            if limit is not None and batch * seq > limit:
                continue
            for name in (ref, test):
                if name not in outputs:
                    outputs[name] = runners[name].run(feed)[OUTPUT_NAME]
            result[f"{ref}->{test}"] = compare(outputs[ref], outputs[test], atol, rtol).to_json()
        report.cases.append({"batch": batch, "seq": seq, "seed": seed + index, "pairs": result,
                             "passed": all(c["passed"] for c in result.values())})
        if on_case is not None:
            on_case(batch, seq)
    return report


def check_tolerances(atol: float, rtol: float) -> None:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (value >= 0 and np.isfinite(value)):
            raise UserInputError(f"--{name} must be a finite number >= 0, got {value}")


def build_runners(spec: ModelSpec, module: "torch.jit.ScriptModule", onnx_model: Path | bytes,
                  threads: int = 1) -> dict[str, Runner]:
    """Every runner over one model: eager and float64 on the TorchScript module's weights."""
    from gru_deploy import script
    from gru_deploy.model import load_weights, weights_numpy
    from gru_deploy.runners import (Float64Runner, OnnxReferenceRunner, OnnxRuntimeRunner, eager_runner,
                                    torchscript_runner)

    script.check_loop(module)
    model = load_weights(spec, dict(module.state_dict()))
    onnx_bytes = onnx_model.read_bytes() if isinstance(onnx_model, Path) else onnx_model
    return {
        "eager": eager_runner(spec, model),
        "torchscript": torchscript_runner(spec, module),
        "onnxruntime": OnnxRuntimeRunner(spec, onnx_bytes, threads=threads),
        "onnx-reference": OnnxReferenceRunner(spec, onnx_bytes),
        "float64": Float64Runner(spec, weights_numpy(model)),
    }


def export_runners(folder: Path, manifest: dict[str, Any], threads: int = 1) -> dict[str, Runner]:
    """Runners over an export dir's files, each file checked against the manifest first."""
    from gru_deploy import script
    from gru_deploy.manifest import verified_path

    spec = ModelSpec.from_dict(manifest["config"])
    module = script.load(verified_path(folder, manifest, "model.pt"))
    return build_runners(spec, module, verified_path(folder, manifest, "model.onnx"), threads)


def verify_export(folder: Path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  on_case: Callable[[int, int], None] | None = None) -> ParityReport:
    """Check every checksum of an export dir, then run the parity grid on its files."""
    from gru_deploy.manifest import check_files, read_manifest

    check_tolerances(atol, rtol)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    runners = export_runners(folder, manifest)
    return run_parity(runners, ModelSpec.from_dict(manifest["config"]), atol=atol, rtol=rtol, on_case=on_case)
