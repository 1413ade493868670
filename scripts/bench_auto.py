#!/usr/bin/env python
"""Is `--strategy auto`'s pick the fastest form? One run, at every shape of `gru-deploy bench`.

At each (batch, seq) of the bench grid, the classifier's ONNX forms (loop, stepwise, scan,
fused; default-size model, untrained: speed does not depend on the weights) go through auto's
own choice (`pipeline.choose_fastest`, its timing budgets and its re-timing of close pairs);
then all of them are timed again, independently, for --budget seconds each, together with the
forms of `scripts/bench_loop_forms.py` (not auto candidates: the best ONNX forms known), and
the pick's median is divided by the fastest candidate's, and the fastest candidate's by the
fastest known form's. 1.00 means auto kept the fastest; the issue's targets are at most 1.1
for both. A benchmark, not a test.

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
    from gru_deploy.convert.pipeline import choose_fastest, time_strategies

    import torch
    from bench_loop_forms import form_graphs

    from gru_deploy.models.tutorial import GRUClassifier

    spec, graphs = default_graphs()
    torch.manual_seed(0)
    known = {f"known: {name}": graph for name, graph in form_graphs(GRUClassifier().eval(), spec).items()}
    rows = []
    for shape in SHAPES:
        chosen, record = choose_fastest(
            graphs, lambda models, budget: time_strategies(models, spec.signature(), shape, budget))
        timed = time_strategies({**graphs, **known}, spec.signature(), shape, args.budget)
        check = {name: timed[name] for name in graphs}
        fastest = min(check, key=check.get)
        best_known = min(known, key=timed.get)
        rows.append({"batch": shape[0], "seq": shape[1], "auto": record, "chosen": chosen, "check_median_us": check,
                     "known_median_us": {name: timed[name] for name in known},
                     "fastest_in_check": fastest, "chosen_vs_fastest": check[chosen] / check[fastest],
                     "fastest_known": best_known, "fastest_vs_known": check[fastest] / timed[best_known]})
    result = {"onnxruntime": ort.__version__, "check_budget_s": args.budget, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"auto's pick against an independent timing ({args.budget:g} s per form), onnxruntime {ort.__version__}")
    for row in rows:
        timed = ", ".join(f"{k} {v:,.0f}" for k, v in row["auto"]["median_us"].items())
        if "retimed" in row["auto"]:
            timed += " (retimed: " + ", ".join(f"{k} {v:,.0f}" for k, v in row["auto"]["retimed"]["median_us"].items()) + ")"
        check = ", ".join(f"{k} {v:,.0f}" for k, v in row["check_median_us"].items())
        print(f"batch {row['batch']}, seq {row['seq']}: auto timed {timed}; picked {row['chosen']}")
        print(f"  check (µs): {check}; pick / fastest {row['chosen_vs_fastest']:.2f}")
        known = ", ".join(f"{k[7:]} {v:,.0f}" for k, v in row["known_median_us"].items())
        print(f"  known forms (µs): {known}; fastest candidate / fastest known ({row['fastest_known'][7:]}) "
              f"{row['fastest_vs_known']:.2f}")


if __name__ == "__main__":
    main()
