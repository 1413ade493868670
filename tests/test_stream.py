"""The streaming API: `gru_deploy.Stream` against the stream model it runs, on loop and fused exports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gru_deploy.errors import UserInputError
from gru_deploy.serve.infer import infer
from cli_helpers import tutorial_runners
from test_lengths_hook import tagger  # noqa: F401  (a module fixture: your own tagger's export)


@pytest.fixture(scope="module")
def fused_export(tiny_checkpoint, tmp_path_factory):
    from gru_deploy.convert.folder import export_to_dir

    out = tmp_path_factory.mktemp("stream") / "fused"
    export_to_dir(tiny_checkpoint, out, strategy="fused")
    return out


@pytest.fixture(params=["loop", "fused"])
def export(request, export_dir, fused_export):
    return {"loop": export_dir, "fused": fused_export}[request.param]


def one_pass(path, x, h0):
    """The stream model the manifest lists, run by infer (a plain session.run) over the whole sequence."""
    return infer(path, x, h0=h0).outputs


@pytest.fixture(params=["tutorial loop", "tutorial fused", "family", "user"])
def streaming(request, export_dir, fused_export, every_kind, tagger):  # noqa: F811
    """An export of each kind of model that streams: the tutorial classifier (loop and fused),
    a family's 2-layer model, your own tagger (per-step outputs)."""
    return {"tutorial loop": export_dir, "tutorial fused": fused_export, "family": every_kind["family"][0],
            "user": tagger}[request.param]


def test_steps_equal_one_pass_of_the_stream_model(streaming):
    """One engine for every model: stepping from a random state gives, for every output, what the
    stream model gives on the whole sequence (a per-step output: step t is its t-th step), and
    the final state; each sequence of a batch is independent of the others."""
    from gru_deploy import Stream
    from gru_deploy.manifest import read_manifest

    signature = read_manifest(streaming)["variants"]["stream"]["signature"]
    sizes = {t["name"]: t["shape"] for t in signature["inputs"]}
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 40, sizes["x"][2])).astype(np.float32)
    h0 = rng.uniform(-0.5, 0.5, (3, *sizes["h0"][1:])).astype(np.float32)
    whole = one_pass(streaming, x, h0)

    def by_name(answer):  # the tutorial model's Stream answers its logits, a module's every output by name
        return answer if isinstance(answer, dict) else {"logits": answer}

    stream = Stream(streaming, batch=3)
    stream.state = h0
    np.testing.assert_array_equal(stream.state, h0)  # held as the step model holds it, read back as set
    steps = [by_name(stream.step(x[:, t])) for t in range(x.shape[1])]
    first = one_pass(streaming, x[:, :1], h0)  # the first step from h0 (40 steps forget much of h0)
    for name, value in steps[0].items():
        np.testing.assert_allclose(value, first[name], atol=1e-5, rtol=0, err_msg=name)
    for output in signature["outputs"]:
        name = output["name"]
        if name == "h_n":
            continue
        got = (np.concatenate([s[name] for s in steps], output["shape"].index("seq")) if "seq" in output["shape"]
               else steps[-1][name])
        np.testing.assert_allclose(got, whole[name], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(stream.state, whole["h_n"], atol=1e-5, rtol=0)
    alone = Stream(streaming)
    alone.state = h0[1:2]
    for t in range(x.shape[1]):
        row = by_name(alone.step(x[1, t]))
    name = signature["outputs"][0]["name"]
    np.testing.assert_allclose(row[name][0], steps[-1][name][1], atol=1e-6, rtol=0)


def test_the_tutorial_stream_equals_its_own_loop_eager(export):
    """The stream model against the tutorial's module eager (forward_stream) from a random state."""
    from gru_deploy import Stream

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 40, 8)).astype(np.float32)
    h0 = rng.uniform(-0.5, 0.5, (3, 16)).astype(np.float32)
    stream = Stream(export, batch=3)
    stream.state = h0
    for t in range(x.shape[1]):
        logits = stream.step(x[:, t])
    eager = tutorial_runners(export, variant="stream")["eager"].run({"x": x, "h0": h0})
    np.testing.assert_allclose(logits, eager["logits"], atol=1e-5, rtol=1e-5)


def test_the_step_skips_the_guard_and_computes_what_the_guarded_graph_does(fused_export, export_dir):
    """Where an export has no one-step model (a stream model given as bytes; an export from
    before model_step.onnx), the step runs the guarded graph's non-empty branch: the same
    numbers, bit for bit. An export that has one steps it (loop and fused alike), within the
    parity tolerance of the stream model."""
    from gru_deploy import Stream
    from gru_deploy.manifest import read_manifest

    manifest = read_manifest(fused_export)
    bare = Stream.from_onnx((fused_export / "model_stream.onnx").read_bytes(),
                            manifest["variants"]["stream"]["signature"])
    assert bare.guard_skipped and bare.step_model is None and bare.model == "model_stream.onnx"
    assert Stream(fused_export).step_model == Stream(export_dir).step_model == "model_step.onnx"
    x = np.random.default_rng(4).standard_normal((1, 1, 8)).astype(np.float32)
    h0 = np.full((1, 16), 0.25, np.float32)
    want = one_pass(fused_export, x, h0)
    for stream, exact in ((bare, True), (Stream(fused_export), False)):
        stream.state = h0
        got = stream.step(x[0, 0])
        if exact:
            np.testing.assert_array_equal(got, want["logits"])
            np.testing.assert_array_equal(stream.state, want["h_n"])
        else:
            np.testing.assert_allclose(got, want["logits"], atol=1e-6, rtol=0)
            np.testing.assert_allclose(stream.state, want["h_n"], atol=1e-6, rtol=0)


def test_state_get_set_reset_and_chunks(export):
    from gru_deploy import Stream

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 12, 8)).astype(np.float32)
    stream = Stream(export, batch=2)
    np.testing.assert_array_equal(stream.state, np.zeros((2, 16), np.float32))
    first = stream.run(x[:, :5])  # a chunk, then steps, then a chunk: one pass over all 12
    for t in range(5, 9):
        stream.step(x[:, t])
    last = stream.run(x[:, 9:])
    whole = one_pass(export, x, np.zeros((2, 16), np.float32))
    np.testing.assert_allclose(last, whole["logits"], atol=1e-6, rtol=0)
    state = stream.state
    state[:] = 7.0  # a copy: changing it changes nothing
    np.testing.assert_allclose(stream.state, whole["h_n"], atol=1e-6, rtol=0)
    empty = stream.run(np.zeros((2, 0, 8), np.float32))  # no steps: fc(state), state unchanged
    np.testing.assert_allclose(empty, last, atol=1e-6, rtol=0)
    stream.reset()
    np.testing.assert_array_equal(stream.state, np.zeros((2, 16), np.float32))
    np.testing.assert_allclose(stream.run(x[:, :5]), first, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((2, 8), np.float32), r"shape \[1, 8\]"),
    (np.zeros(8, np.float64), "float32"),
    (np.array([np.nan] + [0.0] * 7, np.float32), "non-finite"),
])
def test_bad_steps_are_user_errors_and_leave_the_state(export_dir, bad, fragment):
    from gru_deploy import Stream

    stream = Stream(export_dir)
    stream.step(np.ones(8, np.float32))
    before = stream.state
    with pytest.raises(UserInputError, match=fragment):
        stream.step(bad)
    np.testing.assert_array_equal(stream.state, before)


def test_bad_streams_and_states_are_user_errors(export_dir):
    from gru_deploy import Stream

    with pytest.raises(UserInputError, match="at least 1"):
        Stream(export_dir, batch=0)
    with pytest.raises(UserInputError, match="no int8 onnx model for the stream variant"):
        Stream(export_dir, precision="int8")
    stream = Stream(export_dir, batch=2)
    with pytest.raises(UserInputError, match=r"float32 \[2, 16\]"):
        stream.state = np.zeros((1, 16), np.float32)
    with pytest.raises(UserInputError, match="batch 3"):
        stream.run(np.zeros((3, 4, 8), np.float32))


def test_importing_gru_deploy_loads_no_onnxruntime_until_stream_is_used():
    code = ("import sys, gru_deploy; assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules; "
            "assert gru_deploy.Stream.__name__ == 'Stream'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_readme_streaming_example_runs(export_dir, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [block] = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "from gru_deploy import Stream" in b]
    assert len(block.strip().splitlines()) <= 12  # a short example
    exec(compile(block.replace('"exported/"', repr(str(export_dir))), "README.md", "exec"), {})
    from gru_deploy.manifest import read_manifest

    assert capsys.readouterr().out.strip() in read_manifest(export_dir)["labels"]
