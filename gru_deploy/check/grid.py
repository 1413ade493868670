"""The parity grid, one for every model: run each case through runners, compare every output of
each pair, widen a case's atol for float32's own error where the reference can estimate it,
and report per case and per pair (`ParityReport`: parity.json's shape, the manifest's record).
It runs and compares; the runners and the cases are the caller's (check.module_parity's grids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from gru_deploy.check.compare import DEFAULT_ATOL, DEFAULT_RTOL, compare
from gru_deploy.check.timing import stage
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.spec import INPUT_NAME, OUTPUT_NAME, STATE_IN

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
        return {**self.record(), "cases": self.cases}

    def record(self) -> dict[str, Any]:
        """What an export's manifest keeps of the report (parity.json keeps it all, with the cases)."""
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol, "applied_atol": self.applied_atol,
                "noise_ceiling_fraction": NOISE_CAP_FRACTION, **self.verification(),
                "empty_inputs_verified": self.empty_inputs_verified, "notes": self.notes,
                "summary": _json_safe(self.summary())}

    @property
    def empty_inputs_verified(self) -> bool:
        """Whether every variant's grid ran an empty sequence (a lengths model's: lengths of 0)
        and passed: what the export's inputs then accept (manifest.answers_empty)."""
        variants = {case.get("variant", "classifier") for case in self.cases}
        empty = {case.get("variant", "classifier") for case in self.cases if case["seq"] == 0}
        return self.passed and bool(variants) and empty == variants

    def extend(self, part: "ParityReport") -> None:
        """Take another part's cases and notes (a variant's, under its prefix) into this report."""
        self.cases.extend(part.cases)
        self.notes.extend(note for note in part.notes if note not in self.notes)


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


def pair_key(prefix: str, ref: str, test: str, output: str) -> str:
    """A comparison's name: `ref->test` for logits, `ref->test[name]` for any other output."""
    return f"{prefix}{ref}->{test}" + ("" if output == OUTPUT_NAME else f"[{output}]")


def run_parity(
    runners: Mapping[str, Any],
    feed_of: Callable[[int, int, int], Mapping[str, np.ndarray]],
    cases: Iterable[tuple[int, int]] = (),
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    pairs: Iterable[tuple[str, str, int | None]] = (),
    seed: int | None = 0,
    variant: str = "classifier",
    prefix: str = "",
    on_case: Callable[[str], None] | None = None,
    extra: Callable[[Mapping[str, np.ndarray], dict[str, dict[str, np.ndarray]]], dict[str, Any]] | None = None,
) -> ParityReport:
    """The parity grid, for every model: run each case (`feed_of(batch, seq, index)`) through the
    runners named by `pairs` (reference, test, largest batch*seq it runs on) and compare every
    output of each pair (keys: pair_key, behind `prefix`).

    A runner is anything with `run(feed) -> outputs by name`; one with `unsupported` set is not
    run, and the report says why. Where the float64 runner estimates float32's own error
    (`float32_noise`, the tutorial's re-implementation), each case's atol widens by
    NOISE_FACTOR times it, below the ceiling (noise_tolerance); both are recorded. `extra(feed,
    outputs)` adds a case's further comparisons (the lengths variant's padding check). A runner
    that raises is a CheckFailed naming it and the case. `on_case` hears of each case (progress).
    Over 60 lines: one loop over cases, runners and outputs, with the noise widening, the
    reference evaluator's limit and the unverifiable outputs kept apart.
    """
    check_tolerances(atol, rtol)
    report = ParityReport(atol, rtol)
    for name, runner in runners.items():
        if getattr(runner, "unsupported", ""):
            report.notes.append(f"{prefix}{name} not compared: {runner.unsupported}")
    runners = {name: r for name, r in runners.items() if not getattr(r, "unsupported", "")}
    pairs = [p for p in pairs if p[0] in runners and p[1] in runners]
    all_cases = list(cases or ())
    for index, (batch, seq) in enumerate(all_cases):
        if on_case is not None:
            on_case(f"{prefix or variant + ':'} case {index + 1}/{len(all_cases)}: batch {batch}, seq {seq}")
        feed = feed_of(batch, seq, index)
        outputs: dict[str, dict[str, np.ndarray]] = {}
        noise: dict[str, float] = {}
        if "float64" in runners:  # its answer is the noise's unperturbed run and the pairs' reference
            outputs["float64"] = _run(runners["float64"], "float64", feed, batch, seq)
            estimate = getattr(runners["float64"], "float32_noise", None)
            if estimate is not None:  # float32's own error on this input
                with stage("float32 noise"):
                    noise = estimate(feed, seed=(seed or 0) + index, clean=outputs["float64"])
        widening, unverifiable = noise_tolerance(noise, outputs.get("float64", {}), atol)
        result: dict[str, Any] = {}
        unverified: dict[str, Any] = {}
        for ref, test, limit in pairs:
            if limit is not None and batch * seq > limit:
                continue
            for name in (ref, test):
                if name not in outputs:
                    outputs[name] = _run(runners[name], name, feed, batch, seq)
            for out in outputs[ref]:
                comparison = compare(outputs[ref][out], outputs[test][out], atol + widening.get(out, 0.0), rtol)
                (unverified if out in unverifiable else result)[pair_key(prefix, ref, test, out)] = comparison.to_json()
        if extra is not None:
            result.update({prefix + key: c for key, c in extra(feed, outputs).items()})
        case = {"batch": batch, "seq": seq, **({"seed": seed + index} if seed is not None else {}),
                "variant": variant, "pairs": result, "float32_noise": noise,
                "passed": all(c["passed"] for c in result.values())}
        if unverifiable:
            case["unverifiable"] = unverifiable
            case["unverified_pairs"] = unverified
        report.cases.append(case)
    return report


def _run(runner: Any, name: str, feed: Mapping[str, np.ndarray], batch: int, seq: int) -> dict[str, np.ndarray]:
    """A runner's outputs on one case; a runtime's own failure is a CheckFailed naming it and the case."""
    try:
        return runner.run(feed)
    except (UserInputError, CheckFailed):
        raise
    except Exception as exc:
        raise CheckFailed(f"{name} failed at batch {batch}, seq {seq}: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0]}") from None


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


def make_input(batch: int, seq: int, input_size: int, seed: int) -> np.ndarray:
    """Normal values of both signs, each sample at its own scale in [0.01, 10]."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 1, size=(batch, 1, 1))
    return (rng.standard_normal((batch, seq, input_size)) * scale).astype(np.float32)


# The stream fed in chunks: one sequence of CHUNKED_SEQ steps, in chunks of each size.
CHUNK_SIZES = (1, 7, 100)
CHUNKED_SEQ = 1000


def check_chunked(runner: Any, signature: dict[str, Any], atol: float, rtol: float, seq: int = CHUNKED_SEQ,
                  chunks: Iterable[int] = CHUNK_SIZES, batch: int = 2, seed: int = 7) -> list[dict[str, Any]]:
    """A stream model in one runtime (`runner.run(feed) -> outputs by name`) fed one sequence in
    chunks from zeros, h_n carried into h0, against one pass: every output (a per-step one,
    the chunks' steps side by side) and h_n; one case per chunk size, with `bit_identical`."""
    from gru_deploy.spec import STATE_OUT

    inputs = {t["name"]: t for t in signature["inputs"]}
    x = make_input(batch, seq, int(inputs[INPUT_NAME]["shape"][2]), seed)
    h0 = np.zeros((batch, *inputs[STATE_IN]["shape"][1:]), np.float32)
    whole = runner.run({INPUT_NAME: x, STATE_IN: h0})
    per_step = {o["name"]: o["shape"].index("seq") for o in signature["outputs"] if "seq" in o["shape"]}
    cases = []
    for chunk in chunks:
        h, parts = h0, []
        for start in range(0, seq, chunk):
            out = runner.run({INPUT_NAME: np.ascontiguousarray(x[:, start:start + chunk]), STATE_IN: h})
            h = np.asarray(out[STATE_OUT], np.float32)
            parts.append(out)
        pairs = {}
        for name in whole:
            got = np.concatenate([p[name] for p in parts], axis=per_step[name]) if name in per_step else parts[-1][name]
            comparison = compare(whole[name], got, atol, rtol).to_json()
            comparison["bit_identical"] = bool(np.array_equal(whole[name], got))
            pairs[pair_key("stream:", "one-pass", f"chunks:{runner.name}", name)] = comparison
        cases.append({"batch": batch, "seq": seq, "chunk": chunk, "variant": "stream", "pairs": pairs,
                      "passed": all(c["passed"] for c in pairs.values())})
    return cases


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
