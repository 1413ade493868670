"""The export folder for each strategy, auto's choice, and what a failed export leaves."""

from __future__ import annotations

import pytest

from gru_deploy.errors import UserInputError
from gru_deploy.manifest import read_manifest
from gru_deploy.pipeline import export_to_dir, time_strategies
from gru_deploy.verify import verify_export


def test_fused_export_verifies(tiny_checkpoint, tmp_path):
    manifest = export_to_dir(tiny_checkpoint, tmp_path / "fused", strategy="fused")
    assert manifest["strategy"] == "fused" and manifest["onnx"]["op_types"]["GRU"] == 1
    assert manifest["ir_version"] == 8 and manifest["auto"] is None
    assert (tmp_path / "fused" / "model.pt").is_file()  # TorchScript kept whatever the ONNX strategy
    assert verify_export(tmp_path / "fused")


def test_auto_keeps_the_fastest_it_measured(tiny_checkpoint, tmp_path):
    manifest = export_to_dir(tiny_checkpoint, tmp_path / "auto", strategy="auto", typical=(2, 30))
    auto = manifest["auto"]
    assert set(auto["median_us"]) == {"loop", "fused", "scan"}
    assert auto["chosen"] == min(auto["median_us"], key=auto["median_us"].get) == manifest["strategy"]
    assert (auto["typical_batch"], auto["typical_seq"]) == (2, 30)
    assert read_manifest(tmp_path / "auto")["auto"] == auto


def test_time_strategies_reports_positive_medians(export_dir):
    spec_config = read_manifest(export_dir)["config"]
    from gru_deploy.spec import ModelSpec

    onnx_bytes = (export_dir / "model.onnx").read_bytes()
    timings = time_strategies({"a": onnx_bytes}, ModelSpec.from_dict(spec_config), (1, 5), budget_s=0.05)
    assert timings["a"] > 0


@pytest.mark.parametrize("kwargs,fragment", [
    ({"strategy": "scan2"}, "unknown strategy"),
    ({"strategy": "auto", "typical": (0, 100)}, "typical"),
    ({"opset": 99}, "verified range"),
])
def test_bad_options_write_nothing(tiny_checkpoint, tmp_path, kwargs, fragment):
    with pytest.raises(UserInputError, match=fragment):
        export_to_dir(tiny_checkpoint, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_scan_export_verifies_without_torchscript_in_its_graph(tiny_checkpoint, tmp_path):
    manifest = export_to_dir(tiny_checkpoint, tmp_path / "scan", strategy="scan")
    assert manifest["strategy"] == "scan" and manifest["onnx"]["op_types"]["Scan"] == 1
    assert "Loop" not in manifest["onnx"]["op_types"] and manifest["opset"] >= 18
    assert verify_export(tmp_path / "scan")
