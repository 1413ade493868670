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
# Variants exported beside the classifier.
VARIANTS = ("stream", "lengths")
# The forms each --strategy exports the stream and lengths variants in (auto checks and times
# every one and keeps the fastest at the variant's workload).
VARIANT_FORMS = {**{name: (name,) for name in STRATEGIES}, "auto": STRATEGIES}
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
    (and writes nothing) when a guard or the parity gate fails. Over 60 lines: the tutorial
    model's front half (script, forms, auto per variant, parity), each step a call; write_export
    writes the folder.
    """
    from gru_deploy.convert import script
    from gru_deploy.convert.graphs import check_opset
    from gru_deploy.models.tutorial import as_variant
    from gru_deploy.check.grid import check_tolerances
    from gru_deploy.check.verify import build_runners, parity_for_dir

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
        chosen, auto = choose_fastest(
            graphs, lambda models, budget: time_strategies(models, spec.signature(), typical, budget), step)
        auto = {"typical_batch": typical[0], "typical_seq": typical[1], "threads": 1, **auto}
    result = results[chosen]
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}
    variants: dict[str, Any] = {}
    add_model(files, models, variants, "classifier", pt_bytes, result.onnx_bytes, result.strategy,
              result.record(), spec.signature())
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
                lambda models, budget: time_strategies(models, spec.signature(variant), typical, budget, variant),
                step)
            variant_auto = {**workload, "threads": 1, **variant_auto}
        add_model(files, models, variants, variant, script.to_bytes(module), built[form].onnx_bytes, form,
                  built[form].record(), spec.signature(variant), auto=variant_auto)
    notes: list[str] = []
    deprecations = script.take_deprecations()
    if deprecations:
        notes.append(f"torch {library_versions()['torch']} deprecates what model.pt is made with (gru-deploy "
                     "silences it and keeps model.pt for libtorch runtimes): "
                     + " | ".join(m[:120] for m in deprecations))
    step("computing the golden cases (eager PyTorch)")
    files[GOLDEN_FILE], golden = golden_cases(model, spec)

    def prove(stage: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        step("checking parity of every file: eager, TorchScript, onnxruntime, onnx reference, float64; "
             "chunked streaming; padded batches")
        report = parity_for_dir(stage, manifest, atol, rtol)
        if not report:
            raise CheckFailed("parity failed, nothing written: " + "; ".join(report.failures()))
        return report.to_json(), report.record()

    return write_export(out, files, {
        "strategy": result.strategy, "auto": auto, "opset": result.opset, "ir_version": result.ir_version,
        "onnx": {"node_count": result.node_count, "op_types": result.op_types}, "signature": spec.signature(),
        "models": models, "variants": variants, "config": spec.to_dict(), "labels": list(spec.labels),
        "metrics": checkpoint.metrics, "training": checkpoint.training,
        "source_checkpoint": {"sha256": checkpoint.sha256}, "golden": golden}, notes, prove, step)


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
    from gru_deploy.check.verify import VARIANT_CASES, tutorial_grid

    cases = None if variant == "classifier" else VARIANT_CASES
    report = tutorial_grid(runners, spec, cases, variant, atol=atol, rtol=rtol)
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


def workload_feed(signature: dict[str, Any], variant: str, typical: tuple[int, int]) -> dict[str, Any]:
    """The inputs variant_workload describes, for any signature (fixed seed): x, a state
    uniform in [-1, 1] where the model takes one, lengths uniform in 1..seq where it takes them."""
    import numpy as np

    from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN

    rng = np.random.default_rng(0)
    batch, seq = typical
    feed = {}
    for tensor in signature["inputs"]:
        if tensor["name"] == INPUT_NAME:
            steps = 1 if variant == "stream" else seq
            feed[INPUT_NAME] = rng.standard_normal((batch, steps, tensor["shape"][2])).astype(np.float32)
        elif tensor["name"] == STATE_IN:
            feed[STATE_IN] = rng.uniform(-1, 1, (batch, *tensor["shape"][1:])).astype(np.float32)
        elif tensor["name"] == LENGTHS_NAME:
            feed[LENGTHS_NAME] = rng.integers(1, seq + 1, batch).astype(np.int64)
    return feed


def time_strategies(models: dict[str, bytes], signature: dict[str, Any], typical: tuple[int, int],
                    budget_s: float = TIMING_BUDGET_S, variant: str = "classifier") -> dict[str, float]:
    """Median onnxruntime latency (µs, one thread, one session each) of each graph of one variant
    on its workload (variant_workload), for the tutorial model and a module alike."""
    import onnxruntime as ort

    from gru_deploy.check.runners import session_options
    from gru_deploy.check.timing import median_us

    feed = workload_feed(signature, variant, typical)
    outputs = [o["name"] for o in signature["outputs"]]
    timings = {}
    for name, onnx_bytes in models.items():
        session = ort.InferenceSession(onnx_bytes, session_options(1), providers=["CPUExecutionProvider"])
        timings[name] = round(median_us(lambda: session.run(outputs, feed), budget_s), 1)
    return timings


def add_model(files: dict[str, bytes], models: dict[str, Any], variants: dict[str, Any], variant: str,
              torchscript: bytes, onnx: bytes, form: str, graph: dict[str, Any], signature: dict[str, Any],
              **record: Any) -> None:
    """One variant's TorchScript and ONNX files (model.pt / model.onnx for the classifier,
    model_VARIANT.* otherwise) put into `files`, and recorded as the manifest lists them:
    `models` by file, `variants` (all but the classifier) by variant, with `record` added."""
    stem = "model" if variant == "classifier" else f"model_{variant}"
    pt, onnx_name = f"{stem}.pt", f"{stem}.onnx"
    files[pt], files[onnx_name] = torchscript, onnx
    models[pt] = {"variant": variant, "format": "torchscript", "precision": "fp32"}
    models[onnx_name] = {"variant": variant, "format": "onnx", "precision": "fp32", "strategy": form,
                         "opset": graph["opset"], "ir_version": graph["ir_version"]}
    if variant != "classifier":
        variants[variant] = {"torchscript": pt, "onnx": onnx_name, "strategy": form, "signature": signature,
                             "onnx_node_count": graph["node_count"], "op_types": graph["op_types"], **record}


def write_export(out: Path, files: dict[str, bytes], fields: dict[str, Any], notes: list[str],
                 prove: Callable[[Path, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]],
                 step: Callable[[str], None]) -> dict[str, Any]:
    """The export folder, written all at once, for the tutorial model and a module alike: ORT-format
    copies of every ONNX model (onnxruntime's converter; a model it cannot convert is noted and
    goes without), every file into a staging folder, `prove(stage, manifest)` -> (parity.json's
    content, the manifest's parity record) raising CheckFailed to write nothing, then the
    manifest (`fields` plus format, versions, notes and every file's sha256). Returns it."""
    from gru_deploy.convert.graphs import add_ort_models, to_ort_format
    from gru_deploy.errors import WriteFailed

    models = fields["models"]
    step("converting the ONNX models to ORT format (onnxruntime's converter)")
    try:
        add_ort_models(files, models, to_ort_format({n: files[n] for n, m in models.items() if m["format"] == "onnx"}))
    except WriteFailed as exc:  # an op the ORT-format writer does not take: the edge bundle goes without
        notes.append(f"no ORT-format copy: {exc}")
    with staged_dir(Path(out), keep=KEEP) as stage:
        for name, data in files.items():
            atomic_write_bytes(stage / name, data)
        manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
                                    "gru_deploy_version": __version__, **fields, "versions": library_versions(),
                                    "notes": notes, "files": {name: file_entry(stage / name) for name in files}}
        parity, manifest["parity"] = prove(stage, manifest)
        atomic_write_json(stage / "parity.json", parity)
        manifest["files"]["parity.json"] = file_entry(stage / "parity.json")
        atomic_write_json(stage / MANIFEST_NAME, manifest)
    return manifest
