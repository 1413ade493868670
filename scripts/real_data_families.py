"""Real-data check of the model families: train each on a data set through gru-deploy, export
it (--strategy auto), and measure test accuracy after export in every runtime the export
offers (TorchScript / eager, onnxruntime fp32 in the exported form, int8 where onnxruntime's
quantiser applies). Prints a markdown table; --json writes every number.

    .venv/bin/python scripts/real_data_families.py --data japanesevowels --json families.json

Needs the data set (japanesevowels: the `datasets` extra). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

CONFIGS = (  # name, family, layers, bidirectional
    ("tutorial, 1 layer", "tutorial", 1, False),
    ("tutorial cell, 2 layers", "tutorial", 2, False),
    ("tutorial cell, bidirectional", "tutorial", 1, True),
    ("torch.nn.GRU, 1 layer", "torch-gru", 1, False),
    ("torch.nn.GRU, 2 layers, bidirectional", "torch-gru", 2, True),
)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="japanesevowels")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime
    import torch

    import gru_deploy
    from gru_deploy.accuracy import deployment_accuracy
    from gru_deploy.cli import _train_options
    from gru_deploy.data import load_data
    from gru_deploy.manifest import read_manifest
    from gru_deploy.spec import ModelSpec
    from gru_deploy.train import train, train_family

    options = _train_options(args.data, None, None, None, args.seed)
    split = load_data(args.data, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, family, layers, bidirectional in CONFIGS:
            start = time.perf_counter()
            if family == "tutorial" and layers == 1 and not bidirectional:
                spec = ModelSpec(input_size=split.train.input_size, hidden_size=args.hidden_size,
                                 output_size=len(split.train.labels), labels=split.train.labels)
                ckpt = train(spec, split, options)
            else:
                ckpt = train_family(family, args.hidden_size, layers, bidirectional, split, options)
            trained_s = time.perf_counter() - start
            out = Path(tmp) / name.replace(" ", "_").replace(",", "").replace(".", "_")
            manifest = gru_deploy.export(checkpoint=ckpt, out=out, strategy="auto")
            manifest = read_manifest(out)
            accuracy = deployment_accuracy(out, args.data, seed=args.seed)
            worst = max(entry["max_abs"] for key, entry in manifest["parity"]["summary"].items()
                        if key.startswith("float64->"))
            rows.append({"model": name, "family": family, "layers": layers, "bidirectional": bidirectional,
                         "train_seconds": round(trained_s, 1), "accuracy_at_training": ckpt.metrics["test_accuracy"],
                         "strategy": manifest["strategy"], "auto_median_us": manifest["auto"]["median_us"],
                         "parity_worst_float64_max_abs": worst, "test_samples": accuracy["test_samples"],
                         "runtimes": accuracy["runtimes"], "notes": accuracy.get("notes", [])})
            print(f"{name}: {json.dumps(rows[-1]['runtimes'])}", flush=True)
    record = {"data": args.data, "hidden_size": args.hidden_size, "seed": args.seed, "epochs": options.epochs,
              "machine": _cpu(), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.data}, hidden {args.hidden_size}, {options.epochs} epochs, seed {args.seed}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}\n")
    print("| model | exported form (auto) | test accuracy: PyTorch | onnxruntime fp32 | int8 | float64 parity |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        runtimes = row["runtimes"]
        torch_row = runtimes.get("torchscript") or runtimes.get("eager")
        fp32 = next(v for k, v in runtimes.items() if "exported" in k)
        int8 = next((v for k, v in runtimes.items() if "int8" in k), None)
        print(f"| {row['model']} | {row['strategy']} | {torch_row['accuracy']:.1%} | {fp32['accuracy']:.1%} | "
              + (f"{int8['accuracy']:.1%}" if int8 else "n/a (no int8 GRU kernel)")
              + f" | {row['parity_worst_float64_max_abs']:.1e} |")


if __name__ == "__main__":
    main()
