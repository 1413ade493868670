"""JUnit XML of the parity report (`verify --junit-xml`), read back with a real JUnit reader, and
the example CI workflows that keep it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from junitparser import Failure, JUnitXml

from gru_deploy.check.compare import compare
from gru_deploy.check.junit import parity_junit_xml
from gru_deploy.manifest import file_entry, json_bytes, read_manifest

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
GITHUB_WORKFLOW = ROOT / "examples" / "ci" / "github-actions.yml"
GITLAB_CI = ROOT / "examples" / "ci" / ".gitlab-ci.yml"


def read_junit(path: Path) -> tuple[Any, list[Any]]:
    """The one <testsuite> of a report and its test cases, as junitparser reads them."""
    suites = list(JUnitXml.fromfile(str(path)))
    assert len(suites) == 1
    return suites[0], list(suites[0])


def entries(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(pair, case, comparison) for every case x pair entry of a report's JSON."""
    return [(pair, case, c) for case in report["cases"] for pair, c in case["pairs"].items()]


def case_label(case: dict[str, Any]) -> str:
    return f"batch={case['batch']} seq={case['seq']}" + (f" chunk={case['chunk']}" if "chunk" in case else "")


def test_the_junit_module_loads_neither_torch_nor_numpy():
    code = ("import sys, gru_deploy.check.junit\n"
            "heavy = {'torch', 'numpy', 'onnxruntime'} & set(sys.modules)\nassert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def passing_report(export_dir: Path) -> dict[str, Any]:
    """A real parity report over the session export's files, on a few small cases."""
    from cli_helpers import small_grid, tutorial_runners

    report = small_grid(tutorial_runners(export_dir), export_dir, [(1, 0), (3, 7), (2, 30)])
    assert report
    return report.to_json()


def test_a_passing_report_has_one_testcase_per_case_and_pair(passing_report, tmp_path):
    path = tmp_path / "parity-junit.xml"
    path.write_bytes(parity_junit_xml(passing_report, "small grid"))
    suite, cases = read_junit(path)
    expected = entries(passing_report)
    assert len(expected) > 3 * 4  # every case holds several pairs
    assert suite.name == "small grid" and (suite.tests, suite.failures, suite.errors) == (len(expected), 0, 0)
    assert [(c.classname, c.name) for c in cases] == [(pair, case_label(case)) for pair, case, _ in expected]
    assert all(c.is_passed and not c.result for c in cases)


def _failing_report() -> dict[str, Any]:
    """One passing, one failing (off by 0.5 in one logit) and one shape-mismatched comparison."""
    ref = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    off = ref.copy()
    off[1, 2] += 0.5
    return {"passed": False, "atol": 1e-5, "rtol": 1e-4, "cases": [
        {"batch": 3, "seq": 7, "seed": 0, "passed": False,
         "pairs": {"eager->torchscript": compare(ref, ref, 1e-5, 1e-4).to_json(),
                   "eager->onnxruntime": compare(ref, off, 1e-5, 1e-4).to_json()}},
        {"batch": 2, "seq": 1000, "chunk": 7, "passed": False,
         "pairs": {"stream:one-pass->chunks:onnxruntime": compare(ref, ref[:2], 1e-5, 1e-4).to_json()}},
    ]}


def test_a_failed_comparison_is_a_failure_naming_errors_and_tolerances(tmp_path):
    report = _failing_report()
    path = tmp_path / "parity-junit.xml"
    path.write_bytes(parity_junit_xml(report, "parity"))
    suite, cases = read_junit(path)
    assert (suite.tests, suite.failures) == (3, 2)
    passed, off, shape = cases
    assert passed.is_passed and (off.classname, off.name) == ("eager->onnxruntime", "batch=3 seq=7")
    [failure] = off.result
    assert isinstance(failure, Failure)
    c = report["cases"][0]["pairs"]["eager->onnxruntime"]
    assert c["max_abs"] == pytest.approx(0.5)
    for fragment in (f"max abs {c['max_abs']:.3g}", f"mean abs {c['mean_abs']:.3g}", f"p99 abs {c['p99_abs']:.3g}",
                     "atol 1e-05", "rtol 0.0001", c["reason"]):
        assert fragment in failure.message, (fragment, failure.message)
    assert f"max_abs: {c['max_abs']}" in failure.text and f"min_atol: {c['min_atol']}" in failure.text
    [failure] = shape.result  # statistics that could not be computed read n/a, with compare()'s reason
    assert shape.name == "batch=2 seq=1000 chunk=7"
    assert "max abs n/a" in failure.message and "shape [2, 4] differs" in failure.message


def _diverging_export(export_dir: Path, tiny_checkpoint: Any, tmp_path: Path) -> Path:
    """A copy of the session export whose model.onnx computes fc.bias + 1 (its checksum updated):
    TorchScript still matches eager, onnxruntime is off by 1 in every logit."""
    import shutil

    from cli_helpers import tutorial_graph
    from gru_deploy.models.tutorial import load_weights

    folder = tmp_path / "diverging"
    shutil.copytree(export_dir, folder)
    spec = tiny_checkpoint.spec
    state = {**tiny_checkpoint.state_dict, "fc.bias": tiny_checkpoint.state_dict["fc.bias"] + 1.0}
    (folder / "model.onnx").write_bytes(tutorial_graph(load_weights(spec, state), spec).onnx_bytes)
    manifest = read_manifest(folder)
    manifest["files"]["model.onnx"] = file_entry(folder / "model.onnx")
    (folder / "manifest.json").write_bytes(json_bytes(manifest))
    return folder


@pytest.mark.slow
def test_verify_writes_the_report_before_failing(export_dir, tiny_checkpoint, tmp_path):
    """A failing parity gate still writes the file (replacing an old one), then exits 1."""
    folder = _diverging_export(export_dir, tiny_checkpoint, tmp_path)
    out = tmp_path / "reports" / "parity-junit.xml"
    out.parent.mkdir()
    out.write_text("stale\n")
    proc = run_cli("verify", str(folder), "--json", "--junit-xml", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "parity failed" in proc.stderr
    report = json.loads(proc.stdout)
    suite, cases = read_junit(out)
    expected = entries(report)
    failed = [(pair, case, c) for pair, case, c in expected if not c["passed"]]
    assert {pair for pair, _, _ in failed} >= {"torchscript->onnxruntime", "float64->onnxruntime"}
    assert (suite.tests, suite.failures, suite.errors) == (len(expected), len(failed), 0)
    by_name = {(c.classname, c.name): c for c in cases}  # --json sorts the pairs; the XML keeps the run's order
    assert len(by_name) == len(cases) and set(by_name) == {(pair, case_label(case)) for pair, case, _ in expected}
    for pair, case, c in expected:
        testcase = by_name[pair, case_label(case)]
        if c["passed"]:
            assert testcase.is_passed, (pair, case_label(case))
            continue
        [failure] = testcase.result
        if c["max_abs"] is not None:
            assert c["max_abs"] > 0.5  # fc.bias + 1 shows, where the seq lets the bias through
        for fragment in (f"max abs {c['max_abs']:.3g}", f"atol {c['atol']:.3g}", f"rtol {c['rtol']:.3g}"):
            assert fragment in failure.message, (fragment, failure.message)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # atomic: no temp file left


# --- the example CI workflows ------------------------------------------------------------------

def _verify_report_file(command: str) -> str | None:
    """The --junit-xml FILE of a `gru-deploy verify` line (None if the line has none)."""
    for line in command.splitlines():
        words = shlex.split(line)
        if words[:2] != ["gru-deploy", "verify"]:
            continue
        for i, word in enumerate(words):
            if word == "--junit-xml" and i + 1 < len(words):
                return words[i + 1]
            if word.startswith("--junit-xml="):
                return word.split("=", 1)[1]
    return None


def _options(command: str, name: str) -> set[str]:
    """The options a `gru-deploy NAME` line passes."""
    return {word.split("=")[0] for line in command.splitlines() if shlex.split(line)[:2] == ["gru-deploy", name]
            for word in shlex.split(line) if word.startswith("--")}


def _known_options(name: str) -> set[str]:
    from gru_deploy.cli import cli

    return {opt for param in cli.commands[name].params for opt in param.opts}


def test_github_workflow_uploads_the_junit_report_even_when_parity_fails():
    workflow = yaml.safe_load(GITHUB_WORKFLOW.read_text())
    [job] = workflow["jobs"].values()
    steps = job["steps"]
    runs = [step.get("run", "") for step in steps]
    [verify_at] = [i for i, run in enumerate(runs) if _verify_report_file(run)]
    [export_at] = [i for i, run in enumerate(runs) if "gru-deploy export" in run]
    report = _verify_report_file(runs[verify_at])
    assert export_at < verify_at and not steps[verify_at].get("continue-on-error")  # a failure fails the job
    uploads = [(i, step) for i, step in enumerate(steps) if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert any(i > verify_at and "always()" in str(step.get("if", "")) and report in str(step["with"]["path"]).split()
               for i, step in uploads), uploads
    for name in ("export", "verify"):  # the options it passes exist
        assert _options("\n".join(runs), name) <= _known_options(name), name


def test_gitlab_job_keeps_the_junit_report_even_when_parity_fails():
    config = yaml.safe_load(GITLAB_CI.read_text())
    jobs = [job for job in config.values() if isinstance(job, dict) and "script" in job]
    [job] = [job for job in jobs if any(_verify_report_file(line) for line in job["script"])]
    [report] = [_verify_report_file(line) for line in job["script"] if _verify_report_file(line)]
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["reports"]["junit"] == report
    assert not job.get("allow_failure")
    assert _options("\n".join(job["script"]), "verify") <= _known_options("verify")
