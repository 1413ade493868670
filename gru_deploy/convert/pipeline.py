"""The one export pipeline, for every model (the tutorial classifier, a built-in family, your
own module): script → recurrence check → signature → each variant's forms (checked, and timed
under auto) → golden cases → the export folder (write_export), proved before it is swapped
in. Its building blocks live here too: scripting, reading the signature off the module, each
form's graph (loop, fused, stepwise), the variants' hooks, auto's timings, the folder's writer.

Every model is proved alike (convert.user.ModuleProof): each form against a float64 reference
on a parity grid (check.module_parity), the float64 answers stored for verify. What differs
is what the model declares through its `Proof`: the tutorial classifier (convert.folder.
TutorialProof) brings its own float64 reference (a numpy re-implementation that estimates
float32's own error), hence the wide grid, and its golden cases and manifest fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.module_parity import UserSignature, as_outputs
from gru_deploy.check.recurrence import source_line
from gru_deploy.convert.graphs import STRATEGIES
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.manifest import (MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, atomic_write_bytes,
                                 atomic_write_json, file_entry, staged_dir)
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN, STATE_OUT
from gru_deploy.versions import __version__, library_versions

if TYPE_CHECKING:
    import torch

    from gru_deploy.check.grid import ParityReport
    from gru_deploy.models.user import UserModel


class Built:
    """One variant in one form: its TorchScript (the PyTorch side: the model's own hook, the
    hoisted cell) and the file's bytes, saved as scripted (before the ONNX exporter, which
    inlines a module's code in place), and its ONNX graph with the graph's record. A program
    model has no TorchScript (None, None)."""

    def __init__(self, variant: str, form: str, scripted: "torch.jit.ScriptModule | None", pt_bytes: bytes | None,
                 onnx_bytes: bytes, graph: dict[str, Any], signature: "UserSignature") -> None:
        self.variant, self.form, self.scripted, self.pt_bytes = variant, form, scripted, pt_bytes
        self.onnx_bytes, self.graph, self.signature = onnx_bytes, graph, signature


class Proof:
    """How one kind of model is proved: what its graphs carry, which forms its variants take,
    each candidate's check, its golden cases, and the folder's proof and manifest fields."""

    def metadata(self, model: "UserModel") -> dict[str, Any]:
        raise NotImplementedError

    def check(self, built: Built, model: "UserModel", step: Callable[[str], None]
              ) -> "ParityReport":
        """The candidate's parity report; CheckFailed (nothing written) when it fails."""
        raise NotImplementedError

    def golden(self, model: "UserModel", signatures: dict[str, "UserSignature"]) -> tuple[bytes, dict[str, Any]]:
        raise NotImplementedError

    def finish(self, model: "UserModel", kept: str, parts: list["ParityReport"], files: dict[str, bytes],
               signatures: dict[str, "UserSignature"]) -> tuple[dict[str, Any], Callable]:
        """The manifest fields of this kind of model (files it adds go into `files`) and the
        folder's proof: prove(stage, manifest) -> (parity.json, the manifest's parity record)."""
        raise NotImplementedError


def export_model(model: "UserModel", out: Path, proof: Proof, opset: int = 17, atol: float = 1e-5,
                 rtol: float = 1e-5, strategy: str = "loop", typical: tuple[int, int] = (1, 100),
                 input_size: int | None = None, output_names: list[str] | None = None, labels: tuple[str, ...] = (),
                 on_step: Callable[[str], None] | None = None, targets: tuple[str, ...] = (),
                 executorch_batch: int = 1, executorch_max_seq: int = 2048,
                 onnx_exporter: str = "torchscript") -> dict[str, Any]:
    """Export any model into `out`, all at once and only when every check passes; return the
    manifest. `strategy`: loop, fused, stepwise (where they apply) or auto (every form that
    applies, checked, timed at `typical` (batch, seq) at each variant's workload, the fastest
    kept). `targets`: what is built beside ONNX and TorchScript (convert.programs.add_targets);
    ExecuTorch's programs take `executorch_batch` rows per call and (the classifier)
    1..`executorch_max_seq` steps. `onnx_exporter`: torchscript, or dynamo (torch.onnx's
    successor exporter, of the control-flow form) for the loop form's graphs.
    Over 60 lines: the pipeline's stages in order, each a call."""
    from gru_deploy.check.grid import check_tolerances
    from gru_deploy.check.module_parity import GOLDEN_FILE
    from gru_deploy.check.recurrence import check_recurrence
    from gru_deploy.check.timing import stage
    from gru_deploy.convert import script
    from gru_deploy.convert.graphs import check_opset
    from gru_deploy.convert.programs import add_targets, check_onnx_exporter, check_targets
    from gru_deploy.manifest import recover_interrupted_runs
    from gru_deploy.models.user import input_size_of

    recover_interrupted_runs(Path(out))  # first, whatever this export then does (a killed run's swap)
    check_opset(opset)
    check_tolerances(atol, rtol)
    check_module_strategy(strategy, model)
    check_targets(targets)
    check_onnx_exporter(onnx_exporter)
    if executorch_batch < 1 or executorch_max_seq < 1:
        raise UserInputError(f"ExecuTorch's batch and max seq must be at least 1, got {executorch_batch} and "
                             f"{executorch_max_seq}")
    if min(typical) < 1:
        raise UserInputError(f"the typical batch and seq must be at least 1, got {typical}")
    step = on_step or (lambda message: None)
    size = input_size or input_size_of(model.module)
    if size is None:
        raise UserInputError(f"{model.reference}: cannot read the input size off its layers; pass --input-size")
    script.take_deprecations()  # what this export hears, not what earlier work in this process heard
    with stage("script"):
        step(f"scripting {model.reference} with torch.jit.script (checking its time loop stays a loop)")
        scripted, kept, model = script_or_program(model, size)
        step(f"reading the signature off the module (input [batch, seq, {size}])")
        signature = discover_signature(model.module, size, model.reference, output_names)
        if labels and (len(signature.outputs) != 1 or signature.outputs[0]["shape"][-1] != len(labels)):
            raise UserInputError(f"{len(labels)} labels do not fit the outputs {signature.to_dict()['outputs']}")
        signatures, notes = declared_variants(model, scripted, signature)
    if model.program:
        targets, onnx_exporter, program_notes = program_model_targets(model, kept, targets, onnx_exporter)
        notes += program_notes
    check_targets(targets, model)  # what the model can take, now that scripting said what it is
    check_onnx_exporter(onnx_exporter, model)
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}
    variants: dict[str, Any] = {}
    parts: list["ParityReport"] = []
    chosen: dict[str, Any] = {}
    metadata = proof.metadata(model)
    for variant, sig in signatures.items():
        classifier_form = chosen["classifier"].form if chosen else strategy
        with stage("forms"):
            candidates = variant_candidates(model, scripted, kept, variant, sig, opset, strategy, metadata, step,
                                            classifier_form, onnx_exporter)
        with stage("parity"):
            reports = {form: proof.check(built, model, step) for form, built in candidates.items()}
        form, auto = next(iter(candidates)), None
        if strategy == "auto" and (len(candidates) > 1 or variant == "classifier"):  # the classifier: always timed
            with stage("auto"):
                form, auto = time_candidates(candidates, variant, typical, step)
        chosen[variant] = built = candidates[form]
        parts.append(reports[form])
        add_model(files, models, variants, variant, built.pt_bytes, built.onnx_bytes, form,
                  built.graph, sig.to_dict(), **({"auto": auto} if variant != "classifier" else {}))
        if variant == "classifier":
            classifier_auto = auto
    if "stream" in signatures:
        with stage("forms"):
            step_model = build_step_model(model, signatures["stream"], opset, metadata, step)
        if step_model is not None:
            with stage("parity"):
                parts.append(proof.check_step(step_model[0], chosen["stream"], model, step))
            add_step_model(files, models, variants, *step_model)
    if targets:
        parts += add_targets(model, signatures, targets, proof, files, models, step, executorch_batch,
                             executorch_max_seq)
    deprecations = script.take_deprecations()
    if deprecations:
        notes.append(f"torch {library_versions()['torch']} deprecates what model.pt is made with (gru-deploy "
                     "silences it and keeps model.pt for libtorch runtimes): "
                     + " | ".join(m[:120] for m in deprecations))
    step("computing the golden cases (eager PyTorch)")
    with stage("golden"):
        files[GOLDEN_FILE], golden = proof.golden(model, signatures)
    fields, prove = proof.finish(model, kept, parts, files, signatures)
    graph = chosen["classifier"].graph
    return write_export(out, files, {
        "strategy": chosen["classifier"].form, "auto": classifier_auto, "opset": graph["opset"],
        "ir_version": graph["ir_version"], "onnx": {"node_count": graph["node_count"], "op_types": graph["op_types"]},
        "signature": signature.to_dict(), "models": models, "variants": variants, **fields, "golden": golden,
        "onnx_exporter": onnx_exporter},
        notes, prove, step)


def script_or_program(model: "UserModel", input_size: int
                      ) -> tuple["torch.jit.ScriptModule | None", str, "UserModel"]:
    """(the module scripted, how its recurrence is kept, the model): TorchScript's, or where
    TorchScript cannot compile the module and torch.export keeps its loop (a torch.while_loop or
    scan), no TorchScript, the loop's operator, and the model marked `program`; else
    TorchScript's error."""
    import dataclasses

    from gru_deploy.check.recurrence import check_recurrence
    from gru_deploy.convert.programs import program_recurrence

    try:
        scripted = script_user(model)
    except UserInputError:
        kept = program_recurrence(model, input_size)
        if kept is None:
            raise
        return None, kept, dataclasses.replace(model, program=True)
    return scripted, check_recurrence(scripted, model.reference), model


def program_model_targets(model: "UserModel", kept: str, targets: tuple[str, ...], onnx_exporter: str
                          ) -> tuple[tuple[str, ...], str, list[str]]:
    """A program model's targets (its torch.export programs always: they take TorchScript's
    place) and ONNX exporter (dynamo: the TorchScript-based one needs TorchScript), with the
    notes that say so; UserInputError for ExecuTorch over a while_loop, which it does not lower."""
    from gru_deploy.convert.programs import PROGRAM_FORMAT

    if "executorch" in targets and kept == "while_loop":
        raise UserInputError(f"{model.reference}: ExecuTorch does not lower torch.while_loop: write the time loop "
                             "with scan (torch._higher_order_ops.scan) for --targets executorch, or leave it out")
    if "aoti" in targets and kept == "scan":  # seen with torch 2.13: InductorError KeyError on the batch's symbol
        raise UserInputError(f"{model.reference}: AOTInductor cannot compile a scan over a dynamic batch: write the "
                             "time loop with torch.while_loop for --targets aoti, or leave it out")
    notes = [f"TorchScript cannot compile {model.reference}; its loop is a {kept}, which torch.export keeps: no "
             f"model*.pt, the torch.export programs (model*.pt2) in their place, the ONNX graphs by the dynamo "
             "exporter"]
    return (PROGRAM_FORMAT, *(t for t in targets if t != PROGRAM_FORMAT)), "dynamo", notes


def declared_variants(model: "UserModel", scripted: "torch.jit.ScriptModule | None", signature: "UserSignature"
                      ) -> tuple[dict[str, "UserSignature"], list[str]]:
    """The classifier's signature and each variant's the module declares (models.variants), and
    a note for each variant it does not (a program model's hooks need no @torch.jit.export)."""
    import torch

    signatures, notes = {"classifier": signature}, []
    scripted = scripted if scripted is not None else model.module
    if hasattr(scripted, LENGTHS_HOOK):
        signatures["lengths"] = lengths_signature(signature)
    else:
        notes.append(f"the lengths variant is absent: the module defines no @torch.jit.export {LENGTHS_HOOK}"
                     "(x, lengths)")
    if not hasattr(scripted, STREAM_HOOK):
        notes.append(f"the stream variant is absent: the module defines no @torch.jit.export {STREAM_HOOK}"
                     f"(x, {STATE_IN}) (and {STATE_HOOK}(batch))")
        return signatures, notes
    initial = getattr(model.module, STATE_HOOK, None)
    state = initial(2) if callable(initial) else None
    if state is None:
        notes.append(f"the stream variant is absent: {STATE_HOOK}(batch) returned None: the module cannot stream "
                     "(e.g. bidirectional)")
        return signatures, notes
    if not isinstance(state, torch.Tensor) or state.dim() < 2 or state.shape[0] != 2 or bool(state.any()):
        raise UserInputError(f"{model.reference}.{STATE_HOOK}(2) must return zeros of shape [2, ...] (the state "
                             f"forward starts from), got {getattr(state, 'shape', type(state).__name__)}")
    signatures["stream"] = stream_signature(signature, [int(d) for d in state.shape[1:]])
    return signatures, notes


def variant_candidates(model: "UserModel", scripted: "torch.jit.ScriptModule", kept: str, variant: str,
                       sig: UserSignature, opset: int, strategy: str, metadata: dict[str, Any],
                       step: Callable[[str], None], classifier_form: str, onnx_exporter: str = "torchscript"
                       ) -> dict[str, Built]:
    """A variant's candidate forms under `strategy` (the classifier's: classifier_forms; a
    variant's: variant_forms, after the classifier's kept form), each built; the loop form's
    ONNX by `onnx_exporter`."""
    if variant == "classifier":
        return classifier_forms(model, scripted, kept, sig, opset, strategy, metadata, step, onnx_exporter)
    forms = variant_forms(strategy, classifier_form, model, onnx_exporter)
    return {form: build_variant(model, variant, form, sig, opset, metadata, step, onnx_exporter) for form in forms}


def every_form(model: "UserModel", opset: int = 17, step: Callable[[str], None] = lambda message: None
               ) -> dict[str, dict[str, Built]]:
    """Every variant the module declares in every form that applies (what `auto` weighs),
    built as export builds them, unchecked: what bench times."""
    from gru_deploy.check.recurrence import check_recurrence
    from gru_deploy.models.user import input_size_of

    scripted = script_user(model)
    kept = check_recurrence(scripted, model.reference)
    signature = discover_signature(model.module, input_size_of(model.module), model.reference)
    signatures, _ = declared_variants(model, scripted, signature)
    return {variant: variant_candidates(model, scripted, kept, variant, sig, opset, "auto", {}, step, "auto")
            for variant, sig in signatures.items()}


def variant_forms(strategy: str, classifier_form: str, model: "UserModel", onnx_exporter: str = "torchscript"
                  ) -> tuple[str, ...]:
    """The forms a variant is built in, for every model: a tutorial-cell model's variants in
    every form under auto (each checked and timed at the variant's own workload), else in the
    classifier's form; any other model's, the exporter's graph of its hook (a Loop, or
    torch.nn.GRU's GRU nodes); with the dynamo exporter, torch.nn.GRU's family weighs the
    dynamo loop beside the TorchScript exporter's GRU nodes (fused) as its classifier does."""
    if _tutorial_cell_family(model):
        return STRATEGIES if strategy == "auto" else (classifier_form,)
    if onnx_exporter == "dynamo" and _torch_gru_family(model):
        return ("loop", "fused") if strategy == "auto" else (classifier_form,)
    return ("loop",)


def classifier_forms(model: "UserModel", scripted: "torch.jit.ScriptModule", kept: str, signature: "UserSignature",
                     opset: int, strategy: str, metadata: dict[str, Any], step: Callable[[str], None],
                     onnx_exporter: str = "torchscript") -> dict[str, Built]:
    """The classifier's candidate forms for `strategy` (module_graphs), each with the
    TorchScript model.pt holds (the module as scripted)."""
    from gru_deploy.convert.script import to_bytes

    pt_bytes = to_bytes(scripted) if scripted is not None else None
    graphs = module_graphs(model, scripted, kept, signature, opset, strategy, step, metadata, onnx_exporter)
    return {form: Built("classifier", form, scripted, pt_bytes, data, graph, signature)
            for form, (data, graph) in graphs.items()}


def build_variant(model: "UserModel", variant: str, form: str, signature: "UserSignature", opset: int,
                  metadata: dict[str, Any], step: Callable[[str], None], onnx_exporter: str = "torchscript") -> Built:
    """A variant (the module's hook made forward: models.variants) in one form: fused (the
    tutorial-cell model's GRU nodes, built), the dynamo exporter's loop, else the TorchScript
    exporter's graph of the hook as scripted in that form (stepwise: the cell as written, once
    per step; torch.nn.GRU's fused: its GRU nodes)."""
    from gru_deploy.models.variants import LengthsOf, StreamOf

    wrapper, hook = {"lengths": (LengthsOf, LENGTHS_HOOK), "stream": (StreamOf, STREAM_HOOK)}[variant]
    step(f"exporting the {variant} variant ({hook}) as {form}")
    meta = {**metadata, "gru_deploy.variant": variant, "gru_deploy.strategy": form}
    from gru_deploy.convert.script import to_bytes

    scripted = _script_hook(model, wrapper, hook) if not model.program else None
    pt_bytes = to_bytes(scripted) if scripted is not None else None
    if form == "fused" and _tutorial_cell_family(model):
        data, graph = build_fused_graph(model, signature, opset, variant, meta)
    elif form == "loop" and onnx_exporter == "dynamo":
        from gru_deploy.convert.programs import dynamo_onnx

        data, graph = dynamo_onnx(model, variant, signature, opset, meta)
    else:
        exported = scripted if form != "stepwise" else _script_hook(in_form(model, form), wrapper, hook)
        data, graph = export_user_onnx(exported, signature, opset, meta, strategy=form)
    return Built(variant, form, scripted, pt_bytes, data, graph, signature)


def time_candidates(candidates: dict[str, Built], variant: str, typical: tuple[int, int],
                    step: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """auto: the fastest candidate at the variant's workload (convert.folder.variant_workload),
    and the record of every timing."""
    workload = variant_workload(variant, typical)
    signature = next(iter(candidates.values())).signature.to_dict()
    step(f"timing the {variant} as {', '.join(candidates)} at {workload['description']}")
    form, record = choose_fastest({name: built.onnx_bytes for name, built in candidates.items()},
                                  lambda graphs, budget: time_strategies(graphs, signature, typical, budget, variant),
                                  step)
    return form, {**workload, "threads": 1, "candidates": list(candidates), **record}


def build_step_model(model: "UserModel", stream: "UserSignature", opset: int, metadata: dict[str, Any],
                     step: Callable[[str], None]) -> tuple[bytes, dict[str, Any], dict[str, Any]] | None:
    """The stream variant's one-step model where gru-deploy can build it (a one-direction
    tutorial-cell model: convert.families.build_step): its bytes, graph record and signature;
    None for any other model."""
    from gru_deploy.check.module_parity import step_layout
    from gru_deploy.convert.families import build_step
    from gru_deploy.convert.graphs import count_ops, finish_export

    onnx_model = build_step(model.module, stream.output_names[0], opset)
    if onnx_model is None:
        return None
    step("building the one-step model: one ONNX GRU node per layer and the head")
    result = finish_export(onnx_model, "fused", opset, count_ops(onnx_model.graph),
                           {**metadata, "gru_deploy.variant": "step", "gru_deploy.strategy": "fused"})
    inputs = {t["name"]: t for t in stream.inputs}
    layers, hidden = step_layout(inputs[STATE_IN]["shape"][1:])
    state = {"dtype": "float32", "shape": [layers, "batch", hidden]}
    x = {"name": INPUT_NAME, "dtype": "float32", "shape": [1, "batch", inputs[INPUT_NAME]["shape"][2]]}
    signature = {"inputs": [x, {"name": STATE_IN, **state}],
                 "outputs": [stream.outputs[0], {"name": STATE_OUT, **state}]}
    return result.onnx_bytes, result.record(), signature


def add_step_model(files: dict[str, bytes], models: dict[str, Any], variants: dict[str, Any], data: bytes,
                   graph: dict[str, Any], signature: dict[str, Any]) -> None:
    """The one-step model into `files`, listed in `models` as variant "step" and recorded under
    the stream variant's `step_model` (manifest.variant_record; no TorchScript of its own: the
    stream's is its PyTorch side)."""
    name = "model_step.onnx"
    files[name] = data
    models[name] = {"variant": "step", "format": "onnx", "precision": "fp32", "strategy": "fused",
                    "opset": graph["opset"], "ir_version": graph["ir_version"]}
    variants["stream"]["step_model"] = {
        "onnx": name, "strategy": "fused", "signature": signature,
        "layout": "x [1, batch, input] (one step, time-major), state [layers, batch, hidden]",
        "onnx_node_count": graph["node_count"], "op_types": graph["op_types"]}


def check_failed(what: str, report: "ParityReport") -> CheckFailed:
    """CheckFailed: `what` failed, the pairs that failed named."""
    return CheckFailed(f"{what}, nothing written: " + "; ".join(report.failures()))


# --- the building blocks: scripting, signature, forms, variants --------------------------------

ONNX_RECURRENCE = ("Loop", "Scan", "GRU", "LSTM", "RNN")
# Probes that name each output axis: (batch, seq) pairs whose sizes differ from each other.
PROBES = ((2, 3), (3, 5))


# A method a module may define (with @torch.jit.export) for gru-deploy to export its lengths
# variant: forward_lengths(x [batch, seq, I] padded, lengths int64 [batch]) -> the outputs of
# forward, each sample's as it gets them alone, unpadded.
LENGTHS_HOOK = "forward_lengths"

# The stream variant's hooks: initial_state(batch) -> the state forward starts from ([batch,
# ...] zeros; None when the module cannot stream), and @torch.jit.export forward_stream(x, h0)
# -> (forward's outputs..., h_n).
STREAM_HOOK = "forward_stream"
STATE_HOOK = "initial_state"
MODULE_STRATEGIES = ("loop", "fused", "stepwise", "auto")


def script_user(model: "UserModel") -> "torch.jit.ScriptModule":
    """torch.jit.script the user's module; a module TorchScript cannot compile is a user error
    naming TorchScript's message and the user's file and line."""
    import torch

    from gru_deploy.convert.script import quiet_torchscript_deprecation

    try:
        with quiet_torchscript_deprecation():
            return torch.jit.script(model.module)
    except Exception as exc:  # TorchScript raises several types; all mean "cannot compile this"
        text = str(exc)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        where = source_line(text)
        raise UserInputError(f"TorchScript cannot compile {model.reference}: {lines[0] if lines else type(exc).__name__}"
                             + (f" (at {where})" if where else "")
                             + "; make the module scriptable (torch.jit.script) and try again") from None


def discover_signature(module: "torch.nn.Module", input_size: int, reference: str,
                       output_names: list[str] | None = None) -> UserSignature:
    """Run the module at two (batch, seq) probes and name each output axis: 'batch' where it
    follows the batch, 'seq' where it follows the sequence length, a size where it is fixed."""
    import torch

    shapes = []
    for batch, seq in PROBES:
        x = torch.randn(batch, seq, input_size, generator=torch.Generator().manual_seed(batch))
        try:
            with torch.no_grad():
                outputs = as_outputs(module(x), reference)
        except UserInputError:
            raise
        except Exception as exc:
            raise UserInputError(f"{reference} fails on an input of shape [{batch}, {seq}, {input_size}]: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                 "is --input-size right?") from None
        for i, out in enumerate(outputs):
            if out.dtype != torch.float32:
                raise UserInputError(f"{reference}: output {i} is {out.dtype}; gru-deploy exports float32 outputs")
        shapes.append([list(out.shape) for out in outputs])
    if len(shapes[0]) != len(shapes[1]) or any(len(a) != len(b) for a, b in zip(*shapes)):
        raise UserInputError(f"{reference}: the number or rank of outputs changes with the input's shape")
    names = output_names or (["logits"] if len(shapes[0]) == 1 else [f"output_{i}" for i in range(len(shapes[0]))])
    if len(names) != len(shapes[0]) or len(set(names)) != len(names) or INPUT_NAME in names:
        raise UserInputError(f"--output-names: give {len(shapes[0])} distinct names other than {INPUT_NAME!r}")
    outputs = []
    for name, first, second in zip(names, *shapes):
        dims: list[Any] = []
        for a, b in zip(first, second):
            if (a, b) == (PROBES[0][0], PROBES[1][0]):
                dims.append("batch")
            elif (a, b) == (PROBES[0][1], PROBES[1][1]):
                dims.append("seq")
            elif a == b:
                dims.append(a)
            else:
                raise UserInputError(f"{reference}: output {name!r} has an axis of size {a} then {b} that follows "
                                     "neither the batch nor the sequence length")
        if not dims or dims[0] != "batch":
            raise UserInputError(f"{reference}: output {name!r} must have the batch as its first axis, got {dims}")
        outputs.append({"name": name, "dtype": "float32", "shape": dims})
    inputs = [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", "seq", input_size]}]
    return UserSignature(inputs, outputs)


def export_user_onnx(scripted: "torch.jit.ScriptModule", signature: UserSignature, opset: int,
                     metadata: dict[str, Any] | None = None, strategy: str = "loop") -> tuple[bytes, dict]:
    """The scripted module as ONNX (convert.graphs.export_scripted: exported at two example
    lengths, refused when its node count changes between them or it holds no recurrence)."""
    from gru_deploy.convert.graphs import export_scripted, finish_export

    model, op_types = export_scripted(scripted, signature.to_dict(), opset, needs=ONNX_RECURRENCE)
    result = finish_export(model, strategy, opset, op_types, metadata)
    return result.onnx_bytes, result.record()


def check_module_strategy(strategy: str, model: "UserModel | None" = None) -> None:
    if strategy not in MODULE_STRATEGIES:
        raise UserInputError(f"unknown strategy {strategy!r}; a module exports as {', '.join(MODULE_STRATEGIES)} "
                             "(fused: the tutorial cell families and torch.nn.GRU; stepwise: the tutorial cell "
                             "families)")
    if strategy == "stepwise" and model is not None and not _tutorial_cell_family(model):
        raise UserInputError(f"--strategy stepwise runs the tutorial cell as written, once per step; "
                             f"{model.reference} is not a tutorial-cell family model: export it with --strategy loop")


def in_form(model: "UserModel", form: str) -> "UserModel":
    """`model` as its `form` is built: the stepwise copy (models.families.stepwise) for stepwise."""
    import dataclasses

    from gru_deploy.models.families import stepwise

    return dataclasses.replace(model, module=stepwise(model.module).eval()) if form == "stepwise" else model


def module_graphs(model: "UserModel", scripted: "torch.jit.ScriptModule", kept: str, signature: UserSignature,
                  opset: int, strategy: str, step: Callable[[str], None], metadata: dict[str, Any] | None = None,
                  onnx_exporter: str = "torchscript") -> dict[str, tuple[bytes, dict]]:
    """The candidate ONNX graphs for `strategy`: {"loop": …}, {"fused": …}, {"stepwise": …},
    each (bytes, graph record). fused where it applies (convert.families.fused_plan), stepwise
    for the tutorial-cell family; auto takes every one that applies (loop alone when neither).
    The loop form's graph is the TorchScript exporter's, or with `onnx_exporter` dynamo the
    dynamo exporter's of the control-flow form (convert.programs.dynamo_onnx)."""
    from gru_deploy.convert.families import fused_plan

    plan = None
    if strategy in ("fused", "auto"):
        try:
            plan = fused_plan(model.module, kept, model.reference)
        except UserInputError:
            if strategy == "fused":
                raise
    graphs: dict[str, tuple[bytes, dict]] = {}

    def meta(form: str) -> dict[str, Any]:
        return {**(metadata or {}), "gru_deploy.strategy": form}
    if plan == "exporter":  # torch.nn.GRU: the TorchScript exporter's graph is the fused form, unless a Loop remains
        step(f"exporting to ONNX opset {opset} (the recurrence kept: {kept}; torchscript exporter)")
        fused = export_user_onnx(scripted, signature, opset, meta("fused"))
        if "Loop" in fused[1]["op_types"]:
            if strategy == "fused":
                raise UserInputError(f"--strategy fused: {model.reference} has a loop besides torch.nn.GRU; "
                                     "export it with --strategy loop")
        else:
            graphs["fused"] = fused
            if strategy == "fused" or onnx_exporter == "torchscript":  # its loop form would be this same graph
                return graphs
    if strategy in ("loop", "auto"):  # stepwise: neither
        step(f"exporting to ONNX opset {opset} (the recurrence kept: {kept}; {onnx_exporter} exporter)")
        if onnx_exporter == "dynamo":
            from gru_deploy.convert.programs import dynamo_onnx

            graphs["loop"] = dynamo_onnx(model, "classifier", signature, opset, meta("loop"))
        else:
            graphs["loop"] = export_user_onnx(scripted, signature, opset, meta("loop"))
    if plan == "build":
        step(f"building the fused graph: one ONNX GRU node per layer (opset {opset})")
        graphs["fused"] = build_fused_graph(model, signature, opset, "classifier", meta("fused"))
    if strategy == "stepwise" or (strategy == "auto" and _tutorial_cell_family(model)):
        step(f"exporting the stepwise form to ONNX opset {opset} (the cell as written, once per step)")
        graphs["stepwise"] = export_user_onnx(script_user(in_form(model, "stepwise")), signature, opset,
                                              meta("stepwise"), strategy="stepwise")
    return graphs


def build_fused_graph(model: "UserModel", signature: UserSignature, opset: int,
                      variant: str = "classifier", metadata: dict[str, Any] | None = None) -> tuple[bytes, dict]:
    """The tutorial-cell family's fused graph of `variant` (convert.families.build_stacked_fused),
    checked and serialised: (bytes, graph record)."""
    from gru_deploy.convert.families import build_stacked_fused
    from gru_deploy.convert.graphs import count_ops, finish_export

    onnx_model = build_stacked_fused(model.module, signature.inputs[0]["shape"][2], signature.output_names[0],
                                     opset, variant=variant)
    result = finish_export(onnx_model, "fused", opset, count_ops(onnx_model.graph), metadata)
    return result.onnx_bytes, result.record()


def _tutorial_cell_family(model: "UserModel") -> bool:
    """True for the tutorial-cell family (StackedGRUClassifier): gru-deploy builds its fused
    graphs itself, and its stepwise form."""
    from gru_deploy.models.families import cell_layers

    return cell_layers(model.module) is not None


def _torch_gru_family(model: "UserModel") -> bool:
    """True for torch.nn.GRU's family (TorchGRUClassifier): its fused form is the TorchScript
    exporter's graph (GRU nodes), its loop form by the dynamo exporter its control-flow form's."""
    from gru_deploy.models.families import TorchGRUClassifier

    return isinstance(model.module, TorchGRUClassifier)


def _script_hook(model: "UserModel", wrapper: Any, hook: str) -> "torch.jit.ScriptModule":
    """torch.jit.script of `wrapper(module)`, whose forward is the module's `hook`."""
    import torch

    from gru_deploy.convert.script import quiet_torchscript_deprecation

    try:
        with quiet_torchscript_deprecation():
            return torch.jit.script(wrapper(model.module).eval())
    except Exception as exc:
        raise UserInputError(f"TorchScript cannot compile {model.reference}.{hook}: "
                             f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None


def lengths_signature(signature: UserSignature) -> UserSignature:
    return UserSignature(signature.inputs + [{"name": LENGTHS_NAME, "dtype": "int64", "shape": ["batch"]}],
                         signature.outputs)


def stream_signature(signature: UserSignature, state_dims: list[int]) -> UserSignature:
    if STATE_OUT in signature.output_names:
        raise UserInputError(f"an output is named {STATE_OUT!r}, the stream variant's state: rename it "
                             "(--output-names)")
    state = {"dtype": "float32", "shape": ["batch", *state_dims]}
    return UserSignature(signature.inputs + [{"name": STATE_IN, **state}],
                         signature.outputs + [{"name": STATE_OUT, **state}])


# --- auto and the export folder ----------------------------------------------------------------

# auto: seconds of timing per candidate; when the two fastest are within RETIME_WITHIN of each
# other, they are timed again for RETIME_BUDGET_S each and that second timing decides.
TIMING_BUDGET_S = 0.5
RETIME_WITHIN = 1.2
RETIME_BUDGET_S = 1.5
# Files in an export dir that gru-deploy did not write and keeps across exports.
KEEP = ("README.md",)


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
              torchscript: bytes | None, onnx: bytes, form: str, graph: dict[str, Any], signature: dict[str, Any],
              **record: Any) -> None:
    """One variant's TorchScript and ONNX files (model.pt / model.onnx for the classifier,
    model_VARIANT.* otherwise) put into `files`, and recorded as the manifest lists them:
    `models` by file, `variants` (all but the classifier) by variant, with `record` added."""
    stem = "model" if variant == "classifier" else f"model_{variant}"
    pt, onnx_name = f"{stem}.pt", f"{stem}.onnx"
    files[onnx_name] = onnx
    if torchscript is not None:  # a program model has none (its programs take its place)
        files[pt] = torchscript
        models[pt] = {"variant": variant, "format": "torchscript", "precision": "fp32"}
    models[onnx_name] = {"variant": variant, "format": "onnx", "precision": "fp32", "strategy": form,
                         "opset": graph["opset"], "ir_version": graph["ir_version"]}
    if variant != "classifier":
        variants[variant] = {"torchscript": pt if torchscript is not None else None, "onnx": onnx_name,
                             "strategy": form, "signature": signature,
                             "onnx_node_count": graph["node_count"], "op_types": graph["op_types"], **record}


def write_export(out: Path, files: dict[str, bytes], fields: dict[str, Any], notes: list[str],
                 prove: Callable[[Path, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]],
                 step: Callable[[str], None]) -> dict[str, Any]:
    """The export folder, written all at once, for the tutorial model and a module alike: ORT-format
    copies of every ONNX model (onnxruntime's converter; a model it cannot convert is noted and
    goes without), every file into a staging folder, `prove(stage, manifest)` -> (parity.json's
    content, the manifest's parity record) raising CheckFailed to write nothing, then the
    manifest (`fields` plus format, versions, notes and every file's sha256). Returns it."""
    from gru_deploy.check.timing import stage
    from gru_deploy.convert.graphs import add_ort_models, to_ort_format
    from gru_deploy.errors import WriteFailed

    models = fields["models"]
    step("converting the ONNX models to ORT format (onnxruntime's converter)")
    try:
        with stage("ORT conversion"):
            converted = to_ort_format({n: files[n] for n, m in models.items()
                                       if m["format"] == "onnx" and m["variant"] != "step"})
        add_ort_models(files, models, converted)
    except WriteFailed as exc:  # an op the ORT-format writer does not take: the edge bundle goes without
        notes.append(f"no ORT-format copy: {exc}")
    with stage("write"), staged_dir(Path(out), keep=KEEP) as staged:
        for name, data in files.items():
            atomic_write_bytes(staged / name, data)
        manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
                                    "gru_deploy_version": __version__, **fields, "versions": library_versions(),
                                    "notes": notes, "files": {name: file_entry(staged / name) for name in files}}
        with stage("parity"):
            parity, manifest["parity"] = prove(staged, manifest)
        atomic_write_json(staged / "parity.json", parity)
        manifest["files"]["parity.json"] = file_entry(staged / "parity.json")
        atomic_write_json(staged / MANIFEST_NAME, manifest)
    return manifest
