"""Run the real `gru-deploy` console script from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXPORT_FILES = ["golden.npz", "manifest.json", "model.onnx", "model.ort", "model.pt", "model_lengths.onnx",
                "model_lengths.ort", "model_lengths.pt", "model_step.onnx", "model_stream.onnx", "model_stream.ort",
                "model_stream.pt", "parity.json", "reference_float64.npz",
                "required_operators.config"]


def gru_deploy_exe() -> str:
    exe = shutil.which("gru-deploy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the gru-deploy console script is not installed (pip install -e .)"
    return exe


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console script; return the completed process (text mode)."""
    return subprocess.run([gru_deploy_exe(), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def tutorial_runners(folder: Path, variant: str = "classifier") -> dict:
    """The parity grid's runners (check.module_parity.user_runners) over a tutorial export's
    files for one variant: eager (the classifier rebuilt from model.pt's weights), TorchScript,
    onnxruntime, onnx's reference evaluator, and float64 (the numpy re-implementation)."""
    from gru_deploy.check import torchscript as script
    from gru_deploy.check.module_parity import UserSignature, user_runners
    from gru_deploy.check.runners import Float64Runner
    from gru_deploy.manifest import read_manifest, select_model, verified_path
    from gru_deploy.models.tutorial import load_weights, tutorial_parameters, weights_numpy
    from gru_deploy.spec import ModelSpec

    manifest = read_manifest(folder)
    spec = ModelSpec.from_dict(manifest["config"])
    entry = manifest if variant == "classifier" else manifest["variants"][variant]
    signature = UserSignature(entry["signature"]["inputs"], entry["signature"]["outputs"])
    module = script.load(verified_path(folder, manifest, select_model(manifest, variant, "torchscript")))
    model = load_weights(spec, tutorial_parameters(module.state_dict()))
    onnx_bytes = verified_path(folder, manifest, select_model(manifest, variant, "onnx")).read_bytes()
    method = {"classifier": "forward", "lengths": "forward_lengths", "stream": "forward_stream"}[variant]
    return user_runners(model, module, onnx_bytes, signature, method=method, variant=variant,
                        float64=Float64Runner(spec, weights_numpy(model), variant))


def onnxruntime_outputs(graph: bytes, feed: dict) -> dict:
    """One run of an ONNX model in onnxruntime (CPU): every output by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def small_grid(runners: dict, folder: Path, cases, variant: str = "classifier", first_seed: int = 0, **options):
    """The export's parity grid (check.module_parity.module_parity, the wide grid's inputs) on a
    few cases through `runners`."""
    from gru_deploy.check.module_parity import Grid, UserSignature, module_parity
    from gru_deploy.manifest import read_manifest

    manifest = read_manifest(folder)
    entry = manifest if variant == "classifier" else manifest["variants"][variant]
    signature = UserSignature(entry["signature"]["inputs"], entry["signature"]["outputs"])
    return module_parity(runners, signature, options.pop("atol", 1e-5), options.pop("rtol", 1e-5),
                         Grid({variant: tuple(cases)}, "scaled", 21, first_seed=first_seed), variant, **options)


def tutorial_graph(model, spec, form: str = "loop", variant: str = "classifier", opset: int = 17,
                   metadata: dict | None = None):
    """The tutorial classifier's `variant` in `form` as export builds it (convert.pipeline:
    export_user_onnx of the scripted variant for loop and stepwise, build_fused_graph for fused):
    its ONNX bytes, form and graph record (opset, ir_version, node_count, op_types)."""
    import types

    from gru_deploy.check.module_parity import UserSignature
    from gru_deploy.convert import script
    from gru_deploy.convert.pipeline import build_fused_graph, export_user_onnx
    from gru_deploy.models.user import UserModel

    raw = spec.signature(variant)
    signature = UserSignature(raw["inputs"], raw["outputs"])
    if form == "fused":
        data, record = build_fused_graph(UserModel(model, "tutorial", None), signature, opset, variant, metadata)
    else:
        module = variant_module(model, variant, hoist=form != "stepwise")
        data, record = export_user_onnx(script.torchscript(module), signature, opset, metadata, strategy=form)
    return types.SimpleNamespace(onnx_bytes=data, strategy=form, **record)


def variant_module(model, variant: str, hoist: bool = True):
    """A copy of the tutorial classifier as a variant's module (models.variants: its hook made
    forward), its projections hoisted out of the loop or (hoist=False) computed per step."""
    import copy

    from gru_deploy.models.variants import LengthsOf, StreamOf

    out = copy.deepcopy(model)
    out.hoist = hoist
    return {"classifier": lambda m: m, "lengths": LengthsOf, "stream": StreamOf}[variant](out).eval()
