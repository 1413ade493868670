#!/usr/bin/env python
"""Do more onnxruntime threads ever make gru-deploy's graphs slower? One run, medians.

For each ONNX strategy of the default-size model (untrained: speed does not depend on the
weights) and a few (batch, seq) shapes, times one session per setting: 1 thread; 2 threads
with the pool's workers spinning (onnxruntime's default); 2 threads without spinning (what
gru-deploy's `session_options` uses). Ratios are to 1 thread, within this run. A benchmark,
not a test.

    python scripts/bench_threads.py [--budget 1] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

SHAPES = ((1, 100), (32, 100), (256, 200))
SETTINGS = {"1 thread": (1, False), "2 threads, spinning": (2, True), "2 threads, no spinning": (2, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import onnxruntime as ort

    from gru_deploy.bench import default_graphs, median_us
    from gru_deploy.check.runners import session_options

    spec, graphs = default_graphs()
    rows = []
    for batch, seq in SHAPES:
        x = np.random.default_rng(batch + seq).standard_normal((batch, seq, spec.input_size)).astype(np.float32)
        for strategy, graph in graphs.items():
            medians = {}
            for setting, (threads, spinning) in SETTINGS.items():
                session = ort.InferenceSession(graph, session_options(threads, spinning),
                                               providers=["CPUExecutionProvider"])
                medians[setting] = median_us(lambda: session.run(None, {"x": x}), args.budget)
            rows.append({"strategy": strategy, "batch": batch, "seq": seq, "median_us": medians,
                         "vs_1_thread": {k: v / medians["1 thread"] for k, v in medians.items()}})
    result = {"onnxruntime": ort.__version__, "budget_s": args.budget, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    names = list(SETTINGS)
    print(f"median µs (ratio to 1 thread), onnxruntime {ort.__version__}")
    print(f"{'strategy':<8} {'batch, seq':>10}" + "".join(f"{n:>28}" for n in names))
    for row in rows:
        cells = "".join(f"{row['median_us'][n]:>18,.0f} ({row['vs_1_thread'][n]:>5.2f}x)" for n in names)
        print(f"{row['strategy']:<8} {row['batch']:>4}, {row['seq']:<5}" + cells)


if __name__ == "__main__":
    main()
