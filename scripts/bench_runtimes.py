#!/usr/bin/env python
"""Median latency of eager PyTorch vs TorchScript vs onnxruntime on one checkpoint.

A benchmark, not a test: run it on a quiet machine and read the ratios, which are
measured in the same run. "eager" is the reference: the tutorial's own loop
(`tutorial_forward`), i.e. the user's model as written. "eager (export form)" is our
time-major, hoisted form of the same math, run eagerly. Every runtime runs on one thread
by default (`--threads`), onnxruntime in its own session.

    python scripts/bench_runtimes.py [--checkpoint CKPT] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

SHAPES = ((1, 100), (32, 100), (1, 1000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to benchmark (default: an untrained model, seed 0)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime (default 1)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per measurement (default 1.5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    import torch

    from gru_deploy.convert import script
    from gru_deploy.bench import median_us
    from gru_deploy.check.module_parity import UserSignature
    from gru_deploy.convert.pipeline import export_user_onnx
    from gru_deploy.models.tutorial import GRUClassifier, tutorial_forward
    import onnxruntime

    from gru_deploy.check.runners import session_options
    from gru_deploy.spec import ModelSpec
    from gru_deploy.train import load_checkpoint

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        spec, model = ckpt.spec, ckpt.model()
    else:
        torch.manual_seed(0)
        spec, model = ModelSpec(), GRUClassifier().eval()
    scripted = script.torchscript(model)
    onnx_bytes = export_user_onnx(scripted, UserSignature(**spec.signature()), 17)[0]
    ort = onnxruntime.InferenceSession(onnx_bytes, session_options(args.threads), providers=["CPUExecutionProvider"])

    rows = []
    for batch, seq in SHAPES:
        x_np = np.random.default_rng(0).standard_normal((batch, seq, spec.input_size)).astype(np.float32)
        x = torch.from_numpy(x_np)
        with torch.inference_mode():
            timings = {
                "eager": median_us(lambda: tutorial_forward(model, x), args.budget),
                "eager (export form)": median_us(lambda: model(x), args.budget),
            }
        with torch.no_grad():  # TorchScript modules refuse inference-mode tensors here
            x_ts = x.clone()
            timings["torchscript"] = median_us(lambda: scripted(x_ts), args.budget)
        timings["onnxruntime"] = median_us(lambda: ort.run(None, {"x": x_np}), args.budget)
        rows.append({"batch": batch, "seq": seq, "median_us": timings,
                     "ratio_to_eager": {k: timings["eager"] / v for k, v in timings.items()}})

    if args.json:
        print(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))
        return 0
    names = list(rows[0]["median_us"])
    print(f"median latency, µs (speed-up vs eager in brackets); threads={args.threads}, torch {torch.__version__}")
    print(f"{'batch, seq':<12}" + "".join(f"{n:>26}" for n in names))
    for row in rows:
        cells = "".join(f"{row['median_us'][n]:>17,.0f} ({row['ratio_to_eager'][n]:>5.1f}x)" for n in names)
        print(f"{row['batch']:>4}, {row['seq']:<6}" + cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
