"""The tutorial model's parity grid (its cases, feeds, pairs and runners over an export's files;
check.grid runs it) and `verify` of export dirs.

The grid is batch {1, 3, 64} × seq {0, 1, 7, 100, 1000} plus one 2,048-step case, with
inputs of both signs at scales from 0.01 to 10 and fixed seeds. Pairs compared:
eager (the tutorial's loop) against TorchScript and onnxruntime, a float64 numpy
re-implementation of the equations against onnxruntime, and eager against onnx's
ReferenceEvaluator on the small cases (it is pure Python and slow).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

from gru_deploy.check.compare import DEFAULT_ATOL, DEFAULT_RTOL
from gru_deploy.check.grid import CHUNK_SIZES, ParityReport, check_chunked, check_tolerances, make_input, run_parity
from gru_deploy.check.runners import Runner
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, STATE_IN, ModelSpec

if TYPE_CHECKING:
    import torch

GRID_BATCHES = (1, 3, 64)
GRID_SEQS = (0, 1, 7, 100, 1000)
EXTRA_CASES = ((2, 2048),)
# (reference, test, largest batch*seq it runs on: None for every case)
PAIRS: tuple[tuple[str, str, int | None], ...] = (
    ("eager", "torchscript", None),
    ("eager", "onnxruntime", None),
    ("float64", "onnxruntime", None),
    ("eager", "onnx-reference", 21),
    ("eager", "onnxruntime-ort", None),
)


def grid_cases() -> list[tuple[int, int]]:
    return [(b, s) for b in GRID_BATCHES for s in GRID_SEQS] + list(EXTRA_CASES)


def make_feed(spec: ModelSpec, variant: str, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """A grid case's feed: x, plus a random h0 (stream) or lengths {seq, 1, 0, random} (lengths)."""
    feed = {INPUT_NAME: make_input(batch, seq, spec.input_size, seed)}
    rng = np.random.default_rng(seed + 10_000)
    if variant == "stream":
        feed[STATE_IN] = rng.uniform(-1, 1, size=(batch, spec.hidden_size)).astype(np.float32)
    if variant == "lengths":
        lengths = rng.integers(0, seq + 1, size=batch)
        lengths[: min(batch, 3)] = [seq, min(seq, 1), 0][: min(batch, 3)]
        feed[LENGTHS_NAME] = lengths.astype(np.int64)
    return feed


# The int8 gate's inputs (compare.int8_gate): a few hundred sequences up to the grid's longest,
# (batch, seq) each: 64 samples at 1, 7, 25 and 100 steps, 16 at 1,000 and 8 at 2,048.
INT8_GATE_CASES = ((64, 1), (64, 7), (64, 25), (64, 100), (16, 1000), (8, 2048))


def int8_gate_feeds(input_size: int, state_shape: tuple[int, ...] | None = None,
                    seed: int = 5000) -> list[dict[str, np.ndarray]]:
    """The int8 gate's feeds: x per INT8_GATE_CASES (make_input), plus a state uniform in
    [-1, 1] where the model takes one (`state_shape` without the batch axis); fixed seeds, so a
    bundle's verify regenerates exactly the inputs its recorded reference answered."""
    feeds = []
    for index, (batch, seq) in enumerate(INT8_GATE_CASES):
        feed = {INPUT_NAME: make_input(batch, seq, input_size, seed + index)}
        if state_shape is not None:
            rng = np.random.default_rng(seed + 100 + index)
            feed[STATE_IN] = rng.uniform(-1, 1, size=(batch, *state_shape)).astype(np.float32)
        feeds.append(feed)
    return feeds


def tutorial_grid(runners: Mapping[str, Runner], spec: ModelSpec, cases: Iterable[tuple[int, int]] | None = None,
                  variant: str = "classifier", seed: int = 0, **options: Any) -> ParityReport:
    """The tutorial model's grid (check.grid.run_parity): its feeds (make_feed, case `index`
    seeded `seed + index`), its cases (grid_cases unless given) and its pairs (PAIRS)."""
    return run_parity(runners, lambda batch, seq, index: make_feed(spec, variant, batch, seq, seed + index),
                      grid_cases() if cases is None else cases, pairs=options.pop("pairs", PAIRS), seed=seed,
                      variant=variant, **options)


def build_runners(spec: ModelSpec, module: "torch.jit.ScriptModule", onnx_model: Path | bytes,
                  threads: int = 1, variant: str = "classifier") -> dict[str, Runner]:
    """Every runner over one model variant: eager and float64 on the TorchScript module's weights."""
    from gru_deploy.check import torchscript as script
    from gru_deploy.models.tutorial import load_weights, tutorial_parameters, weights_numpy
    from gru_deploy.check.runners import (Float64Runner, OnnxReferenceRunner, OnnxRuntimeRunner, eager_runner,
                                    torchscript_runner)

    script.check_loop(module)
    model = load_weights(spec, tutorial_parameters(module.state_dict()))
    onnx_bytes = onnx_model.read_bytes() if isinstance(onnx_model, Path) else onnx_model
    return {
        "eager": eager_runner(spec, model, variant),
        "torchscript": torchscript_runner(spec, module, variant),
        "onnxruntime": OnnxRuntimeRunner(spec, onnx_bytes, threads=threads, variant=variant),
        "onnx-reference": OnnxReferenceRunner(spec, onnx_bytes, variant=variant),
        "float64": Float64Runner(spec, weights_numpy(model), variant),
    }


# The stream and lengths variants: a smaller grid, plus a long case.
VARIANT_CASES = tuple((b, s) for b in (1, 3, 8) for s in (0, 1, 7, 100)) + ((2, 1000),)


def export_runners(folder: Path, manifest: dict[str, Any], threads: int = 1,
                   variant: str = "classifier") -> dict[str, Runner]:
    """Runners over an export dir's files for one variant, each file checked against the manifest first."""
    from gru_deploy.check import torchscript as script
    from gru_deploy.manifest import find_models, select_model, verified_path
    from gru_deploy.check.runners import OnnxRuntimeRunner

    spec = ModelSpec.from_dict(manifest["config"])
    where = str(folder)
    pt_name = select_model(manifest, variant, "torchscript", where=where)
    onnx_name = select_model(manifest, variant, "onnx", where=where)
    module = script.load(verified_path(folder, manifest, pt_name))
    runners = build_runners(spec, module, verified_path(folder, manifest, onnx_name), threads, variant)
    if find_models(manifest, variant, "ort", where=where):
        ort_name = select_model(manifest, variant, "ort", where=where)
        ort_format = verified_path(folder, manifest, ort_name).read_bytes()
        runners["onnxruntime-ort"] = OnnxRuntimeRunner(spec, ort_format, threads=threads, variant=variant)
        runners["onnxruntime-ort"].name = "onnxruntime-ort"
    return runners


def parity_for_dir(folder: Path, manifest: dict[str, Any], atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL, on_case: Callable[[str], None] | None = None) -> ParityReport:
    """The full parity gate over an export dir's files (checksums checked on load).

    The classifier on the full grid; each variant the manifest lists on its grid; the stream
    fed in chunks of 1, 7 and 100 over 1,000 steps in TorchScript and onnxruntime.
    """
    spec = ModelSpec.from_dict(manifest["config"])
    report = tutorial_grid(export_runners(folder, manifest), spec, atol=atol, rtol=rtol, on_case=on_case)
    for variant in manifest.get("variants") or {}:
        runners = export_runners(folder, manifest, variant=variant)
        part = tutorial_grid(runners, spec, VARIANT_CASES, variant, atol=atol, rtol=rtol,
                             prefix=f"{variant}:", on_case=on_case)
        report.extend(part)
        if variant == "stream":
            for name in ("torchscript", "onnxruntime"):
                if on_case is not None:
                    on_case(f"stream: chunks of {', '.join(map(str, CHUNK_SIZES))} in {name}")
                report.cases.extend(check_chunked(runners[name], spec.signature("stream"), atol, rtol))
    return report


def verify_export(folder: Path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  on_case: Callable[[str], None] | None = None) -> ParityReport:
    """Check every checksum of an export dir, then run the parity gate on its files."""
    from gru_deploy.manifest import check_files, read_manifest

    check_tolerances(atol, rtol)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    return parity_for_dir(folder, manifest, atol, rtol, on_case)


def user_export_parity(folder: Path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                       on_case: Callable[[str], None] | None = None) -> ParityReport | None:
    """The parity report of an export folder of a user's own model (checksums first); None for
    a folder of the tutorial model."""
    from gru_deploy.check.module_parity import verify_user_export
    from gru_deploy.manifest import MANIFEST_NAME, check_files, is_module_export, read_manifest

    folder = Path(folder)
    if not folder.is_dir() or not (folder / MANIFEST_NAME).is_file():
        return None  # the tutorial path reports what is wrong with anything else
    manifest = read_manifest(folder)
    if not is_module_export(manifest):
        return None
    check_files(folder, manifest)
    return verify_user_export(Path(folder), manifest, atol, rtol, on_case)
