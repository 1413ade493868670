"""The stream variant of a module that defines the hooks (`initial_state(batch)` and
`@torch.jit.export forward_stream(x, h0) -> (outputs..., h_n)`): its promise checked on the
float64 module (one chunk = forward; chunks carried through h_n = the one pass), exported,
re-verified, and run chunk by chunk by infer --state-in/--state-out, gru_deploy.Stream and
the edge bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from test_lengths_hook import MODELS, _checkpoint, tagger  # noqa: F401  (tagger: a module fixture)


def test_the_hooks_export_a_stream_variant_whose_promise_is_checked(tagger):  # noqa: F811
    from gru_deploy.manifest import read_manifest

    manifest = read_manifest(tagger)
    stream = manifest["variants"]["stream"]
    assert [t["name"] for t in stream["signature"]["inputs"]] == ["x", "h0"]
    assert [t["name"] for t in stream["signature"]["outputs"]] == ["logits", "h_n"]
    assert stream["signature"]["inputs"][1]["shape"] == ["batch", 6]
    parity = json.loads((tagger / "parity.json").read_text())
    assert parity["passed"] and parity["verified_max_seq"]["stream"] == 2048
    for key in ("stream:float64 forward->float64 stream", "stream:float64 one pass->float64 chunks of 1",
                "stream:float64 one pass->float64 chunks of 7[h_n]"):
        assert parity["summary"][key]["max_abs"] <= 1e-9, key
    stream = {k: e for k, e in parity["summary"].items() if k.startswith("stream:")}
    assert "stream:float64->onnxruntime[h_n]" in stream and all(e["max_abs"] <= 1e-5 for e in stream.values())
    proc = run_cli("verify", str(tagger), "--json")
    verified = json.loads(proc.stdout)
    assert proc.returncode == 0 and verified["passed"] and "stream:torchscript->onnxruntime[h_n]" in verified["summary"]


def test_a_stream_hook_that_forgets_its_state_is_refused(tmp_path):
    out = tmp_path / "forgetful"
    proc = run_cli("export", "--model", f"{MODELS}:ForgetfulStream", "--checkpoint",
                   str(_checkpoint("ForgetfulStream", tmp_path)), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "stream variant's parity failed" in proc.stderr and "chunks of 1" in proc.stderr
    assert not out.exists()


def test_infer_carries_the_state_between_chunks(tagger, tmp_path):  # noqa: F811
    x = np.random.default_rng(21).standard_normal((2, 12, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "a.npy", x[:, :5])
    np.save(tmp_path / "b.npy", x[:, 5:])
    whole = json.loads(run_cli("infer", str(tagger), "--input", str(tmp_path / "x.npy"), "--json").stdout)
    assert run_cli("infer", str(tagger), "--input", str(tmp_path / "a.npy"), "--state-out",
                   str(tmp_path / "h.npy")).returncode == 0
    proc = run_cli("infer", str(tagger), "--input", str(tmp_path / "b.npy"), "--state-in", str(tmp_path / "h.npy"),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    second = np.asarray(json.loads(proc.stdout)["outputs"]["logits"]["data"])
    np.testing.assert_allclose(second, np.asarray(whole["outputs"]["logits"]["data"])[:, 5:], atol=1e-5)
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
    proc = run_cli("infer", str(tagger), "--input", str(tmp_path / "b.npy"), "--state-in", str(tmp_path / "bad.npy"))
    assert proc.returncode == 2 and "must be float32 of shape [2, 6]" in proc.stderr


def test_the_stream_api_steps_a_module_from_its_edge_bundle(tagger, tmp_path):  # noqa: F811
    """(From an export: test_stream's one test for every model.)"""
    import gru_deploy

    path, manifest = gru_deploy.package(tagger, "edge", out=tmp_path / "edge")
    assert set(manifest["signatures"]) == {"classifier", "lengths", "stream"}
    assert gru_deploy.verify(path)["passed"]
    x = np.random.default_rng(22).standard_normal((2, 9, 4)).astype(np.float32)
    whole = gru_deploy.load(path).predict(x)["logits"]
    stream = gru_deploy.Stream(path, batch=2)
    steps = [stream.step(x[:, t])["logits"] for t in range(x.shape[1])]
    np.testing.assert_allclose(np.concatenate(steps, 1), whole, atol=1e-5)
    stream.reset()
    np.testing.assert_allclose(stream.step(x[:, :4])["logits"], whole[:, :4], atol=1e-5)
    assert stream.state.shape == (2, 6)
    with pytest.raises(gru_deploy.UserInputError, match="batch=2"):
        stream.step(x[:1, 0])


def test_the_family_streams_unless_bidirectional(tmp_path):
    import gru_deploy
    from gru_deploy.models.families import StackedGRUClassifier

    for bidirectional in (False, True):
        manifest = gru_deploy.export(StackedGRUClassifier(3, 5, 2, layers=2, bidirectional=bidirectional).eval(),
                                     out=tmp_path / str(bidirectional))
        assert ("stream" in manifest["variants"]) != bidirectional
        if bidirectional:
            assert any("cannot stream" in note for note in manifest["notes"])
        else:
            assert manifest["variants"]["stream"]["signature"]["inputs"][1]["shape"] == ["batch", 2, 5]


def test_the_fused_family_streams_through_gru_nodes_from_every_layers_state(tmp_path):
    """--strategy fused: the stacked family's stream model is one GRU node per layer, each
    started from its layer's h0 (no Loop); it passed the stream's parity (one pass = forward =
    chunks, every runner against float64), Stream steps it, and an empty chunk answers
    fc(h0's last layer) with h_n = h0 without the kernel (run in a child: the kernel aborts)."""
    import onnx
    import torch

    import gru_deploy
    from test_export import run_isolated
    from gru_deploy.check.onnx_walk import all_graphs
    from gru_deploy.models.families import StackedGRUClassifier

    torch.manual_seed(4)
    model = StackedGRUClassifier(3, 5, 2, layers=2).eval()
    out = tmp_path / "fused"
    manifest = gru_deploy.export(model, out=out, strategy="fused")
    stream = manifest["variants"]["stream"]
    assert stream["strategy"] == "fused" == manifest["models"][stream["onnx"]]["strategy"]
    graph = onnx.load(out / stream["onnx"]).graph
    grus = [n for g in all_graphs(graph) for n in g.node if n.op_type == "GRU"]
    assert len(grus) == 2 and all(len(n.input) == 6 and n.input[5] for n in grus)  # initial_h given
    assert not any(n.op_type == "Loop" for g in all_graphs(graph) for n in g.node)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and "stream:float64->onnxruntime[h_n]" in parity["summary"]
    x = np.random.default_rng(8).standard_normal((2, 9, 3)).astype(np.float32)
    h0 = np.random.default_rng(9).uniform(-1, 1, (2, 2, 5)).astype(np.float32)
    with torch.no_grad():
        want_logits, want_h = model.forward_stream(torch.from_numpy(x), torch.from_numpy(h0))
    steps = gru_deploy.Stream(out, batch=2)
    steps.state = h0
    for t in range(9):
        got = steps.step(x[:, t])
    got = got["logits"] if isinstance(got, dict) else got
    np.testing.assert_allclose(got, want_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(steps.state, want_h.numpy(), atol=1e-5)
    code = ("import json, sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "h0 = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 2, 5)\n"
            "out = s.run(None, {'x': np.zeros((2, 0, 3), np.float32), 'h0': h0})\n"
            "print(json.dumps([o.tolist() for o in out]))\n")
    logits, h_n = run_isolated(code, str(out / stream["onnx"]))
    h0 = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 2, 5)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.fc(torch.from_numpy(h0[:, 1])).numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.array(h_n, np.float32), h0)


def test_the_family_exports_stepwise_with_every_variant_projecting_inside_its_loop(tmp_path):
    """--strategy stepwise for the tutorial-cell family at depth: the classifier, lengths and
    stream models each a Loop whose body holds the input projections (the loop form computes
    them before its Loop), each passing parity; a model of another kind is refused."""
    import onnx
    import torch

    import gru_deploy
    from gru_deploy.check.onnx_walk import count_ops
    from gru_deploy.convert.graphs import subgraphs
    from gru_deploy.models.families import StackedGRUClassifier

    torch.manual_seed(5)
    model = StackedGRUClassifier(3, 5, 2, layers=2).eval()
    forms = {form: gru_deploy.export(model, out=tmp_path / form, strategy=form) for form in ("loop", "stepwise")}

    def body_matmuls(folder, name):
        loops = [n for n in onnx.load(folder / name).graph.node if n.op_type == "Loop"]
        ops = [count_ops(subgraphs(loop)[0]) for loop in loops]
        return sum(o.get("MatMul", 0) + o.get("Gemm", 0) for o in ops), len(loops)

    for name in ("model.onnx", "model_lengths.onnx", "model_stream.onnx"):
        record = forms["stepwise"]["models"][name]
        assert record["strategy"] == "stepwise" and forms["loop"]["models"][name]["strategy"] == "loop", name
        (stepwise_mm, loops), (loop_mm, _) = body_matmuls(tmp_path / "stepwise", name), body_matmuls(tmp_path / "loop", name)
        assert loops == 2 and stepwise_mm > loop_mm, name  # one Loop per layer
    parity = json.loads((tmp_path / "stepwise" / "parity.json").read_text())
    assert parity["passed"] and {k.split(":")[0] for k in parity["summary"] if ":" in k} == {"lengths", "stream",
                                                                                                 "step"}
    with pytest.raises(gru_deploy.UserInputError, match="not a tutorial-cell family model"):
        gru_deploy.export(torch.nn.GRU(3, 5), out=tmp_path / "x", strategy="stepwise")


def test_bench_times_a_modules_own_models_against_torchscript(tagger):  # noqa: F811
    """bench on a module export: every model it has, TorchScript and onnxruntime in one run,
    the ratio computed from the two medians; the Stream API beside the raw stream model."""
    proc = run_cli("bench", str(tagger), "--budget", "0.02", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {(r["model"], r["batch"], r["seq"]) for r in result["rows"]}
    assert {("classifier", 1, 1), ("classifier", 32, 100), ("lengths", 32, 100), ("stream", 1, 1)} <= rows
    for r in result["rows"]:
        assert r["onnxruntime_vs_torchscript"] == pytest.approx(r["onnxruntime_us"] / r["torchscript_us"], rel=0.01)
    stream = next(r for r in result["rows"] if r["model"] == "stream")
    assert stream["stream_api_vs_run"] == pytest.approx(stream["stream_api_us"] / stream["onnxruntime_us"], rel=0.01)
    proc = run_cli("bench", str(tagger), "--plot", "x.png")
    assert proc.returncode == 2 and "your own model's export is timed from its files" in proc.stderr


def test_the_server_bundle_streams_through_tritons_sequence_batcher(tagger, tmp_path):  # noqa: F811
    """The stream model's config.pbtxt, read with Triton's own schema: the sequence batcher keeps
    exactly the state the model takes and gives (h0 -> h_n, the module's state shape, zeros at a
    sequence's start), so a client sends x only and gets the other outputs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import gru_deploy

    bundle, manifest = gru_deploy.package(tagger, "server", out=tmp_path / "server")
    assert gru_deploy.verify(bundle)["passed"]
    text = (bundle / "model_repository" / "model_stream" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    signature = manifest["signatures"]["stream"]
    assert [t.name for t in config.input] == [t["name"] for t in signature["inputs"] if t["name"] != "h0"]
    assert [t.name for t in config.output] == [t["name"] for t in signature["outputs"] if t["name"] != "h_n"]
    [state] = config.sequence_batching.state
    assert (state.input_name, state.output_name, list(state.dims)) == ("h0", "h_n", [6])
    assert state.initial_state[0].zero_data and list(state.initial_state[0].dims) == [6]
    assert not config.HasField("dynamic_batching")
    assert not (bundle / "model_repository" / "model_stream_torchscript").exists()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_serve_keeps_a_modules_sequences_as_tritons_sequence_batcher_would(tagger, tmp_path, protocol):  # noqa: F811
    """`serve` on the module's server bundle: two sequences interleaved, one in 1-step and one in
    7-step chunks; each chunk's per-step tags, joined, equal the whole sequence's. The bundle's
    Triton config for the stream model declares exactly what the server's stream model takes
    and gives: x in, the other outputs out, h0 -> h_n kept."""
    import signal

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import gru_deploy
    from test_serve_protocols import CLIENTS, launch

    bundle, manifest = gru_deploy.package(tagger, "server", out=tmp_path / "server")
    assert manifest["deploy"]["kubernetes"]["name"] == "model"  # deploy/ for a module's bundle too
    assert (bundle / manifest["deploy"]["kserve"]["file"]).is_file()
    config = text_format.Parse((bundle / "model_repository" / "model_stream" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    proc, where = launch(bundle)
    try:
        module = CLIENTS[protocol][0]
        client = module.InferenceServerClient(where[protocol])
        meta = client.get_model_metadata("model_stream", **({"as_json": True} if protocol == "grpc" else {}))
        assert [t.name for t in config.input] == [t["name"] for t in meta["inputs"]] == ["x"]
        assert [t.name for t in config.output] == [t["name"] for t in meta["outputs"]]
        [state] = config.sequence_batching.state
        assert (state.input_name, state.output_name) == ("h0", "h_n")

        x = np.random.default_rng(5).standard_normal((2, 30, 4)).astype(np.float32)

        def tensor(a):
            t = module.InferInput("x", list(a.shape), "FP32")
            t.set_data_from_numpy(a)
            return [t]

        whole = client.infer("model", tensor(x)).as_numpy("logits")  # [2, 30, 3]: per step
        got: dict[int, list[np.ndarray]] = {0: [], 1: []}
        chunks = {0: [(s, s + 1) for s in range(30)], 1: [(s, min(s + 7, 30)) for s in range(0, 30, 7)]}
        for i in range(30):
            for k in (0, 1):
                if i < len(chunks[k]):
                    s, e = chunks[k][i]
                    result = client.infer("model_stream", tensor(x[k:k + 1, s:e]), sequence_id=k + 1,
                                          sequence_start=s == 0, sequence_end=e == 30)
                    got[k].append(result.as_numpy("logits"))
        for k in (0, 1):
            np.testing.assert_allclose(np.concatenate(got[k], 1)[0], whole[k], atol=1e-5, rtol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
