"""Export targets beside ONNX and TorchScript, for PyTorch's successors of TorchScript (`--targets`):
a torch.export program (`.pt2`, `torch.export.save`), dynamic batch and seq, for each variant;
an AOTInductor package of the classifier's program (`torch._inductor.aoti_compile_and_package`:
the program compiled to C++ and a shared library, for libtorch servers without Python);
ExecuTorch programs (.pte) of the classifier and the stream's one step. And the loop form's
ONNX graphs by torch.onnx's dynamo exporter (`--onnx-exporter dynamo`).

torch.export unrolls a Python `for` loop to the example's length, as tracing does (and
torch.nn.GRU's kernel too); so every one of them is built from the model's control-flow form (models.control_flow: the same weights,
the loop a `torch.while_loop`, or a `scan` for ExecuTorch), and a program without its loop is
refused before anything is written. Each file is proved on the variant's parity grid like every
other file (check.module_parity.program_parity, or the ONNX forms' own check).
"""

from __future__ import annotations

import io
import shutil
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.module_parity import AOTI_FORMAT, EXECUTORCH_FORMAT, PROGRAM_FORMAT
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN

if TYPE_CHECKING:
    from gru_deploy.check.grid import ParityReport
    from gru_deploy.check.module_parity import UserSignature
    from gru_deploy.models.user import UserModel

TARGETS = ("torch-export", "aoti", "executorch")
# The variants an AOTInductor package is compiled for: each compile takes 20-30 s here (g++).
AOTI_VARIANTS = ("classifier",)
METHODS = {"classifier": "forward", "lengths": "forward_lengths", "stream": "forward_stream"}

FAMILIES_WITH_FORM = ("the tutorial classifier, `train --layers N [--bidirectional] [--family torch-gru]`")
WHILE_LOOP_HINT = (
    "write the time loop with torch.while_loop, which torch.export keeps a loop: "
    "h = torch.while_loop(lambda t, h: t < x.size(1), lambda t, h: (t + 1, cell(x.index_select(1, t.reshape(1))"
    ".squeeze(1), h)), (torch.zeros((), dtype=torch.int64), h0))[1] (TorchScript cannot compile that: gru-deploy then "
    "exports the module through torch.export alone, its programs in TorchScript's place)")


def without_form(model: "UserModel | None") -> bool:
    """True for a model whose loop torch.export would unroll: neither a built-in family (whose
    control-flow form gru-deploy writes) nor a program model (its own loop a while_loop or scan)."""
    from gru_deploy.models.control_flow import control_flow_form

    return model is not None and not model.program and control_flow_form(model.module) is None


def check_targets(targets: tuple[str, ...], model: "UserModel | None" = None) -> None:
    """UserInputError for a target this gru-deploy does not build, or one `model` cannot take."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UserInputError(f"unknown target {unknown[0]!r}: choose from {', '.join(TARGETS)} (ONNX and "
                             "TorchScript are always written)")
    if "aoti" in targets and not (shutil.which("g++") or shutil.which("c++")):
        raise UserInputError("--targets aoti compiles C++: install a C++ compiler (Debian/Ubuntu: apt-get install "
                             "g++) or leave aoti out")
    if targets:
        from gru_deploy.check.module_parity import quiet_torch_internals

        quiet_torch_internals()
    if "executorch" in targets:
        try:
            import executorch  # noqa: F401
        except ImportError:
            raise UserInputError("--targets executorch needs ExecuTorch: pip install 'gru-deploy[executorch]' (or "
                                 "pip install executorch) or leave executorch out") from None
    if targets and without_form(model):
        raise UserInputError(
            f"{model.reference}: --targets {','.join(targets)} needs the model's time loop as control flow, and "
            f"gru-deploy writes that form for the built-in families only ({FAMILIES_WITH_FORM}); torch.export would "
            f"unroll a Python for loop to one example length. For your own module, {WHILE_LOOP_HINT}")


def example_inputs(signature: "UserSignature") -> tuple[Any, ...]:
    """Inputs torch.export traces with: batch 2 and seq 3 (neither 0 nor 1, which it would
    specialise), lengths 3 and 1, zero states."""
    import torch

    args = []
    for tensor in signature.inputs:
        if tensor["name"] == INPUT_NAME:
            args.append(torch.zeros(2, 3, int(tensor["shape"][2])))
        elif tensor["name"] == LENGTHS_NAME:
            args.append(torch.tensor([3, 1], dtype=torch.int64))
        elif tensor["name"] == STATE_IN:
            args.append(torch.zeros(2, *(int(d) for d in tensor["shape"][1:])))
        else:
            raise CheckFailed(f"no example for input {tensor['name']!r}")
    return tuple(args)


def dynamic_shapes(signature: "UserSignature") -> tuple[dict[int, Any], ...]:
    """Batch dynamic on every input, seq on x; no bounds."""
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    return tuple({0: batch, 1: seq} if t["name"] == INPUT_NAME else {0: batch} for t in signature.inputs)


ONNX_EXPORTERS = ("torchscript", "dynamo")


def check_onnx_exporter(exporter: str, model: "UserModel | None" = None) -> None:
    """UserInputError for an exporter this gru-deploy does not know, or dynamo for a model
    without a control-flow form (the dynamo exporter unrolls a Python for loop, as torch.export does)."""
    if exporter not in ONNX_EXPORTERS:
        raise UserInputError(f"unknown ONNX exporter {exporter!r}: choose from {', '.join(ONNX_EXPORTERS)}")
    if exporter != "dynamo":
        return
    from gru_deploy.check.module_parity import quiet_torch_internals

    quiet_torch_internals()
    if without_form(model):
        raise UserInputError(
            f"{model.reference}: --onnx-exporter dynamo exports the model's control-flow form, which gru-deploy "
            f"writes for the built-in families only ({FAMILIES_WITH_FORM}); export it with --onnx-exporter torchscript")


def dynamo_onnx(model: "UserModel", variant: str, signature: "UserSignature", opset: int,
                metadata: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The variant's loop form written by torch.onnx's dynamo exporter, the successor of the
    TorchScript-based one: the control-flow form's torch.export program (its while_loop an ONNX
    `Loop`), batch and seq dynamic and named as the signature names them, checked
    (graphs.finish_export) like every graph; (bytes, graph record)."""
    import contextlib

    import torch

    from gru_deploy.convert.graphs import count_ops, finish_export

    program = export_program(model, variant, signature)
    names_in, names_out = [t["name"] for t in signature.inputs], signature.output_names
    try:  # it prints its progress and its opset conversion on stdout
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_program = torch.onnx.export(program, example_inputs(signature), dynamo=True, input_names=names_in,
                                             output_names=names_out, opset_version=opset, verbose=False)
    except Exception as exc:
        raise CheckFailed(f"torch.onnx's dynamo exporter failed on the {variant} variant: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:300]}") from None
    proto = onnx_program.model_proto
    axes = {}  # the exporter's symbols (s33, ...) for batch and seq, named as the signature names them
    for tensor, record in zip(proto.graph.input, signature.inputs):
        for dim, name in zip(tensor.type.tensor_type.shape.dim, record["shape"]):
            if dim.dim_param and isinstance(name, str):
                axes[dim.dim_param] = name
    for tensor in [*proto.graph.input, *proto.graph.output]:
        for dim in tensor.type.tensor_type.shape.dim:
            if dim.dim_param in axes:
                dim.dim_param = axes[dim.dim_param]
    result = finish_export(proto, "loop", opset, count_ops(proto.graph),
                           {**metadata, "gru_deploy.onnx_exporter": "dynamo"})
    if not {"Loop", "Scan"} & set(result.record()["op_types"]):  # a while_loop's Loop, a scan's Scan
        raise CheckFailed(f"the dynamo exporter's {variant} graph has no Loop: its time loop was unrolled")
    return result.onnx_bytes, {**result.record(), "exporter": "dynamo"}


def control_flow(model: "UserModel") -> Any:
    """The model's control-flow form (models.control_flow; a program model is its own), in
    eval mode; UserInputError when gru-deploy cannot write one."""
    from gru_deploy.models.control_flow import control_flow_form

    form = model.module if getattr(model, "program", False) else control_flow_form(model.module)
    if form is None:
        raise UserInputError(f"{model.reference}: no control-flow form; {WHILE_LOOP_HINT}")
    return form.eval()


def loops(program: Any) -> dict[str, int]:
    """How many torch.while_loop and scan calls an exported program's graph holds."""
    import torch

    ops = {"while_loop": torch.ops.higher_order.while_loop, "scan": torch.ops.higher_order.scan}
    return {name: sum(1 for node in program.graph.nodes if node.op == "call_function" and node.target is op)
            for name, op in ops.items()}


def program_recurrence(model: "UserModel", input_size: int) -> str | None:
    """How a module TorchScript cannot compile keeps its loop under torch.export (batch and seq
    dynamic): "while_loop", "scan", or None when torch.export fails on it or has no loop (a
    Python loop it would unroll)."""
    import torch

    from gru_deploy.check.module_parity import UserSignature

    signature = UserSignature([{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", "seq", input_size]}], [])
    torch._dynamo.reset()
    try:
        program = torch.export.export(model.module.eval(), example_inputs(signature),
                                      dynamic_shapes=dynamic_shapes(signature))
    except Exception:  # torch.export raises many types; each means it cannot keep this module's loop
        return None
    found = loops(program)
    return next((name for name, count in found.items() if count), None)


def export_program(model: "UserModel", variant: str, signature: "UserSignature") -> Any:
    """The variant's control-flow form through torch.export, batch and seq dynamic; CheckFailed
    when torch.export fails or the program lost its while_loop."""
    import torch

    from gru_deploy.models.control_flow import Variant

    form = control_flow(model)
    torch._dynamo.reset()  # a guard of an earlier export in this process would leak into this one
    try:
        program = torch.export.export(Variant(form, METHODS[variant]), example_inputs(signature),
                                      dynamic_shapes={"args": dynamic_shapes(signature)})
    except Exception as exc:
        raise CheckFailed(f"torch.export of the {variant} variant failed: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:300]}") from None
    if not any(loops(program).values()):
        raise CheckFailed(f"the {variant} program has no while_loop: torch.export unrolled its time loop")
    return program


def build_program(model: "UserModel", variant: str, signature: "UserSignature",
                  step: Callable[[str], None]) -> tuple[bytes, dict[str, Any], Any]:
    """The variant's torch.export program, saved (`torch.export.save`): its bytes, its record
    (the loops it keeps, each axis's bounds as torch.export recorded them) and the program."""
    import torch

    step(f"torch.export of the {variant} variant (its loop a torch.while_loop; batch and seq dynamic)")
    program = export_program(model, variant, signature)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    found = loops(program)
    record = {"form": "while_loop" if found["while_loop"] else "scan", "while_loops": found["while_loop"],
              **({"scans": found["scan"]} if found["scan"] else {}), "bounds": axis_bounds(program, signature)}
    return buffer.getvalue(), record, program


def build_aoti(program: Any, variant: str, step: Callable[[str], None]) -> tuple[bytes, dict[str, Any]]:
    """The variant's torch.export program compiled by AOTInductor into a package: its bytes and
    record (what it was compiled with, and for: the compiler, the CPU vector ISA inductor chose,
    which a CPU running it must have)."""
    import platform
    import subprocess
    import tempfile
    from pathlib import Path

    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    step(f"AOTInductor: compiling the {variant} program to C++ and a shared library (20-30 s here)")
    compiler = shutil.which("g++") or shutil.which("c++") or "c++"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as exc:
            raise CheckFailed(f"AOTInductor could not compile the {variant} program: {type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:300]}") from None
        data = path.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()
    isa = pick_vec_isa()
    return data, {"compiler": version[0] if version else compiler, "machine": platform.machine(),
                  "cpu_isa": str(isa) if isa else "none (scalar code)"}


def axis_bounds(program: Any, signature: "UserSignature") -> dict[str, list[int | None]]:
    """[min, max] of x's batch and seq as the program records them (None: unbounded)."""
    x = next(node for node in program.graph.nodes if node.op == "placeholder"
             and node.name == program.graph_signature.user_inputs[0])
    bounds = {}
    for axis, name in ((0, "batch"), (1, "seq")):
        size = x.meta["val"].shape[axis]
        if isinstance(size, int):
            bounds[name] = [size, size]
            continue
        ranges = program.range_constraints[size.node.expr]  # sympy: torch's infinity is not an Integer
        bounds[name] = [int(v) if v.is_Integer else None for v in (ranges.lower, ranges.upper)]
    return bounds


def add_targets(model: "UserModel", signatures: dict[str, "UserSignature"], targets: tuple[str, ...], proof: Any,
                files: dict[str, bytes], models: dict[str, Any], step: Callable[[str], None],
                executorch_batch: int = 1, executorch_max_seq: int = 2048) -> list["ParityReport"]:
    """Build each of `targets` for each variant it takes, prove it with `proof.check_program`
    (nothing is written when one fails) and put it into `files` and `models`; the reports.
    torch-export: every variant's program; aoti: the classifier's program (written too: it is
    what the package is compiled from) and its package; executorch: the classifier and the
    stream's one step, for each backend."""
    from gru_deploy.check.timing import stage

    parts = []
    for variant, sig in signatures.items():
        if PROGRAM_FORMAT in targets or ("aoti" in targets and variant in AOTI_VARIANTS):
            with stage("torch.export"):
                data, record, program = build_program(model, variant, sig, step)
            with stage("parity"):
                parts.append(proof.check_program(data, variant, sig, model, step))
            add_program(files, models, variant, data, record)
            if "aoti" in targets and variant in AOTI_VARIANTS:
                with stage("AOTInductor"):
                    data, compiled = build_aoti(program, variant, step)
                with stage("parity"):
                    parts.append(proof.check_program(data, variant, sig, model, step, AOTI_FORMAT))
                add_program(files, models, variant, data,
                            {"program": program_name(variant), "form": record["form"], **compiled}, AOTI_FORMAT)
        if "executorch" in targets and variant in (("classifier",) if model.program else ("classifier", "stream")):
            with stage("ExecuTorch"):
                lowered = build_executorch(model, variant, sig, executorch_batch, executorch_max_seq, step)
            for name, data, record in lowered:
                with stage("parity"):
                    parts.append(proof.check_program(data, variant, sig, model, step, EXECUTORCH_FORMAT, name,
                                                     record))
                add_executorch(files, models, variant, name, data, record)
    return parts


def program_name(variant: str, fmt: str = PROGRAM_FORMAT) -> str:
    stem = "model" if variant == "classifier" else f"model_{variant}"
    return f"{stem}.pt2" if fmt == PROGRAM_FORMAT else f"{stem}.{fmt}.pt2"


def add_program(files: dict[str, bytes], models: dict[str, Any], variant: str, data: bytes,
                record: dict[str, Any], fmt: str = PROGRAM_FORMAT) -> None:
    """A program or package into `files`, listed in `models` by its variant and format."""
    import torch

    name = program_name(variant, fmt)
    files[name] = data
    models[name] = {"variant": variant, "format": fmt, "precision": "fp32", "torch": torch.__version__, **record}


# ExecuTorch's backends a .pte is lowered for: its portable kernels, and XNNPACK (which takes
# the operators outside the loop).
EXECUTORCH_BACKENDS = ("portable", "xnnpack")


def build_executorch(model: "UserModel", variant: str, signature: "UserSignature", batch: int, max_seq: int,
                     step: Callable[[str], None]) -> list[tuple[str, bytes, dict[str, Any]]]:
    """ExecuTorch programs (.pte) of a variant, one per backend: the classifier with its loop a
    scan at a static `batch` and seq bounded by 1..`max_seq`; the stream variant as one step
    (x [batch, 1, I], h0 -> logits, h_n; no loop) at a static `batch`, its caller stepping it
    through a signal. ExecuTorch plans memory for these bounds
    and answers another batch wrongly without an error (seen: batch 1 on a batch-2 program
    gave 2 rows), so each record holds the bounds and every runner checks them first."""
    import torch
    from torch.export import Dim

    from gru_deploy.models.control_flow import Variant

    form = control_flow(model)
    x_size = int(signature.inputs[0]["shape"][2])
    if variant == "classifier":  # a program model's own forward: its loop is a scan (program_model_targets)
        method, seq = "forward" if getattr(model, "program", False) else "forward_scan", [1, max_seq]
        example: tuple[Any, ...] = (torch.zeros(batch, min(3, max_seq), x_size),)
        dynamic: Any = {"args": ({1: Dim("seq", min=1, max=max_seq)},)} if max_seq > 1 else None
    elif variant == "stream":
        method, seq = "forward_one_step", [1, 1]
        state = [int(d) for d in signature.inputs[1]["shape"][1:]]
        example, dynamic = (torch.zeros(batch, 1, x_size), torch.zeros(batch, *state)), None
    else:
        raise CheckFailed(f"no ExecuTorch program for the {variant} variant")
    step(f"ExecuTorch: lowering the {variant} variant (batch {batch}, seq {seq[0]}..{seq[1]}) for "
         f"{' and '.join(EXECUTORCH_BACKENDS)}")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch._dynamo.reset()  # a guard of an earlier export in this process would leak into this one
    try:
        program = torch.export.export(Variant(form, method), example, dynamic_shapes=dynamic)
    except Exception as exc:
        raise CheckFailed(f"torch.export of the {variant} variant for ExecuTorch failed: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:300]}") from None
    out = []
    for backend in EXECUTORCH_BACKENDS:  # each lowering starts from the same program (it copies it)
        try:
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()] if backend == "xnnpack"
                                                  else []).to_executorch()
        except Exception as exc:
            raise CheckFailed(f"ExecuTorch could not lower the {variant} variant for {backend}: "
                              f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}") from None
        stem = "model" if variant == "classifier" else "model_step"
        out.append((f"{stem}.{backend}.pte", bytes(lowered.buffer),
                    {"backend": backend, "batch": batch, "seq": seq,
                     "form": "scan" if variant == "classifier" else "one step"}))
    return out


def add_executorch(files: dict[str, bytes], models: dict[str, Any], variant: str, name: str, data: bytes,
                   record: dict[str, Any]) -> None:
    """An ExecuTorch program into `files`, listed in `models` with its bounds."""
    from importlib.metadata import version

    files[name] = data
    models[name] = {"variant": variant, "format": EXECUTORCH_FORMAT, "precision": "fp32",
                    "executorch": version("executorch"), **record}
