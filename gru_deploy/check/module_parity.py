"""Parity of a module's export (a built-in family or your own model): its signature, the
grid's inputs, runners over every runtime (the module eager and in float64 when it is at hand,
else the float64 outputs the export stored), the comparison of every output, and `verify`
of the files. It runs and compares; it builds nothing (convert.user builds the graphs)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.recurrence import check_recurrence
from gru_deploy.errors import CheckFailed, UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gru_deploy.check.grid import ParityReport


# The parity grid for user models: (batch, seq); the onnx reference evaluator (pure Python)
# runs on the cases up to 100 steps (REFERENCE_MAX_CELLS).
USER_CASES = ((1, 1), (3, 7), (2, 100), (1, 2048))


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

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
                for t in self.inputs + self.outputs}


def as_outputs(value: Any, reference: str) -> tuple["torch.Tensor", ...]:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise UserInputError(f"{reference}: forward must return a tensor or a tuple of tensors, got "
                         f"{type(value).__name__}")


REFERENCE_FILE = "reference_float64.npz"


# The lengths variant's grid: (batch, seq), lengths spread over 1..seq (the first sample full).
LENGTHS_CASES = ((3, 7), (4, 100), (3, 2048))


STREAM_CASES = ((1, 1), (3, 7), (2, 100), (1, 2048))
CASES = {"classifier": USER_CASES, "lengths": LENGTHS_CASES, "stream": STREAM_CASES}


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


class Call:
    """A runner over one runtime of a module: `run(feed) -> every output by name`, as
    check.grid.run_parity takes it; `unsupported` says why it cannot judge the model."""

    def __init__(self, name: str, run: Callable[[Feed], dict[str, "np.ndarray"]] | None = None,
                 unsupported: str = "") -> None:
        self.name, self._run, self.unsupported = name, run, unsupported

    def run(self, feed: Feed) -> dict[str, "np.ndarray"]:
        return self._run(feed)  # type: ignore[misc]


def user_runners(module: "torch.nn.Module | None", scripted: "torch.jit.ScriptModule", onnx_bytes: bytes,
                 signature: UserSignature, stored: dict[str, "np.ndarray"] | None = None,
                 method: str = "forward", variant: str = "classifier", ort_format: bytes | None = None
                 ) -> dict[str, Call]:
    """Runners of a feed (numpy, by input name) returning every output as float64 numpy by name:
    eager and float64 (the user's module's `method`, and a float64 copy of it) when the module
    is at hand, TorchScript, onnxruntime and onnx's reference evaluator. Without the module
    (verify), float64 answers from `stored`: the float64 outputs the export computed from the
    module (REFERENCE_FILE). `ort_format`: the ORT-format copy, run as "onnxruntime-ort". Over
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
    runners["torchscript"] = Call("torchscript", torch_call(scripted, torch.float32))
    runners["onnxruntime"] = onnxruntime_runner("onnxruntime", onnx_bytes, signature)
    if ort_format is not None:
        runners["onnxruntime-ort"] = onnxruntime_runner("onnxruntime-ort", ort_format, signature)
    if gap:  # it would compute something else: the report says it was not run, and why
        runners["onnx-reference"] = Call("onnx-reference", unsupported=gap)
    else:
        reference = ReferenceEvaluator(onnx_bytes)
        runners["onnx-reference"] = Call("onnx-reference", lambda feed: as_float64(reference.run(names, feed)))
    if module is not None:
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


def ort_format_parity(folder: Path, manifest: dict[str, Any], variant: str, signature: UserSignature,
                      stored: dict[str, "np.ndarray"], cases: tuple[tuple[int, int], ...], atol: float, rtol: float,
                      on_case: Callable[[str], None] | None = None) -> "ParityReport | None":
    """The variant's ORT-format copy (where the manifest lists one, checksum-checked) against the
    stored float64 answers on the module grid; None where the export has no copy."""
    from gru_deploy.manifest import find_models, verified_path

    names = find_models(manifest, variant, "ort", where=str(folder))
    if not names:
        return None
    runners = {"float64": stored_runner(stored, signature, variant),
               "onnxruntime-ort": onnxruntime_runner("onnxruntime-ort", verified_path(folder, manifest, names[0]).read_bytes(),
                                                     signature)}
    return module_parity(runners, signature, atol, rtol, cases=cases, variant=variant, on_case=on_case)


def stored_runner(stored: dict[str, "np.ndarray"], signature: UserSignature, variant: str) -> Call:
    """The float64 answers the export stored (REFERENCE_FILE), by case: verify's reference."""
    names = signature.output_names

    def recorded(feed: Feed) -> dict[str, "np.ndarray"]:
        batch, seq = feed[INPUT_NAME].shape[:2]
        keys = {name: reference_key(variant, batch, seq, name) for name in names}
        if keys[names[0]] not in stored:
            raise CheckFailed(f"{REFERENCE_FILE} holds no float64 {variant} outputs for batch {batch}, seq {seq}")
        return {name: stored[key] for name, key in keys.items()}
    return Call("float64", recorded)


def case_input(batch: int, seq: int, input_size: int) -> "np.ndarray":
    """The parity grid's input for (batch, seq): the same at export and at verify."""
    import numpy as np

    return np.random.default_rng(batch * 1009 + seq).standard_normal((batch, seq, input_size)).astype(np.float32)


def recording(runner: Call, signature: UserSignature, variant: str = "classifier"
              ) -> tuple[Call, dict[str, "np.ndarray"]]:
    """`runner`, and the dict it fills with every output it returns (keys as reference_key): the
    float64 module's outputs are stored as parity computes them."""
    seen: dict[str, "np.ndarray"] = {}

    def run_and_keep(feed: Feed) -> dict[str, "np.ndarray"]:
        outputs = runner.run(feed)
        batch, seq = feed[INPUT_NAME].shape[:2]
        seen.update({reference_key(variant, batch, seq, name): out for name, out in outputs.items()})
        return outputs
    return Call(runner.name, run_and_keep), seen


# onnx's reference evaluator (pure Python) runs on a module's cases of at most this many batch x
# steps: every case of the grids up to 100 steps (USER_CASES, LENGTHS_CASES, STREAM_CASES).
REFERENCE_MAX_CELLS = 400
MODULE_NOTES = (
    f"onnx's reference evaluator runs on cases of at most {REFERENCE_MAX_CELLS} batch x steps (it is pure Python)",
    "empty batches and sequences are not run: a recurrent kernel may abort on them",
    "float32's own error is not estimated for a module: every comparison is held to atol itself")


def module_pairs(names: list[str]) -> list[tuple[str, str, int | None]]:
    """A module's pairs: every runner against float64, and each against eager (TorchScript
    where the module is not at hand)."""
    first = "eager" if "eager" in names else "torchscript"
    limit = {"onnx-reference": REFERENCE_MAX_CELLS}
    return ([("float64", name, limit.get(name)) for name in names if name != "float64"]
            + [(first, name, limit.get(name)) for name in names if name not in (first, "float64")])


def module_parity(runners: dict[str, Call], signature: UserSignature, atol: float, rtol: float,
                  cases: tuple[tuple[int, int], ...] = USER_CASES, variant: str = "classifier",
                  on_case: Callable[[str], None] | None = None, extra: Callable | None = None) -> "ParityReport":
    """The parity grid (check.grid.run_parity) of a module's variant on its cases (case_feed's
    inputs), every output of every pair (module_pairs) held to atol and rtol. Empty axes are not
    run: a user graph's recurrent kernel may abort on them (onnxruntime's GRU does)."""
    from gru_deploy.check.grid import run_parity

    report = run_parity(runners, lambda batch, seq, index: case_feed(signature, batch, seq), cases, atol, rtol,
                        module_pairs(list(runners)), seed=None, variant=variant,
                        prefix="" if variant == "classifier" else f"{variant}:", on_case=on_case, extra=extra)
    report.notes.extend(note for note in MODULE_NOTES if note not in report.notes)
    return report


def verify_user_export(folder: Path, manifest: dict[str, Any], atol: float, rtol: float,
                       on_case: Callable[[str], None] | None = None) -> "ParityReport":
    """Parity of a user export's files, without the user's code: TorchScript (model*.pt) is the
    PyTorch side, and the float64 outputs the export computed from the user's module (its
    REFERENCE_FILE, checksum-verified) the reference; the classifier and each variant the
    export has (its comparisons under the variant's prefix)."""
    import numpy as np

    from gru_deploy.manifest import verified_path

    reference = manifest.get("reference") or {}
    with np.load(verified_path(folder, manifest, reference.get("file", REFERENCE_FILE)), allow_pickle=False) as data:
        stored = {key: data[key] for key in data.files}
    signature = UserSignature(manifest["signature"]["inputs"], manifest["signature"]["outputs"])
    recorded = (manifest.get("onnx") or {}).get("op_types")
    report = _verify_variant(folder, manifest, "classifier", signature, recorded, stored,
                             _cases(folder, reference.get("cases", USER_CASES)), atol, rtol, on_case)
    for name, entry in (manifest.get("variants") or {}).items():
        if name not in CASES or name == "classifier":
            raise UserInputError(f"{folder}/manifest.json: unknown variant {name!r}")
        sig = UserSignature(entry["signature"]["inputs"], entry["signature"]["outputs"])
        variant = _verify_variant(folder, manifest, name, sig, entry.get("op_types"), stored,
                                  _cases(folder, reference.get(f"{name}_cases", CASES[name])), atol, rtol, on_case)
        report.extend(variant)
    return report


def _cases(folder: Path, cases: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(cases, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and all(type(v) is int and 1 <= v <= 100_000 for v in c)
            for c in cases):
        raise UserInputError(f"{folder}/manifest.json: reference cases must be a list of [batch, seq] pairs")
    return tuple((int(c[0]), int(c[1])) for c in cases)


def _verify_variant(folder: Path, manifest: dict[str, Any], variant: str, signature: UserSignature, recorded: Any,
                    stored: dict[str, "np.ndarray"], cases: tuple[tuple[int, int], ...], atol: float, rtol: float,
                    on_case: Callable[[str], None] | None) -> "ParityReport":
    from gru_deploy.check import torchscript as script
    from gru_deploy.check.onnx_walk import check_onnx_bytes
    from gru_deploy.manifest import find_models, select_model, verified_path

    pt = verified_path(folder, manifest, select_model(manifest, variant, "torchscript", where=str(folder)))
    onnx_path = verified_path(folder, manifest, select_model(manifest, variant, "onnx", where=str(folder)))
    if not isinstance(recorded, dict):
        raise UserInputError(f"{folder}/manifest.json: the {variant} model's op_types are missing; re-export the model")
    onnx_bytes = onnx_path.read_bytes()
    check_onnx_bytes(onnx_bytes, f"{folder}: {onnx_path.name}", known=frozenset(recorded))
    scripted = script.load(pt)
    check_recurrence(scripted, str(pt))
    ort_names = find_models(manifest, variant, "ort", where=str(folder))
    ort_format = verified_path(folder, manifest, ort_names[0]).read_bytes() if ort_names else None
    runners = user_runners(None, scripted, onnx_bytes, signature, stored, variant=variant, ort_format=ort_format)
    report = module_parity(runners, signature, atol, rtol, cases=cases, variant=variant, on_case=on_case)
    if variant == "stream":
        report.cases.extend(chunked_in_runtimes(runners, signature, atol, rtol, on_case))
    return report


def chunked_in_runtimes(runners: dict[str, Call], signature: UserSignature, atol: float, rtol: float,
                        on_case: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The stream model in TorchScript and onnxruntime (`runners`, uncached: chunks share
    shapes) fed in chunks against one pass (check.grid.check_chunked): at export and at verify."""
    from gru_deploy.check.grid import CHUNK_SIZES, check_chunked

    cases = []
    for name in ("torchscript", "onnxruntime"):
        if on_case is not None:
            on_case(f"stream: chunks of {', '.join(map(str, CHUNK_SIZES))} in {name}")
        cases.extend(check_chunked(runners[name], signature.to_dict(), atol, rtol))
    return cases
