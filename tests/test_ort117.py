"""onnxruntime 1.17 compatibility: our ONNX (fp32, int8) and ORT-format files in an old runtime.

A venv with onnxruntime 1.17.3 and numpy<2 (plus onnx 1.16, which 1.17's .ort converter
imports) is made once under ~/.cache/gru-deploy/ort117-venv (GRU_DEPLOY_ORT117_VENV moves
it) and reused. gru_deploy/bundle/golden_check.py runs there against golden outputs computed with
the current onnxruntime, directly and through `package --check-with`.

Measured (onnxruntime 1.32 here): .onnx fp32 and int8 load and match in 1.17; an .ort made
by 1.32's converter loads and matches in 1.17 (both converters write ORT format version 6);
an .ort made by 1.17's converter loads and matches in 1.17 and in 1.32.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "gru_deploy" / "bundle" / "golden_check.py"
OLD_ORT = "1.17.3"
OLD_PACKAGES = [f"onnxruntime=={OLD_ORT}", "numpy<2", "onnx==1.16.2"]
VENV = Path(os.environ.get("GRU_DEPLOY_ORT117_VENV", Path.home() / ".cache" / "gru-deploy" / "ort117-venv"))
READY = VENV / ".gru-deploy-ready"  # written last: a half-made venv is rebuilt
FP32_ATOL = 1e-5
INT8_ATOL = 1e-4  # int8 kernels may differ in how they apply the float scales
CONVERT = (
    "import sys; from pathlib import Path; "
    "from onnxruntime.tools.convert_onnx_models_to_ort import convert_onnx_models_to_ort, OptimizationStyle; "
    "convert_onnx_models_to_ort(Path(sys.argv[1]), output_dir=Path(sys.argv[2]), "
    "optimization_styles=[OptimizationStyle.Fixed])"
)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(python: Path | str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, env=clean_env())


@pytest.fixture(scope="session")
def old_python() -> Path:
    """The 1.17 venv's python, made on first use (about 15 s) and cached across runs."""
    python = VENV / "bin" / "python"
    if READY.is_file() and python.is_file():
        probe = run(python, "-c", "import onnxruntime, numpy, onnx; print(onnxruntime.__version__)")
        if probe.returncode == 0 and probe.stdout.strip() == OLD_ORT:
            return python
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    made = run(sys.executable, "-m", "venv", str(VENV))
    assert made.returncode == 0, made.stderr
    installed = run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *OLD_PACKAGES, timeout=900)
    if installed.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        # A failure, not a skip: CI must run these checks (PyPI holds these wheels for this Python).
        pytest.fail(f"cannot install {' '.join(OLD_PACKAGES)}: {installed.stderr.strip().splitlines()[-1:]}")
    READY.write_text(" ".join(OLD_PACKAGES) + "\n")
    return python


def feed_for(variant: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(117)
    feed = {"x": rng.standard_normal((3, 20, 8)).astype(np.float32)}
    if variant == "stream":
        feed["h0"] = (0.5 * rng.standard_normal((3, 16))).astype(np.float32)
    return feed


def as_json(array: np.ndarray) -> dict:
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """onnx/ (fp32 + int8), ort132/ (made by the current converter), golden.json from the current runtime."""
    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from cli_helpers import tutorial_graph
    from gru_deploy.bundle.quantize import quantize_int8

    base = tmp_path_factory.mktemp("ort117")
    onnx_dir, ort_dir = base / "onnx", base / "ort132"
    onnx_dir.mkdir()
    model = tiny_checkpoint.model()
    cases = []
    for variant, stem in (("classifier", "model"), ("stream", "model_stream")):
        fp32 = tutorial_graph(model, tiny_checkpoint.spec, variant=variant).onnx_bytes
        int8, _ = quantize_int8(fp32)
        for name, data, atol in ((f"{stem}.onnx", fp32, FP32_ATOL), (f"{stem}_int8.onnx", int8, INT8_ATOL)):
            (onnx_dir / name).write_bytes(data)
            feed = feed_for(variant)
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs = dict(zip(names, session.run(names, feed)))
            for model_name in (name, name.replace(".onnx", ".ort")):
                cases.append({"model": model_name, "inputs": {k: as_json(v) for k, v in feed.items()},
                              "outputs": {k: as_json(v) for k, v in outputs.items()}, "atol": atol})
    convert_onnx_models_to_ort(onnx_dir, output_dir=ort_dir, optimization_styles=[OptimizationStyle.Fixed])
    golden = base / "golden.json"
    golden.write_text(json.dumps({"cases": cases}))
    return {"base": base, "onnx": onnx_dir, "ort132": ort_dir, "golden": golden}


def golden_for(models: dict[str, Path], suffix: str) -> Path:
    """The golden cases of one file kind (.onnx or .ort)."""
    cases = json.loads(models["golden"].read_text())["cases"]
    path = models["base"] / f"golden{suffix}.json"
    path.write_text(json.dumps({"cases": [c for c in cases if c["model"].endswith(suffix)]}))
    return path


def check(python: Path | str, folder: Path, golden: Path) -> tuple[subprocess.CompletedProcess, dict]:
    results = golden.with_name(f"results-{folder.name}-{abs(hash(str(python)))}.json")
    proc = run(python, str(CHECK), str(folder), str(golden), "--json", str(results))
    print(f"\n$ golden_check.py {folder.name} ({Path(python).parent.parent.name})\n{proc.stdout}{proc.stderr[-2000:]}")
    return proc, json.loads(results.read_text()) if results.is_file() else {}


def ort_format_version(path: Path) -> str:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    return InferenceSession.GetRootAsInferenceSession(path.read_bytes(), 0).OrtVersion().decode()


@pytest.mark.slow
def test_onnx_fp32_and_int8_load_and_match_in_ort117(old_python, models):
    proc, results = check(old_python, models["onnx"], golden_for(models, ".onnx"))
    assert results["onnxruntime"] == OLD_ORT
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "4 passed, 0 failed"
    assert {r["model"] for r in results["results"] if r["passed"]} == {
        "model.onnx", "model_int8.onnx", "model_stream.onnx", "model_stream_int8.onnx"}


@pytest.mark.slow
def test_ort_made_by_current_runtime_loads_in_ort117(old_python, models):
    """Both converters write ORT format version 6, which 1.17 reads: 1.32's .ort runs there."""
    for path in sorted(models["ort132"].glob("*.ort")):
        assert ort_format_version(path) == "6", path.name
    proc, results = check(old_python, models["ort132"], golden_for(models, ".ort"))
    assert results["onnxruntime"] == OLD_ORT
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "4 passed, 0 failed"


@pytest.mark.slow
def test_ort_made_by_ort117_loads_in_both_runtimes(old_python, models):
    """The fallback for old runtimes, an .ort made by 1.17's own converter, works in 1.17 and here."""
    out = models["base"] / "ort117"
    converted = run(old_python, "-c", CONVERT, str(models["onnx"]), str(out))
    assert converted.returncode == 0, converted.stderr[-2000:]
    files = sorted(p.name for p in out.glob("*.ort"))
    assert files == ["model.ort", "model_int8.ort", "model_stream.ort", "model_stream_int8.ort"]
    assert {ort_format_version(out / f) for f in files} == {"6"}
    golden = golden_for(models, ".ort")
    for python, version in ((old_python, OLD_ORT), (sys.executable, None)):
        proc, results = check(python, out, golden)
        assert proc.returncode == 0, proc.stdout
        assert proc.stdout.strip().splitlines()[-1] == "4 passed, 0 failed"
        if version:
            assert results["onnxruntime"] == version


def test_check_script_reports_failures(tmp_path):
    """The script itself, in this runtime: a wrong golden, a missing file and a bad model fail alone."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "relu.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "junk.ort").write_bytes(b"not a model")
    x = {"dtype": "float32", "shape": [1, 2], "data": [-1.0, 2.0]}

    def case(name, data):
        return {"model": name, "inputs": {"x": x},
                "outputs": {"y": {"dtype": "float32", "shape": [1, 2], "data": data}}, "atol": 1e-6}

    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"cases": [case("relu.onnx", [0.0, 2.0]), case("relu.onnx", [0.0, 2.5]),
                                            case("missing.onnx", [0.0, 2.0]), case("junk.ort", [0.0, 2.0])]}))
    proc = run(sys.executable, str(CHECK), str(tmp_path), str(golden))
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[-1] == "1 passed, 3 failed"
    assert lines[1].startswith("PASS relu.onnx") and lines[2].startswith("FAIL relu.onnx: y max abs error 0.5")
    assert lines[3] == "FAIL missing.onnx: file not found" and lines[4].startswith("FAIL junk.ort: cannot load")
    golden.write_text(json.dumps({"cases": [case("relu.onnx", [0.0, 2.0])]}))
    proc = run(sys.executable, str(CHECK), str(tmp_path), str(golden))
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"
    assert run(sys.executable, str(CHECK), str(tmp_path / "nope"), str(golden)).returncode == 2


@pytest.mark.slow
def test_package_check_with_runs_the_golden_vectors_in_ort117_and_records_it(old_python, export_dir, tmp_path):
    """`package --check-with PYTHON`: the shipped edge bundle (fp32 .onnx and .ort, int8 .onnx)
    against its own golden vectors in 1.17, recorded in the manifest only because it ran."""
    from gru_deploy.bundle.package import package

    bundle, manifest = package(export_dir, "edge", out=tmp_path / "edge", quantize="int8",
                               check_with=(str(old_python),))
    [run_117] = manifest["onnxruntime"]["checked_with"]
    golden = json.loads((bundle / "golden" / "golden.json").read_text())
    fp32 = [c for c in golden["cases"] if c.get("precision", "fp32") == "fp32"]
    int8 = [c for c in golden["cases"] if c.get("precision") == "int8"]
    # every fp32 case on .onnx and .ort, every int8 case on its .onnx
    assert run_117 == {"python": str(old_python), "onnxruntime": OLD_ORT, "numpy": run_117["numpy"],
                       "cases": 2 * len(fp32) + len(int8), "passed": True, "failures": []}
    assert len(int8) == 4 and len(fp32) == 5  # classifier 3, stream 1, lengths 1; int8: classifier and stream


def test_check_with_a_python_that_cannot_run_it_writes_nothing(export_dir, tmp_path):
    from gru_deploy.errors import UserInputError
    from gru_deploy.bundle.package import package

    with pytest.raises(UserInputError, match="--check-with"):
        package(export_dir, "edge", out=tmp_path / "edge", check_with=(str(tmp_path / "no-python"),))
    assert not (tmp_path / "edge").exists()


@pytest.mark.slow
def test_check_with_runs_a_modules_edge_bundle_in_ort117(old_python, tmp_path):
    """A module's edge bundle (classifier, lengths and stream models, fp32 .onnx and .ort, int8
    .onnx): every golden case in onnxruntime 1.17, recorded in the manifest."""
    import gru_deploy
    from gru_deploy.bundle.package import package
    from gru_deploy.models.families import StackedGRUClassifier

    import torch

    torch.manual_seed(0)
    out = tmp_path / "family"
    gru_deploy.export(StackedGRUClassifier(3, 5, 2, layers=2).eval(), out=out)
    bundle, manifest = package(out, "edge", out=tmp_path / "edge", quantize="int8", check_with=(str(old_python),))
    [run_117] = manifest["onnxruntime"]["checked_with"]
    golden = json.loads((bundle / "golden" / "golden.json").read_text())
    fp32 = [c for c in golden["cases"] if c.get("precision", "fp32") == "fp32"]
    int8 = [c for c in golden["cases"] if c.get("precision") == "int8"]
    assert {c["variant"] for c in fp32} == {"classifier", "lengths", "stream"}
    assert run_117["passed"] and run_117["onnxruntime"] == OLD_ORT and run_117["cases"] == 2 * len(fp32) + len(int8)
