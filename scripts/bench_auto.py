#!/usr/bin/env python
"""Is `--strategy auto`'s pick the fastest form? One run, at every shape of `gru-deploy bench`.

At each (batch, seq) of the bench grid (the default-size model, and input 64 / hidden 256 at
the bench's large shapes; untrained: speed does not depend on the weights), the classifier's
ONNX forms as export builds them (loop, stepwise, fused) go through auto's own choice (`pipeline.choose_fastest`, its timing budgets and its re-timing of close pairs);
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

    from gru_deploy.bench import LARGE_SHAPES, LARGE_SIZES, SHAPES, default_model
    from gru_deploy.convert.pipeline import every_form
    from gru_deploy.models.user import resized
    from gru_deploy.spec import ModelSpec

    from bench_loop_forms import form_graphs

    rows = []
    small = default_model()
    for model, shapes in ((small, SHAPES), (resized(small, *LARGE_SIZES), LARGE_SHAPES)):
        spec = ModelSpec(input_size=model.module.gru.input_size, hidden_size=model.module.hidden_size)
        graphs = {form: built.onnx_bytes for form, built in every_form(model)["classifier"].items()}
        known = {f"known: {name}": graph for name, graph in form_graphs(model.module, spec).items()}
        rows += [row(graphs, known, spec, shape, args.budget) for shape in shapes]
    result = {"onnxruntime": ort.__version__, "check_budget_s": args.budget, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"auto's pick against an independent timing ({args.budget:g} s per form), onnxruntime {ort.__version__}")
    for row_ in rows:
        timed = ", ".join(f"{k} {v:,.0f}" for k, v in row_["auto"]["median_us"].items())
        if "retimed" in row_["auto"]:
            timed += " (retimed: " + ", ".join(f"{k} {v:,.0f}" for k, v in row_["auto"]["retimed"]["median_us"].items()) + ")"
        check = ", ".join(f"{k} {v:,.0f}" for k, v in row_["check_median_us"].items())
        print(f"{row_['input_size']}/{row_['hidden_size']} batch {row_['batch']}, seq {row_['seq']}: auto timed {timed}; "
              f"picked {row_['chosen']}")
        print(f"  check (µs): {check}; pick / fastest {row_['chosen_vs_fastest']:.2f}")
        known = ", ".join(f"{k[7:]} {v:,.0f}" for k, v in row_["known_median_us"].items())
        print(f"  known forms (µs): {known}; fastest candidate / fastest known ({row_['fastest_known'][7:]}) "
              f"{row_['fastest_vs_known']:.2f}")


def row(graphs: dict, known: dict, spec, shape: tuple[int, int], budget: float) -> dict:
    """One shape: auto's own choice among the candidates, then every candidate and known form
    timed again for `budget` seconds each, and the two ratios."""
    from gru_deploy.convert.pipeline import choose_fastest, time_strategies

    chosen, record = choose_fastest(
        graphs, lambda models, budget_s: time_strategies(models, spec.signature(), shape, budget_s))
    timed = time_strategies({**graphs, **known}, spec.signature(), shape, budget)
    check = {name: timed[name] for name in graphs}
    fastest = min(check, key=check.get)
    best_known = min(known, key=timed.get)
    return {"input_size": spec.input_size, "hidden_size": spec.hidden_size,
            "batch": shape[0], "seq": shape[1], "auto": record, "chosen": chosen, "check_median_us": check,
            "known_median_us": {name: timed[name] for name in known},
            "fastest_in_check": fastest, "chosen_vs_fastest": check[chosen] / check[fastest],
            "fastest_known": best_known, "fastest_vs_known": check[fastest] / timed[best_known]}


if __name__ == "__main__":
    main()
