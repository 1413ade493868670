"""`serve` over both v2 protocols: one server in a subprocess with REST and gRPC, driven by
tritonclient.http and tritonclient.grpc through the same test matrix (health, metadata,
config, infer with and without binary data, errors, sequences). Sequences: chunked answers
equal the whole sequence's, with many sequences interleaved from several clients at once, and
no state shared between sequences."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as http_aio
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gru_deploy.serve.stream import Stream
from test_serve import free_port, start, until, wait_until

NAME, LENGTHS, STREAM = "gru_classifier", "gru_classifier_lengths", "gru_classifier_stream"
PROTOCOLS = ["http", "grpc"]
CLIENTS = {"http": (httpclient, http_aio), "grpc": (grpcclient, grpc_aio)}


def launch(path, *args):
    grpc_port = free_port()
    proc, port, url = start(path, "--grpc-port", str(grpc_port), *args)
    return proc, {"http": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}", "url": url}


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # both endpoints shut down gracefully


@pytest.fixture(scope="module")
def server(export_dir):
    proc, where = launch(export_dir, "--max-batch", "32", "--max-delay-ms", "2")
    yield where
    stop(proc)


@pytest.fixture(scope="module")
def small(export_dir):
    """A server that keeps at most 2 sequences, each freed after 0.5 s idle."""
    proc, where = launch(export_dir, "--max-sequences", "2", "--sequence-idle-s", "0.5")
    yield where
    stop(proc)


def client(where, protocol):
    module = CLIENTS[protocol][0]
    return module.InferenceServerClient(where[protocol])


def inputs(protocol, x, binary=True):
    module = CLIENTS[protocol][0]
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, **({"binary_data": binary} if protocol == "http" else {}))
    return [tensor]


def status_of(exc: InferenceServerException) -> str:
    """The HTTP status ("400") or the gRPC code ("StatusCode.INVALID_ARGUMENT") of an error."""
    return str(exc.status())


def expect_error(call, protocol, http_status, grpc_code, match):
    with pytest.raises(InferenceServerException) as info:
        call()
    want = http_status if protocol == "http" else f"StatusCode.{grpc_code}"
    assert status_of(info.value) == want, info.value
    assert match in info.value.message(), info.value.message()


@pytest.fixture(scope="module")
def spec(export_dir):
    from gru_deploy.manifest import read_manifest
    from gru_deploy.spec import ModelSpec

    return ModelSpec.from_dict(read_manifest(export_dir)["config"])


def stepped(export_dir, x):
    """Logits after every step of each sequence of x [n, steps, I], from a local Stream of the
    export's own stream model: [n, steps, classes]."""
    stream = Stream(export_dir, batch=x.shape[0])
    return np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], 1)


# --- health, metadata, config ---------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_metadata_and_config(server, spec, protocol):
    c = client(server, protocol)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(NAME) and c.is_model_ready(LENGTHS) and c.is_model_ready(STREAM)
    meta = c.get_server_metadata()
    meta = meta if protocol == "http" else {"name": meta.name, "extensions": list(meta.extensions)}
    assert meta["name"] == "gru-deploy" and {"binary_tensor_data", "sequence"} <= set(meta["extensions"])
    for name, inputs_ in ((NAME, ["x"]), (LENGTHS, ["x", "lengths"]), (STREAM, ["x"])):
        model = c.get_model_metadata(name, as_json=True) if protocol == "grpc" else c.get_model_metadata(name)
        assert [t["name"] for t in model["inputs"]] == inputs_
        assert [t["name"] for t in model["outputs"]] == ["logits"]  # the config's (probabilities, label on request)
        assert [int(d) for d in model["inputs"][0]["shape"]] == [-1, -1, spec.input_size]
    # the configs are Triton's schema: parse each answer back into ModelConfig
    for name in (NAME, LENGTHS, STREAM):
        if protocol == "grpc":
            config = c.get_model_config(name).config
        else:
            from google.protobuf import json_format

            answered = c.get_model_config(name)
            # 64-bit integers as JSON numbers, as Triton answers them (protobuf's mapping writes strings)
            assert all(type(d) is int for t in answered["input"] + answered["output"] for d in t["dims"])
            config = json_format.ParseDict(answered, model_config_pb2.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        if name == STREAM:  # exactly the state the server keeps: h0 in, h_n out, the hidden size
            (state,) = config.sequence_batching.state
            assert (state.input_name, state.output_name, list(state.dims)) == ("h0", "h_n", [spec.hidden_size])
            assert [t.name for t in config.input] == ["x"] and not config.HasField("dynamic_batching")
        else:
            assert [t.name for t in config.input] == (["x", "lengths"] if name == LENGTHS else ["x"])
            assert config.HasField("dynamic_batching")


# --- every model of a bundle, with exactly its config -----------------------------------------

def bundle_configs(bundle) -> dict:
    """Triton name -> the bundle's config.pbtxt parsed with Triton's schema, for every ONNX model
    its manifest lists (the TorchScript ones are Triton's to run)."""
    from pathlib import PurePosixPath

    from google.protobuf import text_format

    from gru_deploy.bundle.read import open_bundle

    with open_bundle(bundle) as (folder, manifest):
        names = [PurePosixPath(path).parts[1] for path, info in manifest["models"].items() if info["format"] == "onnx"]
        return {name: text_format.Parse((folder / "model_repository" / name / "config.pbtxt").read_text(),
                                        model_config_pb2.ModelConfig()) for name in names}


def served_config(c, protocol, name):
    if protocol == "grpc":
        return c.get_model_config(name).config
    from google.protobuf import json_format

    return json_format.ParseDict(c.get_model_config(name), model_config_pb2.ModelConfig())


def assert_serves_exactly(where, bundle, protocol) -> dict:
    """Every ONNX model of `bundle` is served under its name with exactly its config.pbtxt, and
    its v2 metadata is the config's inputs and outputs as Triton derives them (the batch axis
    -1 first where max_batch_size > 0, then the dims). Returns the configs."""
    configs = bundle_configs(bundle)
    c = client(where, protocol)
    for name, want in configs.items():
        assert served_config(c, protocol, name) == want, name
        meta = c.get_model_metadata(name, as_json=True) if protocol == "grpc" else c.get_model_metadata(name)
        batch = [-1] if want.max_batch_size > 0 else []
        for got, declared in ((meta["inputs"], want.input), (meta["outputs"], want.output)):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in got] == \
                [(t.name, model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"), batch + list(t.dims))
                 for t in declared], name
    return configs


@pytest.fixture(scope="module")
def bundle_server(export_dir, tmp_path_factory):
    """`serve` on the server bundle archive of the session export, with its defaults."""
    from gru_deploy.bundle.package import package

    bundle, _ = package(export_dir, "server", out=tmp_path_factory.mktemp("bundle") / "server.tar.gz", archive=True)
    proc, where = launch(bundle)
    banner = ""
    while "Ctrl-C stops" not in banner:  # the start-up line (printed once listening)
        line = proc.stderr.readline()
        assert line, banner
        banner += line
    yield bundle, where, banner
    stop(proc)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_onnx_model_of_a_bundle_is_served_with_exactly_its_config(bundle_server, spec, protocol):
    """The classifier answers as the classifier (x only), the lengths model takes lengths as its
    config declares them ([batch, 1]), the stream model keeps its bundle's max_batch_size; the
    TorchScript model is named at start-up as Triton's to run."""
    bundle, where, banner = bundle_server
    configs = assert_serves_exactly(where, bundle, protocol)
    assert sorted(configs) == [NAME, LENGTHS, STREAM]
    assert configs[STREAM].max_batch_size == configs[NAME].max_batch_size == 64  # the bundle's, not --max-batch's
    assert "left to Triton: gru_classifier_torchscript" in banner, banner
    c = client(where, protocol)
    module = CLIENTS[protocol][0]
    x = np.random.default_rng(21).standard_normal((2, 9, spec.input_size)).astype(np.float32)
    lengths = module.InferInput("lengths", [2, 1], "INT64")
    lengths.set_data_from_numpy(np.array([[9], [4]], np.int64))
    padded = c.infer(LENGTHS, [*inputs(protocol, x), lengths]).as_numpy("logits")
    alone = c.infer(NAME, inputs(protocol, np.ascontiguousarray(x[1:, :4]))).as_numpy("logits")
    np.testing.assert_allclose(padded[1:], alone, atol=1e-5)
    expect_error(lambda: c.infer(NAME, [*inputs(protocol, x), lengths]), protocol, "400", "INVALID_ARGUMENT",
                 f"padded ones with 'lengths' to '{LENGTHS}'")
    if protocol == "http":
        assert not c.is_model_ready("gru_classifier_torchscript")


# --- stateless infer ------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "values"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_with_and_without_binary_data_matches_local(server, export_dir, spec, protocol, binary):
    x = np.random.default_rng(3).standard_normal((3, 11, spec.input_size)).astype(np.float32)
    want = stepped(export_dir, x)[:, -1]
    if protocol == "http":
        c = client(server, protocol)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label")]
        result = c.infer(NAME, inputs(protocol, x, binary), outputs=outputs)
        logits, labels = result.as_numpy("logits"), result.as_numpy("label")
    elif binary:  # tritonclient.grpc sends raw_input_contents
        result = client(server, protocol).infer(NAME, inputs(protocol, x),
                                                outputs=[grpcclient.InferRequestedOutput(n) for n in ("logits", "label")])
        logits, labels = result.as_numpy("logits"), result.as_numpy("label")
    else:  # typed contents (fp32_contents), through the generated stub
        import grpc

        request = service_pb2.ModelInferRequest(model_name=NAME)
        tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        request.outputs.add(name="logits")
        with grpc.insecure_channel(server["grpc"]) as channel:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
        labels = None
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
    if labels is not None:
        assert [v.decode() if isinstance(v, bytes) else v for v in labels.ravel()] == \
            [spec.labels[i] for i in want.argmax(1)]


# --- errors: the v2 error of each protocol, and the server goes on ----------------------------

ERRORS = [  # (case, HTTP status, gRPC code, message part)
    ("unknown model", "404", "NOT_FOUND", "unknown model 'nope'"),
    ("wrong input size", "400", "INVALID_ARGUMENT", "the model takes"),
    ("unknown output", "400", "INVALID_ARGUMENT", "unknown output 'nope'"),
    ("stream model without a sequence", "400", "INVALID_ARGUMENT", "keeps a state per sequence"),
    ("chunk of a sequence never started", "400", "INVALID_ARGUMENT", "is not live"),
    ("two sequences in one chunk", "400", "INVALID_ARGUMENT", "one chunk of one sequence"),
    ("lengths with a sequence", "400", "INVALID_ARGUMENT", "takes only 'x'"),
    ("non-finite input", "400", "INVALID_ARGUMENT", "NaN or inf"),
]


@pytest.mark.parametrize("case,http_status,grpc_code,match", ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_errors_get_their_v2_error_and_the_server_keeps_serving(server, spec, protocol, case, http_status,
                                                                        grpc_code, match):
    module = CLIENTS[protocol][0]
    c = client(server, protocol)
    x = np.ones((1, 4, spec.input_size), np.float32)
    calls = {
        "unknown model": lambda: c.infer("nope", inputs(protocol, x)),
        "wrong input size": lambda: c.infer(NAME, inputs(protocol, np.ones((1, 4, spec.input_size + 1), np.float32))),
        "unknown output": lambda: c.infer(NAME, inputs(protocol, x), outputs=[module.InferRequestedOutput("nope")]),
        "stream model without a sequence": lambda: c.infer(STREAM, inputs(protocol, x)),
        "chunk of a sequence never started": lambda: c.infer(STREAM, inputs(protocol, x), sequence_id=987654),
        "two sequences in one chunk": lambda: c.infer(STREAM, inputs(protocol, np.ones((2, 4, spec.input_size),
                                                                                     np.float32)),
                                                      sequence_id=11, sequence_start=True),
        "lengths with a sequence": lambda: c.infer(STREAM, [*inputs(protocol, x), lengths_input(protocol)],
                                                   sequence_id=12, sequence_start=True),
        "non-finite input": lambda: c.infer(NAME, inputs(protocol, np.full((1, 4, spec.input_size), np.nan,
                                                                           np.float32))),
    }
    expect_error(calls[case], protocol, http_status, grpc_code, match)
    assert c.infer(NAME, inputs(protocol, x)).as_numpy("logits").shape == (1, len(spec.labels))


def lengths_input(protocol):
    tensor = CLIENTS[protocol][0].InferInput("lengths", [1], "INT64")
    tensor.set_data_from_numpy(np.array([4], np.int64))
    return tensor


# --- sequences ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_64_interleaved_sequences_from_8_clients_answer_as_if_sent_whole(server, export_dir, spec, protocol):
    """64 sequences of 1,000 steps, 8 of them in 1-step chunks and 56 in 7-step chunks, sent by
    8 clients at once (each interleaving its 8 sequences). Every chunk's answer equals the
    logits after that many steps of the same sequence alone, and the last equals the whole
    sequence sent in one request: a server that shared or mixed up state would fail this."""
    steps, count = 1000, 64
    x = np.random.default_rng(7).standard_normal((count, steps, spec.input_size)).astype(np.float32)
    chunk = [1 if k % 8 == 0 else 7 for k in range(count)]
    module, aio = CLIENTS[protocol]

    async def run() -> tuple[dict[int, list[tuple[int, np.ndarray]]], np.ndarray]:
        clients = [aio.InferenceServerClient(server[protocol]) for _ in range(8)]
        answers: dict[int, list[tuple[int, np.ndarray]]] = {}

        async def sequence(c, k: int) -> None:
            got = answers.setdefault(k, [])
            for s in range(0, steps, chunk[k]):
                e = min(s + chunk[k], steps)
                result = await c.infer(STREAM, inputs(protocol, x[k:k + 1, s:e]), sequence_id=1000 + k,
                                       sequence_start=s == 0, sequence_end=e == steps)
                got.append((e, result.as_numpy("logits")[0]))

        try:
            await asyncio.gather(*(sequence(clients[k % 8], k) for k in range(count)))
            whole = [(await clients[0].infer(NAME, inputs(protocol, x[k:k + 32]))).as_numpy("logits")
                     for k in range(0, count, 32)]  # every sequence whole, within the max_batch_size (32)
            return answers, np.concatenate(whole)
        finally:
            for c in clients:
                await c.close()

    answers, whole = asyncio.run(run())
    reference = stepped(export_dir, x)
    for k in range(count):
        ends = [e for e, _ in answers[k]]
        assert ends == [min(s + chunk[k], steps) for s in range(0, steps, chunk[k])]
        got = np.stack([a for _, a in answers[k]])
        np.testing.assert_allclose(got, reference[k, np.array(ends) - 1], atol=1e-5, rtol=1e-5,
                                   err_msg=f"sequence {k} ({chunk[k]}-step chunks)")
        np.testing.assert_allclose(got[-1], whole[k], atol=1e-5, rtol=1e-5)


def server_metrics(where) -> str:
    with urllib.request.urlopen(f"{where['url']}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sequences_keep_their_own_state_and_a_restart_starts_from_zero(server, export_dir, spec, protocol):
    """Two sequences interleaved step by step answer as each alone; a sequence_start on a live
    sequence starts it again from zeros; after sequence_end its id is free (a chunk is a 400)."""
    c = client(server, protocol)
    x = np.random.default_rng(9).standard_normal((2, 6, spec.input_size)).astype(np.float32)
    alone = stepped(export_dir, x)
    ids = (f"{protocol}-a", f"{protocol}-b") if protocol == "grpc" else (501, 502)  # string and integer ids
    for t in range(6):
        for k in (0, 1):
            got = c.infer(STREAM, inputs(protocol, x[k:k + 1, t:t + 1]), sequence_id=ids[k],
                          sequence_start=t == 0).as_numpy("logits")[0]
            np.testing.assert_allclose(got, alone[k, t], atol=1e-5, rtol=1e-5)
    restarted = c.infer(STREAM, inputs(protocol, x[1:2, :3]), sequence_id=ids[0], sequence_start=True)
    np.testing.assert_allclose(restarted.as_numpy("logits")[0], alone[1, 2], atol=1e-5, rtol=1e-5)
    for sid in ids:
        c.infer(STREAM, inputs(protocol, x[:1, :1]), sequence_id=sid, sequence_end=True)
        expect_error(lambda: c.infer(STREAM, inputs(protocol, x[:1, :1]), sequence_id=sid), protocol, "400",
                     "INVALID_ARGUMENT", "is not live")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_live_sequences_are_capped_and_idle_ones_are_freed(small, spec, protocol):
    c = client(small, protocol)
    x = np.ones((1, 2, spec.input_size), np.float32)
    base = 10 if protocol == "http" else 20
    c.infer(STREAM, inputs(protocol, x), sequence_id=base + 1, sequence_start=True)
    c.infer(STREAM, inputs(protocol, x), sequence_id=base + 2, sequence_start=True)
    expect_error(lambda: c.infer(STREAM, inputs(protocol, x), sequence_id=base + 3, sequence_start=True), protocol,
                 "429", "RESOURCE_EXHAUSTED", "--max-sequences")
    c.infer(STREAM, inputs(protocol, x), sequence_id=base + 1, sequence_end=True)  # frees a place
    c.infer(STREAM, inputs(protocol, x), sequence_id=base + 3, sequence_start=True)
    wait_until(lambda: "gru_deploy_live_sequences 0.0" in server_metrics(small))  # both idle past 0.5 s: freed
    for sid in (base + 2, base + 3):
        expect_error(lambda: c.infer(STREAM, inputs(protocol, x), sequence_id=sid), protocol, "400",
                     "INVALID_ARGUMENT", "is not live")
    metrics = server_metrics(small)
    assert "gru_deploy_live_sequences 0.0" in metrics
    assert 'gru_deploy_sequences_freed_total{reason="idle"}' in metrics


def test_a_grpc_stream_sends_a_sequences_chunks_without_waiting_and_they_run_in_order(server, export_dir, spec):
    """ModelStreamInfer (tritonclient's start_stream): all chunks of two sequences sent back to
    back; every answer equals the logits after that many steps."""
    import queue

    x = np.random.default_rng(13).standard_normal((2, 40, spec.input_size)).astype(np.float32)
    alone = stepped(export_dir, x)
    answers: queue.Queue = queue.Queue()
    c = client(server, "grpc")
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = 0
    for s in range(0, 40, 5):
        for k in (0, 1):
            c.async_stream_infer(STREAM, inputs("grpc", x[k:k + 1, s:s + 5]), request_id=f"{k}:{s + 5}",
                                 sequence_id=7000 + k, sequence_start=s == 0, sequence_end=s + 5 == 40)
            sent += 1
    got = [answers.get(timeout=30) for _ in range(sent)]
    c.stop_stream()
    for result, error in got:
        assert error is None, error
        k, end = (int(v) for v in result.get_response().id.split(":"))
        np.testing.assert_allclose(result.as_numpy("logits")[0], alone[k, end - 1], atol=1e-5, rtol=1e-5)


def test_metrics_count_each_protocol_and_chunks_of_different_sequences_batch(server, spec):
    x = np.ones((1, 3, spec.input_size), np.float32)
    for protocol in PROTOCOLS:
        client(server, protocol).infer(NAME, inputs(protocol, x))

    async def burst() -> None:  # 32 sequences' chunks at once: they share onnxruntime calls
        c = http_aio.InferenceServerClient(server["http"])
        try:
            await asyncio.gather(*(c.infer(STREAM, inputs("http", x), sequence_id=9000 + k, sequence_start=True,
                                           sequence_end=True) for k in range(32)))
        finally:
            await c.close()

    asyncio.run(burst())
    metrics = server_metrics(server)
    assert 'gru_deploy_requests_total{protocol="rest",status="200"}' in metrics
    assert 'gru_deploy_requests_total{protocol="grpc",status="200"}' in metrics
    sizes = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("gru_deploy_batch_size_")}
    stream = f'{{model="{STREAM}"}}'
    assert sizes[f"gru_deploy_batch_size_sum{stream}"] > sizes[f"gru_deploy_batch_size_count{stream}"]


# --- in-process: the parameters and the order of a round ----------------------------------------

@pytest.mark.parametrize("parameters,match", [
    ({"sequence_id": 1.5}, "integer or a string"),
    ({"sequence_id": True}, "integer or a string"),
    ({"sequence_id": 3, "sequence_start": "yes"}, "true or false"),
    ({"sequence_start": True}, "need a sequence_id"),
    ([1, 2], "must be an object"),
])
def test_malformed_sequence_parameters_are_client_errors(parameters, match):
    from gru_deploy.serve.sequences import sequence_flags
    from gru_deploy.serve.server import ClientError

    with pytest.raises(ClientError, match=match) as info:
        sequence_flags(parameters)
    assert info.value.status == 400
    assert sequence_flags({"sequence_id": 0}) is None and sequence_flags({}) is None
    assert sequence_flags({"sequence_id": "s", "sequence_end": True}).end


def test_a_round_runs_each_sequences_chunks_in_arrival_order_in_waves_of_equal_length():
    from gru_deploy.serve.sequences import SequenceFlags, SequenceModel, SequencePending

    def chunk(sid, steps):
        return SequencePending(np.zeros((1, steps, 2), np.float32), np.zeros(0, np.int64), None,
                               SequenceFlags(sid, False, False))

    group = [chunk("a", 1), chunk("b", 7), chunk("a", 7), chunk("c", 1), chunk("a", 1), chunk("b", 1)]
    parts = SequenceModel.parts(None, group)  # type: ignore[arg-type]
    assert [[(p.flags.id, p.x.shape[1]) for p in part] for part in parts] == [
        [("a", 1), ("c", 1)], [("b", 7)],  # wave 1: each sequence's first chunk, by length
        [("b", 1)], [("a", 7)],  # wave 2
        [("a", 1)],  # wave 3
    ]


# --- refused requests: each a 400 / INVALID_ARGUMENT saying what to do, and the server goes on ---

def raw_infer(where, protocol, name, shape):
    """An infer request whose `x` declares `shape` and carries no values, past tritonclient's own
    checks: (the HTTP status or gRPC code, the error message)."""
    import json

    import grpc
    from test_serve import post

    if protocol == "http":
        body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}).encode()
        status, payload = post(f"{where['url']}/v2/models/{name}/infer", body)
        return str(status), json.loads(payload)["error"]
    request = service_pb2.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    with grpc.insecure_channel(where["grpc"]) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        except grpc.RpcError as exc:
            return str(exc.code()), exc.details()
    return "OK", ""


def max_batch_size(c, protocol, name) -> int:
    config = c.get_model_config(name)
    return int(config["max_batch_size"] if protocol == "http" else config.config.max_batch_size)


REFUSED = [  # (case, message part)
    ("FP32 lengths of 2.9", "must be INT64"),
    ("a batch beyond the config's max_batch_size", "max_batch_size"),
    ("a shape overflowing int64", "more elements than int64"),
    ("an integer sequence_id outside uint64", "outside uint64"),
    ("a string sequence_id of 300 bytes", "the limit is 256"),
]


@pytest.mark.parametrize("case,match", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_malformed_requests_are_400_or_invalid_argument_and_the_server_keeps_serving(server, spec, protocol, case,
                                                                                      match):
    module = CLIENTS[protocol][0]
    c = client(server, protocol)
    x = np.ones((1, 4, spec.input_size), np.float32)
    if case == "a shape overflowing int64":  # numpy's product wraps to 0 and matched the empty data: a 500
        got = raw_infer(server, protocol, NAME, [2**32, 2**32, spec.input_size])
        assert got[0] == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), got
        assert match in got[1], got
    else:
        lengths = module.InferInput("lengths", [1, 1], "FP32")
        lengths.set_data_from_numpy(np.array([[2.9]], np.float32))
        big = np.ones((max_batch_size(c, protocol, NAME) + 8, 2, spec.input_size), np.float32)
        calls = {
            "FP32 lengths of 2.9": lambda: c.infer(LENGTHS, [*inputs(protocol, x), lengths]),  # was read as 2
            "a batch beyond the config's max_batch_size": lambda: c.infer(NAME, inputs(protocol, big)),  # was run
            "an integer sequence_id outside uint64": lambda: c.infer(  # was a live sequence; gRPC sends an int64
                STREAM, inputs(protocol, x), sequence_id=2**64 if protocol == "http" else -7, sequence_start=True),
            "a string sequence_id of 300 bytes": lambda: c.infer(  # unbounded, 100 ids of 7 MB held 700 MiB
                STREAM, inputs(protocol, x), sequence_id="s" * 300, sequence_start=True),
        }
        expect_error(calls[case], protocol, "400", "INVALID_ARGUMENT", match)
    assert c.infer(NAME, inputs(protocol, x)).as_numpy("logits").shape == (1, len(spec.labels))


def test_a_refused_request_is_logged_once_at_info_level(export_dir, spec, caplog):
    """One line per refused request, naming the protocol, the model and the reason."""
    import logging

    from aiohttp.test_utils import TestClient, TestServer

    from gru_deploy.serve.grpc_front import start_grpc
    from gru_deploy.serve.server import Service, load_model, make_app

    model = load_model(export_dir, 1, 8, 1.0, None)
    service = Service(model)
    caplog.set_level(logging.INFO, logger="gru_deploy")
    x = np.ones((1, 3, spec.input_size), np.float32)
    body = b'{"inputs": [{"name": "x", "shape": [1, 1, %d], "datatype": "FP32", "data": [%s]}], ' \
           b'"outputs": [{"name": "nope"}]}' % (spec.input_size, b", ".join([b"0.5"] * spec.input_size))

    async def scenario():
        async with TestClient(TestServer(make_app(service))) as rest:
            grpc_server, port = await start_grpc(service, "127.0.0.1", 0)
            c = grpc_aio.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                status = (await rest.post(f"/v2/models/{model.name}/infer", data=body)).status
                with pytest.raises(InferenceServerException):
                    await c.infer(model.name, inputs("grpc", x), outputs=[grpcclient.InferRequestedOutput("nope")])
                return status
            finally:
                await c.close()
                await grpc_server.stop(None)

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == 400
    lines = [r.getMessage() for r in caplog.records
             if r.name.startswith("gru_deploy.serve") and r.levelno == logging.INFO and "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    for line, protocol in zip(lines, ("rest", "grpc")):
        assert f" {protocol} " in line and repr(model.name) in line and "400" in line and "'nope'" in line, line


# --- Triton's statistics extension and readiness ---------------------------------------------

KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def statistics(c, protocol, name) -> dict:
    """The counts and durations of `name` from tritonclient's get_inference_statistics, flat."""
    if protocol == "http":
        (entry,) = c.get_inference_statistics(name)["model_stats"]
        flat = {key: (entry["inference_stats"][key]["count"], entry["inference_stats"][key]["ns"]) for key in KEYS}
        return {**flat, "name": entry["name"], "inference_count": entry["inference_count"],
                "execution_count": entry["execution_count"], "last_inference": entry["last_inference"]}
    (entry,) = c.get_inference_statistics(name).model_stats
    flat = {key: (getattr(entry.inference_stats, key).count, getattr(entry.inference_stats, key).ns) for key in KEYS}
    return {**flat, "name": entry.name, "inference_count": entry.inference_count,
            "execution_count": entry.execution_count, "last_inference": entry.last_inference}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_statistics_count_the_requests_made(server, spec, protocol):
    """tritonclient's get_inference_statistics, against the requests this test makes: successes
    (and the samples in them), refusals, and the queue and compute times of those that ran."""
    c = client(server, protocol)
    meta = c.get_server_metadata()
    assert "statistics" in (meta["extensions"] if protocol == "http" else list(meta.extensions))
    before, stream_before = statistics(c, protocol, NAME), statistics(c, protocol, STREAM)
    rng = np.random.default_rng(23)
    for batch in (1, 2, 3):
        c.infer(NAME, inputs(protocol, rng.standard_normal((batch, 5, spec.input_size)).astype(np.float32)))
    for _ in range(2):
        with pytest.raises(InferenceServerException):
            c.infer(NAME, inputs(protocol, np.ones((1, 4, spec.input_size + 1), np.float32)))
    c.infer(STREAM, inputs(protocol, np.ones((1, 3, spec.input_size), np.float32)), sequence_id=4242,
            sequence_start=True, sequence_end=True)
    after, stream_after = statistics(c, protocol, NAME), statistics(c, protocol, STREAM)
    counts = {key: after[key][0] - before[key][0] for key in KEYS}
    assert counts == {"success": 3, "fail": 2, "queue": 3, "compute_input": 3, "compute_infer": 3,
                      "compute_output": 3}
    assert after["inference_count"] - before["inference_count"] == 6
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    assert after["success"][1] > before["success"][1] and after["compute_infer"][1] > before["compute_infer"][1]
    assert after["fail"][1] > before["fail"][1] and after["last_inference"] >= max(before["last_inference"], 1)
    assert after["name"] == NAME
    assert stream_after["success"][0] - stream_before["success"][0] == 1
    assert stream_after["inference_count"] - stream_before["inference_count"] == 1
    every = c.get_inference_statistics("")
    names = [e["name"] for e in every["model_stats"]] if protocol == "http" else [e.name for e in every.model_stats]
    assert {NAME, STREAM} <= set(names)
    expect_error(lambda: c.get_inference_statistics("nope"), protocol, "404", "NOT_FOUND", "unknown model 'nope'")


SLOW_LOAD = """
import pathlib, sys, time
import gru_deploy.serve.repository as repository
from gru_deploy.serve.run import serve
read, release = repository.read_repository, pathlib.Path(sys.argv[2])

def slow_read(*args, **kwargs):  # the models load only once the test says so
    while not release.exists():
        time.sleep(0.02)
    return read(*args, **kwargs)

repository.read_repository = slow_read
serve(pathlib.Path(sys.argv[1]), port=int(sys.argv[3]), grpc_port=int(sys.argv[4]))
"""


def test_serve_listens_while_its_models_load_and_answers_not_ready(export_dir, tmp_path):
    """`serve` opens its ports first and loads the models off the event loop: meanwhile health
    says live and not ready, and a model call is a 503 / UNAVAILABLE that says to wait."""
    import subprocess
    import sys
    import urllib.error

    port, grpc_port = free_port(), free_port()
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, str(export_dir), str(release), str(port),
                             str(grpc_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def live() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(f"{url}/v2/health/live", timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(live, 60)
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5)
        assert ready.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as infer:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/gru_classifier/infer", data=b"{}"),
                                   timeout=5)
        assert infer.value.code == 503 and "still loading" in infer.value.read().decode()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and not client.is_server_ready()
        with pytest.raises(InferenceServerException, match="still loading") as unavailable:
            client.get_model_metadata("gru_classifier")
        assert "UNAVAILABLE" in str(unavailable.value.status())
        release.touch()
        wait_until(client.is_server_ready, 60)
        assert client.get_model_metadata("gru_classifier").name == "gru_classifier"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_not_ready_while_loading_nor_while_draining(export_dir, spec, monkeypatch):
    """Before the batchers start (the models loading) and from SIGTERM's drain on, /v2/health/ready,
    the model's ready, gRPC ServerReady and ModelReady say not ready, live says live; the drain
    waits for the request in flight, which gets its answer."""
    import threading

    from aiohttp.test_utils import TestClient, TestServer

    from gru_deploy.serve.grpc_front import Servicer
    from gru_deploy.serve.server import Service, load_model, make_app

    model = load_model(export_dir, 1, 1, 1.0, None)  # batching off: a request runs at once
    service = Service(model)
    servicer = Servicer(service)
    running, release = threading.Event(), threading.Event()
    run = model.run

    def held(x, lengths):
        running.set()
        assert release.wait(30)
        return run(x, lengths)
    monkeypatch.setattr(model, "run", held)
    x = np.ones((1, 3, spec.input_size), np.float32)
    body = b'{"inputs": [{"name": "x", "shape": [1, 3, %d], "datatype": "FP32", "data": [%s]}]}' % (
        spec.input_size, b", ".join([b"1.0"] * x.size))

    async def readiness(rest):
        return ((await rest.get("/v2/health/ready")).status == 200,
                (await rest.get(f"/v2/models/{model.name}/ready")).status == 200,
                (await servicer.ServerReady(service_pb2.ServerReadyRequest(), None)).ready,
                (await servicer.ModelReady(service_pb2.ModelReadyRequest(name=model.name), None)).ready,
                (await rest.get("/v2/health/live")).status == 200)

    async def scenario():
        async with TestClient(TestServer(make_app(service, manage=False))) as rest:
            loading = await readiness(rest)
            assert loading == (False, False, False, False, True)  # live, not ready: nothing runs yet
            await service.start()
            try:
                serving = await readiness(rest)
                request = asyncio.ensure_future(rest.post(f"/v2/models/{model.name}/infer", data=body))
                await asyncio.get_running_loop().run_in_executor(None, running.wait, 30)
                drain = asyncio.ensure_future(service.drain(30.0))
                await until(lambda: not service.ready)
                draining = await readiness(rest)
                waited = not drain.done()  # the request is still in flight
                release.set()
                status = (await request).status
                await asyncio.wait_for(drain, 30)
                return serving, draining, waited, status
            finally:
                release.set()
                await service.stop()

    serving, draining, waited, status = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert serving == (True, True, True, True, True)
    assert draining == (False, False, False, False, True) and waited and status == 200


# --- a client that gives up, and a stream that never closes ------------------------------------

def test_a_chunk_whose_client_gave_up_fails_no_other_sequences_chunk(export_dir, spec, monkeypatch):
    """While a long chunk of sequence a runs, b's last chunk is queued, then b's next chunk from a
    client with a 0.2 s timeout, which gives up; c's chunks are queued around it. In the round
    that runs them b has ended, so its abandoned chunk has nowhere to go: it is dropped, and c's
    chunk in the same wave is answered (it was an INTERNAL InvalidStateError). A sequence whose
    chunk waits is not idle: the reaper leaves it."""
    import threading

    from gru_deploy.serve.sequences import SequenceFlags, load_sequence_model
    from gru_deploy.serve.server import Limits, load_model

    stateless = load_model(export_dir, 1, 8, 1.0, None)
    model = load_sequence_model(export_dir, stateless, 1, 8, 1.0, "fp32", 8, 60.0)
    running, release = threading.Event(), threading.Event()
    run_chunks = model.run_chunks

    def gated(x, h0):
        if x.shape[1] == 50:  # the long chunk: held until the others are queued behind it
            running.set()
            assert release.wait(30)
        return run_chunks(x, h0)
    monkeypatch.setattr(model, "run_chunks", gated)
    rng = np.random.default_rng(29)
    xa, xb, xc = (rng.standard_normal((1, n, spec.input_size)).astype(np.float32) for n in (50, 6, 6))

    async def chunk(x, sid, start=False, end=False):
        flags = SequenceFlags(sid, start, end)
        return await model.infer_chunk(model.admit({"x": x}, flags, Limits()), flags)

    async def scenario():
        model.queue = asyncio.Queue()
        batcher = asyncio.create_task(model.batcher())
        try:
            a = asyncio.ensure_future(chunk(xa, "a", start=True, end=True))
            await asyncio.get_running_loop().run_in_executor(None, running.wait, 30)
            b1 = asyncio.ensure_future(chunk(xb[:, :3], "b", start=True, end=True))
            c1 = asyncio.ensure_future(chunk(xc[:, :3], "c", start=True))
            with pytest.raises(asyncio.TimeoutError):  # the client gives up while a's chunk runs
                await asyncio.wait_for(chunk(xb[:, 3:], "b"), 0.2)
            c2 = asyncio.ensure_future(chunk(xc[:, 3:], "c"))
            await asyncio.sleep(0)
            reaped = model.reap(time.monotonic() + 2 * model.idle_s)  # every chunk waits: none is idle
            release.set()
            answers = await asyncio.gather(a, b1, c1, c2)
            return answers, reaped, dict(model.waiting)
        finally:
            release.set()
            batcher.cancel()
            model.executor.shutdown(wait=True)

    answers, reaped, waiting = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert reaped == 0 and waiting == {}
    alone_b, alone_c = stepped(export_dir, xb), stepped(export_dir, xc)
    np.testing.assert_allclose(answers[1]["logits"][0], alone_b[0, 2], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(answers[2]["logits"][0], alone_c[0, 2], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(answers[3]["logits"][0], alone_c[0, 5], atol=1e-5, rtol=1e-5)
    assert "b" not in model.live and "c" in model.live


def test_a_grpc_stream_keeps_no_finished_request_and_caps_those_in_flight():
    """ModelStreamInfer on a stream that stays open: 3 x MAX_STREAM_IN_FLIGHT requests sent at
    once are read only MAX_STREAM_IN_FLIGHT at a time (backpressure), all are answered, and no
    finished request's task is kept (they were, until the stream closed)."""
    import gc

    from gru_deploy.serve import grpc_front

    limit = grpc_front.MAX_STREAM_IN_FLIGHT
    total = 3 * limit
    state = {"in_flight": 0, "peak": 0, "read": 0}

    async def scenario():
        gate, closed = asyncio.Event(), asyncio.Event()
        servicer = grpc_front.Servicer(None)

        async def answer(request):  # instead of a model: held until the gate opens
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            try:
                await gate.wait()
            finally:
                state["in_flight"] -= 1
            return service_pb2.ModelInferResponse(id=request.id)
        servicer._observed = answer

        async def requests():
            for i in range(total):
                state["read"] += 1
                yield service_pb2.ModelInferRequest(model_name=NAME, id=str(i))
            await closed.wait()  # the client keeps its stream open

        ids: list[str] = []

        async def consume():
            async for response in servicer.ModelStreamInfer(requests(), None):
                ids.append(response.infer_response.id)

        consumer = asyncio.ensure_future(consume())
        await until(lambda: state["in_flight"] >= limit)
        for _ in range(3 * total):  # as far as the reader would go
            await asyncio.sleep(0)
        read_while_held = state["read"]
        gate.set()
        await until(lambda: len(ids) == total)
        for _ in range(10):  # the last tasks' done callbacks
            await asyncio.sleep(0)
        gc.collect()
        kept = [t for t in gc.get_objects() if type(t) is asyncio.Task and t.done()
                and "ModelStreamInfer" in getattr(t.get_coro(), "__qualname__", "")]
        closed.set()
        await asyncio.wait_for(consumer, 30)
        return read_while_held, ids, len(kept)

    read_while_held, ids, kept = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert kept == 0
    assert read_while_held <= limit + 1 and state["peak"] == limit
    assert sorted(ids, key=int) == [str(i) for i in range(total)]
