#!/usr/bin/env python
"""What each rewrite of the loop form buys in the exported ONNX Loop (onnxruntime, medians).

Three forms of the same math, each scripted, exported with the TorchScript exporter and run
in onnxruntime (one thread, one session each), measured in one run:

  tutorial     batch-major `x[:, t, :]` (a Slice that copies the whole input every step:
               cost grows with T²) and six Linear calls per step
  time-major   one transpose, then `x[t]`; still six Linear calls per step
  export form  gru_deploy's: time-major, input projections hoisted out of the loop as
               one matmul, z and r hidden projections merged

Each form is first checked against the tutorial's eager code (1e-5). A benchmark, not a test.

    python scripts/bench_loop_forms.py [--budget 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from torch import nn

from gru_deploy.models.tutorial import GRUCell, GRUClassifier, tutorial_forward

SHAPES = ((1, 100), (32, 100), (256, 200), (256, 1000), (256, 2000))


class TutorialForm(nn.Module):
    def __init__(self, source: GRUClassifier) -> None:
        super().__init__()
        self.hidden_size = source.hidden_size
        self.gru: GRUCell = source.gru
        self.fc = source.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.size(0), self.hidden_size)
        for t in range(x.size(1)):
            h = self.gru(x[:, t, :], h)
        return self.fc(h)


class TimeMajorForm(TutorialForm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.transpose(0, 1)
        h = torch.zeros(x.size(0), self.hidden_size)
        for t in range(steps.size(0)):
            h = self.gru(steps[t], h)
        return self.fc(h)


class MergedForm(TutorialForm):
    __constants__ = ["hidden_size"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cell = self.gru
        hidden = self.hidden_size
        steps = x.transpose(0, 1)
        w_x = torch.cat([cell.W_xz.weight, cell.W_xr.weight, cell.W_xh.weight], 0).t()
        b_x = torch.cat([cell.W_xz.bias, cell.W_xr.bias, cell.W_xh.bias], 0)
        w_h_zr = torch.cat([cell.W_hz.weight, cell.W_hr.weight], 0).t()
        w_hh = cell.W_hh.weight.t()
        h = torch.zeros(x.size(0), hidden)
        for t in range(steps.size(0)):
            gx = torch.addmm(b_x, steps[t], w_x)
            zr = torch.sigmoid(gx.narrow(1, 0, 2 * hidden) + torch.mm(h, w_h_zr))
            z = zr.narrow(1, 0, hidden)
            r = zr.narrow(1, hidden, hidden)
            h_tilde = torch.tanh(gx.narrow(1, 2 * hidden, hidden) + torch.mm(r * h, w_hh))
            h = (1 - z) * h + z * h_tilde
        return self.fc(h)


def session(graph: bytes):
    """An onnxruntime session on one thread (the CPU provider)."""
    import onnxruntime as ort

    from gru_deploy.check.runners import session_options

    return ort.InferenceSession(graph, session_options(1), providers=["CPUExecutionProvider"])


def form_graphs(model: GRUClassifier, spec) -> dict[str, bytes]:
    """Each form of `model` scripted and exported as an ONNX Loop, checked against the
    tutorial's eager code (1e-5)."""
    from gru_deploy.convert import script
    from gru_deploy.check.module_parity import UserSignature
    from gru_deploy.convert.pipeline import export_user_onnx

    forms = {"tutorial": TutorialForm(model), "time-major": TimeMajorForm(model),
             "merged in loop": MergedForm(model), "export form": model}
    check = torch.randn(3, 50, spec.input_size)
    with torch.no_grad():
        expected = tutorial_forward(model, check).numpy()
    graphs = {}
    for name, form in forms.items():
        graphs[name] = export_user_onnx(script.torchscript(form.eval()), UserSignature(**spec.signature()), 17)[0]
        got = session(graphs[name]).run(["logits"], {"x": check.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
    return graphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from gru_deploy.bench import median_us
    from gru_deploy.spec import ModelSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec()
    model = GRUClassifier().eval()
    graphs = form_graphs(model, spec)
    forms = list(graphs)
    runners = {name: session(graph) for name, graph in graphs.items()}
    rows = []
    for batch, seq in SHAPES:
        x = np.random.default_rng(seq).standard_normal((batch, seq, 8)).astype(np.float32)
        timings = {name: median_us(lambda: r.run(None, {"x": x}), args.budget) for name, r in runners.items()}
        rows.append({"batch": batch, "seq": seq, "median_us": timings,
                     "speedup_vs_tutorial": {k: timings["tutorial"] / v for k, v in timings.items()}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("onnxruntime Loop, median µs (speed-up vs the tutorial form), one thread")
    print(f"{'batch, seq':<12}" + "".join(f"{n:>24}" for n in forms))
    for row in rows:
        print(f"{row['batch']:>4}, {row['seq']:<6}" + "".join(
            f"{row['median_us'][n]:>15,.0f} ({row['speedup_vs_tutorial'][n]:>4.2f}x)" for n in forms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
