#!/usr/bin/env python
"""Throughput and latency of `gru-deploy serve` with dynamic batching on and off (loopback only).

Starts the server in a subprocess on a free 127.0.0.1 port for each setting, then runs
concurrent tritonclient.http clients, each sending single-sample requests until --requests
requests are done or --seconds pass — bounded in count and in time. Prints requests/s and
p50/p99 latency per setting, measured in one run. A benchmark, not a test.

--workload uniform (the default): lengths 10..100 steps; batching on and off; 1, 8 and 32 clients.
--workload mixed: most requests 1..20 steps, --long-fraction of them 2,000..10,000 steps;
batching on with grouping by length on and off (serve's --group-by-length/--no-group-by-length);
8 and 32 clients; latency reported separately for the short and the long requests.
--workload protocols: one server with REST and gRPC (--grpc-port); the uniform requests sent by
tritonclient.http (binary tensor data) and by tritonclient.grpc, 1 and 32 clients each, in turn.
--workload sequences: 64 sequences of --steps steps, streamed in 1-step chunks (sequence_id,
sequence_start, sequence_end) by 8 asyncio clients, over REST and gRPC, with batching on and
off: chunks/s and the latency of a chunk.

    python scripts/bench_serve.py EXPORT_OR_BUNDLE [--workload mixed] [--requests 800] [--seconds 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

BATCHING = ["--max-batch", "32", "--max-delay-ms", "2"]
WORKLOADS = {  # clients, {setting: serve flags}
    "uniform": ((1, 8, 32), {"batching on (max 32, 2 ms)": BATCHING, "batching off": ["--max-batch", "1"]}),
    "mixed": ((8, 32), {"grouping by length on": [*BATCHING, "--group-by-length"],
                        "grouping by length off": [*BATCHING, "--no-group-by-length"]}),
    "protocols": ((1, 32), {"batching on (max 32, 2 ms)": BATCHING}),
    "sequences": ((8,), {"batching on (max 32, 2 ms)": BATCHING, "batching off": ["--max-batch", "1"]}),
}
PROTOCOLS = ("rest", "grpc")  # tritonclient.http with binary tensor data; tritonclient.grpc
SHORT, LONG = (1, 20), (2_000, 10_000)  # the mixed workload's lengths, inclusive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path: str, args: list[str]) -> tuple[subprocess.Popen, dict[str, int]]:
    """The server with REST and gRPC on free ports: the process and {"rest": port, "grpc": port}."""
    ports = {"rest": free_port(), "grpc": free_port()}
    proc = subprocess.Popen([sys.executable, "-m", "gru_deploy", "serve", path, "--port", str(ports["rest"]),
                             "--grpc-port", str(ports["grpc"]), *args], stderr=subprocess.DEVNULL)
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: gru-deploy serve {' '.join(args)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['rest']}/v2/health/ready", timeout=1):
                return proc, ports
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def sequence_lengths(workload: str, total: int, long_fraction: float, rng: np.random.Generator) -> np.ndarray:
    if workload == "uniform":
        return rng.integers(10, 101, size=total)
    short, long = rng.integers(SHORT[0], SHORT[1] + 1, size=total), rng.integers(LONG[0], LONG[1] + 1, size=total)
    return np.where(rng.random(total) < long_fraction, long, short)


def percentiles(latencies: list[float], prefix: str = "") -> dict[str, float]:
    lat = np.array(latencies) * 1000
    if not len(lat):
        return {f"{prefix}requests": 0, f"{prefix}p50_ms": float("nan"), f"{prefix}p99_ms": float("nan")}
    return {f"{prefix}requests": len(lat), f"{prefix}p50_ms": float(np.percentile(lat, 50)),
            f"{prefix}p99_ms": float(np.percentile(lat, 99))}


def load(port: int, clients: int, total: int, seconds: float, workload: str = "uniform",
         long_fraction: float = 0.05, protocol: str = "rest") -> dict[str, float]:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    module = http if protocol == "rest" else grpc
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, int(n), 8)).astype(np.float32)
              for n in sequence_lengths(workload, total, long_fraction, rng)]
    latencies: list[float] = []
    short_latencies: list[float] = []
    long_latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))
    stop = time.monotonic() + seconds

    def worker() -> None:
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        while time.monotonic() < stop:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            tensor = module.InferInput("x", list(inputs[i].shape), "FP32")
            tensor.set_data_from_numpy(inputs[i])  # http: binary tensor data (its default); grpc: raw contents
            t0 = time.perf_counter()
            client.infer("gru_classifier_lengths", [tensor])  # padded in batches
            with lock:
                latencies.append(time.perf_counter() - t0)
                (short_latencies if inputs[i].shape[1] <= SHORT[1] else long_latencies).append(latencies[-1])

    start_time = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start_time
    result = {"seconds": elapsed, "throughput_rps": len(latencies) / elapsed, **percentiles(latencies)}
    if workload == "mixed":
        result.update(percentiles(short_latencies, "short_") | percentiles(long_latencies, "long_"))
    return result


def stream_chunks(port: int, protocol: str, sequences: int, steps: int, clients: int,
                  input_size: int) -> dict[str, float]:
    """`sequences` sequences of `steps` steps, each streamed in 1-step chunks (the next chunk sent
    once the last is answered), shared round-robin by `clients` asyncio clients."""
    import asyncio

    import tritonclient.grpc as grpc
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http as http
    import tritonclient.http.aio as http_aio

    module, aio = (http, http_aio) if protocol == "rest" else (grpc, grpc_aio)
    x = np.random.default_rng(0).standard_normal((sequences, steps, input_size)).astype(np.float32)
    latencies: list[float] = []

    async def run() -> float:
        pool = [aio.InferenceServerClient(f"127.0.0.1:{port}") for _ in range(clients)]

        async def sequence(client, k: int) -> None:
            for t in range(steps):
                tensor = module.InferInput("x", [1, 1, input_size], "FP32")
                tensor.set_data_from_numpy(x[k:k + 1, t:t + 1])
                t0 = time.perf_counter()
                await client.infer("gru_classifier_stream", [tensor], sequence_id=k + 1, sequence_start=t == 0,
                                   sequence_end=t == steps - 1)
                latencies.append(time.perf_counter() - t0)

        start_time = time.perf_counter()
        try:
            await asyncio.gather(*(sequence(pool[k % clients], k) for k in range(sequences)))
        finally:
            for client in pool:
                await client.close()
        return time.perf_counter() - start_time

    elapsed = asyncio.run(run())
    return {"seconds": elapsed, "throughput_rps": len(latencies) / elapsed, **percentiles(latencies)}


def input_size(path: str) -> int:
    from gru_deploy.serve.user import module_file

    return int(module_file(Path(path), "stream").signature["inputs"][0]["shape"][2])


def lengths_form(path: str) -> str:
    """'NAME (loop)' / 'NAME (fused)': the folder and the form of the lengths model its manifest lists."""
    from gru_deploy.manifest import read_manifest
    from gru_deploy.serve.user import module_file

    name = Path(path).name
    try:
        manifest = read_manifest(Path(path))
    except Exception:  # a bundle: its manifest names the export it came from, not the form
        return f"{name} ({module_file(Path(path), 'lengths').name})"
    info = manifest["models"][manifest["variants"]["lengths"]["onnx"]]
    return f"{name} ({info.get('strategy', '?')})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="+", help="export folder(s) or bundle(s); several are measured in one run "
                                                "(e.g. a loop and a fused export of one checkpoint)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="uniform",
                        help="uniform: 10..100 steps; mixed: 1..20 steps and some 2,000..10,000")
    parser.add_argument("--long-fraction", type=float, default=0.05, help="share of long requests (mixed)")
    parser.add_argument("--requests", type=int, default=800, help="requests per (setting, clients) at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per (setting, clients) at most")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="concurrent clients to run with "
                        "[default: 1 8 32 for uniform, 8 32 for mixed, 1 32 for protocols, 8 for sequences]")
    parser.add_argument("--sequences", type=int, default=64, help="live sequences (sequences workload)")
    parser.add_argument("--steps", type=int, default=100, help="steps per sequence (sequences workload)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    clients_list, settings = WORKLOADS[args.workload]
    clients_list = tuple(args.clients) if args.clients else clients_list
    rows = []
    for path in args.path:
        for setting, flags in settings.items():
            proc, ports = start(path, flags)
            try:
                protocols = PROTOCOLS if args.workload in ("protocols", "sequences") else ("rest",)
                for protocol in protocols:
                    load(ports[protocol], 4, 50, 5, protocol=protocol)  # warm-up
                for protocol in protocols:
                    for clients in clients_list:
                        if args.workload == "sequences":
                            measured = stream_chunks(ports[protocol], protocol, args.sequences, args.steps, clients,
                                                     input_size(path))
                        else:
                            measured = load(ports[protocol], clients, args.requests, args.seconds,
                                            "uniform" if args.workload == "protocols" else args.workload,
                                            args.long_fraction, protocol)
                        rows.append({"model": lengths_form(path), "setting": setting, "protocol": protocol,
                                     "clients": clients, **measured})
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.workload == "mixed":
        print(f"{'served model':<34}{'setting':<26}{'clients':>8}{'req/s':>8}{'short':>7}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'long':>6}{'p50 ms':>9}{'p99 ms':>9}")
        for r in rows:
            print(f"{r['model']:<34}{r['setting']:<26}{r['clients']:>8}{r['throughput_rps']:>8.0f}{r['short_requests']:>7}"
                  f"{r['short_p50_ms']:>9.2f}{r['short_p99_ms']:>9.2f}{r['long_requests']:>6}"
                  f"{r['long_p50_ms']:>9.2f}{r['long_p99_ms']:>9.2f}")
        return 0
    print(f"{'served model':<34}{'setting':<28}{'protocol':<9}{'clients':>8}{'requests':>10}{'req/s':>10}"
          f"{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        print(f"{r['model']:<34}{r['setting']:<28}{r['protocol']:<9}{r['clients']:>8}{r['requests']:>10}"
              f"{r['throughput_rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    if args.workload in ("protocols", "sequences"):  # gRPC against REST, each measured in this run
        for r in rows:
            if r["protocol"] == "grpc":
                rest = next(q for q in rows if q["protocol"] == "rest" and q["setting"] == r["setting"]
                            and q["clients"] == r["clients"] and q["model"] == r["model"])
                print(f"gRPC / REST requests/s, {r['setting']}, {r['clients']} client(s): "
                      f"{r['throughput_rps'] / rest['throughput_rps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
