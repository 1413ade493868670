"""examples/node: onnxruntime-node (pinned in examples/node/package.json) runs the edge
bundle's golden classifier and stream cases on the .onnx files and on the .ort files, and the
stream model fed chunk by chunk (1 and 5 steps, h_n carried into h0) equals one pass.

The example is installed with `npm install --ignore-scripts` into
~/.cache/gru-deploy/node-example (GRU_DEPLOY_CACHE moves it); node_modules is reused while
package.json and package-lock.json are unchanged. Measured here (2 cores): install about
5 s, run.mjs 0.2 s; max abs error vs eager PyTorch 9.5e-7 (.onnx and .ort alike), chunked
vs one pass 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from examples_helpers import EXAMPLES, npm_folder
from gru_deploy.bundle.package import package

TOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node_example() -> Path:
    return npm_folder("node-example", EXAMPLES / "node")


@pytest.fixture(scope="module")
def edge_bundle(export_dir, tmp_path_factory) -> Path:
    out, _ = package(export_dir, "edge", out=tmp_path_factory.mktemp("node") / "edge")
    return out


def run(folder: Path, bundle: Path) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(["node", "run.mjs", str(bundle)], cwd=folder, capture_output=True, text=True, timeout=180)
    print(proc.stdout, proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc, json.loads(lines[-1][len("RESULT "):]) if lines else {}


def test_onnxruntime_node_reproduces_the_golden_vectors(node_example, edge_bundle):
    proc, result = run(node_example, edge_bundle)
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    # The .onnx and the .ort files both ran, and the chunked stream runs were checked.
    assert set(result["max_abs"]) == {"onnx", "ort", "onnx-chunked", "ort-chunked"}
    assert all(error <= TOL for error in result["max_abs"].values()), result
    golden = json.loads((edge_bundle / "golden" / "golden.json").read_text())
    models = json.loads((edge_bundle / "manifest.json").read_text())["models"]
    for case in golden["cases"]:
        if case["variant"] in ("classifier", "stream"):
            # every model the manifest lists for the case's variant: its .onnx and its .ort
            ran = [m for m, info in models.items() if info["variant"] == case["variant"]]
            assert sorted(models[m]["format"] for m in ran) == ["onnx", "ort"]
            for output in case["outputs"]:
                for model in ran:
                    assert f"ok    {case['name']} {model} {output} " in proc.stdout
        if case["variant"] == "stream":
            for size in (1, 5):
                for output in ("logits", "h_n"):
                    assert f"chunks of {size}: {output} vs one pass" in proc.stdout


def test_a_wrong_golden_value_fails(node_example, edge_bundle, tmp_path):
    bundle = tmp_path / "edge"
    shutil.copytree(edge_bundle, bundle)
    path = bundle / "golden" / "golden.json"
    golden = json.loads(path.read_text())
    case = next(c for c in golden["cases"] if c["variant"] == "stream")
    case["outputs"]["h_n"]["data"][3] += 1e-3
    path.write_text(json.dumps(golden))
    proc, result = run(node_example, bundle)
    assert proc.returncode == 1 and result["failed"] == 2, proc.stdout  # the .onnx and the .ort run
    assert result["max_abs"]["onnx"] > TOL and result["max_abs"]["onnx-chunked"] <= TOL


def test_bad_usage_exits_2(node_example, tmp_path):
    proc = subprocess.run(["node", "run.mjs", str(tmp_path)], cwd=node_example, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_onnxruntime_node_runs_a_user_models_edge_bundle_every_variant_and_int8(node_example, tmp_path):
    """The same script on a module's bundles: a per-step tagger with its lengths model (int64
    lengths fed from golden.json), and an int8 bundle of a classifier, .onnx and .ort."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from cli_helpers import run_cli
    from test_lengths_hook import _checkpoint

    models = Path(__file__).parent / "user_models.py"
    for name, quantize in (("MaskedTagger", False), ("TwoLayerGRU", True)):
        out = tmp_path / name
        assert run_cli("export", "--model", f"{models}:{name}", "--checkpoint", str(_checkpoint(name, tmp_path)),
                       "--out", str(out)).returncode == 0
        bundle, _ = package(out, "edge", out=tmp_path / f"{name}-edge", quantize="int8" if quantize else None)
        proc, result = run(node_example, bundle)
        assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
        golden = json.loads((bundle / "golden" / "golden.json").read_text())
        for case in golden["cases"]:
            for output in case["outputs"]:
                assert f"ok    {case['name']} {case['model']} {output} " in proc.stdout
        assert ("onnx-int8" in result["max_abs"]) == quantize and "ort" in result["max_abs"]
