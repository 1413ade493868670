"""Triton's benchmark client, perf_analyzer, against `gru-deploy serve`: the classifier, the
lengths model and the stream model (sequences of --sequence-length chunks), over HTTP, gRPC and
gRPC streaming, at concurrency 1 and 8. Records each run's exit code, throughput and latency,
and prints a Markdown table (--json: the rows as JSON).

  python scripts/perf_analyzer_serve.py BUNDLE [--pa BINARY] [--models classifier lengths stream]
         [--protocols http grpc grpc-streaming] [--concurrency 1 8] [--window-ms 1000] [--out FILE]

The models and their inputs come from the bundle's manifest and configs (serve.repository):
each served ONNX model by its variant, under its Triton name. perf_analyzer 2.60's only wheel
is built for glibc 2.38; without --pa, scripts/perf_analyzer/setup.sh builds a compatibility
shim (cached in ~/.cache/perf_analyzer) and names the binary to call: call that binary, since
the pip entry point always exits 0. Each run is bounded: time windows of --window-ms, at most
--max-trials of them, a run killed after --run-timeout-s. The whole default matrix (18 runs)
takes about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUP = HERE / "perf_analyzer" / "setup.sh"
PROTOCOLS = ("http", "grpc", "grpc-streaming")
VARIANTS = ("classifier", "lengths", "stream")


def perf_analyzer(cache: Path | None = None) -> Path:
    """The perf_analyzer binary setup.sh builds (once; cached), or RuntimeError saying why not."""
    args = ["bash", str(SETUP)] + ([str(cache)] if cache else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise RuntimeError(f"perf_analyzer setup failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return Path(lines[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, http_port: int, grpc_port: int, extra: list[str]) -> subprocess.Popen:
    exe = shutil.which("gru-deploy", path=str(Path(sys.executable).parent)) or shutil.which("gru-deploy")
    if exe is None:
        raise RuntimeError("gru-deploy is not installed next to this Python")
    proc = subprocess.Popen([exe, "serve", str(bundle), "--port", str(http_port), "--grpc-port", str(grpc_port),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gru-deploy serve exited {proc.returncode}: {proc.stderr.read()[-800:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gru-deploy serve did not become ready in 120 s")


def served_models(bundle: Path) -> dict[str, tuple[str, int]]:
    """variant -> (Triton name, input size), as the bundle's manifest and configs say."""
    from gru_deploy.serve.repository import read_repository
    from gru_deploy.serve.server import parse_config

    out = {}
    for file in read_repository(bundle).files:
        config = parse_config(file.config)
        x = next(t for t in config.input if t.name == "x")
        out[file.variant] = (file.name, int(x.dims[-1]))
    return out


def model_args(variant: str, size: int, steps: int, sequence_length: int, folder: Path) -> list[str]:
    """perf_analyzer's input options for a variant: x of `steps` steps per sample; the lengths
    model's data from a file (lengths must lie in 1..steps, so not random); the stream model one
    step per request, sequences of `sequence_length` requests."""
    if variant == "classifier":
        return ["--shape", f"x:{steps},{size}"]
    if variant == "lengths":
        data = folder / "lengths.json"
        x = [round(((i * 7919) % 200) / 100 - 1, 2) for i in range(steps * size)]
        data.write_text(json.dumps({"data": [{"x": {"content": x, "shape": [steps, size]},
                                              "lengths": {"content": [max(1, steps * 2 // 3)], "shape": [1]}}]}))
        return ["--input-data", str(data)]
    return ["--shape", f"x:1,{size}", "--sequence-length", str(sequence_length)]


def parse_csv(path: Path) -> dict[str, float]:
    """Throughput (infer/s) and client latencies (ms) from perf_analyzer's -f report."""
    with open(path, newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    return {"infer_per_s": float(row["Inferences/Second"]),
            **{f"p{q}_ms": float(row[f"p{q} latency"]) / 1000 for q in (50, 90, 95, 99)}}


def run_matrix(bundle: Path, pa: Path, variants: list[str], protocols: list[str], concurrency: list[int],
               window_ms: int = 1000, max_trials: int = 6, stability: int = 50, steps: int = 10,
               sequence_length: int = 20, run_timeout_s: float = 90.0, serve_args: list[str] | None = None,
               log=print) -> list[dict]:
    """One server on `bundle`; one perf_analyzer run per (variant, protocol, concurrency)."""
    http_port, grpc_port = free_port(), free_port()
    models = served_models(bundle)
    rows = []
    server = start_server(bundle, http_port, grpc_port, serve_args or [])
    try:
        with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
            folder = Path(tmp)
            for variant in variants:
                if variant not in models:
                    raise RuntimeError(f"{bundle} serves no {variant} model ({sorted(models)})")
                name, size = models[variant]
                for protocol in protocols:
                    for c in concurrency:
                        report = folder / f"{variant}-{protocol}-{c}.csv"
                        url = f"127.0.0.1:{http_port}" if protocol == "http" else f"127.0.0.1:{grpc_port}"
                        cmd = [str(pa), "-m", name, "-u", url, "-i", "http" if protocol == "http" else "grpc",
                               *(["--streaming"] if protocol == "grpc-streaming" else []),
                               "--concurrency-range", str(c), "--measurement-interval", str(window_ms),
                               "--max-trials", str(max_trials), "--stability-percentage", str(stability),
                               "-f", str(report), *model_args(variant, size, steps, sequence_length, folder)]
                        started = time.monotonic()
                        try:
                            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=run_timeout_s)
                            rc, out = proc.returncode, proc.stdout + proc.stderr
                        except subprocess.TimeoutExpired as exc:
                            rc, out = 124, f"killed after {run_timeout_s:g} s: {exc.stdout or ''}"
                        row = {"model": name, "variant": variant, "protocol": protocol, "concurrency": c,
                               "exit": rc, "seconds": round(time.monotonic() - started, 1),
                               "command": " ".join(["perf_analyzer", *cmd[1:]])}
                        if rc == 0 and report.is_file():
                            row.update(parse_csv(report))
                        else:
                            lines = [line for line in out.splitlines() if line.strip() and "weak version" not in line]
                            row["error"] = " | ".join(lines[-3:])[-400:]
                        rows.append(row)
                        log(f"{name} {protocol} c={c}: exit {rc}"
                            + (f", {row['infer_per_s']:.0f} infer/s, p50 {row['p50_ms']:.2f} ms" if "p50_ms" in row
                               else f": {row.get('error', '')}"))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | protocol | concurrency | exit | infer/s | p50 ms | p90 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "p50_ms" in r:
            lines.append(f"| {r['model']} | {r['protocol']} | {r['concurrency']} | {r['exit']} | "
                         f"{r['infer_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} |")
        else:
            lines.append(f"| {r['model']} | {r['protocol']} | {r['concurrency']} | {r['exit']} | "
                         f"failed: {r.get('error', '')} | | | | |")
    return "\n".join(lines)


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a server bundle (folder or .tar.gz), or an export folder")
    parser.add_argument("--pa", type=Path, default=None, help="the perf_analyzer binary (default: setup.sh's)")
    parser.add_argument("--models", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--window-ms", type=int, default=1000, help="perf_analyzer --measurement-interval")
    parser.add_argument("--max-trials", type=int, default=6, help="perf_analyzer --max-trials (windows per run)")
    parser.add_argument("--stability", type=int, default=50,
                        help="perf_analyzer --stability-percentage (2 shared cores: 10%% is rarely met)")
    parser.add_argument("--steps", type=int, default=10, help="steps per sample (classifier and lengths model)")
    parser.add_argument("--sequence-length", type=int, default=20, help="requests (1-step chunks) per sequence")
    parser.add_argument("--run-timeout-s", type=float, default=90.0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (or JSON) here")
    args = parser.parse_args(argv)
    pa = args.pa or perf_analyzer()
    started = time.monotonic()
    rows = run_matrix(args.bundle, pa, args.models, args.protocols, args.concurrency, args.window_ms, args.max_trials,
                      args.stability, args.steps, args.sequence_length, args.run_timeout_s,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    text = (json.dumps({"machine": machine(), "seconds": round(time.monotonic() - started), "rows": rows}, indent=1)
            if args.json else table(rows) + f"\n\n{machine()}; {time.monotonic() - started:.0f} s in all\n")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
