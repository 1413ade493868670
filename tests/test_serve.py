"""`gru-deploy serve`: a real server in a subprocess on a loopback port, driven by tritonclient.http;
the batcher's failure and length-grouping rules in-process, with the failures injected."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import gru_deploy.serve.run as running
import gru_deploy.serve.server as serving
from cli_helpers import gru_deploy_exe
from gru_deploy.manifest import read_manifest
from gru_deploy.serve.server import Pending, length_groups, load_model, make_app
from cli_helpers import tutorial_runners

import tritonclient.http as http  # noqa: E402  (the test extra installs tritonclient[http])

NAME, LENGTHS = "gru_classifier", "gru_classifier_lengths"  # the server bundle's Triton names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path, *args):
    port = free_port()
    proc = subprocess.Popen([gru_deploy_exe(), "serve", str(path), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, port, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready in 60 s")


@pytest.fixture(scope="module")
def server(export_dir):
    proc, port, url = start(export_dir, "--max-batch", "32", "--max-delay-ms", "3", "--max-body-mb", "0.25",
                            "--read-timeout-s", "1")
    yield {"port": port, "url": url, "client": http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4)}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0  # graceful shutdown on SIGTERM


@pytest.fixture(scope="module")
def local(export_dir):
    """The local onnxruntime answer for one sample, alone and unpadded."""
    runner = tutorial_runners(export_dir)["onnxruntime"]
    return lambda x: runner.run({"x": x})["logits"]


def post(url, body: bytes, headers=None):
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metadata_and_readiness(server):
    client = server["client"]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)  # the classifier: x only
    assert [i["name"] for i in meta["inputs"]] == ["x"]
    assert meta["inputs"][0]["shape"] == [-1, -1, 8] and meta["outputs"][0]["shape"] == [-1, 4]
    meta = client.get_model_metadata(LENGTHS)  # lengths as its config declares it: dims [1], reshaped to []
    assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [("x", [-1, -1, 8]), ("lengths", [-1, 1])]
    assert client.get_server_metadata()["name"] == "gru-deploy"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_matches_local_onnxruntime(server, local, binary):
    x = (np.random.default_rng(1).standard_normal((3, 17, 8)) * 2).astype(np.float32)
    tensor = http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities", "label")]
    result = server["client"].infer(NAME, [tensor], outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("logits"), local(x), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, atol=1e-5)
    labels = LABELS
    got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert got == [labels[i] for i in local(x).argmax(axis=1)]


LABELS = ["very-slow", "slow", "fast", "very-fast"]  # the synthetic data set's, in the session export


def test_default_client_options(server, local):
    x = np.random.default_rng(2).standard_normal((1, 5, 8)).astype(np.float32)
    tensor = http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(server["client"].infer(NAME, [tensor]).as_numpy("logits"), local(x), atol=1e-5)


def _json(inputs, outputs=None):
    return json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()


X = {"name": "x", "shape": [1, 2, 8], "datatype": "FP32", "data": [0.5] * 16}
ERRORS = {
    "malformed JSON": (NAME, b"{not json", {}, 400),
    "not an object": (NAME, b"[1, 2]", {}, 400),
    "unknown model": ("other", _json([X]), {}, 404),
    "wrong datatype": (NAME, _json([{**X, "datatype": "INT32", "data": [1] * 16}]), {}, 400),
    "unknown datatype": (NAME, _json([{**X, "datatype": "FP16"}]), {}, 400),
    "rank 2": (NAME, _json([{**X, "shape": [2, 8]}]), {}, 400),
    "wrong channels": (NAME, _json([{**X, "shape": [1, 4, 4]}]), {}, 400),
    "shape vs data": (NAME, _json([{**X, "shape": [1, 3, 8]}]), {}, 400),
    "missing input": (NAME, _json([{"name": "lengths", "shape": [1], "datatype": "INT64", "data": [1]}]), {}, 400),
    "unknown input": (NAME, _json([X, {"name": "h0", "shape": [1], "datatype": "FP32", "data": [0]}]), {}, 400),
    "NaN": (NAME, b'{"inputs": [{"name": "x", "shape": [1, 1, 8], "datatype": "FP32", '
                  b'"data": [NaN, 0, 0, 0, 0, 0, 0, 0]}]}', {}, 400),
    "lengths too long": (LENGTHS, _json([X, {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [3]}]), {},
                         400),
    "negative lengths": (LENGTHS, _json([X, {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [-1]}]), {},
                         400),
    "lengths to the classifier": (NAME, _json([X, {"name": "lengths", "shape": [1], "datatype": "INT64",
                                                   "data": [2]}]), {}, 400),
    "empty batch": (NAME, _json([{**X, "shape": [0, 2, 8], "data": []}]), {}, 400),
    "unknown output": (NAME, _json([X], [{"name": "h_n"}]), {}, 400),
    "binary size wrong": (NAME, _json([{**X, "data": None, "parameters": {"binary_data_size": 8}}]) + b"\0" * 8,
                          {"Inference-Header-Content-Length": str(len(_json([{**X, "data": None,
                                                                   "parameters": {"binary_data_size": 8}}])))}, 400),
    "header length too big": (NAME, _json([X]), {"Inference-Header-Content-Length": "999999"}, 400),
    "deep JSON": (NAME, b'{"inputs": [], "x": ' + b"[" * 200 + b"]" * 200 + b"}", {}, 400),
    "oversized body": (NAME, _json([{**X, "shape": [1, 8000, 8], "data": [0.1] * 64000}]), {}, 413),
    # a shape whose element count overflows int64 (numpy's product wraps to 0, matching no data)
    "shape overflowing int64": (NAME, _json([{**X, "shape": [2**32, 2**32, 8], "data": []}]), {}, 400),
    "rank 70": (NAME, _json([{**X, "shape": [1] * 70, "data": [0.5]}]), {}, 400),  # numpy's limit is 64
    "5,000-digit sequence_id": (NAME, b'{"inputs": [], "parameters": {"sequence_id": ' + b"7" * 5000 + b"}}", {}, 400),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_client_errors_get_4xx_with_a_v2_error_body(server, case):
    name, body, headers, status = ERRORS[case]
    got, payload = post(f"{server['url']}/v2/models/{name}/infer", body, headers)
    assert got == status
    message = json.loads(payload)
    assert set(message) == {"error"} and message["error"]
    assert server["client"].is_server_ready()  # still serving


def test_concurrent_requests_of_random_lengths_match_and_batch(server, local):
    rng = np.random.default_rng(3)
    cases = [(rng.standard_normal((1, int(n), 8)) * 2).astype(np.float32) for n in rng.integers(1, 60, size=400)]
    expected = [local(x) for x in cases]
    errors, mismatches = [], []

    def worker(indices):
        client = http.InferenceServerClient(f"127.0.0.1:{server['port']}")
        for i in indices:
            try:
                tensor = http.InferInput("x", list(cases[i].shape), "FP32")
                tensor.set_data_from_numpy(cases[i])
                got = client.infer(LENGTHS, [tensor]).as_numpy("logits")  # padded in batches
                if not np.allclose(got, expected[i], atol=1e-5, rtol=1e-5):
                    mismatches.append(i)
            except Exception as exc:  # collected, asserted below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(range(k, 400, 16),)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not mismatches
    with urllib.request.urlopen(f"{server['url']}/metrics") as r:
        metrics = r.read().decode()
    sizes = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("gru_deploy_batch_size_")}
    model = f'{{model="{LENGTHS}"}}'
    assert sizes[f"gru_deploy_batch_size_sum{model}"] > sizes[f"gru_deploy_batch_size_count{model}"]  # some > 1
    assert 'gru_deploy_requests_total{protocol="rest",status="200"}' in metrics


def test_padded_request_with_lengths_equals_each_sample_alone(server, local):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 12, 8)).astype(np.float32)
    lengths = np.array([12, 5, 1], np.int64)
    for shape in ([3], [3, 1]):  # [batch], or [batch, 1] as the config's dims say (perf_analyzer sends that)
        inputs = [http.InferInput("x", list(x.shape), "FP32"), http.InferInput("lengths", shape, "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(lengths.reshape(shape))
        got = server["client"].infer(LENGTHS, inputs).as_numpy("logits")
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(got[b], local(np.ascontiguousarray(x[b:b + 1, :n]))[0], atol=1e-5)


def test_a_slow_client_times_out_and_the_server_keeps_serving(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"inputs\"".encode())
        reply = sock.recv(4096).decode()  # the socket's own timeout (10 s) bounds the wait
    assert reply.startswith("HTTP/1.1 408") and '"error"' in reply
    assert server["client"].is_server_ready()


def test_oversized_content_length_is_refused_before_the_body_is_read(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 999999999\r\n\r\n".encode())
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413") and '"error"' in reply


# --- the batcher, in-process ---------------------------------------------------------------

async def until(condition, timeout: float = 30.0) -> None:
    """Poll `condition()` on the running loop until it holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"{condition} did not hold within {timeout} s"
        await asyncio.sleep(0.005)


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition()` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{condition} did not hold within {timeout} s"
        time.sleep(0.02)


def run_async(coro, timeout: float = 30.0):
    """Run `coro` on a fresh event loop; a request that never gets an answer (the batcher gone)
    fails the test after `timeout` seconds instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class PaddingFails:
    """numpy as serve.py sees it, except that its first np.zeros (the padded batch) raises."""

    def __init__(self) -> None:
        self.failed = False

    def __getattr__(self, name):
        return getattr(np, name)

    def zeros(self, shape, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise MemoryError(f"Unable to allocate the padded batch of shape {shape}")
        return np.zeros(shape, *args, **kwargs)


def fail_once(function, exc: Exception):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return function(*args, **kwargs)
    return wrapper


INJECTED = {  # where the first group fails, and with what; max batch
    "padding the batch (MemoryError)": 3,
    "onnxruntime (multi-line message)": 3,
    "splitting by length": 3,
    "onnxruntime, batching off": 1,
}


@pytest.mark.parametrize("where", sorted(INJECTED))
def test_a_failed_group_gets_v2_500s_and_later_requests_are_served(export_dir, local, monkeypatch, where):
    from aiohttp.test_utils import TestClient, TestServer

    max_batch = INJECTED[where]
    # a group closes when max_batch samples are in (the delay is far longer than the test, and a
    # request counted as arriving that never queues keeps the batcher waiting for more), so the
    # first max_batch requests are exactly the first group, whatever the timing
    model = load_model(export_dir, 1, max_batch, 60_000.0, None)
    model.arriving = 1
    if where.startswith("padding"):
        monkeypatch.setattr(serving, "np", PaddingFails())
    elif where.startswith("onnxruntime"):
        error = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected\n  second line")
        monkeypatch.setattr(model.session, "run", fail_once(model.session.run, error))
    else:
        monkeypatch.setattr(serving, "length_groups", fail_once(serving.length_groups, ValueError("injected")))
    rng = np.random.default_rng(5)
    first = [rng.standard_normal((1, 7, 8)).astype(np.float32) for _ in range(max_batch)]
    later = [rng.standard_normal((1, n, 8)).astype(np.float32) for n in (3, 9, 11)[:max_batch]]

    async def scenario():
        async with TestClient(TestServer(make_app(model))) as client:
            async def infer(x):
                body = _json([{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}])
                response = await client.post(f"/v2/models/{model.name}/infer", data=body)
                return response.status, response.content_type, await response.text()

            failed = await asyncio.gather(*(infer(x) for x in first))
            served = await asyncio.gather(*(infer(x) for x in later))
            metrics = await (await client.get("/metrics")).text()
            return failed, served, metrics

    failed, served, metrics = run_async(scenario())
    for status, content_type, text in failed:
        assert (status, content_type) == (500, "application/json")
        message = json.loads(text)
        assert set(message) == {"error"} and message["error"].startswith("internal error: ")
        assert "injected" in message["error"] or "Unable to allocate" in message["error"]
        assert "\n" not in message["error"]
    for x, (status, _, text) in zip(later, served):
        assert status == 200
        logits = np.array(json.loads(text)["outputs"][0]["data"], np.float32).reshape(1, -1)
        np.testing.assert_allclose(logits, local(x), atol=1e-5, rtol=1e-5)
    assert f'gru_deploy_requests_total{{protocol="rest",status="500"}} {float(len(first))}' in metrics


def calls_of(model, monkeypatch) -> list[tuple[int, ...]]:
    """The padded shape of x of each onnxruntime call the model makes, in order."""
    calls: list[tuple[int, ...]] = []
    run = model.run

    def recording(x, lengths):
        calls.append(x.shape)
        return run(x, lengths)
    monkeypatch.setattr(model, "run", recording)
    return calls


@pytest.mark.parametrize("group_by_length, expected", [
    (True, [(2, 3, 8), (2, 500, 8), (1, 20_000, 8)]),  # shortest first; never padded to 20,000
    (False, [(5, 20_000, 8)]),  # the switch off: one call padded to the longest
])
def test_requests_of_far_apart_lengths_run_in_separate_calls_shortest_first(export_dir, local, monkeypatch,
                                                                           group_by_length, expected):
    seqs = [20_000, 3, 500, 1, 300]
    model = load_model(export_dir, 1, len(seqs), 60_000.0, None, group_by_length=group_by_length)
    calls = calls_of(model, monkeypatch)
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((1, n, 8)).astype(np.float32) for n in seqs]

    async def scenario():
        model.queue = asyncio.Queue()
        batcher = asyncio.create_task(model.batcher())
        try:  # one group: it closes when all len(seqs) samples are in
            return await asyncio.gather(*(model.infer(x, np.array([x.shape[1]], np.int64)) for x in xs))
        finally:
            batcher.cancel()
            model.executor.shutdown(wait=True)

    answers = run_async(scenario(), timeout=120)
    assert calls == expected
    for x, got in zip(xs, answers):
        np.testing.assert_allclose(got["logits"], local(x), atol=1e-5, rtol=1e-5)  # as each gets alone


def test_a_lone_request_does_not_wait_for_the_batching_delay(export_dir, local, monkeypatch):
    """Nothing queued and nothing arriving: the group runs at once, not after --max-delay-ms
    (60 s here, twice the scenario's timeout); with a request arriving, the batcher waits for it."""
    from aiohttp.test_utils import TestClient, TestServer

    model = load_model(export_dir, 1, 8, 60_000.0, None)
    calls = calls_of(model, monkeypatch)
    x = np.random.default_rng(8).standard_normal((1, 5, 8)).astype(np.float32)
    body = _json([{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}])

    async def scenario():
        async with TestClient(TestServer(make_app(model))) as client:
            response = await client.post(f"/v2/models/{model.name}/infer", data=body)
            alone = response.status, await response.json()
            model.arriving += 1  # one more request is on its way: the next group waits for it
            queued, put = asyncio.Event(), model.queue.put

            async def recording_put(item):
                await put(item)
                queued.set()
            model.queue.put = recording_put
            waiting = asyncio.ensure_future(client.post(f"/v2/models/{model.name}/infer", data=body))
            await asyncio.wait_for(queued.wait(), 30)  # it reached the queue ...
            await until(model.queue.empty)  # ... and the batcher took it: now it waits for the one arriving
            for _ in range(100):
                await asyncio.sleep(0)
            held = not waiting.done() and len(calls) == 1
            model.arriving -= 1
            second = model.infer(x, np.array([5], np.int64))  # it arrives and joins the same group
            answers = await asyncio.gather(waiting, second)
            return alone, held, answers[0].status

    (status, answer), held, second_status = run_async(scenario())
    assert status == 200 and second_status == 200 and held
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"], np.float32).reshape(1, -1), local(x),
                               atol=1e-5, rtol=1e-5)
    assert calls == [(1, 5, 8), (2, 5, 8)]


def test_a_call_shorter_than_the_hop_to_the_worker_runs_on_the_event_loop(export_dir, local, monkeypatch):
    """Before any call is timed, a call runs on the worker thread; one the model's recent calls
    say takes under INLINE_NS runs on the event loop's thread; a longer one on the worker again.
    Each call updates the estimate, and the answers are the same wherever the call ran."""
    model = load_model(export_dir, 1, 1, 0.0, None)  # batching off: each request is one call
    threads: list[str] = []
    run = model.run

    def recording(x, lengths):
        threads.append(threading.current_thread().name)
        return run(x, lengths)
    monkeypatch.setattr(model, "run", recording)
    x = np.random.default_rng(9).standard_normal((1, 3, 8)).astype(np.float32)

    async def scenario():
        answers, estimates = [], []
        try:
            for ns_per_step in (None, serving.INLINE_NS / 30, serving.INLINE_NS / 3):
                model.ns_per_step = ns_per_step  # 3 steps: under INLINE_NS, then over it
                answers.append(await model.infer(x, np.array([3], np.int64)))
                estimates.append(model.ns_per_step)
        finally:
            model.executor.shutdown(wait=True)
        return answers, estimates

    answers, estimates = run_async(scenario())
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop on this thread
    assert threads[0].startswith("onnxruntime") and threads[1] == loop_thread and threads[2].startswith("onnxruntime")
    assert all(e is not None and e > 0 for e in estimates)
    for got in answers:
        np.testing.assert_allclose(got["logits"], local(x), atol=1e-5, rtol=1e-5)


def test_length_groups_bound_the_padding_and_keep_similar_lengths_together():
    def pending(seq: int, batch: int = 1) -> Pending:
        return Pending(np.zeros((batch, seq, 8), np.float32), np.full(batch, seq, np.int64), None)

    def seqs(parts):
        return [[p.x.shape[1] for p in part] for part in parts]

    assert seqs(length_groups([pending(n) for n in (10, 100, 55, 138, 30)])) == [[10, 30, 55, 100, 138]]  # slack 128
    assert seqs(length_groups([pending(n) for n in (20_000, 1, 2_000, 16_000, 16_001, 129, 130)])) == \
        [[1], [129, 130], [2_000], [16_000, 16_001, 20_000]]  # padded to at most 8x, or 128 steps more
    assert seqs(length_groups([pending(n) for n in (129, 1)])) == [[1, 129]]
    assert seqs(length_groups([pending(n) for n in (130, 1)])) == [[1], [130]]
    assert seqs(length_groups([pending(n) for n in (5, 1, 9)], ratio=1, slack=0)) == [[1], [5], [9]]
    assert length_groups([]) == []
    same = [pending(7, batch=b) for b in (1, 3, 2)]
    assert length_groups(same) == [same]  # equal lengths: arrival order kept


def test_an_edge_bundle_serves_its_models_under_the_server_bundles_names(export_dir, tmp_path):
    """An edge bundle has no Triton repository: its ONNX classifier, lengths and stream models
    are served under the server bundle's names with the configs it writes; an export without
    int8 models has nothing to serve at --precision int8 (exit 2)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from cli_helpers import run_cli
    from gru_deploy.bundle.package import package
    from gru_deploy.serve.repository import read_repository

    edge, _ = package(export_dir, "edge", out=tmp_path / "edge")
    server, _ = package(export_dir, "server", out=tmp_path / "server")
    served = read_repository(edge)
    assert [(f.name, f.variant, f.file) for f in served.files] == [
        (NAME, "classifier", "model.onnx"), ("gru_classifier_lengths", "lengths", "model_lengths.onnx"),
        ("gru_classifier_stream", "stream", "model_stream.onnx")]
    for f in served.files:
        want = (server / "model_repository" / f.name / "config.pbtxt").read_text()
        assert text_format.Parse(f.config, model_config_pb2.ModelConfig()) == \
            text_format.Parse(want, model_config_pb2.ModelConfig())
    proc = run_cli("serve", str(export_dir), "--port", str(free_port()), "--precision", "int8")
    assert proc.returncode == 2 and "no int8 ONNX classifier or lengths model to serve" in proc.stderr, proc.stderr


def test_serving_a_bundle_archive_extracts_it_once_and_hashes_each_file_once(export_dir, tmp_path, monkeypatch):
    """What `serve` builds before it listens, from a .tar.gz: one extraction, one sha256 per file."""
    import gru_deploy.bundle.read as read
    import gru_deploy.manifest as manifest_module
    from gru_deploy.bundle.package import package

    bundle, manifest = package(export_dir, "server", out=tmp_path / "server.tar.gz", archive=True)
    extractions, hashed, services = [], [], []
    extract, sha256_file = read._extract, manifest_module.sha256_file

    def counting_extract(*args):
        extractions.append(args[0])
        return extract(*args)

    def counting_sha256(path):
        hashed.append(path)
        return sha256_file(path)

    async def no_listening(service, host, port, grpc_port, print_fn, path, load, *rest):
        repository, models, sequences = load()  # what _run does once it listens
        service.install(models, sequences)
        services.append(service)

    monkeypatch.setattr(read, "_extract", counting_extract)
    monkeypatch.setattr(read, "sha256_file", counting_sha256)
    monkeypatch.setattr(manifest_module, "sha256_file", counting_sha256)
    monkeypatch.setattr(running, "_run", no_listening)
    running.serve(bundle, print_fn=lambda message: None)
    assert len(extractions) == 1
    assert len(hashed) == len(manifest["files"])  # each file once
    (service,) = services
    assert [m.name for m in service.models] == [NAME, LENGTHS, "gru_classifier_stream"]


# --- serve, one path for every model: the tutorial classifier, a family's model, your own -------

@pytest.mark.parametrize("kind", ["tutorial", "family", "user"])
def test_serve_answers_every_models_golden_cases_as_the_model_did_at_export(every_kind, kind):
    """`gru-deploy serve` on each kind's export, a real client (tritonclient.http): the golden
    cases of the classifier and lengths models, every output by name, equal to the model run
    eager at export, under the Triton names the manifest records. (The stream model's state is
    the server's, from zeros at a sequence's start: test_serve_protocols holds its sequences.)"""
    from gru_deploy.check.module_parity import golden_load
    from gru_deploy.manifest import model_name

    folder = every_kind[kind][0]
    manifest = read_manifest(folder)
    base = model_name(manifest)
    proc, port, _ = start(folder)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        served = 0
        for case in golden_load(folder, manifest):
            if case["variant"] == "stream":
                continue
            inputs = case["inputs"]
            tensors = [http.InferInput("x", list(inputs["x"].shape), "FP32")]
            tensors[0].set_data_from_numpy(inputs["x"], binary_data=True)
            if case["variant"] == "lengths":  # as its config declares it: dims [1]
                lengths = inputs["lengths"].reshape(-1, 1)
                tensors.append(http.InferInput("lengths", list(lengths.shape), "INT64"))
                tensors[1].set_data_from_numpy(lengths, binary_data=True)
            name = base if case["variant"] == "classifier" else f"{base}_{case['variant']}"
            result = client.infer(name, tensors, outputs=[http.InferRequestedOutput(n) for n in case["outputs"]])
            for output, want in case["outputs"].items():
                np.testing.assert_allclose(result.as_numpy(output), want, atol=1e-5, rtol=1e-5,
                                           err_msg=f"{kind} {case['name']} {output}")
            served += 1
        assert served >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
