"""`export`: checkpoint → TorchScript → ONNX → parity → export dir, written all at once.

Everything is built in a staging folder beside the target and swapped in only after the
parity gate passes, so a failed or interrupted export leaves the earlier export whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.versions import __version__
from gru_deploy.check.compare import DEFAULT_ATOL, DEFAULT_RTOL
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.convert.graphs import STRATEGIES
from gru_deploy.manifest import (MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, atomic_write_bytes,
                                 atomic_write_json, file_entry, staged_dir)
from gru_deploy.check.module_parity import GOLDEN_FILE
from gru_deploy.train import Checkpoint
from gru_deploy.versions import library_versions

if TYPE_CHECKING:
    import torch

    from gru_deploy.convert.graphs import ExportResult
    from gru_deploy.spec import ModelSpec

STRATEGY_CHOICES = (*STRATEGIES, "auto")
# Variants exported beside the classifier, and their file names.
VARIANTS = ("stream", "lengths")
VARIANT_FILES = {"stream": ("model_stream.pt", "model_stream.onnx"),
                 "lengths": ("model_lengths.pt", "model_lengths.onnx")}
# The forms each --strategy exports the stream and lengths variants in (auto checks and times
# every one and keeps the fastest at the variant's workload).
VARIANT_FORMS = {**{name: (name,) for name in STRATEGIES}, "auto": STRATEGIES}
# Variants that also get an ORT-format copy (for onnxruntime mobile / minimal builds).
ORT_VARIANTS = ("classifier", "stream")
# auto: seconds of timing per candidate; when the two fastest are within RETIME_WITHIN of each
# other, they are timed again for RETIME_BUDGET_S each and that second timing decides.
TIMING_BUDGET_S = 0.5
RETIME_WITHIN = 1.2
RETIME_BUDGET_S = 1.5
# The golden cases a bundle ships: (variant, batch, seq); lengths cases use lengths {seq, 1, 0}.
GOLDEN_CASES = (("classifier", 1, 10), ("classifier", 2, 25), ("classifier", 3, 1),
                ("stream", 2, 12), ("lengths", 3, 15))
# Files in an export dir that gru-deploy did not write and keeps across exports.
KEEP = ("README.md",)


def build_strategy(strategy: str, model: "torch.nn.Module", scripted: "torch.jit.ScriptModule",
                   checkpoint: Checkpoint, opset: int, metadata: dict[str, Any]) -> "ExportResult":
    """One ONNX graph for one strategy."""
    from gru_deploy.convert.graphs import export_fused, export_loop

    meta = {**metadata, "gru_deploy.strategy": strategy}
    if strategy == "loop":
        return export_loop(scripted, checkpoint.spec, opset, meta)
    if strategy == "stepwise":
        return build_variant("stepwise", "classifier", model, scripted, checkpoint, opset, meta)
    if strategy == "fused":
        return export_fused(checkpoint.state_dict, checkpoint.spec, opset, meta)
    raise UserInputError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_CHOICES)}")


def build_variant(form: str, variant: str, model: "torch.nn.Module", module: "torch.jit.ScriptModule",
                  checkpoint: Checkpoint, opset: int, metadata: dict[str, Any]) -> "ExportResult":
    """One ONNX graph of a variant in one form (loop, fused, stepwise)."""
    from gru_deploy.convert import script
    from gru_deploy.convert.graphs import export_fused, export_loop
    from gru_deploy.models.tutorial import as_variant

    if form == "loop":
        return export_loop(module, checkpoint.spec, opset, metadata, variant=variant)
    if form == "stepwise":  # the same weights, each step's input projection inside the loop
        stepwise = script.torchscript(as_variant(model, variant, hoist=False))
        return export_loop(stepwise, checkpoint.spec, opset, metadata, variant=variant, strategy="stepwise")
    return export_fused(checkpoint.state_dict, checkpoint.spec, opset, metadata, variant=variant)


def export_to_dir(
    checkpoint: Checkpoint,
    out: Path,
    opset: int = 17,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    strategy: str = "loop",
    typical: tuple[int, int] = (1, 100),
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write model.pt, model.onnx, parity.json and manifest.json into `out`; return the manifest.

    `strategy` is loop, fused, stepwise or auto; auto checks every strategy's parity, times each at
    the `typical` (batch, seq) in onnxruntime and keeps the fastest. Raises CheckFailed
    (and writes nothing) when a guard or the parity gate fails.
    """
    from gru_deploy.convert import script
    from gru_deploy.convert.graphs import add_ort_models, check_opset, to_ort_format
    from gru_deploy.models.tutorial import as_variant
    from gru_deploy.check.verify import build_runners, check_tolerances, parity_for_dir

    check_opset(opset)
    check_tolerances(atol, rtol)
    if strategy not in STRATEGY_CHOICES:
        raise UserInputError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_CHOICES)}")
    if min(typical) < 1:
        raise UserInputError(f"the typical batch and seq must be at least 1, got {typical}")
    step = on_step or (lambda message: None)
    spec = checkpoint.spec
    model = checkpoint.model()
    script.take_deprecations()  # what this export hears, not what earlier work in this process heard
    step("scripting with torch.jit.script (checking the time loop stays a prim::Loop)")
    scripted = script.torchscript(model)
    pt_bytes = script.to_bytes(scripted)
    metadata = {
        "gru_deploy.version": __version__,
        "gru_deploy.config": spec.to_dict(),
        "gru_deploy.labels": list(spec.labels),
        "gru_deploy.source_checkpoint_sha256": checkpoint.sha256 or "",
    }
    candidates = list(STRATEGIES) if strategy == "auto" else [strategy]
    results = {}
    for name in candidates:
        step(f"exporting strategy {name} to ONNX opset {opset}")
        results[name] = build_strategy(name, model, scripted, checkpoint, opset, metadata)
    auto: dict[str, Any] | None = None
    chosen = candidates[0]
    if strategy == "auto":
        for name, result in results.items():
            step(f"checking parity of {name} before timing it")
            check_candidate(f"strategy {name}", build_runners(spec, scripted, result.onnx_bytes), spec, atol, rtol)
        step(f"timing {', '.join(candidates)} at batch {typical[0]}, seq {typical[1]}")
        graphs = {n: r.onnx_bytes for n, r in results.items()}
        chosen, auto = choose_fastest(graphs, lambda models, budget: time_strategies(models, spec, typical, budget),
                                      step)
        auto = {"typical_batch": typical[0], "typical_seq": typical[1], "threads": 1, **auto}
    result = results[chosen]
    files = {"model.pt": pt_bytes, "model.onnx": result.onnx_bytes}
    models: dict[str, dict[str, Any]] = {
        "model.pt": {"variant": "classifier", "format": "torchscript", "precision": "fp32"},
        "model.onnx": {"variant": "classifier", "format": "onnx", "precision": "fp32", "strategy": result.strategy,
                       "opset": result.opset, "ir_version": result.ir_version},
    }
    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        module = script.torchscript(as_variant(model, variant))
        forms = VARIANT_FORMS[strategy]
        built = {}
        for form in forms:
            step(f"exporting the {variant} variant as {form} (and TorchScript)")
            meta = {**metadata, "gru_deploy.variant": variant, "gru_deploy.strategy": form}
            built[form] = build_variant(form, variant, model, module, checkpoint, opset, meta)
        variant_auto = None
        form = forms[0]
        if len(forms) > 1:
            for name, candidate in built.items():
                step(f"checking parity of the {variant} variant as {name} before timing it")
                check_candidate(f"the {variant} variant as {name}",
                                build_runners(spec, module, candidate.onnx_bytes, variant=variant), spec, atol, rtol,
                                variant)
            workload = variant_workload(variant, typical)
            step(f"timing the {variant} variant as {', '.join(forms)} at {workload['description']}")
            form, variant_auto = choose_fastest(
                {n: b.onnx_bytes for n, b in built.items()},
                lambda models, budget: time_strategies(models, spec, typical, budget, variant=variant), step)
            variant_auto = {**workload, "threads": 1, **variant_auto}
        exported = built[form]
        pt_name, onnx_name = VARIANT_FILES[variant]
        files[pt_name] = script.to_bytes(module)
        files[onnx_name] = exported.onnx_bytes
        models[pt_name] = {"variant": variant, "format": "torchscript", "precision": "fp32"}
        models[onnx_name] = {"variant": variant, "format": "onnx", "precision": "fp32", "strategy": form,
                             "opset": exported.opset, "ir_version": exported.ir_version}
        variants[variant] = {"torchscript": pt_name, "onnx": onnx_name, "strategy": form, "auto": variant_auto,
                             "signature": spec.signature(variant), "onnx_node_count": exported.node_count,
                             "op_types": exported.op_types}
    notes: list[str] = []
    deprecations = script.take_deprecations()
    if deprecations:
        notes.append(f"torch {library_versions()['torch']} deprecates what model.pt is made with (gru-deploy "
                     "silences it and keeps model.pt for libtorch runtimes): "
                     + " | ".join(m[:120] for m in deprecations))
    step("computing the golden cases (eager PyTorch)")
    files[GOLDEN_FILE], golden = golden_cases(model, spec)
    step("converting the classifier and stream models to ORT format (onnxruntime's converter)")
    ort_sources = [name for name, info in models.items() if info["format"] == "onnx" and info["variant"] in ORT_VARIANTS]
    add_ort_models(files, models, to_ort_format({name: files[name] for name in ort_sources}))
    with staged_dir(Path(out), keep=KEEP) as stage:
        for name, data in files.items():
            atomic_write_bytes(stage / name, data)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "gru_deploy_version": __version__,
            "strategy": result.strategy,
            "auto": auto,
            "opset": result.opset,
            "ir_version": result.ir_version,
            "onnx": {"node_count": result.node_count, "op_types": result.op_types},
            "signature": spec.signature(),
            "models": models,
            "variants": variants,
            "config": spec.to_dict(),
            "labels": list(spec.labels),
            "metrics": checkpoint.metrics,
            "training": checkpoint.training,
            "source_checkpoint": {"sha256": checkpoint.sha256},
            "versions": library_versions(),
            "notes": notes,
            "golden": golden,
            "files": {name: file_entry(stage / name) for name in files},
        }
        step("checking parity of every file: eager, TorchScript, onnxruntime, onnx reference, float64; "
             "chunked streaming; padded batches")
        report = parity_for_dir(stage, manifest, atol, rtol)
        if not report:
            raise CheckFailed("parity failed, nothing written: " + "; ".join(report.failures()))
        parity = report.to_json()
        atomic_write_json(stage / "parity.json", parity)
        manifest["files"]["parity.json"] = file_entry(stage / "parity.json")
        manifest["parity"] = {"passed": parity["passed"], "atol": atol, "rtol": rtol,
                              "applied_atol": parity["applied_atol"],
                              "noise_ceiling_fraction": parity["noise_ceiling_fraction"],
                              "verified_max_seq": parity["verified_max_seq"], "unverifiable": parity["unverifiable"],
                              "notes": parity["notes"], "summary": parity["summary"]}
        atomic_write_json(stage / MANIFEST_NAME, manifest)
    return manifest


def golden_cases(model: "torch.nn.Module", spec: "ModelSpec") -> tuple[bytes, dict[str, Any]]:
    """The golden cases (GOLDEN_CASES; inputs from check.verify.make_feed) answered by the model
    eager in fp32 (check.runners.eager_runner): GOLDEN_FILE's bytes and the manifest's record."""
    from gru_deploy.check.module_parity import golden_store
    from gru_deploy.check.runners import eager_runner
    from gru_deploy.check.verify import make_feed

    cases = []
    for index, (variant, batch, seq) in enumerate(GOLDEN_CASES):
        feed = make_feed(spec, variant, batch, seq, seed=1000 + index)
        cases.append((f"{variant}_{index}", variant, feed, eager_runner(spec, model, variant).run(feed)))
    return golden_store(cases)


def check_candidate(what: str, runners: dict[str, Any], spec: "ModelSpec", atol: float, rtol: float,
                    variant: str = "classifier") -> None:
    """auto's check before timing a candidate: the classifier's full grid, a variant's grid;
    CheckFailed (nothing written) when parity fails."""
    from gru_deploy.check.verify import VARIANT_CASES, run_parity

    cases = None if variant == "classifier" else VARIANT_CASES
    report = run_parity(runners, spec, cases=cases, atol=atol, rtol=rtol, variant=variant)
    if not report:
        raise CheckFailed(f"parity failed for {what}, nothing written: " + "; ".join(report.failures()))


def choose_fastest(graphs: dict[str, bytes], time_fn: Callable[[dict[str, bytes], float], dict[str, float]],
                   on_step: Callable[[str], None] | None = None) -> tuple[str, dict[str, Any]]:
    """The fastest graph by `time_fn(graphs, budget_s) -> median µs`, and the record of every timing.

    When the two fastest are within RETIME_WITHIN of each other, noise could decide: they are
    timed again for RETIME_BUDGET_S each, and that second timing decides (recorded as `retimed`).
    """
    step = on_step or (lambda message: None)
    timings = time_fn(graphs, TIMING_BUDGET_S)
    record: dict[str, Any] = {"median_us": timings, "budget_s": TIMING_BUDGET_S}
    ranked = sorted(graphs, key=timings.__getitem__)
    decided_by = timings
    if len(ranked) > 1 and timings[ranked[1]] <= RETIME_WITHIN * timings[ranked[0]]:
        step(f"{ranked[0]} and {ranked[1]} are within {RETIME_WITHIN - 1:.0%}: timing them again")
        decided_by = time_fn({n: graphs[n] for n in ranked[:2]}, RETIME_BUDGET_S)
        record["retimed"] = {"median_us": decided_by, "budget_s": RETIME_BUDGET_S}
    record["chosen"] = min(ranked[:2], key=decided_by.__getitem__)
    return record["chosen"], record


def variant_workload(variant: str, typical: tuple[int, int]) -> dict[str, Any]:
    """What auto times a variant on: the classifier and the lengths model at the typical (batch,
    seq), the lengths model with lengths spread over 1..seq; the stream model one step per call
    (streaming's unit of work) at the typical batch."""
    batch, seq = typical
    if variant == "stream":
        return {"typical_batch": batch, "steps_per_call": 1, "description": f"batch {batch}, one step per call"}
    if variant == "lengths":
        return {"typical_batch": batch, "typical_seq": seq, "lengths": f"uniform in 1..{seq}",
                "description": f"batch {batch}, seq {seq}, lengths 1..{seq}"}
    return {"typical_batch": batch, "typical_seq": seq, "description": f"batch {batch}, seq {seq}"}


def workload_feed(spec: "ModelSpec", variant: str, typical: tuple[int, int]) -> dict[str, Any]:
    """The inputs variant_workload describes (fixed seed)."""
    import numpy as np

    from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN

    rng = np.random.default_rng(0)
    batch, seq = typical
    steps = 1 if variant == "stream" else seq
    feed = {INPUT_NAME: rng.standard_normal((batch, steps, spec.input_size)).astype(np.float32)}
    if variant == "stream":
        feed[STATE_IN] = rng.uniform(-1, 1, (batch, spec.hidden_size)).astype(np.float32)
    if variant == "lengths":
        feed[LENGTHS_NAME] = rng.integers(1, seq + 1, batch).astype(np.int64)
    return feed


def time_strategies(models: dict[str, bytes], spec: "ModelSpec", typical: tuple[int, int],
                    budget_s: float = TIMING_BUDGET_S, variant: str = "classifier") -> dict[str, float]:
    """Median onnxruntime latency (µs, one thread, one session each) of each graph of one variant
    on its workload (variant_workload)."""
    from gru_deploy.check.timing import median_us
    from gru_deploy.check.runners import OnnxRuntimeRunner

    feed = workload_feed(spec, variant, typical)
    timings = {}
    for name, onnx_bytes in models.items():
        runner = OnnxRuntimeRunner(spec, onnx_bytes, threads=1, variant=variant)
        timings[name] = round(median_us(lambda: runner.run(feed), budget_s), 1)
    return timings
