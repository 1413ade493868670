#!/usr/bin/env python
"""Throughput and latency of `gru-deploy serve` with dynamic batching on and off (loopback only).

Starts the server in a subprocess on a free 127.0.0.1 port for each setting, then runs
1, 8 and 32 concurrent tritonclient.http clients, each sending single-sample requests of
random length (10..100 steps) until --requests requests are done or --seconds pass —
bounded in count and in time. Prints requests/s and p50/p99 latency per setting, measured
in one run. A benchmark, not a test.

    python scripts/bench_serve.py EXPORT_OR_BUNDLE [--requests 800] [--seconds 20] [--json]
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

import numpy as np

CLIENTS = (1, 8, 32)
SETTINGS = {"batching on (max 32, 2 ms)": ["--max-batch", "32", "--max-delay-ms", "2"],
            "batching off": ["--max-batch", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gru_deploy", "serve", path, "--port", str(port), *args],
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def load(port: int, clients: int, total: int, seconds: float) -> dict[str, float]:
    import tritonclient.http as http

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, int(n), 8)).astype(np.float32) for n in rng.integers(10, 101, size=total)]
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))
    stop = time.monotonic() + seconds

    def worker() -> None:
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        while time.monotonic() < stop:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            tensor = http.InferInput("x", list(inputs[i].shape), "FP32")
            tensor.set_data_from_numpy(inputs[i])
            t0 = time.perf_counter()
            client.infer("gru_classifier", [tensor])
            with lock:
                latencies.append(time.perf_counter() - t0)

    start_time = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start_time
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "seconds": elapsed, "throughput_rps": len(lat) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="export folder or bundle")
    parser.add_argument("--requests", type=int, default=800, help="requests per (setting, clients) at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per (setting, clients) at most")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for setting, flags in SETTINGS.items():
        proc, port = start(args.path, flags)
        try:
            load(port, 4, 50, 5)  # warm-up
            for clients in CLIENTS:
                rows.append({"setting": setting, "clients": clients,
                             **load(port, clients, args.requests, args.seconds)})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'setting':<28}{'clients':>8}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        print(f"{r['setting']:<28}{r['clients']:>8}{r['requests']:>10}{r['throughput_rps']:>10.0f}"
              f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
