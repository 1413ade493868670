"""The `gru-deploy` command line: thin commands over the library.

Exit codes: 0 ok; 1 a check failed (parity, checksum, guard); 2 bad input or usage;
130 interrupted. Errors are one line on stderr; `--debug` shows the traceback. torch,
onnx and onnxruntime are imported inside command bodies so `--help` stays fast.
"""

from __future__ import annotations

import errno
import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from gru_deploy.versions import __version__
from gru_deploy.errors import CheckFailed, GruDeployError, UserInputError

DATA_DEFAULTS = {
    # The tutorial's own run: 20 full-batch epochs of Adam at lr 1e-3.
    "seed-random": {"epochs": 20, "batch_size": 1000, "lr": 1e-3},
}
GENERIC_DEFAULTS = {"epochs": 20, "batch_size": 64, "lr": 1e-2}
# Real data sets (.ts): small, so more epochs and smaller batches; normalised per channel.
REAL_DEFAULTS = {"epochs": 40, "batch_size": 16, "lr": 1e-2}
REAL_DATA = ("basicmotions", "japanesevowels")


def _say(ctx_obj: dict[str, Any], message: str) -> None:
    if not ctx_obj.get("quiet"):
        click.echo(message, err=True)


def _progress(ctx_obj: dict[str, Any], message: str) -> None:
    """Step-by-step progress: on a terminal only, like progress bars."""
    if not ctx_obj.get("quiet") and sys.stderr.isatty():
        click.echo(message, err=True)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="gru-deploy")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Take an explicit-loop GRU classifier from PyTorch to ONNX and the runtimes it ships to.

    \b
    Typical use:
      gru-deploy train --out checkpoint.pt          # or bring your own checkpoint
      gru-deploy export --checkpoint checkpoint.pt  # -> exported/
      gru-deploy verify exported/                   # parity gate for CI (exit 0/1)

    Exit codes: 0 ok, 1 a check failed, 2 bad input or usage, 130 interrupted.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _train_options(data: str, epochs: int | None, batch_size: int | None, lr: float | None, seed: int,
                   normalize: bool | None = None):
    from gru_deploy.train import TrainOptions

    real = data in REAL_DATA or data.endswith(".ts")
    defaults = DATA_DEFAULTS.get(data, REAL_DEFAULTS if real else GENERIC_DEFAULTS)
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    return TrainOptions(**{k: defaults[k] if v is None else v for k, v in given.items()}, seed=seed,
                        normalize=real if normalize is None else normalize)


def _train(data: str, hidden_size: int, options: Any, test_fraction: float, quiet: bool, test: str | None = None,
           family: tuple[str, int, bool] | None = None):
    from gru_deploy.data import load_data
    from gru_deploy.spec import ModelSpec
    from gru_deploy.train import stderr_progress, train, train_family

    split = load_data(data, seed=options.seed, test_fraction=test_fraction, test=test)
    progress, close = stderr_progress(options.epochs, quiet)
    try:
        if family is not None:
            return train_family(family[0], hidden_size, family[1], family[2], split, options, progress=progress)
        spec = ModelSpec(input_size=split.train.input_size, hidden_size=hidden_size,
                         output_size=len(split.train.labels), labels=split.train.labels)
        return train(spec, split, options, progress=progress)
    finally:
        close()


def _retired_strategy(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "scan":
        raise click.BadParameter("scan is retired: it was never the fastest form in `gru-deploy bench` "
                                 "(docs/performance.md) and no runtime needs it; use fused (fastest), stepwise, "
                                 "loop (int8) or auto", ctx=ctx, param=param)
    return value


@cli.command()
@click.option("--data", default="synthetic", show_default=True, metavar="NAME|PATH",
              help="Built-in data set (synthetic, seed-random; basicmotions, japanesevowels with the "
                   "datasets extra), an .npz with x [N,T,I] float32, y [N] int, optional labels and "
                   "lengths, or a UEA/UCR .ts file.")
@click.option("--test", "test_path", default=None, metavar="PATH_TEST.ts",
              help="With --data PATH_TRAIN.ts: the test split (else --test-fraction is held out).")
@click.option("--normalize/--no-normalize", default=None,
              help="Per-channel normalisation learned on the training split, baked into the model "
                   "[default: on for .ts and real data sets, off otherwise].")
@click.option("--epochs", type=int, default=None, help="Training epochs [default: 20].")
@click.option("--hidden-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Minibatch size [default: 64; seed-random: 1000, the tutorial's full batch].")
@click.option("--lr", type=float, default=None,
              help="Adam learning rate [default: 0.01; seed-random: 0.001 as in the tutorial].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data, init and shuffling.")
@click.option("--test-fraction", type=float, default=0.2, show_default=True,
              help="Share of the data held out for test accuracy (.npz and synthetic).")
@click.option("--family", type=click.Choice(["tutorial", "torch-gru"]), default="tutorial", show_default=True,
              help="tutorial: the tutorial's GRU cell in an explicit loop; torch-gru: torch.nn.GRU. Both with a "
                   "Linear head on the last layer's final state(s).")
@click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Stacked GRU layers.")
@click.option("--bidirectional", is_flag=True, help="Run each layer in both directions.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("checkpoint.pt"),
              show_default=True, help="Checkpoint file to write (atomically).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_obj
def train(obj: dict, data: str, test_path: str | None, normalize: bool | None, epochs: int | None,
          hidden_size: int, batch_size: int | None, lr: float | None, seed: int, test_fraction: float, family: str,
          layers: int, bidirectional: bool, out: Path, quiet: bool, as_json: bool) -> None:
    """Train the GRU classifier and write a checkpoint.

    The checkpoint holds the state_dict (the tutorial's parameter names), the config,
    labels, training metrics and library versions; it is read back with
    torch.load(weights_only=True). With --layers N, --bidirectional or --family torch-gru
    it holds a built-in family's model instead (its name and constructor arguments), which
    `gru-deploy export --checkpoint` exports through the same path as your own model.

    \b
    Example:
      gru-deploy train --data synthetic --epochs 20 --out checkpoint.pt
      gru-deploy train --data japanesevowels --hidden-size 32 --out jv.pt
      gru-deploy train --data TRAIN.ts --test TEST.ts
      gru-deploy train --data japanesevowels --layers 2 --out jv2.pt
      gru-deploy train --data japanesevowels --family torch-gru --bidirectional --out jvt.pt
    """
    obj["quiet"] = quiet or as_json
    options = _train_options(data, epochs, batch_size, lr, seed, normalize)
    tutorial = family == "tutorial" and layers == 1 and not bidirectional
    ckpt = _train(data, hidden_size, options, test_fraction, obj["quiet"], test_path,
                  family=None if tutorial else (family, layers, bidirectional))
    config = (ckpt.spec.to_dict() if tutorial
              else {"family": ckpt.family, "model_args": ckpt.model_args, "labels": list(ckpt.labels)})
    sha = ckpt.save(out)
    result = {"checkpoint": str(out), "sha256": sha, "config": config,
              "metrics": {k: v for k, v in ckpt.metrics.items() if k != "loss_history"}}
    if as_json:
        _emit_json(result)
    else:
        m = ckpt.metrics
        click.echo(f"wrote {out}: train accuracy {m['train_accuracy']:.1%}, "
                   f"held-out accuracy {m['test_accuracy']:.1%}, final loss {m['final_loss']:.4f}")


@cli.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint to export (gru-deploy's, a built-in family's from `train --layers/"
                   "--bidirectional/--family`, or the tutorial's plain state_dict). "
                   "Without it the default model is trained first.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("exported"),
              show_default=True, help="Export folder; replaced as a whole only when every check passes.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13..20 verified).")
@click.option("--strategy", type=click.Choice(["loop", "fused", "stepwise", "auto", "scan"]), default="loop",
              show_default=True, metavar="[loop|fused|stepwise|auto]", callback=_retired_strategy,
              help="ONNX form of the classifier, stream and lengths models: loop (the scripted loop as an ONNX "
                   "Loop, input projections hoisted before it), stepwise (the same Loop with each step's input "
                   "projection inside it: faster at large batch x long sequences), fused (ONNX's GRU operator), "
                   "auto (check each, time them at each model's typical workload, keep the fastest). A built-in "
                   "family or --model exports as loop, fused (the tutorial cell families and torch.nn.GRU), stepwise "
                   "(the tutorial cell families) or auto.")
@click.option("--typical-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size that --strategy auto times.")
@click.option("--typical-seq", type=click.IntRange(min=1), default=100, show_default=True,
              help="Sequence length that --strategy auto times.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Parity gate: absolute tolerance.")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Parity gate: relative tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed when training the default model.")
@click.option("--model", "model_ref", default=None, metavar="FILE.py:NAME|PKG.MODULE:NAME",
              help="Your own recurrent model instead of the tutorial's: a class or a factory returning a "
                   "torch.nn.Module. gru-deploy imports and runs that code (it is yours: only name code you "
                   "trust); --checkpoint holds its state_dict (and optionally its constructor arguments "
                   "under model_args) and is loaded with weights_only=True.")
@click.option("--model-args", default=None, metavar="JSON",
              help="With --model: constructor keyword arguments as a JSON object (over the checkpoint's).")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="With --model: input channels, when they cannot be read off the model's first layer.")
@click.option("--output-names", default=None, metavar="A,B,...",
              help="With --model: names of the outputs [default: logits for one output, output_0, ... for "
                   "several].")
@click.option("--targets", default="", metavar="torch-export,aoti,executorch",
              help="What to build beside ONNX and TorchScript (always written), comma-separated: torch-export "
                   "(model*.pt2, a torch.export program per variant, batch and seq dynamic, its time loop a "
                   "torch.while_loop), aoti (model.aoti.pt2, the classifier's program compiled by AOTInductor for "
                   "libtorch without Python: needs g++, 20-30 s; writes the program it compiles too), executorch "
                   "(model.{portable,xnnpack}.pte and model_step.*.pte: the classifier, its loop a scan, and the "
                   "stream's one step, for ExecuTorch's runtime at a static batch; needs the executorch extra). Each "
                   "is proved like the ONNX files. For the built-in families: the tutorial classifier and `train --layers N "
                   "[--bidirectional] [--family torch-gru]` models (a bidirectional model has no stream variant); and "
                   "your own module written with torch.while_loop or scan (its programs are always written, in place "
                   "of TorchScript, which cannot compile it).")
@click.option("--onnx-exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript",
              show_default=True,
              help="What writes the loop form's ONNX graphs: torch.onnx's TorchScript-based exporter, or its successor, "
                   "the dynamo exporter (torch.export based), of the model's control-flow form (its loop a "
                   "torch.while_loop, kept an ONNX Loop); proved alike, and auto weighs it like any loop. dynamo: for "
                   "the built-in families (the tutorial classifier, `train` models); your own module written with "
                   "torch.while_loop or scan always takes it.")
@click.option("--executorch-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --targets executorch: the rows per call of its programs (ExecuTorch plans memory for a "
                   "static batch, and answers another wrongly without an error: gru-deploy runs other batches in "
                   "calls of it).")
@click.option("--executorch-max-seq", type=click.IntRange(min=1), default=2048, show_default=True,
              help="With --targets executorch: the longest sequence its classifier takes (recorded in the "
                   "manifest; a longer one is refused).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON on stdout.")
@click.pass_obj
def export(obj: dict, checkpoint: Path | None, out: Path, opset: int, strategy: str, typical_batch: int,
           typical_seq: int, atol: float, rtol: float, seed: int, model_ref: str | None, model_args: str | None,
           input_size: int | None, output_names: str | None, targets: str, onnx_exporter: str,
           executorch_batch: int, executorch_max_seq: int, quiet: bool, as_json: bool) -> None:
    """Script the model, export it to ONNX and prove parity; write the export folder.

    \b
    Writes into --out:
      model.pt       TorchScript (torch.jit.script; the time loop is a prim::Loop)
      model.onnx     ONNX, input x [batch, seq, I], dynamic batch and seq; a Loop
                     (--strategy loop, stepwise) or ONNX's GRU operator (fused)
      model_stream.* (x, h0) -> (logits, h_n), and model_lengths.* (x, lengths) ->
                     logits: TorchScript and ONNX, in the same form
      model*.ort     ORT format of the classifier and stream models
      model*.pt2     with --targets torch-export: torch.export programs (torch.export.load)
      model.aoti.pt2 with --targets aoti: an AOTInductor package (libtorch, no Python)
      *.pte          with --targets executorch: ExecuTorch programs (portable, XNNPACK)
      parity.json    eager vs TorchScript vs onnxruntime vs onnx reference vs float64
      manifest.json  signature, opset, sha256 of every file, config, labels, metrics, versions
    An element fails parity only when it exceeds both --atol and --rtol. Exit 1 (and
    nothing written) when a guard or the parity gate fails.

    With --model, your own module: its recurrence must run over x's time axis (a loop over
    x.size(1), or torch.nn.GRU/LSTM): a loop with a fixed trip count is refused (exit 1,
    naming the line), a module TorchScript cannot compile is exit 2 with TorchScript's message.
    Its outputs (any number, [batch, ...] or per step [batch, seq, ...]) are read off the
    module; parity of every output is proved against the module run in float64 up to 2,048
    steps, and stored (reference_float64.npz) for verify. Every model takes one pipeline (the
    tutorial classifier, a built-in family's checkpoint: stacked or bidirectional tutorial
    cells, torch.nn.GRU; your own module); the tutorial classifier is proved on its own grid
    (up to 2,048 steps, empty sequences, float32's noise ceiling).

    \b
    Example:
      gru-deploy export --checkpoint checkpoint.pt --out exported/ --json
      gru-deploy export --checkpoint checkpoint.pt --strategy auto --typical-batch 32
      gru-deploy export --model my_models.py:TwoLayerGRU --checkpoint ck.pt --out mine/
      gru-deploy train --layers 2 --out two.pt && gru-deploy export --checkpoint two.pt --strategy auto
      gru-deploy export --checkpoint checkpoint.pt --targets torch-export
    \f
    Over 60 lines: the command's usage checks, the untrained default, and its human and --json
    summaries; the work is api.export.
    """
    import gru_deploy
    from gru_deploy.check.grid import check_tolerances, tolerance_line
    from gru_deploy.check.timing import measuring, stage, stage_line
    from gru_deploy.convert.graphs import check_opset
    from gru_deploy.convert.programs import check_targets
    from gru_deploy.models.user import parse_model_args

    obj["quiet"] = quiet or as_json
    check_opset(opset)
    check_tolerances(atol, rtol)
    wanted = tuple(t.strip() for t in targets.split(",") if t.strip())
    check_targets(wanted)
    if model_ref is None:
        for name, value in (("--model-args", model_args), ("--input-size", input_size),
                            ("--output-names", output_names)):
            if value is not None:
                raise UserInputError(f"{name} applies to your own model: give --model FILE.py:NAME too")
    elif checkpoint is None:
        raise UserInputError("--model needs --checkpoint: the state_dict of your trained model "
                             "(torch.save({'state_dict': model.state_dict(), 'model_args': {...}}, 'ck.pt'))")
    source: Any = checkpoint
    with measuring() as clock:
        if model_ref is None and checkpoint is None:
            _say(obj, "no --checkpoint given: training the default model on the synthetic data set first "
                      f"(seed {seed}; use `gru-deploy train` to keep a checkpoint)")
            with stage("train"):
                source = _train("synthetic", 16, _train_options("synthetic", None, None, None, seed), 0.2,
                                obj["quiet"])
            _say(obj, f"trained: held-out accuracy {source.metrics['test_accuracy']:.1%}")
        manifest = gru_deploy.export(
            model_ref, checkpoint=source, out=out, model_args=parse_model_args(model_args) if model_ref else None,
            input_size=input_size, output_names=[n.strip() for n in output_names.split(",")] if output_names else None,
            strategy=strategy, opset=opset, atol=atol, rtol=rtol, typical=(typical_batch, typical_seq),
            on_step=lambda m: _progress(obj, m), targets=wanted, executorch_batch=executorch_batch,
            executorch_max_seq=executorch_max_seq, onnx_exporter=onnx_exporter)
    times = clock.record()
    if as_json:
        keys = ["strategy", "auto", "opset", "files", "parity"] + (
            ["model", "signature"] if "model" in manifest else [])
        _emit_json({"out": str(out), **{k: manifest[k] for k in keys},
                    "metrics": {k: v for k, v in manifest["metrics"].items() if k != "loss_history"},
                    "stage_seconds": times})
        return
    for note in manifest["notes"]:
        _say(obj, f"note: {note}")
    if manifest["auto"]:
        auto = manifest["auto"]
        times = ", ".join(f"{k} {v:,.0f} µs" for k, v in auto["median_us"].items())
        if auto.get("retimed"):
            times += "; within 20%, timed again: " + ", ".join(
                f"{k} {v:,.0f} µs" for k, v in auto["retimed"]["median_us"].items())
        click.echo(f"auto: at batch {auto['typical_batch']}, seq {auto['typical_seq']}: {times}; kept {auto['chosen']}")
    model = manifest.get("model") or {}  # what the export records of the module it came from
    outputs = ", ".join(f"{o['name']} {o['shape']}" for o in manifest["signature"]["outputs"])
    what = [model["reference"], f"recurrence kept as {model['recurrence']}"] if model else []
    what += [f"strategy {manifest['strategy']}", f"outputs {outputs}"]
    click.echo(f"wrote {out}/ ({'; '.join(what)}): " + ", ".join(sorted(manifest["files"]) + ["manifest.json"]))
    summary = manifest["parity"]["summary"]
    worst_pair = max(summary, key=lambda k: summary[k]["max_abs"])
    cases = len(json.loads((out / "parity.json").read_text())["cases"])
    click.echo(f"parity holds: {len(summary)} comparisons over {cases} cases; worst max abs error "
               f"{summary[worst_pair]['max_abs']:.2e} ({worst_pair}); {tolerance_line(manifest['parity'])}; "
               f"details in {out / 'parity.json'}")
    _say(obj, stage_line(times))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--atol", type=float, default=1e-5, show_default=True,
              help="Absolute tolerance (export folders; a bundle uses its manifest's).")
@click.option("--rtol", type=float, default=1e-5, show_default=True,
              help="Relative tolerance (export folders; a bundle uses its manifest's).")
@click.option("--data", default=None, metavar="NAME|PATH",
              help="Also report a classifier's accuracy on this data set's test split (as in train --data): "
                   "TorchScript, onnxruntime fp32 (the exported form; every form and eager where gru-deploy "
                   "rebuilds the model) and int8, with agreement with TorchScript.")
@click.option("--test", "test_path", default=None, metavar="PATH_TEST.ts", help="With --data PATH_TRAIN.ts.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (progress shows per case, on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout (also on failure).")
@click.option("--junit-xml", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Also write the parity report as JUnit XML for CI, one testcase per case and runner pair "
                   "(export folders; written also when parity fails).")
@click.option("--trust-torchscript", is_flag=True,
              help="Bundles: also load and run their TorchScript models and AOTInductor packages. torch.jit.load "
                   "runs code from the file and a package is a shared library: use it only on a bundle you made or "
                   "trust (without it they are listed as not run).")
@click.pass_obj
def verify(obj: dict, path: Path, atol: float, rtol: float, data: str | None, test_path: str | None, quiet: bool,
           as_json: bool, junit_xml: Path | None, trust_torchscript: bool) -> None:
    """Check an export folder or a bundle (folder or .tar.gz). Exit 0 when it holds, 1 when not.

    An export folder, from its files alone, every model alike: every checksum, then on the
    grid the export recorded, TorchScript (model*.pt) against onnxruntime, the ORT-format copy
    and onnx's ReferenceEvaluator, and each against the float64 answers the export stored
    (reference_float64.npz; the tutorial model's: batch {1,3,64} x seq {0,1,7,100,1000} plus
    2,048 steps, widened for float32's own error); every variant on its grid; the stream fed in
    chunks of 1, 7 and 100.

    A bundle: manifest schema, every checksum, no extra or missing file, each model loads
    in its runtime, the golden vectors reproduce within the manifest's tolerances, int8
    models pass their gate again. An archive is inspected whole and only then extracted, to
    a temporary folder. Its TorchScript models and AOTInductor packages are not loaded unless
    --trust-torchscript (torch.jit.load runs code from the file; a package is a shared
    library); they are listed as not run.

    \b
    Examples:
      gru-deploy verify exported/ --json > parity.json
      gru-deploy verify exported-edge.tar.gz
    \f
    Over 60 lines: the usage checks and the printing of three reports (a bundle's checks, a
    module export's pairs, the tutorial grid's cases); the checks are api.verify.
    """
    import gru_deploy
    from gru_deploy.bundle.read import first_failure, is_bundle
    from gru_deploy.check.grid import failure_lines, tolerance_line
    from gru_deploy.check.timing import stage_line

    obj["quiet"] = quiet or as_json
    ctx = click.get_current_context()
    if is_bundle(path):
        given = [f"--{name.replace('_path', '').replace('_', '-')}"
                 for name in ("atol", "rtol", "data", "test_path", "junit_xml")
                 if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to export folders (the parity grid); a bundle is "
                                   "checked against its golden vectors and the tolerances its manifest records")
        report = gru_deploy.verify(path, trust_torchscript=trust_torchscript)
        if as_json:
            _emit_json(report)
        else:
            if report["passed"]:
                click.echo(f"bundle {path} ({report['target']}): {len(report['checks'])} checks passed")
            for check in report["checks"]:
                if not check["passed"]:
                    click.echo(f"FAIL {check['check']}: {check['message']}")
            for entry in report["not_run"]:
                click.echo(f"not run: {entry['check']}: {entry['why']}")
        if not report["passed"]:
            raise CheckFailed(f"bundle {path} fails: {first_failure(report)}")
        return
    if trust_torchscript:
        raise click.UsageError("--trust-torchscript applies to bundles; an export folder's TorchScript (your own "
                               "export's) is one side of its parity grid and is always loaded")
    report = gru_deploy.verify(path, atol, rtol, data=data, test=test_path, junit_xml=junit_xml,
                               on_case=lambda m: _progress(obj, m))
    accuracy = report["deployment_accuracy"]
    if as_json:
        _emit_json(report)
    else:
        def number(value: Any) -> str:
            return "inf" if value is None else f"{value:.2e}"

        for pair, s in report["summary"].items():
            click.echo(f"{'ok  ' if s['passed'] else 'FAIL'} {pair:<42} max abs {number(s['max_abs'])}  "
                       f"p99 abs {number(s['p99_abs'])}  min atol {number(s['min_atol'])}  "
                       f"atol applied {number(s['applied_atol'])}  "
                       f"argmax {s['argmax_agreement']:.0%}  ({s['cases']} cases)")
        for case in report.get("unverifiable") or []:
            click.echo(f"UNVERIFIABLE {case['variant']} batch={case['batch']} seq={case['seq']}: "
                       + "; ".join(f"{out}: {why}" for out, why in case["outputs"].items()))
        if accuracy:
            click.echo(f"accuracy on {accuracy['data']} test split ({accuracy['test_samples']} samples"
                       f"{', each at its own length' if accuracy.get('variable_length') else ''}):")
            for name, row in accuracy["runtimes"].items():
                side = accuracy["reference"]
                click.echo(f"  {name:<36} {row['accuracy']:.1%}  (agrees with {side} on "
                           f"{row[f'agreement_with_{side}']:.1%})")
            for note in accuracy.get("notes") or []:
                click.echo(f"  note: {note}")
    if not report["passed"]:
        raise CheckFailed(f"parity failed for {path}: " + "; ".join(failure_lines(report["summary"])))
    if not as_json:
        click.echo(f"parity holds for {path}: {tolerance_line(report)}")
        if "stage_seconds" in report:
            _say(obj, stage_line(report["stage_seconds"]))


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["edge", "server"]), required=True,
              help="edge: ONNX + ORT format for onnxruntime-web/mobile; server: a Triton model repository.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder (or .tar.gz with --archive) [default: FOLDER-TARGET beside FOLDER].")
@click.option("--archive", is_flag=True, help="Write one deterministic .tar.gz instead of a folder.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="edge only: add int8 models (onnxruntime dynamic quantisation of the Loop form, its body "
                   "included), gated against the fp32 model on 280 sequences of 1-2,048 steps (95th "
                   "percentile error, per-length median, class agreement). Refused where under half the weight "
                   "bytes would be int8 (a fused export: onnxruntime has no int8 GRU kernel).")
@click.option("--check-with", "check_with", multiple=True, metavar="PYTHON",
              help="Also run the golden vectors on every .onnx/.ort model with this Python interpreter (e.g. a "
                   "venv holding another onnxruntime; needs numpy and onnxruntime there) and record the result "
                   "in the manifest. Repeatable; a failure writes nothing.")
@click.option("--storage-uri", default=None, metavar="URI",
              help="server: where KServe reads the model repository (gs://, s3://, pvc://...; the folder holding "
                   "model_repository/'s model folders) in deploy/kserve-inferenceservice.yaml.  "
                   "[default: pvc://gru-deploy-models/NAME/model_repository]")
@click.option("--image", default=None, metavar="IMAGE",
              help="server: the image deploy/gru-deploy-serve.yaml runs (build it with deploy/Dockerfile).  "
                   "[default: gru-deploy-serve:VERSION]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle manifest as JSON on stdout.")
@click.pass_obj
def package(obj: dict, folder: Path, target: str, out: Path | None, archive: bool, quantize: str | None,
            check_with: tuple[str, ...], storage_uri: str | None, image: str | None, force: bool, quiet: bool,
            as_json: bool) -> None:
    """Bundle an export folder for the runtimes it ships to, with manifest, checksums and golden vectors.

    Reads FOLDER only through its manifest, checking every sha256 first. Every bundle holds
    manifest.json (signatures, labels, opset and IR of each ONNX file, minimum onnxruntime,
    sha256 and size of every file, the source export's manifest hash, parity, versions),
    golden/ (fixed inputs and eager PyTorch's outputs as .npy and JSON) and README.txt.

    \b
    edge    each variant's .onnx (classifier, lengths, stream) with the .ort copies the
            export made, required_operators.config, a web page (onnxruntime-web)
    server  model_repository/ for Triton: ONNX classifier, lengths and stream models
            (sequence batcher, implicit state) and the TorchScript classifier and lengths
            models (pytorch_libtorch);
            deploy/: a KServe InferenceService (Triton runtime, --storage-uri), a
            Kubernetes Deployment + Service running `gru-deploy serve` (--image), and
            the Dockerfile of that image

    \b
    Examples:
      gru-deploy package exported/ --target edge
      gru-deploy package exported/ --target edge --quantize int8
      gru-deploy package exported/ --target server --archive --out server.tar.gz
    """
    import gru_deploy

    obj["quiet"] = quiet or as_json
    written, manifest = gru_deploy.package(folder, target, out=out, archive=archive, force=force,
                                           on_step=lambda m: _progress(obj, m), quantize=quantize,
                                           check_with=check_with, storage_uri=storage_uri, image=image)
    if as_json:
        _emit_json({"out": str(written), **manifest})
        return
    from gru_deploy.bundle.quantize import recorded_gates

    for name, q in ((manifest.get("quantization") or {}).get("models") or {}).items():
        for output, g in recorded_gates(q).items():
            longest = max(c[1] for c in g["inputs"]["cases"])
            click.echo(f"int8 {name}: {q['weight_bytes_quantized_share']:.0%} of weight bytes int8, "
                       f"{q['size_before']:,} -> {q['size_after']:,} bytes; {output} vs {g.get('reference', 'eager')} "
                       f"on {g['rows']:,} rows of 1-{longest:,} steps: p{g['error_quantile']:g} abs "
                       f"{g['quantile_abs']:.3g} (bound {g['max_abs_bound']:.3g}; worst row {g['max_abs']:.3g}), "
                       f"argmax agreement {g['argmax_agreement']:.1%} (at least {g['min_argmax_agreement']:.0%})")
    for run in manifest["onnxruntime"]["checked_with"]:
        click.echo(f"golden vectors pass in onnxruntime {run['onnxruntime']} ({run['python']}): {run['cases']} runs")
    total = sum(entry["size"] for entry in manifest["files"].values())
    click.echo(f"wrote {written} ({target}): {len(manifest['files']) + 1} files, {total:,} bytes; "
               f"check it with `gru-deploy verify {written}`")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="x as .npy: float32 [batch, seq, input_size].")
@click.option("--lengths", "lengths_path", type=click.Path(path_type=Path), default=None,
              help="int64 [batch] .npy: valid steps per sample of a padded x (0..seq).")
@click.option("--state-in", type=click.Path(path_type=Path), default=None,
              help="h0 as .npy float32 [batch, hidden] for streaming (zeros when omitted).")
@click.option("--state-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the final state h_n here (.npy), to feed the next chunk as --state-in.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Which model runs: fp32, or the int8 one of an edge bundle packaged with --quantize int8.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--quiet", "-q", is_flag=True, help="Do not say which model file ran (on stderr).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the model file and precision that ran, predictions, probabilities and logits as JSON.")
def infer(folder: Path, input_path: Path, lengths_path: Path | None, state_in: Path | None,
          state_out: Path | None, precision: str, threads: int, quiet: bool, as_json: bool) -> None:
    """Run onnxruntime on an export folder or a bundle and print predictions with their labels.

    The plain classifier runs by default; with --lengths the variable-length model
    (padded batches); with --state-in/--state-out the streaming model, one chunk per call.
    The model file is the one the manifest lists for that variant and --precision (fp32
    unless asked); the output names it. Inputs are validated before onnxruntime sees them
    (exit 2 with one line when wrong).

    \b
    Examples:
      gru-deploy infer exported/ --input x.npy --json
      gru-deploy infer exported/ --input padded.npy --lengths lengths.npy
      gru-deploy infer exported/ --input chunk1.npy --state-out h.npy
      gru-deploy infer exported/ --input chunk2.npy --state-in h.npy --state-out h.npy
    """
    from gru_deploy.serve.infer import choose, load_array, save_array
    from gru_deploy.serve.infer import infer as run_infer

    stream = state_in is not None or state_out is not None
    file = choose(folder, lengths_path is not None, stream, precision)  # what runs, before reading the inputs
    x = load_array(input_path, "--input")
    lengths = load_array(lengths_path, "--lengths") if lengths_path else None
    h0 = load_array(state_in, "--state-in") if state_in else None
    result = run_infer(folder, x, lengths=lengths, h0=h0, stream=stream, threads=threads, precision=precision,
                       file=file)
    if state_out is not None:
        save_array(state_out, result.state)
    if as_json:
        _emit_json(result.to_json())
        return
    if not quiet:
        click.echo(f"ran {result.model} ({result.precision}) in onnxruntime", err=True)
    for line in result.lines():
        click.echo(line)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads for torch and for each onnxruntime session.")
@click.option("--budget", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              help="Seconds spent measuring each (runtime, shape).")
@click.option("--no-large", is_flag=True, help="Skip the same model at hidden 256 / input 64.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG bar chart (needs matplotlib: pip install 'gru-deploy[plot]').")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.pass_obj
def bench(obj: dict, folder: Path | None, threads: int, budget: float, no_large: bool, plot: Path | None,
          quiet: bool, as_json: bool) -> None:
    """Median latency of eager PyTorch, TorchScript and each ONNX strategy in onnxruntime.

    For the tutorial classifier and a built-in family's model (gru-deploy rebuilds it from the
    export's weights), in one run: eager (the model as its author wrote it: the tutorial's own
    loop; the reference), TorchScript, and every ONNX form the export pipeline builds (loop,
    fused, stepwise where they apply) in onnxruntime (one session each, --threads threads) at
    (batch, seq) = (1,1), (1,100), (32,100), (1,1000), (256,200), and the same model at hidden
    256 / input 64 at (1,100) and (64,100); prints medians with ratios to eager; reports the
    loop graph's cost at seq 1000 vs 2000 (batch 256) and whether it is linear (ratio under 3;
    a T-squared cost gives ~4), each form's streaming per-step cost and lengths model. FOLDER
    is an export folder (checksums are checked); without it, an untrained default model.
    Reports only: the exit code does not depend on the timings.

    On the export of your own model (its code is not run): its own models, TorchScript
    (model.pt, the reference) against onnxruntime at (1,1), (1,100), (32,100), (1,1000), its
    lengths model at (32,100) and its stream model per step (raw and through
    gru_deploy.Stream), where it has them.

    \b
    Example:
      gru-deploy bench exported/ --json > bench.json
    """
    from gru_deploy.bench import bench as measure

    obj["quiet"] = quiet or as_json
    result, table = measure(folder, threads=threads, budget_s=budget, large=not no_large, plot_path=plot,
                            progress=lambda m: _progress(obj, f"measuring {m}"), say=lambda m: _say(obj, m))
    if as_json:
        _emit_json(result)
    else:
        click.echo(table)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def inspect(path: Path, as_json: bool) -> None:
    """Show what an export folder, a bundle (folder or .tar.gz) or an .onnx file holds.

    Signature, labels, every file with its size and checksum status (ok, CHANGED,
    missing), and for each ONNX model its inputs, outputs, op types, opset and IR version.
    Runs nothing; use `gru-deploy verify` to check numbers.

    \b
    Examples:
      gru-deploy inspect exported/
      gru-deploy inspect exported/model.onnx --json
    """
    from gru_deploy.bundle.inspection import format_report, inspect_path

    report = inspect_path(path)
    if as_json:
        _emit_json(report)
    else:
        click.echo(format_report(report))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model-name", default=None,
              help="Base of the names in the URL: NAME (the classifier), NAME_lengths, NAME_stream  [default: "
                   "the bundle's Triton names: gru_classifier...; for a built-in family or your own model: model...].")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Samples grouped into one onnxruntime call, and the most one request may hold (the served "
                   "configs' max_batch_size); 1 turns dynamic batching off.  [default: each model's config.pbtxt: 64]")
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=None,
              help="How long a request may wait for others to batch with (only while another request is "
                   "queued or arriving; a lone request runs at once).  [default: the config's "
                   "max_queue_delay_microseconds: 1 ms]")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=8.0, show_default=True,
              help="Largest request body accepted (413 above it).")
@click.option("--max-seq", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Longest sequence accepted (413 above it).")
@click.option("--read-timeout-s", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="A request body that has not arrived by then gets 408 (slow clients).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Which models the manifest lists to serve (int8 only where they were packaged).")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Split each batch into onnxruntime calls of similar sequence length, shortest first, so a "
                   "short request never runs padded to a long one; --no-group-by-length pads the whole batch "
                   "to its longest request.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve the v2 gRPC protocol (inference.GRPCInferenceService; tritonclient.grpc works as "
                   "is) on this port, sharing the models, limits, batchers and metrics.  [default: REST only]")
@click.option("--max-sequences", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Live sequences (sequence_id ... sequence_end) whose state the server keeps; a new one beyond "
                   "this gets 429 (gRPC RESOURCE_EXHAUSTED).")
@click.option("--sequence-idle-s", type=click.FloatRange(min=0.01), default=None,
              help="A sequence with no request for this long is freed (a later chunk of it gets 400).  "
                   "[default: the stream model's config.pbtxt: 60]")
def serve(path: Path, host: str, port: int, model_name: str | None, max_batch: int | None,
          max_delay_ms: float | None, threads: int, max_body_mb: float, max_seq: int, read_timeout_s: float,
          precision: str, group_by_length: bool, grpc_port: int | None, max_sequences: int,
          sequence_idle_s: float | None) -> None:
    """Serve an export folder or bundle with the KServe v2 / Triton protocol: REST, and gRPC
    with --grpc-port.

    \b
    GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/NAME[/ready|/config|/stats]
    POST /v2/models/NAME/infer   every ONNX model of the bundle under its Triton name, with its
                                 config.pbtxt: NAME x FP32 [batch, seq, I]; NAME_lengths x
                                 padded + lengths INT64 [batch]; outputs logits (probabilities,
                                 label on request); JSON or the binary tensor extension
    gRPC inference.GRPCInferenceService (tritonclient.grpc works as is): the same calls
    GET  /metrics                Prometheus: requests, errors, latency, batch sizes, sequences
    Concurrent requests are batched into one onnxruntime call (padded with lengths for the
    lengths model; of one length for the classifier): each answer equals the one it gets
    alone. SIGTERM / Ctrl-C finish in-flight requests first.

    \b
    Sequences (Triton's sequence batcher): a request with parameters sequence_id,
    sequence_start, sequence_end sends one chunk x [1, steps, I] of a sequence; the server
    keeps its state (the stream variant) from start to end, so chunks answer as the whole
    sequence would. They go to NAME_stream (or NAME, with the parameters).
    Needs the serve extra: pip install 'gru-deploy[serve]'.

    \b
    Example:
      gru-deploy serve exported-server.tar.gz --port 8000 --grpc-port 8001
    """
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("aiohttp", "prometheus_client")):
        raise UserInputError("serve needs aiohttp and prometheus-client: pip install 'gru-deploy[serve]'")
    from gru_deploy.serve.server import Limits
    from gru_deploy.serve.run import serve as run_server

    limits = Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_seq=max_seq, read_timeout_s=read_timeout_s)
    run_server(path, host=host, port=port, model_name=model_name, max_batch=max_batch, max_delay_ms=max_delay_ms,
               threads=threads, limits=limits, print_fn=lambda m: click.echo(m, err=True), precision=precision,
               group_by_length=group_by_length, grpc_port=grpc_port, max_sequences=max_sequences,
               sequence_idle_s=sequence_idle_s)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map errors to one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if hasattr(signal, "SIGXFSZ"):
        # Past a file size limit, fail the write (EFBIG, reported as one line) instead of dying.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cli.main(args=args, prog_name="gru-deploy", standalone_mode=False)
    except GruDeployError as exc:
        if debug:
            raise
        click.echo(f"gru-deploy: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if debug:
            raise
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"gru-deploy: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if debug or exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise
        click.echo(f"gru-deploy: error: cannot write {exc.filename or 'output'}: {exc.strerror}; "
                   "earlier results are left as they were", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("gru-deploy: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
