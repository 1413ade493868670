"""Parity of every export: its signature, the parity grids (the unit grid, the wide grid) and
their inputs, runners over every runtime (the module eager and its float64 reference when it
is at hand, else the float64 answers the export stored), the comparison of every output, and
`verify` of an export folder from its files. It runs and compares; it builds nothing
(convert builds the graphs)"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from gru_deploy.check.recurrence import check_recurrence
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gru_deploy.check.grid import ParityReport


@dataclass
class UserSignature:
    """Inputs and outputs as the manifest records them: name, dtype, shape (dynamic dims named)."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs}

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]


def as_outputs(value: Any, reference: str) -> tuple["torch.Tensor", ...]:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise UserInputError(f"{reference}: forward must return a tensor or a tuple of tensors, got "
                         f"{type(value).__name__}")


# The unit grid, a module's: (batch, seq) per variant, unit-normal inputs (case_feed); the lengths
# variant's lengths spread over 1..seq (the first sample full).
USER_CASES = ((1, 1), (3, 7), (2, 100), (1, 2048))
LENGTHS_CASES = ((3, 7), (4, 100), (3, 2048))
STREAM_CASES = ((1, 1), (3, 7), (2, 100), (1, 2048))
CASES = {"classifier": USER_CASES, "lengths": LENGTHS_CASES, "stream": STREAM_CASES}
# onnx's reference evaluator (pure Python) runs on the unit grid's cases of at most this many
# batch x steps: every case up to 100 steps.
REFERENCE_MAX_CELLS = 400

# The wide grid, for a model whose float64 reference estimates float32's own error (the tutorial
# classifier's numpy re-implementation): batch {1, 3, 64} x seq {0, 1, 7, 100, 1000} plus one
# 2,048-step case; its variants on a smaller grid plus a long case; inputs of both signs at scales
# from 0.01 to 10 (scaled_feed, seeded by the case's index), lengths {seq, 1, 0, random}.
GRID_BATCHES = (1, 3, 64)
GRID_SEQS = (0, 1, 7, 100, 1000)
WIDE_CASES = tuple((b, s) for b in GRID_BATCHES for s in GRID_SEQS) + ((2, 2048),)
VARIANT_CASES = tuple((b, s) for b in (1, 3, 8) for s in (0, 1, 7, 100)) + ((2, 1000),)


@dataclass(frozen=True)
class Grid:
    """A parity grid: its (batch, seq) cases per variant, how its inputs are drawn ("normal":
    case_feed; "scaled": scaled_feed), how many batch x steps onnx's reference evaluator runs
    on, and the golden cases (variant, batch, seq) a bundle ships. The manifest records it under
    `reference`, so that verify draws the inputs the export drew."""

    cases: Mapping[str, tuple[tuple[int, int], ...]]
    inputs: str = "normal"
    reference_cells: int = REFERENCE_MAX_CELLS
    golden: tuple[tuple[str, int, int], ...] = ()
    first_seed: int = 0

    def feed(self, signature: "UserSignature", batch: int, seq: int, index: int, seed: int | None = None) -> "Feed":
        """A case's inputs: the same at export and at verify (`index`: the case's place in its
        variant's grid; `seed`: the base of its seeds, the grid's unless given)."""
        if self.inputs == "scaled":
            return scaled_feed(signature, batch, seq, (self.first_seed if seed is None else seed) + index)
        return case_feed(signature, batch, seq)

    @property
    def seed(self) -> int | None:
        return self.first_seed if self.inputs == "scaled" else None

    def record(self, signatures: Mapping[str, "UserSignature"]) -> dict[str, Any]:
        return {"inputs": self.inputs, "reference_cells": self.reference_cells,
                "cases": [list(c) for c in self.cases["classifier"]],
                **{f"{v}_cases": [list(c) for c in self.cases[v]] for v in signatures if v != "classifier"}}

    @classmethod
    def from_record(cls, reference: Mapping[str, Any], where: str) -> "Grid":
        """The grid an export recorded (an export from before `inputs` was recorded: the unit grid)."""
        inputs = reference.get("inputs", "normal")
        cells = reference.get("reference_cells", REFERENCE_MAX_CELLS)
        if inputs not in ("normal", "scaled") or type(cells) is not int or cells < 0:
            raise UserInputError(f"{where}/manifest.json: unknown reference grid ({inputs!r}, {cells!r}); re-export "
                                 "with this gru-deploy")
        cases = {"classifier": _cases(where, reference.get("cases", USER_CASES))}
        cases.update({v: _cases(where, reference.get(f"{v}_cases", CASES[v])) for v in CASES if v != "classifier"})
        return cls(cases, inputs, cells)


UNIT_GRID = Grid(CASES, golden=(("classifier", 3, 7), ("classifier", 2, 100), ("lengths", 3, 7),
                                ("lengths", 4, 100), ("stream", 3, 7), ("stream", 2, 100)))
WIDE_GRID = Grid({"classifier": WIDE_CASES, "lengths": VARIANT_CASES, "stream": VARIANT_CASES}, "scaled", 21,
                 golden=(("classifier", 1, 10), ("classifier", 2, 25), ("classifier", 3, 1), ("stream", 2, 12),
                         ("lengths", 3, 15)))
GOLDEN_SEED = 1000  # the golden cases' inputs (scaled_feed) are seeded from here, by their index


REFERENCE_FILE = "reference_float64.npz"


Feed = dict  # input name -> numpy array


def reference_key(variant: str, batch: int, seq: int, name: str) -> str:
    """Where REFERENCE_FILE keeps a case's float64 output ('BxS/name' for the classifier)."""
    return f"{batch}x{seq}/{name}" if variant == "classifier" else f"{variant}/{batch}x{seq}/{name}"


# Golden cases: fixed inputs and what eager PyTorch answers for them, chosen and computed by the
# export (the model is at hand there) and kept in GOLDEN_FILE, whence a bundle copies them.
GOLDEN_FILE = "golden.npz"
GOLDEN_KINDS = ("inputs", "outputs")


def golden_key(case: str, kind: str, tensor: str) -> str:
    """Where GOLDEN_FILE keeps one tensor of a golden case."""
    return f"{case}/{kind}/{tensor}"


def npz_bytes(arrays: dict[str, "np.ndarray"]) -> bytes:
    """Arrays as the bytes of one .npz file."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def golden_store(cases: list[tuple[str, str, Feed, dict[str, "np.ndarray"]]]) -> tuple[bytes, dict[str, Any]]:
    """(name, variant, inputs, eager outputs) per golden case -> GOLDEN_FILE's bytes and the
    manifest's `golden` record."""
    import numpy as np
    import torch

    arrays: dict[str, "np.ndarray"] = {}
    record = []
    for name, variant, inputs, outputs in cases:
        for kind, values in (("inputs", inputs), ("outputs", outputs)):
            arrays.update({golden_key(name, kind, k): np.ascontiguousarray(v) for k, v in values.items()})
        record.append({"name": name, "variant": variant, "inputs": list(inputs), "outputs": list(outputs)})
    return npz_bytes(arrays), {"file": GOLDEN_FILE, "computed_by": f"eager PyTorch {torch.__version__}", "cases": record}


def golden_load(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The export's golden cases ({name, variant, inputs, outputs}, arrays by tensor name) from
    its checksum-verified GOLDEN_FILE, as its manifest lists them."""
    import numpy as np

    from gru_deploy.manifest import verified_path

    golden = manifest.get("golden") or {}
    if not golden.get("cases"):
        raise UserInputError(f"{folder}: the export records no golden cases (made by an older gru-deploy); "
                             "re-export with this gru-deploy")
    with np.load(verified_path(folder, manifest, golden.get("file", GOLDEN_FILE)), allow_pickle=False) as data:
        stored = {key: data[key] for key in data.files}
    cases = []
    for entry in golden["cases"]:
        case = {"name": entry["name"], "variant": entry["variant"]}
        for kind in GOLDEN_KINDS:
            keys = {t: golden_key(entry["name"], kind, t) for t in entry[kind]}
            missing = [k for k in keys.values() if k not in stored]
            if missing:
                raise UserInputError(f"{folder}: {GOLDEN_FILE} lacks {missing[0]}; re-export the model")
            case[kind] = {t: stored[k] for t, k in keys.items()}
        cases.append(case)
    return cases


def case_feed(signature: UserSignature, batch: int, seq: int) -> Feed:
    """The parity grid's inputs for (batch, seq): the same at export and at verify."""
    import numpy as np

    feed = {INPUT_NAME: case_input(batch, seq, signature.inputs[0]["shape"][2])}
    state = next((t for t in signature.inputs if t["name"] == STATE_IN), None)
    if state is not None:  # a state from somewhere in a sequence: uniform in [-1, 1]
        rng = np.random.default_rng(batch * 104729 + seq)
        feed[STATE_IN] = rng.uniform(-1, 1, (batch, *state["shape"][1:])).astype(np.float32)
    if any(t["name"] == LENGTHS_NAME for t in signature.inputs):
        rng = np.random.default_rng(batch * 7919 + seq)
        lengths = rng.integers(1, seq + 1, batch).astype(np.int64)
        lengths[0] = seq
        feed[LENGTHS_NAME] = lengths
    return feed


def scaled_feed(signature: UserSignature, batch: int, seq: int, seed: int) -> Feed:
    """The wide grid's inputs: x of both signs, each sample at its own scale in [0.01, 10]
    (check.grid.make_input), a state uniform in [-1, 1], lengths {seq, 1, 0, random in 0..seq}."""
    import numpy as np

    from gru_deploy.check.grid import make_input

    feed = {INPUT_NAME: make_input(batch, seq, signature.inputs[0]["shape"][2], seed)}
    rng = np.random.default_rng(seed + 10_000)
    state = next((t for t in signature.inputs if t["name"] == STATE_IN), None)
    if state is not None:
        feed[STATE_IN] = rng.uniform(-1, 1, size=(batch, *state["shape"][1:])).astype(np.float32)
    if any(t["name"] == LENGTHS_NAME for t in signature.inputs):
        lengths = rng.integers(0, seq + 1, size=batch)
        lengths[: min(batch, 3)] = [seq, min(seq, 1), 0][: min(batch, 3)]
        feed[LENGTHS_NAME] = lengths.astype(np.int64)
    return feed


Noise = Callable[..., dict[str, float]]  # (feed, seed=, clean=) -> float32's own error per output


class Call:
    """A runner over one runtime of a module: `run(feed) -> every output by name`, as
    check.grid.run_parity takes it; `unsupported` says why it cannot judge the model;
    `float32_noise`, on a float64 reference that estimates it, float32's own error on a feed."""

    def __init__(self, name: str, run: Callable[[Feed], dict[str, "np.ndarray"]] | None = None,
                 unsupported: str = "", noise: Noise | None = None) -> None:
        self.name, self._run, self.unsupported, self.float32_noise = name, run, unsupported, noise

    def run(self, feed: Feed) -> dict[str, "np.ndarray"]:
        return self._run(feed)  # type: ignore[misc]


def user_runners(module: "torch.nn.Module | None", scripted: Any, onnx_bytes: bytes,
                 signature: UserSignature, stored: dict[str, "np.ndarray"] | None = None,
                 method: str = "forward", variant: str = "classifier", ort_format: bytes | None = None,
                 float64: Call | None = None, side: str = "torchscript") -> dict[str, Call]:
    """Runners of a feed (numpy, by input name) returning every output as float64 numpy by name:
    eager and float64 (the user's module's `method`, and a float64 copy of it) when the module
    is at hand, TorchScript (`scripted`, named `side`: a program model's torch.export program at
    verify; None: none), onnxruntime and onnx's reference evaluator. Without the module
    (verify), float64 answers from `stored`: the float64 outputs the export computed from the
    module (REFERENCE_FILE). `ort_format`: the ORT-format copy, run as "onnxruntime-ort".
    `float64`: the model's own reference instead of its float64 copy (the tutorial's). Over
    60 lines: one small adapter per runtime, each a few lines."""
    import numpy as np
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator

    from gru_deploy.check.runners import reference_gaps

    names_in = [t["name"] for t in signature.inputs]
    names = signature.output_names

    def torch_call(fn: Any, dtype: "torch.dtype") -> Callable[[Feed], dict[str, "np.ndarray"]]:
        def run(feed: Feed) -> dict[str, "np.ndarray"]:
            args = [torch.from_numpy(feed[n]) for n in names_in]
            args = [a.to(dtype) if a.is_floating_point() else a for a in args]
            with torch.no_grad():
                out = as_outputs(fn(*args), "the model")
            return {name: o.detach().double().numpy() for name, o in zip(names, out)}
        return run

    def float64_call(fn: Any) -> Callable[[Feed], dict[str, "np.ndarray"]]:
        run = torch_call(fn, torch.float64)

        def checked(feed: Feed) -> dict[str, "np.ndarray"]:
            try:
                return run(feed)
            except UserInputError:
                raise
            except Exception as exc:
                raise UserInputError(
                    f"the float64 reference (your module after .double()) failed: {type(exc).__name__}: "
                    f"{(str(exc).splitlines() or [''])[0]}; create tensors inside forward with the input's dtype "
                    "(e.g. x.new_zeros)") from None
        return checked

    def as_float64(outputs: list) -> dict[str, "np.ndarray"]:
        return {name: np.asarray(o, np.float64) for name, o in zip(names, outputs)}

    gap = reference_gaps(onnx.load_from_string(onnx_bytes))
    runners: dict[str, Call] = {}
    if module is not None:
        runners["eager"] = Call("eager", torch_call(getattr(module, method), torch.float32))
    if scripted is not None:  # a program model has no TorchScript: at verify its program takes the name `side`
        runners[side] = Call(side, torch_call(scripted, torch.float32))
    runners["onnxruntime"] = onnxruntime_runner("onnxruntime", onnx_bytes, signature)
    if ort_format is not None:
        runners["onnxruntime-ort"] = onnxruntime_runner("onnxruntime-ort", ort_format, signature)
    if gap:  # it would compute something else: the report says it was not run, and why
        runners["onnx-reference"] = Call("onnx-reference", unsupported=gap)
    else:
        reference = ReferenceEvaluator(onnx_bytes)
        runners["onnx-reference"] = Call("onnx-reference", lambda feed: as_float64(reference.run(names, feed)))
    if float64 is not None:
        runners["float64"] = float64
    elif module is not None:
        runners["float64"] = Call("float64", float64_call(getattr(copy.deepcopy(module).double(), method)))
    elif stored is not None:
        runners["float64"] = stored_runner(stored, signature, variant)
    return runners


def onnxruntime_runner(name: str, model: bytes, signature: UserSignature) -> Call:
    """onnxruntime (one thread, CPU) on a model's ONNX bytes or its ORT-format copy (what
    onnxruntime mobile and web load): every output as float64 numpy by name."""
    import numpy as np
    import onnxruntime as ort

    from gru_deploy.check.runners import session_options

    names = signature.output_names
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    return Call(name, lambda feed: {name: np.asarray(o, np.float64)
                                                 for name, o in zip(names, session.run(names, feed))})


def step_layout(state_shape: "tuple[int, ...] | list[int]") -> tuple[int, int]:
    """(layers, hidden) of a stream state [..., H] or [..., layers, H] (without the batch axis):
    the step model keeps it as [layers, batch, H], ONNX's GRU layout."""
    return (1, int(state_shape[-1])) if len(state_shape) == 1 else (int(state_shape[0]), int(state_shape[1]))


def step_state(h: "np.ndarray", layers: int) -> "np.ndarray":
    """A stream state [batch, *state] in the step model's layout [layers, batch, H] (a view)."""
    return h.reshape(h.shape[0], layers, -1).transpose(1, 0, 2)


def stream_state(h: "np.ndarray", state_shape: "tuple[int, ...]") -> "np.ndarray":
    """The step model's [layers, batch, H] as the stream signature's [batch, *state] (a copy)."""
    return h.transpose(1, 0, 2).copy().reshape(h.shape[1], *state_shape)


def step_runner(name: str, model: bytes, signature: UserSignature) -> Call:
    """onnxruntime on the one-step model (convert.graphs.step_graph), fed and answering in the
    stream variant's signature (x [batch, 1, I], h0 and h_n [batch, *state]), so that it is
    compared with the stream's runners on the stream grid's one-step cases."""
    import numpy as np
    import onnxruntime as ort

    from gru_deploy.check.runners import session_options
    from gru_deploy.spec import STATE_OUT

    names = signature.output_names
    state = tuple(next(t for t in signature.inputs if t["name"] == STATE_IN)["shape"][1:])
    layers, _ = step_layout(state)
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])

    def run(feed: Feed) -> dict[str, "np.ndarray"]:
        x, h0 = feed[INPUT_NAME], feed[STATE_IN]
        batch = x.shape[0]
        if x.shape[1] != 1:
            raise CheckFailed(f"{name} runs one step; it was given {x.shape[1]}")
        h0_step = np.ascontiguousarray(step_state(h0, layers))
        out = dict(zip(names, session.run(names, {INPUT_NAME: x.reshape(1, batch, -1), STATE_IN: h0_step})))
        out[STATE_OUT] = stream_state(out[STATE_OUT], state)
        return {key: np.asarray(value, np.float64) for key, value in out.items()}
    return Call(name, run)


def file_parity(runners: dict[str, Call], test: Call, signature: UserSignature, grid: Grid, variant: str,
                takes: Callable[[int], bool], atol: float, rtol: float, prefix: str,
                on_case: Callable[[str], None] | None = None) -> "ParityReport":
    """One more file of a variant (`test`) against the variant's float64 reference and its
    PyTorch side (eager at export, TorchScript at verify: `runners`) on the grid's cases of the
    variant whose seq it `takes`, with the same inputs (the same case index, so the same seeds)
    and every output: pairs `float64->TEST` and `eager->TEST` (or `torchscript->TEST`) behind
    `prefix`."""
    from gru_deploy.check.grid import run_parity

    cases = [(index, case) for index, case in enumerate(grid.cases[variant]) if takes(case[1])]
    side = pytorch_side(runners)
    return run_parity({"float64": runners["float64"], side: runners[side], test.name: test},
                      lambda batch, seq, i: grid.feed(signature, batch, seq, cases[i][0]),
                      [case for _, case in cases], atol, rtol, [("float64", test.name, None), (side, test.name, None)],
                      seed=grid.seed, variant=variant, prefix=prefix, on_case=on_case)


def step_parity(runners: dict[str, Call], step_bytes: bytes, signature: UserSignature, grid: Grid, atol: float,
                rtol: float, on_case: Callable[[str], None] | None = None) -> "ParityReport":
    """The one-step model against the stream's float64 reference and its PyTorch side (eager, or
    TorchScript at verify) on the stream grid's one-step cases, with the same inputs (the same
    case index, so the same seeds) and every output: cases of the stream variant, pairs under
    `step:`."""
    test = step_runner("onnxruntime-step", step_bytes, signature)
    report = file_parity(runners, test, signature, grid, "stream", lambda seq: seq == 1, atol, rtol, "step:",
                         on_case)
    report.notes.append("the one-step model (model_step.onnx) on the stream grid's one-step cases, as the stream "
                        "model's signature feeds it")
    return report


# The successors of TorchScript, run and compared: a torch.export program (`.pt2`,
# torch.export.save) loaded with torch.export.load and run as its module, and an AOTInductor
# package, on the same grid and against the same float64 reference as every other file.
# the manifest's formats of the files (and the runners' names of the first two)
PROGRAM_FORMAT, AOTI_FORMAT, EXECUTORCH_FORMAT = "torch-export", "aoti", "executorch"


def pytorch_reference(folder: Path, manifest: dict[str, Any], variant: str) -> tuple[str, str, Any]:
    """(format, file name, callable) of the variant's PyTorch file, checksum-checked: its
    TorchScript (model*.pt), or where the export has none (a program model) its torch.export
    program (model*.pt2). What verify, the int8 gate, bench and verify --data compare with."""
    from gru_deploy.check import torchscript as script
    from gru_deploy.manifest import find_models, select_model, verified_path

    fmt = "torchscript" if find_models(manifest, variant, "torchscript") else PROGRAM_FORMAT
    name = select_model(manifest, variant, fmt, where=str(folder))
    path = verified_path(folder, manifest, name)
    return fmt, name, script.load(path) if fmt == "torchscript" else load_program(path.read_bytes(), name)


def load_program(data: bytes, where: str, fmt: str = PROGRAM_FORMAT) -> Any:
    """A torch.export program (`fmt` torch-export) or an AOTInductor package (aoti: native code,
    the package's shared library loaded into this process) in `data`, as a callable;
    CheckFailed naming `where` when torch cannot load it."""
    import os
    import tempfile

    import torch

    quiet_torch_internals()
    try:
        if fmt == PROGRAM_FORMAT:
            return torch.export.load(io.BytesIO(data)).module()
        with tempfile.NamedTemporaryFile(suffix=".pt2", delete=False) as handle:  # the loader reads a path
            handle.write(data)
        try:
            return torch._inductor.aoti_load_package(handle.name)  # extracts what it runs elsewhere
        finally:
            os.unlink(handle.name)
    except Exception as exc:
        raise CheckFailed(f"{where}: torch cannot load it as {fmt}: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:200]}") from None


def program_runner(data: bytes, signature: UserSignature, where: str, fmt: str = PROGRAM_FORMAT) -> Call:
    """A torch.export program or AOTInductor package (load_program) fed the signature's inputs
    (numpy, by name) in order, answering every output as float64 numpy by name."""
    import numpy as np
    import torch

    program = load_program(data, where, fmt)
    names_in, names_out = [t["name"] for t in signature.inputs], signature.output_names

    def run(feed: Feed) -> dict[str, "np.ndarray"]:
        with torch.no_grad():
            out = program(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names_in))
        out = as_outputs(tuple(out) if isinstance(out, list) else out, where)  # AOTInductor answers a list
        return {name: o.detach().double().numpy() for name, o in zip(names_out, out)}
    return Call(fmt, run)


def program_parity(runners: dict[str, Call], data: bytes, signature: UserSignature, grid: Grid, variant: str,
                   atol: float, rtol: float, where: str, on_case: Callable[[str], None] | None = None,
                   fmt: str = PROGRAM_FORMAT, record: dict[str, Any] | None = None) -> "ParityReport":
    """A variant's torch.export program, AOTInductor package or ExecuTorch program (`fmt`; an
    ExecuTorch program's `record` holds its backend and bounds) against its float64 reference
    and its PyTorch side (eager at export, TorchScript at verify: `runners`) on the variant's
    grid, every case within the file's bounds and every output, with the same inputs as the
    other files of the variant: pairs `float64->NAME`, `eager->NAME` (or `torchscript->NAME`)."""
    low, high = (record or {}).get("seq") or (0, None)  # an ExecuTorch program's bounds; the others have none
    if fmt == EXECUTORCH_FORMAT:
        test = executorch_runner(data, signature, where, record or {})
        what = (f"the ExecuTorch program ({record['backend']}; batch {record['batch']} per call, the grid's batches "
                f"run in calls of it; the grid's cases of seq {low}..{high})")
    else:
        test = program_runner(data, signature, where, fmt)
        what = ("the torch.export program (torch.export.load(...).module())" if fmt == PROGRAM_FORMAT else
                "the AOTInductor package (torch._inductor.aoti_load_package)")
    report = file_parity(runners, test, signature, grid, variant,
                         lambda seq: low <= seq and (high is None or seq <= high), atol, rtol,
                         "" if variant == "classifier" else f"{variant}:", on_case)
    report.notes.append(f"{where}: {what} on the {variant} grid")
    return report


def quiet_torch_internals() -> None:
    """Silence what users cannot act on: torchao's warning on import (ExecuTorch imports it) that
    its CUDA kernels do not load in a CPU build of torch, nothing ExecuTorch's CPU backends use;
    and torch's own FutureWarning, from inside torch.export and ExecuTorch's lowering, that its
    pytree's LeafSpec check is deprecated; and the dynamo ONNX exporter's notes on what it does
    inside (torchvision's ops not registered, the opset it builds at before converting to the
    one asked for: the graph's opset is checked and recorded); and torch.export.load's note on a
    loop counter's symbol it does not find in the graph it loads."""
    import logging
    import warnings

    for name in ("torchao", "torch.onnx._internal.exporter", "onnxscript.version_converter", "torch._export.serde"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def executorch_runner(data: bytes, signature: UserSignature, where: str, record: dict[str, Any]) -> Call:
    """An ExecuTorch program (.pte) run by ExecuTorch's runtime, named `executorch-BACKEND`. Its
    bounds are checked first: a seq outside the recorded range is a UserInputError (ExecuTorch
    plans memory for them, and a batch it was not built for comes back wrong without an error),
    and a feed's batch runs in calls of the recorded batch, the last padded with zeros."""
    import numpy as np
    import torch

    quiet_torch_internals()
    from executorch.runtime import Runtime

    # the program, and the bytes it was loaded from, must outlive the method (it reads them: a
    # method of a collected program crashed the process), so the closure holds all three
    program = Runtime.get().load_program(data)
    method = program.load_method("forward")
    keep = (data, program)
    batch, (low, high) = int(record["batch"]), record["seq"]
    names_in, names_out = [t["name"] for t in signature.inputs], signature.output_names

    def run(feed: Feed) -> dict[str, "np.ndarray"]:
        rows, seq = feed[INPUT_NAME].shape[:2]
        if not low <= seq <= high:
            raise UserInputError(f"{where} takes sequences of {low} to {high} steps (its bounds, in the manifest); "
                                 f"got {seq}")
        parts: list[list["np.ndarray"]] = []
        for start in range(0, rows, batch):
            chunk = [np.asarray(feed[n][start:start + batch]) for n in names_in]
            short = batch - chunk[0].shape[0]
            chunk = [np.concatenate([c, np.zeros((short, *c.shape[1:]), c.dtype)]) if short else c for c in chunk]
            out = method.execute([torch.from_numpy(np.ascontiguousarray(c)) for c in chunk])
            if out[0].shape[0] != batch:
                raise CheckFailed(f"{where}: answered {out[0].shape[0]} rows for a batch of {batch}")
            parts.append([o.detach().double().numpy()[:batch - short] for o in out])
        assert keep
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names_out)}
    return Call(f"{EXECUTORCH_FORMAT}-{record['backend']}", run)


def ort_format_parity(folder: Path, manifest: dict[str, Any], variant: str, signature: UserSignature,
                      stored: dict[str, "np.ndarray"], grid: Grid, atol: float, rtol: float,
                      on_case: Callable[[str], None] | None = None) -> "ParityReport | None":
    """The variant's ORT-format copy (where the manifest lists one, checksum-checked) against the
    stored float64 answers on the grid; None where the export has no copy."""
    from gru_deploy.manifest import find_models, verified_path

    names = find_models(manifest, variant, "ort", where=str(folder))
    if not names:
        return None
    runners = {"float64": stored_runner(stored, signature, variant),
               "onnxruntime-ort": onnxruntime_runner("onnxruntime-ort", verified_path(folder, manifest, names[0]).read_bytes(),
                                                     signature)}
    return module_parity(runners, signature, atol, rtol, grid, variant=variant, on_case=on_case)


def stored_runner(stored: dict[str, "np.ndarray"], signature: UserSignature, variant: str) -> Call:
    """The float64 answers the export stored (REFERENCE_FILE), by case: verify's reference; with
    float32's own error on each case where the export's reference estimated it."""
    names = signature.output_names

    def keys_of(feed: Feed, prefix: str = "") -> dict[str, str]:
        batch, seq = feed[INPUT_NAME].shape[:2]
        keys = {name: prefix + reference_key(variant, batch, seq, name) for name in names}
        if keys[names[0]] not in stored:
            raise CheckFailed(f"{REFERENCE_FILE} holds no float64 {variant} {prefix.strip('/') or 'outputs'} for "
                              f"batch {batch}, seq {seq}")
        return keys

    def recorded(feed: Feed) -> dict[str, "np.ndarray"]:
        return {name: stored[key] for name, key in keys_of(feed).items()}

    def noise(feed: Feed, **_: Any) -> dict[str, float]:
        return {name: float(stored[key]) for name, key in keys_of(feed, NOISE_PREFIX).items()}
    estimated = any(key.startswith(NOISE_PREFIX) for key in stored)
    return Call("float64", recorded, noise=noise if estimated else None)


NOISE_PREFIX = "float32_noise/"  # REFERENCE_FILE's keys of float32's own error, per case and output


def case_input(batch: int, seq: int, input_size: int) -> "np.ndarray":
    """The parity grid's input for (batch, seq): the same at export and at verify."""
    import numpy as np

    return np.random.default_rng(batch * 1009 + seq).standard_normal((batch, seq, input_size)).astype(np.float32)


def recording(runner: Call, signature: UserSignature, variant: str = "classifier"
              ) -> tuple[Call, dict[str, "np.ndarray"]]:
    """`runner`, and the dict it fills with every output it returns (keys as reference_key): the
    float64 reference's outputs (and its float32-noise estimates) are stored as parity computes them."""
    import numpy as np

    seen: dict[str, "np.ndarray"] = {}

    def run_and_keep(feed: Feed) -> dict[str, "np.ndarray"]:
        outputs = runner.run(feed)
        batch, seq = feed[INPUT_NAME].shape[:2]
        seen.update({reference_key(variant, batch, seq, name): out for name, out in outputs.items()})
        return outputs

    def noise_and_keep(feed: Feed, **options: Any) -> dict[str, float]:
        noise = runner.float32_noise(feed, **options)  # type: ignore[misc]
        batch, seq = feed[INPUT_NAME].shape[:2]
        seen.update({NOISE_PREFIX + reference_key(variant, batch, seq, name): np.float64(value)
                     for name, value in noise.items()})
        return noise
    return Call(runner.name, run_and_keep, noise=noise_and_keep if runner.float32_noise else None), seen


# The PyTorch side every file is compared with besides float64, first found: the module
# (export), its TorchScript (verify), a program model's torch.export program (its verify).
PYTORCH_SIDES = ("eager", "torchscript", "torch-export")


def pytorch_side(names: Any) -> str:
    """The first of PYTORCH_SIDES in `names`; "torchscript" where none is (its pairs then run
    nothing: check.grid.run_parity runs a pair only where both runners are given)."""
    return next((name for name in PYTORCH_SIDES if name in names), "torchscript")


def module_pairs(names: list[str], reference_cells: int = REFERENCE_MAX_CELLS) -> list[tuple[str, str, int | None]]:
    """A module's pairs: every runner against float64, and each against eager (TorchScript
    where the module is not at hand); onnx's reference evaluator on cases of at most
    `reference_cells` batch x steps."""
    first = pytorch_side(names)
    limit = {"onnx-reference": reference_cells}
    return ([("float64", name, limit.get(name)) for name in names if name != "float64"]
            + [(first, name, limit.get(name)) for name in names if name not in (first, "float64")])


def module_parity(runners: dict[str, Call], signature: UserSignature, atol: float, rtol: float,
                  grid: Grid = UNIT_GRID, variant: str = "classifier", on_case: Callable[[str], None] | None = None,
                  extra: Callable | None = None) -> "ParityReport":
    """The parity grid (check.grid.run_parity) of a model's variant on `grid`'s cases and inputs,
    every output of every pair (module_pairs) held to atol and rtol (widened for float32's own
    error where the float64 reference estimates it)."""
    from gru_deploy.check.grid import run_parity

    cases = grid.cases[variant]
    report = run_parity(runners, lambda batch, seq, index: grid.feed(signature, batch, seq, index), cases, atol, rtol,
                        module_pairs(list(runners), grid.reference_cells), seed=grid.seed, variant=variant,
                        prefix="" if variant == "classifier" else f"{variant}:", on_case=on_case, extra=extra)
    notes = [f"onnx's reference evaluator runs on cases of at most {grid.reference_cells} batch x steps (it is pure "
             "Python)"]
    if variant == "lengths":
        notes.append("lengths spread over 1..seq, the first sample full" if grid.inputs == "normal"
                     else "lengths {seq, 1, 0, random in 0..seq}")
    if not any(0 in case for case in cases):
        notes.append("empty batches and sequences are not run: a recurrent kernel may abort on them")
    if getattr(runners.get("float64"), "float32_noise", None) is None:
        notes.append("float32's own error is not estimated (the float64 reference is the module itself): every "
                     "comparison is held to atol itself")
    report.notes.extend(note for note in notes if note not in report.notes)
    return report


def verify_export(folder: Path, atol: float = 1e-5, rtol: float = 1e-5,
                  on_case: Callable[[str], None] | None = None) -> "ParityReport":
    """`verify` of an export folder, every model alike, from its files alone: checksums first;
    then, on the grid the export recorded, TorchScript (model*.pt) as the PyTorch side and the
    float64 answers the export stored (REFERENCE_FILE, with its float32-noise estimates) as the
    reference; the classifier and each variant the export has (under the variant's prefix)."""
    import numpy as np

    from gru_deploy.check.grid import check_tolerances
    from gru_deploy.check.timing import stage
    from gru_deploy.manifest import MANIFEST_NAME, check_files, read_manifest, verified_path

    check_tolerances(atol, rtol)
    folder = Path(folder)
    if folder.is_dir() and not (folder / MANIFEST_NAME).is_file():
        raise UserInputError(f"{folder}: no {MANIFEST_NAME}; run gru-deploy export first")
    with stage("checksums"):
        manifest = read_manifest(folder)
        check_files(folder, manifest)
    reference = manifest.get("reference")
    if not isinstance(reference, dict):
        raise UserInputError(f"{folder}: the export stores no float64 reference (made by an older gru-deploy); "
                             "re-export with this gru-deploy")
    grid = Grid.from_record(reference, str(folder))
    with np.load(verified_path(folder, manifest, reference.get("file", REFERENCE_FILE)), allow_pickle=False) as data:
        stored = {key: data[key] for key in data.files}
    report = None
    for name, entry in {"classifier": manifest, **(manifest.get("variants") or {})}.items():
        if name not in CASES or (name == "classifier" and entry is not manifest):
            raise UserInputError(f"{folder}/manifest.json: unknown variant {name!r}")
        sig = UserSignature(entry["signature"]["inputs"], entry["signature"]["outputs"])
        recorded = (manifest.get("onnx") or {}).get("op_types") if entry is manifest else entry.get("op_types")
        part = _verify_variant(folder, manifest, name, sig, recorded, stored, grid, atol, rtol, on_case)
        report = part if report is None else report
        if part is not report:
            report.extend(part)
    return report  # type: ignore[return-value]


def _cases(where: str, cases: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(cases, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and all(type(v) is int and 0 <= v <= 100_000 for v in c)
            and c[0] >= 1 for c in cases):
        raise UserInputError(f"{where}/manifest.json: reference cases must be a list of [batch, seq] pairs")
    return tuple((int(c[0]), int(c[1])) for c in cases)


def _verify_variant(folder: Path, manifest: dict[str, Any], variant: str, signature: UserSignature, recorded: Any,
                    stored: dict[str, "np.ndarray"], grid: Grid, atol: float, rtol: float,
                    on_case: Callable[[str], None] | None) -> "ParityReport":
    from gru_deploy.check.onnx_walk import check_onnx_bytes
    from gru_deploy.check.timing import stage
    from gru_deploy.manifest import find_models, select_model, variant_record, verified_path

    with stage("load"):
        # the PyTorch side: TorchScript, or a program model's torch.export program (whose own
        # check is then the variant's grid below)
        side, pt_name, scripted = pytorch_reference(folder, manifest, variant)
        if side == "torchscript":
            check_recurrence(scripted, f"{folder}/{pt_name}")
        onnx_path = verified_path(folder, manifest, select_model(manifest, variant, "onnx", where=str(folder)))
        if not isinstance(recorded, dict):
            raise UserInputError(f"{folder}/manifest.json: the {variant} model's op_types are missing; re-export "
                                 "the model")
        onnx_bytes = onnx_path.read_bytes()
        check_onnx_bytes(onnx_bytes, f"{folder}: {onnx_path.name}", known=frozenset(recorded))
        ort_names = find_models(manifest, variant, "ort", where=str(folder))
        ort_format = verified_path(folder, manifest, ort_names[0]).read_bytes() if ort_names else None
    with stage("parity"):
        runners = user_runners(None, scripted, onnx_bytes, signature, stored, variant=variant, ort_format=ort_format,
                               side=side)
        report = module_parity(runners, signature, atol, rtol, grid, variant=variant, on_case=on_case)
        if variant == "stream":
            report.cases.extend(chunked_in_runtimes(runners, signature, atol, rtol, on_case))
    step = variant_record(manifest, "step") if variant == "stream" else {}
    if step:
        with stage("load"):
            step_path = verified_path(folder, manifest, select_model(manifest, "step", "onnx", where=str(folder)))
            step_bytes = step_path.read_bytes()
            check_onnx_bytes(step_bytes, f"{folder}: {step_path.name}", known=frozenset(step.get("op_types") or ()))
        with stage("parity"):
            report.extend(step_parity(runners, step_bytes, signature, grid, atol, rtol, on_case))
    for fmt in (PROGRAM_FORMAT, AOTI_FORMAT, EXECUTORCH_FORMAT):
        for name in (n for n in find_models(manifest, variant, fmt, where=str(folder)) if n != pt_name):
            with stage("load"):
                data = verified_path(folder, manifest, name).read_bytes()
            with stage("parity"):
                report.extend(program_parity(runners, data, signature, grid, variant, atol, rtol, name, on_case, fmt,
                                             manifest["models"][name]))
    return report


def chunked_in_runtimes(runners: dict[str, Call], signature: UserSignature, atol: float, rtol: float,
                        on_case: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The stream model in TorchScript and onnxruntime (`runners`, uncached: chunks share
    shapes) fed in chunks against one pass (check.grid.check_chunked): at export and at verify."""
    from gru_deploy.check.grid import CHUNK_SIZES, check_chunked

    cases = []
    for name in (n for n in ("torchscript", "torch-export", "onnxruntime") if n in runners):
        if on_case is not None:
            on_case(f"stream: chunks of {', '.join(map(str, CHUNK_SIZES))} in {name}")
        cases.extend(check_chunked(runners[name], signature.to_dict(), atol, rtol))
    return cases
