"""Export the user's own recurrent model: script it, check its recurrence runs over the input's
time axis, read its signature off the module, export it to ONNX and prove parity against the
module itself run in float64.

The checks are the tutorial path's, made generic: the loop is kept (a `prim::Loop` whose trip
count comes from `x`, or a recurrent operator such as `torch.nn.GRU`'s, which exports to ONNX
`GRU` over the dynamic axis), the graph's node count must not change with the example length,
and every output is compared, eager vs TorchScript vs onnxruntime vs onnx's reference vs the
float64 module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN, STATE_OUT
from gru_deploy.check.module_parity import (
    GOLDEN_FILE, LENGTHS_CASES, REFERENCE_FILE, STREAM_CASES, USER_CASES, Call, Feed, UserSignature, as_outputs,
    case_feed, case_input, golden_store, module_parity, npz_bytes, recording, user_runners)
from gru_deploy.check.grid import pair_key
from gru_deploy.check.recurrence import check_recurrence, source_line  # noqa: F401  (the recurrence check: check's)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gru_deploy.models.user import UserModel

ONNX_RECURRENCE = ("Loop", "Scan", "GRU", "LSTM", "RNN")
# Golden cases (batch, seq) per variant, a subset of the parity grid whose float64 outputs it
# stored (USER_CASES, LENGTHS_CASES, STREAM_CASES): a bundle ships them.
GOLDEN_BY_VARIANT = {"classifier": ((3, 7), (2, 100)), "lengths": ((3, 7), (4, 100)), "stream": ((3, 7), (2, 100))}
# Probes that name each output axis: (batch, seq) pairs whose sizes differ from each other.
PROBES = ((2, 3), (3, 5))


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
                     kind: str = "user") -> tuple[bytes, dict]:
    """The scripted module as ONNX (convert.graphs.export_scripted: exported at two example
    lengths, refused when its node count changes between them or it holds no recurrence)."""
    from gru_deploy.convert.graphs import export_scripted, finish_export

    model, op_types = export_scripted(scripted, signature.to_dict(), opset, needs=ONNX_RECURRENCE)
    result = finish_export(model, "loop", opset, op_types, {"gru_deploy.model": kind})
    return result.onnx_bytes, result.record()


# --- parity ---------------------------------------------------------------------------------

# A method a module may define (with @torch.jit.export) for gru-deploy to export its lengths
# variant: forward_lengths(x [batch, seq, I] padded, lengths int64 [batch]) -> the outputs of
# forward, each sample's as it gets them alone, unpadded.
LENGTHS_HOOK = "forward_lengths"

# The stream variant's hooks: initial_state(batch) -> the state forward starts from ([batch,
# ...] zeros; None when the module cannot stream), and @torch.jit.export forward_stream(x, h0)
# -> (forward's outputs..., h_n).
STREAM_HOOK = "forward_stream"
STATE_HOOK = "initial_state"
# The stream's promise, checked on the float64 module: from the initial state, one chunk is
# forward's answer, and chunks of these sizes carried through h_n are the one pass.
CHUNK_SIZES = (1, 7)
CONTRACT_CASES = ((2, 9), (1, 100))


# --- the export folder ----------------------------------------------------------------------

MODULE_STRATEGIES = ("loop", "fused", "stepwise", "auto")


def _once(runner: Call) -> Call:
    """`runner`, answering each parity case (a feed is fixed by its (batch, seq): case_feed) once."""
    answers: dict[tuple[int, ...], dict[str, "np.ndarray"]] = {}

    def cached(feed: Feed) -> dict[str, "np.ndarray"]:
        key = tuple(feed[INPUT_NAME].shape[:2])
        if key not in answers:
            answers[key] = runner.run(feed)
        return answers[key]
    return Call(runner.name, cached)


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
                  opset: int, strategy: str, step: Callable[[str], None]) -> dict[str, tuple[bytes, dict]]:
    """The candidate ONNX graphs for `strategy`: {"loop": …}, {"fused": …}, {"stepwise": …},
    each (bytes, graph record). fused where it applies (convert.families.fused_plan), stepwise
    for the tutorial-cell family; auto takes every one that applies (loop alone when neither)."""
    from gru_deploy.convert.families import fused_plan

    plan = None
    if strategy in ("fused", "auto"):
        try:
            plan = fused_plan(model.module, kept, model.reference)
        except UserInputError:
            if strategy == "fused":
                raise
    graphs: dict[str, tuple[bytes, dict]] = {}
    kind = model.record()["kind"]
    if strategy in ("loop", "auto") or plan == "exporter":  # stepwise: neither
        step(f"exporting to ONNX opset {opset} (the recurrence kept: {kept})")
        exported = export_user_onnx(scripted, signature, opset, kind)
        if plan == "exporter":  # torch.nn.GRU: the exporter's graph is the fused form, unless a Loop remains
            if "Loop" not in exported[1]["op_types"]:
                return {"loop" if strategy == "loop" else "fused": exported}
            if strategy == "fused":
                raise UserInputError(f"--strategy fused: {model.reference} has a loop besides torch.nn.GRU; "
                                     "export it with --strategy loop")
        graphs["loop"] = exported
    if plan == "build":
        step(f"building the fused graph: one ONNX GRU node per layer (opset {opset})")
        graphs["fused"] = build_fused_graph(model, signature, opset)
    if strategy == "stepwise" or (strategy == "auto" and _tutorial_cell_family(model)):
        step(f"exporting the stepwise form to ONNX opset {opset} (the cell as written, once per step)")
        graphs["stepwise"] = export_user_onnx(script_user(in_form(model, "stepwise")), signature, opset,
                                              model.record()["kind"])
    return graphs


def build_fused_graph(model: "UserModel", signature: UserSignature, opset: int,
                      variant: str = "classifier") -> tuple[bytes, dict]:
    """The tutorial-cell family's fused graph of `variant` (convert.families.build_stacked_fused),
    checked and serialised: (bytes, graph record)."""
    from gru_deploy.convert.families import build_stacked_fused
    from gru_deploy.convert.graphs import count_ops, finish_export

    onnx_model = build_stacked_fused(model.module, signature.inputs[0]["shape"][2], signature.output_names[0],
                                     opset, variant=variant)
    result = finish_export(onnx_model, "fused", opset, count_ops(onnx_model.graph),
                           {"gru_deploy.model": model.record()["kind"]})
    return result.onnx_bytes, result.record()


def _tutorial_cell_family(model: "UserModel") -> bool:
    """True for the tutorial-cell family (StackedGRUClassifier): gru-deploy builds its fused
    graphs itself, and its stepwise form."""
    from gru_deploy.models.families import StackedGRUClassifier

    return isinstance(model.module, StackedGRUClassifier)


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


def export_lengths_variant(model: "UserModel", signature: UserSignature, form: str, opset: int, atol: float,
                           rtol: float, step: Callable[[str], None]) -> dict[str, Any]:
    """The lengths variant of a module that defines the hook (LENGTHS_HOOK, @torch.jit.export):
    scripted through models.variants.LengthsOf, exported in `form` (fused: the tutorial-cell
    family's GRU nodes given sequence_lens; otherwise the exporter's graph of the scripted
    hook), and proved on LENGTHS_CASES against the float64 module's hook, whose padded answer
    is itself held to the module's forward on each sample alone. Returns its files, parity,
    stored float64 outputs and manifest entries."""
    import torch

    from gru_deploy.convert import script
    from gru_deploy.models.variants import LengthsOf

    sig = lengths_signature(signature)
    step(f"the lengths variant ({LENGTHS_HOOK}): scripting and exporting it ({form})")
    scripted = _script_hook(in_form(model, form), LengthsOf, LENGTHS_HOOK)
    onnx_bytes, graph = (build_fused_graph(model, sig, opset, "lengths") if form == "fused"
                         else export_user_onnx(scripted, sig, opset, model.record()["kind"]))
    step("checking the lengths variant's parity: padded = alone, every runner against float64")
    runners = user_runners(model.module, scripted, onnx_bytes, sig, method=LENGTHS_HOOK, variant="lengths")
    runners["float64"], stored = recording(runners["float64"], sig, "lengths")
    double = copy.deepcopy(model.module).double()

    def padding(feed: Feed, outputs: dict[str, dict[str, "np.ndarray"]]) -> dict[str, Any]:
        """Each sample's padded float64 answer against the module's forward in float64 on the
        sample alone, unpadded (a per-step output: on the sample's own steps)."""
        import numpy as np

        from gru_deploy.check.compare import compare

        want: dict[str, list["np.ndarray"]] = {o["name"]: [] for o in sig.outputs}
        got: dict[str, list["np.ndarray"]] = {o["name"]: [] for o in sig.outputs}
        for index, length in enumerate(feed[LENGTHS_NAME]):
            x = torch.from_numpy(feed[INPUT_NAME][index:index + 1, :int(length)]).double()
            with torch.no_grad():
                single = as_outputs(double(x), model.reference)
            for output, alone in zip(sig.outputs, single):
                padded = outputs["float64"][output["name"]][index:index + 1]
                if "seq" in output["shape"]:
                    padded = padded.take(range(int(length)), axis=output["shape"].index("seq"))
                want[output["name"]].append(alone.detach().numpy().ravel())
                got[output["name"]].append(padded.ravel())
        return {pair_key("", "float64 alone", "float64 padded", name):
                compare(np.concatenate(want[name]), np.concatenate(got[name]), atol, rtol).to_json() for name in want}

    parity = module_parity(runners, sig, atol, rtol, LENGTHS_CASES, "lengths", extra=padding)
    parity.notes.append("lengths spread over 1..seq; 'float64 alone': the module's forward in float64 on each sample "
                        "alone, unpadded, against its padded answer on its valid steps")
    if not parity:
        raise CheckFailed("the lengths variant's parity failed, nothing written: " + "; ".join(parity.failures()))
    return {"signature": sig, "pt": script.to_bytes(scripted), "onnx": onnx_bytes, "graph": graph, "form": form,
            "parity": parity, "stored": stored}


def stream_signature(signature: UserSignature, state_dims: list[int]) -> UserSignature:
    if STATE_OUT in signature.output_names:
        raise UserInputError(f"an output is named {STATE_OUT!r}, the stream variant's state: rename it "
                             "(--output-names)")
    state = {"dtype": "float32", "shape": ["batch", *state_dims]}
    return UserSignature(signature.inputs + [{"name": STATE_IN, **state}],
                         signature.outputs + [{"name": STATE_OUT, **state}])


def _stream_contract(model: "UserModel", signature: UserSignature, atol: float, rtol: float) -> list[dict[str, Any]]:
    """The stream's promise on the float64 module, as parity cases: from initial_state, one
    chunk gives forward's outputs; chunks carried through h_n give the one pass's outputs and
    state (one case per chunk size)."""
    import numpy as np
    import torch

    from gru_deploy.check.compare import compare
    from gru_deploy.check.grid import pair_key

    double = copy.deepcopy(model.module).double()
    names = signature.output_names
    per_step = ["seq" in o["shape"] for o in signature.outputs]

    def numpy(values: Any) -> list["np.ndarray"]:
        return [v.detach().numpy() for v in as_outputs(values, model.reference)]

    def case(batch: int, seq: int, pairs: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"batch": batch, "seq": seq, **more, "variant": "stream", "pairs": pairs,
                "passed": all(c["passed"] for c in pairs.values())}

    cases = []
    for batch, seq in CONTRACT_CASES:
        x = torch.from_numpy(case_input(batch, seq, signature.inputs[0]["shape"][2])).double()
        h0 = getattr(double, STATE_HOOK)(batch).double()
        with torch.no_grad():
            whole = numpy(double(x))
            one = numpy(getattr(double, STREAM_HOOK)(x, h0))
            cases.append(case(batch, seq, {pair_key("stream:", "float64 forward", "float64 stream", name):
                                           compare(want, got, atol, rtol).to_json()
                                           for name, want, got in zip(names, whole, one)}))
            for size in CHUNK_SIZES:
                state, parts = h0, []
                for start in range(0, seq, size):
                    out = numpy(getattr(double, STREAM_HOOK)(x[:, start:start + size], state))
                    state = torch.from_numpy(out[-1])
                    parts.append(out)
                chunked = [np.concatenate([p[i] for p in parts], axis=signature.outputs[i]["shape"].index("seq"))
                           if per_step[i] else parts[-1][i] for i in range(len(names))] + [parts[-1][-1]]
                cases.append(case(batch, seq, {
                    pair_key("stream:", "float64 one pass", f"float64 chunks of {size}", name):
                    compare(want, got, atol, rtol).to_json() for name, want, got in zip(names + [STATE_OUT], one, chunked)},
                    chunk=size))
    return cases


def export_stream_variant(model: "UserModel", signature: UserSignature, form: str, opset: int, atol: float,
                          rtol: float, step: Callable[[str], None]) -> dict[str, Any] | str:
    """The stream variant of a module with the stream hooks (STATE_HOOK, STREAM_HOOK): scripted
    through models.variants.StreamOf, exported in `form` (fused: the tutorial-cell family's GRU
    nodes, each layer's from h0[:, layer]; otherwise the exporter's graph), proved on
    STREAM_CASES (from a state in [-1, 1]) against the float64 hook, the hook itself held to
    forward and to its own chunked runs (_stream_contract). Returns what export_lengths_variant
    does, or why the module does not stream."""
    import torch

    from gru_deploy.convert import script
    from gru_deploy.models.variants import StreamOf

    initial = getattr(model.module, STATE_HOOK, None)
    state = initial(2) if callable(initial) else None
    if state is None:
        return f"{STATE_HOOK}(batch) returned None: the module cannot stream (e.g. bidirectional)"
    if not isinstance(state, torch.Tensor) or state.dim() < 2 or state.shape[0] != 2 or bool(state.any()):
        raise UserInputError(f"{model.reference}.{STATE_HOOK}(2) must return zeros of shape [2, ...] (the state "
                             f"forward starts from), got {getattr(state, 'shape', type(state).__name__)}")
    sig = stream_signature(signature, [int(d) for d in state.shape[1:]])
    step(f"the stream variant ({STREAM_HOOK}, state {list(state.shape[1:])}): scripting and exporting it ({form})")
    scripted = _script_hook(in_form(model, form), StreamOf, STREAM_HOOK)
    onnx_bytes, graph = (build_fused_graph(model, sig, opset, "stream") if form == "fused"
                         else export_user_onnx(scripted, sig, opset, model.record()["kind"]))
    step("checking the stream variant's parity: one pass = forward = chunks, every runner against float64")
    runners = user_runners(model.module, scripted, onnx_bytes, sig, method=STREAM_HOOK, variant="stream")
    runners["float64"], stored = recording(runners["float64"], sig, "stream")
    parity = module_parity(runners, sig, atol, rtol, STREAM_CASES, "stream")
    parity.cases.extend(_stream_contract(model, signature, atol, rtol))
    parity.notes.append(f"from {STATE_HOOK}: one chunk = forward, and chunks of {CHUNK_SIZES} steps carried "
                        f"through {STATE_OUT} = the one pass, on the float64 module at {list(CONTRACT_CASES)}")
    if not parity:
        raise CheckFailed("the stream variant's parity failed, nothing written: " + "; ".join(parity.failures()))
    return {"signature": sig, "pt": script.to_bytes(scripted), "onnx": onnx_bytes, "graph": graph, "form": form,
            "parity": parity, "stored": stored}


def golden_cases(model: "UserModel", signatures: dict[str, UserSignature]) -> tuple[bytes, dict[str, Any]]:
    """The golden cases (GOLDEN_BY_VARIANT, inputs as the parity grid's) of each exported variant,
    answered by the module eager in fp32: GOLDEN_FILE's bytes and the manifest's record."""
    from gru_deploy.check.runners import run_module
    from gru_deploy.models.variants import LengthsOf, StreamOf

    wrap = {"classifier": lambda m: m, "lengths": LengthsOf, "stream": StreamOf}
    cases = []
    for variant, sig in signatures.items():
        eager = wrap[variant](model.module).eval()
        for batch, seq in GOLDEN_BY_VARIANT[variant]:
            feed = case_feed(sig, batch, seq)
            cases.append((f"{variant}_{len(cases)}", variant, feed, run_module(eager, sig.to_dict(), feed)))
    return golden_store(cases)


def export_user_model(model: "UserModel", out: Path, opset: int = 17, atol: float = 1e-5, rtol: float = 1e-5,
                      input_size: int | None = None, output_names: list[str] | None = None,
                      on_step: Callable[[str], None] | None = None, labels: tuple[str, ...] = (),
                      metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                      strategy: str = "loop", typical: tuple[int, int] = (1, 100)) -> dict[str, Any]:
    """Write model.pt, model.onnx, parity.json and manifest.json for a user's model into `out`,
    all at once and only when every check passes; return the manifest. `labels`, `metrics`
    and `training` are recorded as given (a built-in family's checkpoint carries them).
    `strategy` loop, fused (where it applies) or auto (the faster of the two that pass parity
    at `typical` (batch, seq)). Over 60 lines: a module's front half (script, recurrence,
    signature, forms, parity, hooks' variants), each step a call; write_export writes the folder."""
    from gru_deploy.check.grid import check_tolerances
    from gru_deploy.convert import script
    from gru_deploy.convert.folder import add_model, choose_fastest, time_strategies, write_export
    from gru_deploy.models.user import input_size_of

    check_tolerances(atol, rtol)
    check_module_strategy(strategy, model)
    step = on_step or (lambda message: None)
    size = input_size or input_size_of(model.module)
    if size is None:
        raise UserInputError(f"{model.reference}: cannot read the input size off its layers; pass --input-size")
    step(f"scripting {model.reference} with torch.jit.script")
    scripted = script_user(model)
    kept = check_recurrence(scripted, model.reference)
    step(f"reading the signature off the module (input [batch, seq, {size}])")
    signature = discover_signature(model.module, size, model.reference, output_names)
    if labels and (len(signature.outputs) != 1 or signature.outputs[0]["shape"][-1] != len(labels)):
        raise UserInputError(f"{len(labels)} labels do not fit the outputs {signature.to_dict()['outputs']}")
    candidates = module_graphs(model, scripted, kept, signature, opset, strategy, step)
    pt_bytes = script.to_bytes(scripted)
    parities, module_side = {}, {}
    stored: dict[str, "np.ndarray"] = {}
    for form, (data, _) in candidates.items():
        step(f"checking parity of every output ({form}): eager, TorchScript, onnxruntime, onnx reference, float64")
        runners = user_runners(model.module, scripted, data, signature)
        if not module_side:  # the module's own runners answer alike for every form: run them once
            runners["float64"], stored = recording(runners["float64"], signature)
            module_side = {name: _once(runners[name]) for name in ("eager", "torchscript", "float64")}
        runners.update(module_side)
        parities[form] = module_parity(runners, signature, atol, rtol)
        if not parities[form]:
            raise CheckFailed(f"parity failed ({form}), nothing written: " + "; ".join(parities[form].failures()))
    auto = None
    chosen = next(iter(candidates))
    if strategy == "auto":
        step(f"timing {', '.join(candidates)} at batch {typical[0]}, seq {typical[1]}")
        chosen, auto = choose_fastest({k: v[0] for k, v in candidates.items()},
                                      lambda graphs, budget: time_strategies(graphs, signature.to_dict(), typical,
                                                                             budget), on_step=step)
        auto.update({"typical_batch": typical[0], "typical_seq": typical[1], "candidates": list(candidates)})
    onnx_bytes, graph = candidates[chosen]
    parity = parities[chosen]
    stored = dict(stored)
    notes: list[str] = []
    files: dict[str, bytes] = {}
    models: dict[str, dict[str, Any]] = {}
    variants: dict[str, Any] = {}
    add_model(files, models, variants, "classifier", pt_bytes, onnx_bytes, chosen, graph, signature.to_dict())
    exported: dict[str, Any] = {}
    built = chosen if chosen in ("fused", "stepwise") and _tutorial_cell_family(model) else "loop"  # variants follow it
    if hasattr(scripted, LENGTHS_HOOK):
        exported["lengths"] = export_lengths_variant(model, signature, built, opset, atol, rtol, step)
    else:
        notes.append(f"the lengths variant is absent: the module defines no @torch.jit.export {LENGTHS_HOOK}"
                     "(x, lengths)")
    if hasattr(scripted, STREAM_HOOK):
        result = export_stream_variant(model, signature, built, opset, atol, rtol, step)
        if isinstance(result, str):
            notes.append(f"the stream variant is absent: {result}")
        else:
            exported["stream"] = result
    else:
        notes.append(f"the stream variant is absent: the module defines no @torch.jit.export {STREAM_HOOK}"
                     f"(x, {STATE_IN}) (and {STATE_HOOK}(batch))")
    for variant, done in exported.items():
        stored.update(done["stored"])
        parity.extend(done["parity"])
        add_model(files, models, variants, variant, done["pt"], done["onnx"], done["form"], done["graph"],
                  done["signature"].to_dict())
    files[GOLDEN_FILE], golden = golden_cases(model, {"classifier": signature,
                                                     **{v: done["signature"] for v, done in exported.items()}})
    files[REFERENCE_FILE] = npz_bytes(stored)
    return write_export(out, files, {
        "model": {**model.record(), "recurrence": kept}, "strategy": chosen, "auto": auto,
        "opset": graph["opset"], "ir_version": graph["ir_version"],
        "onnx": {"node_count": graph["node_count"], "op_types": graph["op_types"]},
        "signature": signature.to_dict(), "models": models, "variants": variants, "config": {"input_size": size},
        "labels": list(labels), "metrics": {k: v for k, v in (metrics or {}).items() if k != "loss_history"},
        "training": dict(training or {}), "source_checkpoint": {"sha256": model.checkpoint_sha256},
        "reference": {"file": REFERENCE_FILE, "computed_by": f"{model.reference} in float64 (module.double())",
                      "cases": [list(c) for c in USER_CASES],
                      **({"lengths_cases": [list(c) for c in LENGTHS_CASES]} if "lengths" in variants else {}),
                      **({"stream_cases": [list(c) for c in STREAM_CASES]} if "stream" in variants else {})},
        "golden": golden}, notes, lambda stage, manifest: (parity.to_json(), parity.record()), step)


def export_family(ckpt: Any, out: Path, opset: int = 17, atol: float = 1e-5, rtol: float = 1e-5,
                  on_step: Callable[[str], None] | None = None, strategy: str = "loop",
                  typical: tuple[int, int] = (1, 100)) -> dict[str, Any]:
    """Export a built-in family's checkpoint (train.FamilyCheckpoint) by the generic path."""
    from gru_deploy.models import families
    from gru_deploy.models.user import UserModel

    reference = families.family_reference(ckpt.family)
    model = UserModel(ckpt.model(), reference, families.__file__, dict(ckpt.model_args), ckpt.sha256,
                      family=ckpt.family)
    return export_user_model(model, out, opset=opset, atol=atol, rtol=rtol, on_step=on_step, labels=ckpt.labels,
                             metrics=ckpt.metrics, training=ckpt.training, strategy=strategy, typical=typical)
