#!/usr/bin/env python
"""Is `--strategy auto`'s pick the fastest form? One run, at every shape of `gru-deploy bench`.

At each (batch, seq) of the bench grid, the classifier's three ONNX forms (loop, scan, fused;
default-size model, untrained: speed does not depend on the weights) go through auto's own
choice (`pipeline.choose_fastest`, its timing budgets and its re-timing of close pairs); then
all three are timed again, independently, for --budget seconds each, and the pick's median is
divided by the fastest of those. A ratio of 1.00 means auto kept the fastest; the issue's
target is at most 1.1. A benchmark, not a test.

    python scripts/bench_auto.py [--budget 2] [--json]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per form in the checking timing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import onnxruntime as ort

    from gru_deploy.bench import SHAPES, default_graphs
    from gru_deploy.pipeline import choose_fastest, time_strategies

    spec, graphs = default_graphs()
    rows = []
    for shape in SHAPES:
        chosen, record = choose_fastest(graphs, lambda models, budget: time_strategies(models, spec, shape, budget))
        check = time_strategies(graphs, spec, shape, args.budget)
        fastest = min(check, key=check.get)
        rows.append({"batch": shape[0], "seq": shape[1], "auto": record, "chosen": chosen, "check_median_us": check,
                     "fastest_in_check": fastest, "chosen_vs_fastest": check[chosen] / check[fastest]})
    result = {"onnxruntime": ort.__version__, "check_budget_s": args.budget, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"auto's pick against an independent timing ({args.budget:g} s per form), onnxruntime {ort.__version__}")
    print(f"{'batch, seq':>10}  {'auto timed (µs)':<44}{'picked':>8}  {'check (µs)':<44}{'pick/fastest':>13}")
    for row in rows:
        timed = ", ".join(f"{k} {v:,.0f}" for k, v in row["auto"]["median_us"].items())
        if "retimed" in row["auto"]:
            timed += " (retimed)"
        check = ", ".join(f"{k} {v:,.0f}" for k, v in row["check_median_us"].items())
        print(f"{row['batch']:>4}, {row['seq']:<5}  {timed:<44}{row['chosen']:>8}  {check:<44}"
              f"{row['chosen_vs_fastest']:>13.2f}")


if __name__ == "__main__":
    main()
