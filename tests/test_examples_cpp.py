"""examples/cpp: libtorch (the one the torch wheel ships) loads the server bundle's model.pt
(or, with --aoti, its AOTInductor package) and reproduces the bundle's golden logits, read
from golden/golden.json with nlohmann/json.

The program is built with CMake into ~/.cache/gru-deploy/cpp-build (GRU_DEPLOY_CACHE moves
it), reused across runs and wiped when the example's sources or the torch install change.
Measured here (2 cores): first build about 35 s, cached about 1 s; max abs error 4.8e-7 on
the default export, 1.2e-7 on the tests' tiny one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from examples_helpers import APT_HINT, CACHE, EXAMPLES, digest, require_tools
from gru_deploy.bundle.package import package

SOURCE = EXAMPLES / "cpp"
BUILD = CACHE / "cpp-build"
MODEL = "model_repository/gru_classifier_torchscript/1/model.pt"
TOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def program() -> Path:
    """The built gru_golden, configured afresh when its sources or torch changed."""
    require_tools("cmake", "c++")
    prefix = torch.utils.cmake_prefix_path
    key = digest(*(p.read_bytes() for p in sorted(SOURCE.iterdir()) if p.is_file()), torch.__version__, prefix)
    stamp = BUILD / ".gru-deploy-sources"
    if not (stamp.is_file() and stamp.read_text().strip() == key):
        shutil.rmtree(BUILD, ignore_errors=True)
        BUILD.mkdir(parents=True)
        configure = subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                                    f"-DCMAKE_PREFIX_PATH={prefix}"], capture_output=True, text=True, timeout=300)
        assert configure.returncode == 0, f"{APT_HINT}\n{configure.stdout[-3000:]}{configure.stderr[-3000:]}"
    build = subprocess.run(["cmake", "--build", str(BUILD), "-j2"], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    stamp.write_text(key + "\n")
    return BUILD / "gru_golden"


@pytest.fixture(scope="module")
def server_bundle(export_dir, tmp_path_factory) -> Path:
    out, _ = package(export_dir, "server", out=tmp_path_factory.mktemp("cpp") / "server")
    return out


def run(program: Path, model: Path, golden: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *flags, str(model), str(golden)], capture_output=True, text=True,
                          timeout=120)


def assert_reproduces(proc: subprocess.CompletedProcess, golden: Path) -> None:
    """The program passed every classifier case of `golden` within TOL."""
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_cases = sum(c["variant"] == "classifier" for c in json.loads(golden.read_text())["cases"])
    assert f"{n_cases} classifier case(s)" in proc.stdout and proc.stdout.count("ok  ") == n_cases
    error = float(re.search(r"^max abs error: (\S+)$", proc.stdout, re.M).group(1))
    assert error <= TOL and "PASSED" in proc.stdout


def test_libtorch_reproduces_the_golden_logits(program, server_bundle):
    golden = server_bundle / "golden" / "golden.json"
    assert_reproduces(run(program, server_bundle / MODEL, golden), golden)


def test_a_wrong_golden_logit_fails(program, server_bundle, tmp_path):
    golden = json.loads((server_bundle / "golden" / "golden.json").read_text())
    case = next(c for c in golden["cases"] if c["variant"] == "classifier")
    case["outputs"]["logits"]["data"][0] += 1e-3
    wrong = tmp_path / "golden.json"
    wrong.write_text(json.dumps(golden))
    proc = run(program, server_bundle / MODEL, wrong)
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "FAILED" in proc.stdout, proc.stdout + proc.stderr


def test_bad_usage_exits_2(program, tmp_path):
    proc = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    (tmp_path / "golden.json").write_text("{not json")
    proc = run(program, tmp_path / "missing.pt", tmp_path / "golden.json")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


def test_libtorch_runs_a_user_models_bundle_every_output_and_its_lengths_model(program, tmp_path):
    """The same program on a server bundle of a module with two outputs (a tuple) and on one
    with a lengths model (forward(x, lengths), inputs matched by the schema's argument names)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from cli_helpers import run_cli
    from test_lengths_hook import _checkpoint

    models = Path(__file__).parent / "user_models.py"
    for name, variants in (("LSTMLoop", ("classifier",)), ("MaskedTagger", ("classifier", "lengths"))):
        out = tmp_path / name
        assert run_cli("export", "--model", f"{models}:{name}", "--checkpoint", str(_checkpoint(name, tmp_path)),
                       "--out", str(out)).returncode == 0
        bundle, _ = package(out, "server", out=tmp_path / f"{name}-server")
        golden = bundle / "golden" / "golden.json"
        for variant in variants:
            triton = "model" if variant == "classifier" else f"model_{variant}"
            proc = subprocess.run([str(program), str(bundle / f"model_repository/{triton}_torchscript/1/model.pt"),
                                   str(golden), "--variant", variant], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            n_cases = sum(c["variant"] == variant for c in json.loads(golden.read_text())["cases"])
            assert f"{n_cases} {variant} case(s)" in proc.stdout and "PASSED" in proc.stdout
        wrong = json.loads(golden.read_text())
        case = next(c for c in wrong["cases"] if c["variant"] == "classifier")
        list(case["outputs"].values())[-1]["data"][0] += 1e-3  # the last output: a tuple's second element
        (tmp_path / "wrong.json").write_text(json.dumps(wrong))
        proc = subprocess.run([str(program), str(bundle / "model_repository/model_torchscript/1/model.pt"),
                               str(tmp_path / "wrong.json")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "FAILED" in proc.stdout


@pytest.fixture(scope="module")
def aoti_bundle(checkpoint_file, tmp_path_factory) -> Path:
    """A server bundle of the tiny checkpoint exported with --targets aoti (one AOTInductor
    compile of the classifier: 20-30 s here)."""
    import gru_deploy

    root = tmp_path_factory.mktemp("aoti")
    gru_deploy.export(checkpoint=checkpoint_file, out=root / "export", targets=("aoti",))
    out, _ = package(root / "export", "server", out=root / "server")
    return out


def test_libtorch_runs_the_aoti_package_on_the_golden_vectors_without_python(program, aoti_bundle, tmp_path):
    """torch::inductor::AOTIModelPackageLoader loads the server bundle's AOTInductor package, the
    package chosen by what the bundle's manifest says it is; a changed golden logit fails."""
    manifest = json.loads((aoti_bundle / "manifest.json").read_text())
    (package_path,) = [n for n, info in manifest["models"].items() if info["format"] == "aoti"]
    golden = aoti_bundle / "golden" / "golden.json"
    assert_reproduces(run(program, aoti_bundle / package_path, golden, "--aoti"), golden)
    wrong = json.loads(golden.read_text())
    next(c for c in wrong["cases"] if c["variant"] == "classifier")["outputs"]["logits"]["data"][0] += 1e-3
    (tmp_path / "golden.json").write_text(json.dumps(wrong))
    proc = run(program, aoti_bundle / package_path, tmp_path / "golden.json", "--aoti")
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout + proc.stderr

