"""Export a module (your own, or a built-in family's): the one pipeline (convert.pipeline) with
the module's proof, `ModuleProof`: every form of every variant against the module itself run
in float64 (check.module_parity's grid), eager vs TorchScript vs onnxruntime vs onnx's
reference vs the float64 module, every output; the lengths hook's padding and the stream
hook's chunks held to forward; the float64 answers stored (REFERENCE_FILE) for verify.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.grid import pair_key
from gru_deploy.check.module_parity import (
    GOLDEN_SEED, PROGRAM_FORMAT, REFERENCE_FILE, UNIT_GRID, Call, Feed, Grid, UserSignature, as_outputs, case_input,
    chunked_in_runtimes, golden_store, module_parity, npz_bytes, ort_format_parity, program_parity, recording,
    step_parity, user_runners)
from gru_deploy.convert.pipeline import LENGTHS_HOOK, STATE_HOOK, STREAM_HOOK, Built, Proof, check_failed, export_model
from gru_deploy.manifest import MODULE_MODEL_NAME
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_OUT

if TYPE_CHECKING:
    import numpy as np

    from gru_deploy.check.grid import ParityReport
    from gru_deploy.models.user import UserModel

# The stream's promise, checked on the float64 module: from the initial state, one chunk is
# forward's answer, and chunks of these sizes carried through h_n are the one pass.
CHUNK_SIZES = (1, 7)
CONTRACT_CASES = ((2, 9), (1, 100))


# --- the export folder ----------------------------------------------------------------------


class ModuleProof(Proof):
    """Every model's proof: each candidate on its grid (the unit grid unless given) against its
    float64 reference (the module in float64 unless the model has its own: float64_runner), the
    float64 answers recorded as they are computed (REFERENCE_FILE: verify's reference)."""

    def __init__(self, atol: float, rtol: float, labels: tuple[str, ...] = (), metrics: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None, grid: Grid = UNIT_GRID) -> None:
        self.atol, self.rtol, self.labels, self.grid = atol, rtol, labels, grid
        self.metrics, self.training = metrics or {}, training or {}
        self.stored: list[dict[str, "np.ndarray"]] = []
        # per variant, what does not depend on the form, run once for all its candidates: its
        # eager, TorchScript and float64 runners, the lengths hook's padding check (the grid's
        # `extra`) and the stream hook's contract on the float64 module
        self.module_side: dict[str, dict[str, Call]] = {}
        self.padding: dict[str, Callable] = {}
        self.contract: list[dict[str, Any]] | None = None

    def metadata(self, model: "UserModel") -> dict[str, Any]:
        return {"gru_deploy.model": model.record()["kind"]}

    def float64_runner(self, model: "UserModel", variant: str) -> Call | None:
        """The model's own float64 reference for a variant; None: the module in float64."""
        return None

    def reference_source(self, model: "UserModel") -> str:
        return f"{model.reference} in float64 (module.double())"

    def fields(self, model: "UserModel", kept: str, signatures: dict[str, UserSignature]) -> dict[str, Any]:
        """The manifest's fields for this model (a module's: what it is, where its code lives)."""
        return {"model": {**model.record(), "recurrence": kept}, "model_name": MODULE_MODEL_NAME,
                "config": {"input_size": signatures["classifier"].inputs[0]["shape"][2]}, "labels": list(self.labels),
                "metrics": {k: v for k, v in self.metrics.items() if k != "loss_history"},
                "training": dict(self.training), "source_checkpoint": {"sha256": model.checkpoint_sha256}}

    def check(self, built: Built, model: "UserModel", step: Callable[[str], None]) -> "ParityReport":
        variant, sig = built.variant, built.signature
        method = {"classifier": "forward", "lengths": LENGTHS_HOOK, "stream": STREAM_HOOK}[variant]
        step(f"checking parity of every output ({variant} as {built.form}): eager, TorchScript, onnxruntime, onnx "
             "reference, float64")
        runners = user_runners(model.module, built.scripted, built.onnx_bytes, sig, method=method, variant=variant,
                               float64=self.float64_runner(model, variant))
        in_runtimes = dict(runners)  # before the cached module side replaces them: chunks share shapes
        if variant not in self.module_side:
            runners["float64"], stored = recording(runners["float64"], sig, variant)
            self.stored.append(stored)
            self.module_side[variant] = {name: _once(runners[name]) for name in ("eager", "torchscript", "float64")
                                         if name in runners}
        runners.update(self.module_side[variant])
        if variant == "lengths" and variant not in self.padding:
            self.padding[variant] = _once_per_case(padding_check(model, sig, self.atol, self.rtol))
        report = module_parity(runners, sig, self.atol, self.rtol, self.grid, variant,
                               extra=self.padding.get(variant))
        if variant == "lengths":
            report.notes.append("'float64 alone': the module's forward in float64 on each sample alone, unpadded, "
                                "against its padded answer on its valid steps")
        if variant == "stream":
            if self.contract is None:
                classifier = UserSignature(sig.inputs[:1], [o for o in sig.outputs if o["name"] != STATE_OUT])
                self.contract = _stream_contract(model, classifier, self.atol, self.rtol)
            report.cases.extend(self.contract)
            report.cases.extend(chunked_in_runtimes(in_runtimes, sig, self.atol, self.rtol))
            report.notes.append(f"from {STATE_HOOK}: one chunk = forward, and chunks of {CHUNK_SIZES} steps carried "
                                f"through {STATE_OUT} = the one pass, on the float64 module at {list(CONTRACT_CASES)}")
        if not report:
            raise check_failed(f"the {variant} variant's parity failed ({built.form})" if variant != "classifier"
                               else f"parity failed ({built.form})", report)
        return report

    def check_step(self, step_bytes: bytes, stream: Built, model: "UserModel", step: Callable[[str], None]
                   ) -> "ParityReport":
        """The one-step model against the stream's float64 reference and eager on the stream
        grid's one-step cases (check.module_parity.step_parity)."""
        step("checking the one-step model against float64 and eager")
        report = step_parity(self.module_side["stream"], step_bytes, stream.signature, self.grid, self.atol, self.rtol)
        if not report:
            raise check_failed("the one-step model's parity failed", report)
        return report

    def check_program(self, data: bytes, variant: str, signature: UserSignature, model: "UserModel",
                      step: Callable[[str], None], fmt: str = PROGRAM_FORMAT, name: str = "",
                      record: dict[str, Any] | None = None) -> "ParityReport":
        """A variant's torch.export program, AOTInductor package or ExecuTorch program (`fmt`,
        its `record`) against its float64 reference and eager on the variant's grid
        (check.module_parity.program_parity)."""
        from gru_deploy.convert.programs import program_name

        name = name or program_name(variant, fmt)
        step(f"checking {name} against float64 and eager")
        report = program_parity(self.module_side[variant], data, signature, self.grid, variant, self.atol, self.rtol,
                                name, fmt=fmt, record=record)
        if not report:
            raise check_failed(f"{name}'s parity failed", report)
        return report

    def golden(self, model: "UserModel", signatures: dict[str, UserSignature]) -> tuple[bytes, dict[str, Any]]:
        return golden_cases(model, signatures, self.grid)

    def finish(self, model: "UserModel", kept: str, parts: list["ParityReport"], files: dict[str, bytes],
               signatures: dict[str, UserSignature]) -> tuple[dict[str, Any], Callable]:
        report = parts[0]
        for part in parts[1:]:
            report.extend(part)
        stored: dict[str, "np.ndarray"] = {}
        for part in self.stored:
            stored.update(part)
        files[REFERENCE_FILE] = npz_bytes(stored)
        fields = {**self.fields(model, kept, signatures),
                  "reference": {"file": REFERENCE_FILE, "computed_by": self.reference_source(model),
                                **self.grid.record(signatures)}}
        atol, rtol, grid = self.atol, self.rtol, self.grid

        def prove(stage: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            """The export's own proof, and each ORT-format copy written beside it (staged) against
            the float64 answers on the same grid."""
            for variant, sig in signatures.items():
                part = ort_format_parity(stage, manifest, variant, sig, stored, grid, atol, rtol)
                if part is not None and not part:
                    raise check_failed(f"the {variant} model's ORT-format copy failed parity", part)
                if part is not None:
                    report.extend(part)
            return report.to_json(), report.record()
        return fields, prove


def padding_check(model: "UserModel", sig: UserSignature, atol: float, rtol: float) -> Callable:
    """The lengths variant's extra comparison (check.grid.run_parity's `extra`): each sample's
    padded float64 answer against the module's forward in float64 on the sample alone."""
    import torch

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

    return padding


def _once_per_case(extra: Callable) -> Callable:
    """The grid's `extra(feed, outputs)`, computed once per case (a feed is fixed by its (batch,
    seq): case_feed): it reads only the float64 answers, alike for every form."""
    answers: dict[tuple[int, ...], dict[str, Any]] = {}

    def cached(feed: Feed, outputs: dict[str, dict[str, "np.ndarray"]]) -> dict[str, Any]:
        key = tuple(feed[INPUT_NAME].shape[:2])
        if key not in answers:
            answers[key] = extra(feed, outputs)
        return answers[key]
    return cached


def _once(runner: Call) -> Call:
    """`runner`, answering each parity case (a feed is fixed by its (batch, seq): the grid's
    inputs) once, and estimating float32's own error on it once where it does."""
    answers: dict[tuple[int, ...], Any] = {}

    def cached(kind: str, compute: Callable) -> Callable:
        def answer(feed: Feed, **options: Any) -> Any:
            key = (kind, *feed[INPUT_NAME].shape[:2])
            if key not in answers:
                answers[key] = compute(feed, **options)
            return answers[key]
        return answer
    noise = cached("noise", runner.float32_noise) if runner.float32_noise is not None else None
    return Call(runner.name, cached("run", runner.run), noise=noise)


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


def golden_cases(model: "UserModel", signatures: dict[str, UserSignature], grid: Grid) -> tuple[bytes, dict[str, Any]]:
    """The grid's golden cases of each exported variant (inputs as the grid draws them),
    answered by the module eager in fp32: GOLDEN_FILE's bytes and the manifest's record."""
    from gru_deploy.check.runners import run_module
    from gru_deploy.models.variants import LengthsOf, StreamOf

    wrap = {"classifier": lambda m: m, "lengths": LengthsOf, "stream": StreamOf}
    cases = []
    for variant, batch, seq in grid.golden:
        if variant in signatures:
            sig = signatures[variant]
            feed = grid.feed(sig, batch, seq, len(cases), seed=GOLDEN_SEED)
            outputs = run_module(wrap[variant](model.module).eval(), sig.to_dict(), feed)
            cases.append((f"{variant}_{len(cases)}", variant, feed, outputs))
    return golden_store(cases)


def export_user_model(model: "UserModel", out: Path, opset: int = 17, atol: float = 1e-5, rtol: float = 1e-5,
                      input_size: int | None = None, output_names: list[str] | None = None,
                      on_step: Callable[[str], None] | None = None, labels: tuple[str, ...] = (),
                      metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                      strategy: str = "loop", typical: tuple[int, int] = (1, 100),
                      targets: tuple[str, ...] = (), executorch_batch: int = 1, executorch_max_seq: int = 2048,
                      onnx_exporter: str = "torchscript") -> dict[str, Any]:
    """Export your own module into `out` by the one pipeline with the module's proof; return the
    manifest. `labels`, `metrics` and `training` are recorded as given (a built-in family's
    checkpoint carries them)."""
    return export_model(model, out, ModuleProof(atol, rtol, labels, metrics, training), opset=opset, atol=atol,
                        rtol=rtol, strategy=strategy, typical=typical, input_size=input_size,
                        output_names=output_names, labels=labels, on_step=on_step, targets=targets,
                        executorch_batch=executorch_batch, executorch_max_seq=executorch_max_seq,
                        onnx_exporter=onnx_exporter)


def export_family(ckpt: Any, out: Path, opset: int = 17, atol: float = 1e-5, rtol: float = 1e-5,
                  on_step: Callable[[str], None] | None = None, strategy: str = "loop",
                  typical: tuple[int, int] = (1, 100), targets: tuple[str, ...] = (),
                  executorch_batch: int = 1, executorch_max_seq: int = 2048, onnx_exporter: str = "torchscript") -> dict[str, Any]:
    """Export a built-in family's checkpoint (train.FamilyCheckpoint) by the generic path."""
    from gru_deploy.models import families
    from gru_deploy.models.user import UserModel

    reference = families.family_reference(ckpt.family)
    model = UserModel(ckpt.model(), reference, families.__file__, dict(ckpt.model_args), ckpt.sha256,
                      family=ckpt.family)
    return export_user_model(model, out, opset=opset, atol=atol, rtol=rtol, on_step=on_step, labels=ckpt.labels,
                             metrics=ckpt.metrics, training=ckpt.training, strategy=strategy, typical=typical,
                              targets=targets, executorch_batch=executorch_batch,
                              executorch_max_seq=executorch_max_seq, onnx_exporter=onnx_exporter)
