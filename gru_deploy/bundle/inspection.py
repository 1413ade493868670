"""`inspect`: what an export folder, a bundle or an ONNX file holds, without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gru_deploy.errors import UserInputError


def onnx_summary(data: bytes, where: str) -> dict[str, Any]:
    """Signature, op counts (sub-graphs included), opset, IR version and metadata keys of an ONNX model."""
    import onnx

    from gru_deploy.convert.graphs import count_ops, parse_onnx

    model = parse_onnx(data, where, UserInputError)

    def value(v: Any) -> dict[str, Any]:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": dims}

    return {
        "ir_version": int(model.ir_version),
        "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "inputs": [value(v) for v in model.graph.input],
        "outputs": [value(v) for v in model.graph.output],
        "op_types": count_ops(model.graph),
        "metadata_keys": sorted(p.key for p in model.metadata_props),
        "size": len(data),
    }


def _files_report(folder: Path, files: dict[str, Any]) -> dict[str, Any]:
    """Each listed file with its status (ok, missing, CHANGED), and the summary of each intact .onnx."""
    from gru_deploy.manifest import sha256_file

    status = {}
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file() or path.is_symlink():
            status[name] = "missing"
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            status[name] = "CHANGED"
        else:
            status[name] = "ok"
    return {"files": {n: {**files[n], "status": s} for n, s in status.items()},
            "onnx": {n: onnx_summary((folder / n).read_bytes(), n) for n, s in status.items()
                     if n.endswith(".onnx") and s == "ok"}}


def inspect_path(path: Path) -> dict[str, Any]:
    """A report for an export folder, a bundle (folder or .tar.gz) or an .onnx file."""
    from gru_deploy.bundle.read import is_bundle, open_bundle
    from gru_deploy.manifest import read_manifest

    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return {"kind": "onnx", "path": str(path), **onnx_summary(path.read_bytes(), str(path))}
    if is_bundle(path):
        with open_bundle(path) as (folder, manifest):
            return {"kind": "bundle", "path": str(path), "target": manifest["target"],
                    "signatures": manifest["signatures"], "labels": manifest["labels"],
                    "models": _models(manifest), **_files_report(folder, manifest["files"])}
    manifest = read_manifest(path)
    parity = manifest.get("parity") or {}
    return {"kind": "export", "path": str(path), "strategy": manifest["strategy"], "signature": manifest["signature"],
            "variants": {k: v["signature"] for k, v in (manifest.get("variants") or {}).items()},
            "models": _models(manifest),
            "labels": manifest["labels"], "metrics": {k: v for k, v in manifest.get("metrics", {}).items()
                                                      if k != "loss_history"},
            "parity_passed": parity.get("passed"),
            "parity": {k: parity.get(k) for k in ("atol", "rtol", "applied_atol", "verified_max_seq", "unverifiable")},
            **_files_report(path, manifest["files"])}


def _models(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model file with what the manifest says it is: variant, format, precision and form."""
    return {name: {k: info[k] for k in ("variant", "format", "precision", "strategy") if k in info}
            for name, info in (manifest.get("models") or {}).items()}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: {report['kind']}"
             + (f" ({report.get('target') or report.get('strategy')})" if report["kind"] != "onnx" else "")]
    if report["kind"] == "onnx":
        onnx_items = {Path(report["path"]).name: report}
    else:
        lines.append("labels: " + ", ".join(report["labels"]))
        parity = report.get("parity") or {}
        if parity.get("verified_max_seq"):
            lines.append(f"parity: atol applied up to {parity['applied_atol']:.3g} (requested {parity['atol']:g}), "
                         "verified up to " + ", ".join(f"{v} {n} steps" for v, n in parity["verified_max_seq"].items())
                         + (f"; {len(parity['unverifiable'])} case(s) unverifiable" if parity.get("unverifiable") else ""))
        for name, entry in report["files"].items():
            lines.append(f"  {entry['status']:<8} {entry['size']:>10,}  {name}")
        for name, info in report.get("models", {}).items():
            form = f", {info['strategy']}" if "strategy" in info else ""
            lines.append(f"  model {name}: {info['variant']} ({info['format']}, {info['precision']}{form})")
        onnx_items = report["onnx"]
    for name, info in onnx_items.items():
        sig, out = (", ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in info[k]) for k in ("inputs", "outputs"))
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(info["op_types"].items()))
        lines.append(f"{name}: IR {info['ir_version']}, opset {info['opset']}; ({sig}) -> ({out})")
        lines.append(f"    ops: {ops}")
    return "\n".join(lines)
