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
from test_serve import free_port, start

NAME, STREAM = "gru_classifier", "gru_classifier_stream"
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
    assert c.is_model_ready(NAME) and c.is_model_ready(STREAM)
    meta = c.get_server_metadata()
    meta = meta if protocol == "http" else {"name": meta.name, "extensions": list(meta.extensions)}
    assert meta["name"] == "gru-deploy" and {"binary_tensor_data", "sequence"} <= set(meta["extensions"])
    for name, inputs_ in ((NAME, ["x", "lengths"]), (STREAM, ["x"])):
        model = c.get_model_metadata(name, as_json=True) if protocol == "grpc" else c.get_model_metadata(name)
        assert [t["name"] for t in model["inputs"]] == inputs_
        assert [t["name"] for t in model["outputs"]] == ["logits", "probabilities", "label"]
        assert [int(d) for d in model["inputs"][0]["shape"]] == [-1, -1, spec.input_size]
    # the configs are Triton's schema: parse each answer back into ModelConfig
    for name in (NAME, STREAM):
        if protocol == "grpc":
            config = c.get_model_config(name).config
        else:
            from google.protobuf import json_format

            config = json_format.ParseDict(c.get_model_config(name), model_config_pb2.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        if name == STREAM:  # exactly the state the server keeps: h0 in, h_n out, the hidden size
            (state,) = config.sequence_batching.state
            assert (state.input_name, state.output_name, list(state.dims)) == ("h0", "h_n", [spec.hidden_size])
            assert [t.name for t in config.input] == ["x"] and not config.HasField("dynamic_batching")
        else:
            assert [t.name for t in config.input] == ["x", "lengths"] and config.HasField("dynamic_batching")


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
            whole = await clients[0].infer(NAME, inputs(protocol, x))  # every sequence whole, one request
            return answers, whole.as_numpy("logits")
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
    time.sleep(2.0)  # both live sequences idle past 0.5 s: freed
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
