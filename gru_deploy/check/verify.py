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

from gru_deploy.check.compare import DEFAULT_ATOL, DEFAULT_RTOL, compare
from gru_deploy.errors import UserInputError
from gru_deploy.check.runners import Runner
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME, STATE_IN, STATE_OUT, ModelSpec

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
    ("eager", "onnxruntime-ort", None),
)


# A case's atol grows by this many times float32's own error on its input (Monte Carlo
# arithmetic on the float64 reference). Measured on 9 stream cases of a trained model (AMD
# EPYC, torch 2.13): eager's distance from float64 was 0.4x to 6.5x that estimate; an
# ill-conditioned case (a random h0 that the model amplifies ~400x) reached 1e-4 in eager
# and 4e-5 in onnxruntime. On well-conditioned inputs the estimate is ~1e-7, so the gate
# stays atol there; a wrong export (errors far above float32's) still fails.
NOISE_FACTOR = 10.0
# The widening's ceiling: the larger of the requested atol and this fraction of the output's
# scale (max |float64 reference| of that output on that case). A class decision or a score
# read to three significant digits does not move within 0.1% of the largest output; the
# default model's widest widening was 1.7e-4 of its scale (h_n, a random h0, batch 8 x 100
# steps), six times below it. Where 10x float32's own error exceeds the ceiling, no float32
# runtime can be told from a wrong one at that length: the case is "unverifiable", never
# passed (ParityReport.verified_max_seq says how far each variant is verified).
NOISE_CAP_FRACTION = 1e-3


def grid_cases() -> list[tuple[int, int]]:
    return [(b, s) for b in GRID_BATCHES for s in GRID_SEQS] + list(EXTRA_CASES)


def make_input(batch: int, seq: int, input_size: int, seed: int) -> np.ndarray:
    """Normal values of both signs, each sample at its own scale in [0.01, 10]."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 1, size=(batch, 1, 1))
    return (rng.standard_normal((batch, seq, input_size)) * scale).astype(np.float32)


def make_feed(spec: ModelSpec, variant: str, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """A grid case's feed: x, plus a random h0 (stream) or lengths {seq, 1, 0, random} (lengths)."""
    feed = {INPUT_NAME: make_input(batch, seq, spec.input_size, seed)}
    rng = np.random.default_rng(seed + 10_000)
    if variant == "stream":
        feed[STATE_IN] = rng.uniform(-1, 1, size=(batch, spec.hidden_size)).astype(np.float32)
    if variant == "lengths":
        lengths = rng.integers(0, seq + 1, size=batch)
        lengths[: min(batch, 3)] = [seq, min(seq, 1), 0][: min(batch, 3)]
        feed[LENGTHS_NAME] = lengths.astype(np.int64)
    return feed


# The int8 gate's inputs (compare.int8_gate): a few hundred sequences up to the grid's longest,
# (batch, seq) each: 64 samples at 1, 7, 25 and 100 steps, 16 at 1,000 and 8 at 2,048.
INT8_GATE_CASES = ((64, 1), (64, 7), (64, 25), (64, 100), (16, 1000), (8, 2048))


def int8_gate_feeds(input_size: int, state_shape: tuple[int, ...] | None = None,
                    seed: int = 5000) -> list[dict[str, np.ndarray]]:
    """The int8 gate's feeds: x per INT8_GATE_CASES (make_input), plus a state uniform in
    [-1, 1] where the model takes one (`state_shape` without the batch axis); fixed seeds, so a
    bundle's verify regenerates exactly the inputs its recorded reference answered."""
    feeds = []
    for index, (batch, seq) in enumerate(INT8_GATE_CASES):
        feed = {INPUT_NAME: make_input(batch, seq, input_size, seed + index)}
        if state_shape is not None:
            rng = np.random.default_rng(seed + 100 + index)
            feed[STATE_IN] = rng.uniform(-1, 1, size=(batch, *state_shape)).astype(np.float32)
        feeds.append(feed)
    return feeds


@dataclass
class ParityReport:
    """Per-case, per-pair comparisons; truthy when every comparison passed."""

    atol: float
    rtol: float
    cases: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # comparisons that could not be made, and why

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
                                          "min_rtol": 0.0, "argmax_agreement": 1.0, "worst_case": None,
                                          "applied_atol": 0.0})
                s["cases"] += 1
                s["applied_atol"] = max(s["applied_atol"], c["atol"])
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

    @property
    def applied_atol(self) -> float:
        """The largest atol any passing-or-failing comparison was held to (the requested atol
        plus float32's widening, below its ceiling)."""
        return max([c["atol"] for case in self.cases for c in case["pairs"].values()] + [self.atol])

    def verification(self) -> dict[str, Any]:
        """Per variant, the longest sequence length up to which every case was verifiable, and
        each unverifiable case (never counted as passed)."""
        return verification(self.cases)

    def failures(self) -> list[str]:
        return failure_lines(self.summary())

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol, "applied_atol": self.applied_atol,
                "noise_ceiling_fraction": NOISE_CAP_FRACTION, **self.verification(), "notes": self.notes,
                "summary": _json_safe(self.summary()), "cases": self.cases}


def verification(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """{"verified_max_seq": {variant: N}, "unverifiable": [...]}: N is the longest length such
    that no case of that variant at or below it had an unverifiable output (-1: not even the
    shortest)."""
    seqs: dict[str, set[int]] = {}
    bad: dict[str, set[int]] = {}
    unverifiable = []
    for case in cases:
        variant = case.get("variant", "classifier")
        seqs.setdefault(variant, set()).add(case["seq"])
        if case.get("unverifiable"):
            bad.setdefault(variant, set()).add(case["seq"])
            unverifiable.append({"variant": variant, "batch": case["batch"], "seq": case["seq"],
                                 "outputs": case["unverifiable"]})
    verified = {}
    for variant, lengths in seqs.items():
        first_bad = min(bad.get(variant, {float("inf")}))
        verified[variant] = max([s for s in lengths if s < first_bad], default=-1)
    return {"verified_max_seq": verified, "unverifiable": unverifiable}


def tolerance_line(report: Mapping[str, Any]) -> str:
    """What a parity report's comparisons were held to, and how far each variant is verified:
    the line every human output of verify and export ends with."""
    applied = report.get("applied_atol", report.get("atol"))
    line = (f"applied atol up to {applied:.3g} (requested {report.get('atol'):g}), rtol {report.get('rtol'):g}")
    verified = report.get("verified_max_seq") or {}
    if report.get("unverifiable"):
        line += "; verified up to " + ", ".join(f"{variant} {n} steps" for variant, n in verified.items()) + \
                f"; {len(report['unverifiable'])} case(s) unverifiable (float32's own error above the ceiling)"
    return line


def failure_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line per failing pair of a summary (ParityReport.summary(), or its JSON form)."""
    def number(value: Any) -> str:
        return "inf" if value is None else f"{value:.3g}"

    lines = []
    for pair, s in summary.items():
        if not s["passed"]:
            f, worst = s.get("first_failure") or {}, s.get("worst_case") or {}
            lines.append(f"{pair}: worst max_abs {number(s['max_abs'])} at batch={worst.get('batch')} "
                         f"seq={worst.get('seq')}; first failure batch={f.get('batch')} seq={f.get('seq')}: "
                         f"{f.get('reason')} (atol applied up to {number(s.get('applied_atol'))})")
    return lines


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
    variant: str = "classifier",
    prefix: str = "",
    on_case: Callable[[str], None] | None = None,
) -> ParityReport:
    """Run each case through the runners named by `pairs` and compare every output.

    Keys are `ref->test` for logits and `ref->test[h_n]` for other outputs, behind `prefix`.
    Each case's atol is `atol` plus NOISE_FACTOR times float32's own error on that input,
    measured on the float64 reference (`Float64Runner.float32_noise`); both are recorded.
    `on_case` hears of each case before it runs (progress).
    """
    check_tolerances(atol, rtol)
    report = ParityReport(atol, rtol)
    for name, runner in runners.items():
        if getattr(runner, "unsupported", ""):
            report.notes.append(f"{prefix}{name} not compared: {runner.unsupported}")
    runners = {name: r for name, r in runners.items() if not getattr(r, "unsupported", "")}
    pairs = [p for p in pairs if p[0] in runners and p[1] in runners]
    all_cases = list(cases if cases is not None else grid_cases())
    for index, (batch, seq) in enumerate(all_cases):
        if on_case is not None:
            on_case(f"{prefix or 'classifier:'} case {index + 1}/{len(all_cases)}: batch {batch}, seq {seq}")
        feed = make_feed(spec, variant, batch, seq, seed + index)
        # float32's own error on this input (the float64 reference under Monte Carlo arithmetic):
        # where the trajectory amplifies rounding, two correct float32 runtimes differ that much.
        outputs: dict[str, dict[str, np.ndarray]] = {}
        noise: dict[str, float] = {}
        if "float64" in runners:  # its answer is the noise's unperturbed run and the pairs' reference
            outputs["float64"] = runners["float64"].run(feed)
            noise = runners["float64"].float32_noise(feed, seed=seed + index, clean=outputs["float64"])
        widening, unverifiable = noise_tolerance(noise, outputs.get("float64", {}), atol)
        result: dict[str, Any] = {}
        unverified: dict[str, Any] = {}
        for ref, test, limit in pairs:
            if limit is not None and batch * seq > limit:
                continue
            for name in (ref, test):
                if name not in outputs:
                    outputs[name] = runners[name].run(feed)
            for out in outputs[ref]:
                key = f"{prefix}{ref}->{test}" + ("" if out == OUTPUT_NAME else f"[{out}]")
                case_atol = atol + widening.get(out, 0.0)
                comparison = compare(outputs[ref][out], outputs[test][out], case_atol, rtol).to_json()
                (unverified if out in unverifiable else result)[key] = comparison
        case = {"batch": batch, "seq": seq, "seed": seed + index, "variant": variant, "pairs": result,
                "float32_noise": noise, "passed": all(c["passed"] for c in result.values())}
        if unverifiable:
            case["unverifiable"] = unverifiable
            case["unverified_pairs"] = unverified
        report.cases.append(case)
    return report


def noise_tolerance(noise: Mapping[str, float], reference: Mapping[str, np.ndarray],
                    atol: float) -> tuple[dict[str, float], dict[str, str]]:
    """Per output: how much a case's atol widens for float32's own error (NOISE_FACTOR x noise),
    and the outputs whose widening would pass the ceiling (the larger of atol and
    NOISE_CAP_FRACTION of the output's scale), each with the reason they are unverifiable."""
    widening: dict[str, float] = {}
    unverifiable: dict[str, str] = {}
    for out, value in noise.items():
        wanted = NOISE_FACTOR * value
        ref = np.asarray(reference.get(out, np.zeros(0)))
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        ceiling = max(atol, NOISE_CAP_FRACTION * scale)
        if wanted > ceiling:
            unverifiable[out] = (f"float32's own error ({value:.3g}) x {NOISE_FACTOR:g} exceeds the ceiling "
                                 f"{ceiling:.3g} ({NOISE_CAP_FRACTION:g} of the output's scale {scale:.3g}): "
                                 "no float32 runtime can be checked at this length")
        else:
            widening[out] = wanted
    return widening, unverifiable


def check_tolerances(atol: float, rtol: float) -> None:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (value >= 0 and np.isfinite(value)):
            raise UserInputError(f"--{name} must be a finite number >= 0, got {value}")


def build_runners(spec: ModelSpec, module: "torch.jit.ScriptModule", onnx_model: Path | bytes,
                  threads: int = 1, variant: str = "classifier") -> dict[str, Runner]:
    """Every runner over one model variant: eager and float64 on the TorchScript module's weights."""
    from gru_deploy.check import torchscript as script
    from gru_deploy.models.tutorial import load_weights, tutorial_parameters, weights_numpy
    from gru_deploy.check.runners import (Float64Runner, OnnxReferenceRunner, OnnxRuntimeRunner, eager_runner,
                                    torchscript_runner)

    script.check_loop(module)
    model = load_weights(spec, tutorial_parameters(module.state_dict()))
    onnx_bytes = onnx_model.read_bytes() if isinstance(onnx_model, Path) else onnx_model
    return {
        "eager": eager_runner(spec, model, variant),
        "torchscript": torchscript_runner(spec, module, variant),
        "onnxruntime": OnnxRuntimeRunner(spec, onnx_bytes, threads=threads, variant=variant),
        "onnx-reference": OnnxReferenceRunner(spec, onnx_bytes, variant=variant),
        "float64": Float64Runner(spec, weights_numpy(model), variant),
    }


# The stream and lengths variants: a smaller grid, plus a long case.
VARIANT_CASES = tuple((b, s) for b in (1, 3, 8) for s in (0, 1, 7, 100)) + ((2, 1000),)
CHUNK_SIZES = (1, 7, 100)
CHUNKED_SEQ = 1000


def export_runners(folder: Path, manifest: dict[str, Any], threads: int = 1,
                   variant: str = "classifier") -> dict[str, Runner]:
    """Runners over an export dir's files for one variant, each file checked against the manifest first."""
    from gru_deploy.check import torchscript as script
    from gru_deploy.manifest import find_models, select_model, verified_path
    from gru_deploy.check.runners import OnnxRuntimeRunner

    spec = ModelSpec.from_dict(manifest["config"])
    where = str(folder)
    pt_name = select_model(manifest, variant, "torchscript", where=where)
    onnx_name = select_model(manifest, variant, "onnx", where=where)
    module = script.load(verified_path(folder, manifest, pt_name))
    runners = build_runners(spec, module, verified_path(folder, manifest, onnx_name), threads, variant)
    if find_models(manifest, variant, "ort", where=where):
        ort_name = select_model(manifest, variant, "ort", where=where)
        ort_format = verified_path(folder, manifest, ort_name).read_bytes()
        runners["onnxruntime-ort"] = OnnxRuntimeRunner(spec, ort_format, threads=threads, variant=variant)
        runners["onnxruntime-ort"].name = "onnxruntime-ort"
    return runners


def check_chunked(runner: Runner, spec: ModelSpec, atol: float, rtol: float, seq: int = CHUNKED_SEQ,
                  chunks: Iterable[int] = CHUNK_SIZES, batch: int = 2, seed: int = 7) -> list[dict[str, Any]]:
    """Feed one sequence in chunks, carrying h_n into h0, and compare with one pass (logits and h_n)."""
    x = make_input(batch, seq, spec.input_size, seed)
    h0 = np.zeros((batch, spec.hidden_size), np.float32)
    whole = runner.run({INPUT_NAME: x, STATE_IN: h0})
    cases = []
    for chunk in chunks:
        h, out = h0, None
        for start in range(0, seq, chunk):
            out = runner.run({INPUT_NAME: np.ascontiguousarray(x[:, start:start + chunk]), STATE_IN: h})
            h = out[STATE_OUT]
        pairs = {f"stream:one-pass->chunks:{runner.name}" + ("" if name == OUTPUT_NAME else f"[{name}]"):
                 compare(whole[name], out[name], atol, rtol).to_json() for name in (OUTPUT_NAME, STATE_OUT)}
        for name, c in zip((OUTPUT_NAME, STATE_OUT), pairs.values()):
            c["bit_identical"] = bool(np.array_equal(whole[name], out[name]))
        cases.append({"batch": batch, "seq": seq, "chunk": chunk, "variant": "stream", "pairs": pairs,
                      "passed": all(c["passed"] for c in pairs.values())})
    return cases


def parity_for_dir(folder: Path, manifest: dict[str, Any], atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL, on_case: Callable[[str], None] | None = None) -> ParityReport:
    """The full parity gate over an export dir's files (checksums checked on load).

    The classifier on the full grid; each variant the manifest lists on its grid; the stream
    fed in chunks of 1, 7 and 100 over 1,000 steps in TorchScript and onnxruntime.
    """
    spec = ModelSpec.from_dict(manifest["config"])
    report = run_parity(export_runners(folder, manifest), spec, atol=atol, rtol=rtol, on_case=on_case)
    for variant in manifest.get("variants") or {}:
        runners = export_runners(folder, manifest, variant=variant)
        part = run_parity(runners, spec, cases=VARIANT_CASES, atol=atol, rtol=rtol, variant=variant,
                          prefix=f"{variant}:", on_case=on_case)
        report.cases.extend(part.cases)
        report.notes.extend(part.notes)
        if variant == "stream":
            for name in ("torchscript", "onnxruntime"):
                if on_case is not None:
                    on_case(f"stream: chunks of {', '.join(map(str, CHUNK_SIZES))} in {name}")
                report.cases.extend(check_chunked(runners[name], spec, atol, rtol))
    return report


def verify_export(folder: Path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  on_case: Callable[[str], None] | None = None) -> ParityReport:
    """Check every checksum of an export dir, then run the parity gate on its files."""
    from gru_deploy.manifest import check_files, read_manifest

    check_tolerances(atol, rtol)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    return parity_for_dir(folder, manifest, atol, rtol, on_case)


def user_export_parity(folder: Path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                       on_case: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The parity report of an export folder of a user's own model (checksums first); None for
    a folder of the tutorial model."""
    from gru_deploy.check.module_parity import verify_user_export
    from gru_deploy.manifest import MANIFEST_NAME, check_files, is_module_export, read_manifest

    folder = Path(folder)
    if not folder.is_dir() or not (folder / MANIFEST_NAME).is_file():
        return None  # the tutorial path reports what is wrong with anything else
    manifest = read_manifest(folder)
    if not is_module_export(manifest):
        return None
    check_files(folder, manifest)
    return verify_user_export(Path(folder), manifest, atol, rtol, on_case)
