"""`export`: checkpoint → TorchScript → ONNX → parity → export dir, written all at once.

Everything is built in a staging folder beside the target and swapped in only after the
parity gate passes, so a failed or interrupted export leaves the earlier export whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from gru_deploy import __version__
from gru_deploy.compare import DEFAULT_ATOL, DEFAULT_RTOL
from gru_deploy.errors import CheckFailed
from gru_deploy.manifest import (MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, atomic_write_bytes,
                                 atomic_write_json, file_entry, staged_dir)
from gru_deploy.train import Checkpoint
from gru_deploy.versions import library_versions

# Files in an export dir that gru-deploy did not write and keeps across exports.
KEEP = ("README.md",)


def export_to_dir(
    checkpoint: Checkpoint,
    out: Path,
    opset: int = 17,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write model.pt, model.onnx, parity.json and manifest.json into `out`; return the manifest.

    Raises CheckFailed (and writes nothing) when a guard or the parity gate fails.
    """
    from gru_deploy import script
    from gru_deploy.export import check_opset, export_loop
    from gru_deploy.verify import check_tolerances, export_runners, run_parity

    check_opset(opset)
    check_tolerances(atol, rtol)
    step = on_step or (lambda message: None)
    spec = checkpoint.spec
    model = checkpoint.model()
    step("scripting with torch.jit.script (checking the time loop stays a prim::Loop)")
    scripted = script.torchscript(model)
    step(f"exporting to ONNX opset {opset} (TorchScript exporter; guarding against unrolling)")
    metadata = {
        "gru_deploy.version": __version__,
        "gru_deploy.config": spec.to_dict(),
        "gru_deploy.labels": list(spec.labels),
        "gru_deploy.strategy": "loop",
        "gru_deploy.source_checkpoint_sha256": checkpoint.sha256 or "",
    }
    result = export_loop(scripted, spec, opset, metadata)
    with staged_dir(Path(out), keep=KEEP) as stage:
        atomic_write_bytes(stage / "model.pt", script.to_bytes(scripted))
        atomic_write_bytes(stage / "model.onnx", result.onnx_bytes)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "gru_deploy_version": __version__,
            "strategy": result.strategy,
            "opset": result.opset,
            "ir_version": result.ir_version,
            "onnx": {"node_count": result.node_count, "op_types": result.op_types},
            "signature": spec.signature(),
            "config": spec.to_dict(),
            "labels": list(spec.labels),
            "metrics": checkpoint.metrics,
            "training": checkpoint.training,
            "source_checkpoint": {"sha256": checkpoint.sha256},
            "versions": library_versions(),
            "notes": [script.DEPRECATION_NOTE],
            "files": {name: file_entry(stage / name) for name in ("model.pt", "model.onnx")},
        }
        step("checking parity: eager, TorchScript, onnxruntime, onnx reference, float64")
        report = run_parity(export_runners(stage, manifest), spec, atol=atol, rtol=rtol)
        if not report:
            raise CheckFailed("parity failed, nothing written: " + "; ".join(report.failures()))
        parity = report.to_json()
        atomic_write_json(stage / "parity.json", parity)
        manifest["files"]["parity.json"] = file_entry(stage / "parity.json")
        manifest["parity"] = {"passed": parity["passed"], "atol": atol, "rtol": rtol, "summary": parity["summary"]}
        atomic_write_json(stage / MANIFEST_NAME, manifest)
    return manifest
