"""gru-deploy from Python: `export`, `verify`, `package` and `load`, for training scripts and CI.

    import gru_deploy

    gru_deploy.export(checkpoint="checkpoint.pt", out="exported")                 # the tutorial model
    gru_deploy.export(my_module, out="mine")                                     # your own module
    gru_deploy.export("my_models.py:TwoLayerGRU", checkpoint="ck.pt", out="mine")
    report = gru_deploy.verify("mine")                                           # report["passed"]
    bundle, manifest = gru_deploy.package("exported", "edge")
    model = gru_deploy.load("exported")
    probabilities = model.predict(x)["probabilities"]

Errors are the CLI's: `UserInputError` for bad input, `CheckFailed` when a check fails, both
`GruDeployError`. Importing gru_deploy loads no torch; these functions load what they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.errors import UserInputError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gru_deploy.train import Checkpoint, FamilyCheckpoint


def export(model: "torch.nn.Module | str | None" = None, *,
           checkpoint: "str | Path | Checkpoint | FamilyCheckpoint | None" = None,
           out: str | Path = "exported", model_args: dict[str, Any] | None = None, input_size: int | None = None,
           output_names: list[str] | None = None, strategy: str = "loop", opset: int = 17, atol: float = 1e-5,
           rtol: float = 1e-5, typical: tuple[int, int] = (1, 100),
           on_step: Callable[[str], None] | None = None, targets: tuple[str, ...] = (),
           executorch_batch: int = 1, executorch_max_seq: int = 2048, onnx_exporter: str = "torchscript") -> dict[str, Any]:
    """Export a model to `out` (written whole, only when every check passes); return its manifest.

    `model` None: the model in `checkpoint` (a path, a `Checkpoint` or a `FamilyCheckpoint`):
    the tutorial classifier in `strategy` form (loop, stepwise, fused, auto), or a
    built-in family's (`gru-deploy train --layers/--bidirectional/--family`). `model` an
    `nn.Module`: your own, as it is (weights included). `model` a string `file.py:Name` /
    `package.module:Name`: your own, built with `model_args` over the checkpoint's and loaded
    from `checkpoint`. A module exports as loop, fused (the tutorial cell families and
    torch.nn.GRU; refused for others), stepwise (the tutorial cell families) or auto (the
    fastest at `typical` (batch, seq)). `targets`: what to build beside ONNX and TorchScript:
    "torch-export" (a `.pt2` torch.export program per variant, its loop a torch.while_loop),
    "aoti" (the classifier's program compiled by AOTInductor), "executorch" (.pte programs of
    the classifier and the stream step, `executorch_batch` rows per call, the classifier's seq
    bounded by `executorch_max_seq`), each proved like every other file; for the built-in
    families (the tutorial cell and torch.nn.GRU's, either direction). `onnx_exporter` "dynamo": the loop form's ONNX written by torch.onnx's
    dynamo exporter (of the control-flow form) instead of the TorchScript-based one, proved alike.
    """
    from gru_deploy.convert.user import export_family, export_user_model

    common = {"opset": opset, "atol": atol, "rtol": rtol, "strategy": strategy, "typical": typical, "on_step": on_step,
              "targets": tuple(targets), "executorch_batch": executorch_batch,
              "executorch_max_seq": executorch_max_seq, "onnx_exporter": onnx_exporter}
    if model is None:
        from gru_deploy.convert.folder import export_to_dir
        from gru_deploy.train import Checkpoint, FamilyCheckpoint, load_checkpoint

        if checkpoint is None:
            raise UserInputError("export: give checkpoint= (train one with `gru-deploy train`) or model=")
        for name, value in (("model_args", model_args), ("input_size", input_size), ("output_names", output_names)):
            if value is not None:
                raise UserInputError(f"export: {name} applies to your own model: give model= too")
        ckpt = (checkpoint if isinstance(checkpoint, (Checkpoint, FamilyCheckpoint))
                else load_checkpoint(Path(checkpoint)))
        if isinstance(ckpt, FamilyCheckpoint):
            return export_family(ckpt, Path(out), **common)
        return export_to_dir(ckpt, Path(out), **common)
    return export_user_model(_user_model(model, model_args, checkpoint), Path(out), input_size=input_size,
                             output_names=output_names, **common)


def _user_model(model: Any, model_args: dict[str, Any] | None, checkpoint: Any) -> Any:
    import torch

    from gru_deploy.models.user import UserModel, load_user_model

    if isinstance(model, str):
        if checkpoint is None:
            raise UserInputError("export: a model named by its file or module needs checkpoint= (its state_dict)")
        return load_user_model(model, model_args, Path(checkpoint))
    if isinstance(model, torch.nn.Module):
        if checkpoint is not None or model_args:
            raise UserInputError("export: a module instance carries its weights; drop checkpoint= and model_args=")
        cls = type(model)
        return UserModel(model.eval(), f"{cls.__module__}:{cls.__qualname__}", None)
    raise UserInputError(f"export: model must be an nn.Module or 'file.py:Name', got {type(model).__name__}")


def verify(path: str | Path, atol: float = 1e-5, rtol: float = 1e-5, data: str | None = None,
           test: str | None = None, junit_xml: str | Path | None = None,
           on_case: Callable[[str], None] | None = None, trust_torchscript: bool = False) -> dict[str, Any]:
    """Check an export folder (checksums, then the parity grid) or a bundle (schema, checksums,
    each model loads, golden vectors); the report as the CLI's --json prints it. Read
    `report["passed"]`; nothing is raised for a check that fails, only for unusable input.

    A bundle's TorchScript runs code from the file: it is loaded only with `trust_torchscript`
    (else listed under report["not_run"]). An export folder is your own output: its
    TorchScript is loaded (it is one side of the parity grid).

    On an export folder, `data` (a data set name or path; `test`: a .ts test file) adds
    "deployment_accuracy": test accuracy per runtime; `junit_xml` writes the parity grid as
    JUnit XML (before the accuracy is measured: a failing run is when CI needs it).
    "stage_seconds" says where an export folder's verify spent its time (check.timing)."""
    from gru_deploy.bundle.read import is_bundle, verify_bundle
    from gru_deploy.accuracy import deployment_accuracy
    from gru_deploy.check.grid import check_tolerances
    from gru_deploy.check.module_parity import verify_export
    from gru_deploy.check.timing import measuring, stage
    from gru_deploy.manifest import atomic_write_bytes

    path = Path(path)
    if is_bundle(path):
        if data is not None or test is not None or junit_xml is not None:
            raise UserInputError("data, test and junit_xml apply to export folders (the parity grid); a bundle is "
                                 "checked against its golden vectors")
        return verify_bundle(path, trust_torchscript=trust_torchscript)
    if trust_torchscript:
        raise UserInputError("trust_torchscript applies to bundles; an export folder's TorchScript is loaded as "
                             "part of its parity grid")
    check_tolerances(atol, rtol)
    with measuring() as clock:
        report = verify_export(path, atol=atol, rtol=rtol, on_case=on_case).to_json()
        if junit_xml is not None:
            from gru_deploy.check.junit import parity_junit_xml

            atomic_write_bytes(Path(junit_xml), parity_junit_xml(report, f"gru-deploy verify {path}"))
        accuracy = None
        if data and report["passed"]:
            with stage("accuracy"):
                accuracy = deployment_accuracy(path, data, test)
    return {**report, "deployment_accuracy": accuracy, "stage_seconds": clock.record()}


def package(export_dir: str | Path, target: str, out: str | Path | None = None, quantize: str | None = None,
            archive: bool = False, force: bool = False, check_with: tuple[str, ...] = (),
            on_step: Callable[[str], None] | None = None, storage_uri: str | None = None,
            image: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Build an edge or server bundle from an export folder; (where it was written, its manifest).
    `quantize="int8"` adds int8 models (edge); `check_with` runs the golden vectors in other
    Pythons' onnxruntime (e.g. a venv with 1.17) and records it. A server bundle's deploy/
    files point KServe at `storage_uri` (the model repository) and run `image` (gru-deploy serve)."""
    from gru_deploy.bundle.kubernetes import Deploy
    from gru_deploy.bundle.package import package as build

    return build(Path(export_dir), target, out=Path(out) if out is not None else None, archive=archive, force=force,
                 quantize=quantize, check_with=tuple(check_with), on_step=on_step,
                 deploy=Deploy(storage_uri, image))


class Loaded:
    """An export folder or bundle, ready to run: `predict(x, lengths=None)` and `stream(batch)`."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path, self.threads = path, threads

    def predict(self, x: "np.ndarray", lengths: "np.ndarray | None" = None) -> dict[str, "np.ndarray"]:
        """Every output by name, and for a classifier with labels its probabilities; `lengths`
        runs the lengths variant on a padded x (where the model has one)."""
        from gru_deploy.serve.infer import infer

        result = infer(self.path, x, lengths=lengths, threads=self.threads)
        return {**result.outputs, **({"probabilities": result.probabilities} if result.classes else {})}

    def stream(self, batch: int = 1) -> Any:
        """The streaming API (`gru_deploy.Stream`) over the export's stream model."""
        from gru_deploy.serve.stream import Stream

        return Stream(self.path, batch, threads=self.threads)


def load(path: str | Path, threads: int = 1) -> Loaded:
    """An export folder or a bundle to run from Python (files checked against the manifest when used)."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such export folder or bundle")
    return Loaded(path, threads)
