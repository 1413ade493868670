"""`gru-deploy serve`: a real server in a subprocess on a loopback port, driven by tritonclient.http."""

from __future__ import annotations

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

from cli_helpers import gru_deploy_exe
from gru_deploy.manifest import read_manifest
from gru_deploy.verify import export_runners

import tritonclient.http as http  # noqa: E402  (the test extra installs tritonclient[http])

NAME = "gru_classifier"


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
    runner = export_runners(export_dir, read_manifest(export_dir))["onnxruntime"]
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
    meta = client.get_model_metadata(NAME)
    assert [i["name"] for i in meta["inputs"]] == ["x", "lengths"]
    assert meta["inputs"][0]["shape"] == [-1, -1, 8] and meta["outputs"][0]["shape"] == [-1, 4]
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
    "lengths too long": (NAME, _json([X, {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [3]}]), {}, 400),
    "negative lengths": (NAME, _json([X, {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [-1]}]), {},
                         400),
    "empty batch": (NAME, _json([{**X, "shape": [0, 2, 8], "data": []}]), {}, 400),
    "unknown output": (NAME, _json([X], [{"name": "h_n"}]), {}, 400),
    "binary size wrong": (NAME, _json([{**X, "data": None, "parameters": {"binary_data_size": 8}}]) + b"\0" * 8,
                          {"Inference-Header-Content-Length": str(len(_json([{**X, "data": None,
                                                                   "parameters": {"binary_data_size": 8}}])))}, 400),
    "header length too big": (NAME, _json([X]), {"Inference-Header-Content-Length": "999999"}, 400),
    "deep JSON": (NAME, b'{"inputs": [], "x": ' + b"[" * 200 + b"]" * 200 + b"}", {}, 400),
    "oversized body": (NAME, _json([{**X, "shape": [1, 8000, 8], "data": [0.1] * 64000}]), {}, 413),
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
                got = client.infer(NAME, [tensor]).as_numpy("logits")
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
    assert sizes["gru_deploy_batch_size_sum"] > sizes["gru_deploy_batch_size_count"]  # some batches held > 1
    assert 'gru_deploy_requests_total{status="200"}' in metrics


def test_padded_request_with_lengths_equals_each_sample_alone(server, local):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 12, 8)).astype(np.float32)
    lengths = np.array([12, 5, 1], np.int64)
    inputs = [http.InferInput("x", list(x.shape), "FP32"), http.InferInput("lengths", [3], "INT64")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(lengths)
    got = server["client"].infer(NAME, inputs).as_numpy("logits")
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b], local(np.ascontiguousarray(x[b:b + 1, :n]))[0], atol=1e-5)


def test_a_slow_client_times_out_and_the_server_keeps_serving(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"inputs\"".encode())
        started = time.monotonic()
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408") and '"error"' in reply
    assert time.monotonic() - started < 8
    assert server["client"].is_server_ready()


def test_oversized_content_length_is_refused_before_the_body_is_read(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 999999999\r\n\r\n".encode())
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413") and '"error"' in reply
