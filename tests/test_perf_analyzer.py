"""Triton's own benchmark client, perf_analyzer, against `gru-deploy serve`: it reads each
model's metadata and config, builds its requests from them, and must exit 0. It is set up by
scripts/perf_analyzer/setup.sh (the 2.60 wheel from PyPI, a glibc shim; cached in
~/.cache/perf_analyzer): a machine where that fails fails this test, it does not skip it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "perf_analyzer_serve.py"


def _script():
    spec = importlib.util.spec_from_file_location("perf_analyzer_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_perf_analyzer_drives_the_classifier_and_a_stream_of_sequences_with_exit_0(export_dir, tmp_path):
    from gru_deploy.bundle.package import package

    script = _script()
    pa = script.perf_analyzer()  # RuntimeError (a failure) where it cannot be set up
    bundle, _ = package(export_dir, "server", out=tmp_path / "server.tar.gz", archive=True)
    rows = script.run_matrix(bundle, pa, ["classifier", "lengths", "stream"], ["grpc"], [2], window_ms=500,
                             max_trials=10, stability=100, log=lambda message: None)
    assert [(r["model"], r["exit"]) for r in rows] == [
        ("gru_classifier", 0), ("gru_classifier_lengths", 0), ("gru_classifier_stream", 0)], rows
    assert all(r["infer_per_s"] > 0 for r in rows)
