"""Benchmark harness: medians over repeats, ratios to a reference measured in the same run.

One bench for every model gru-deploy can rebuild from an export (the tutorial classifier, a
built-in family: models.user.rebuild) or none (the default-size tutorial model, untrained):
every variant in every form the export pipeline builds (convert.pipeline.every_form), beside
eager PyTorch (the model as its author wrote it: models.user.baseline) and TorchScript. Your
own model's export is timed from its files (run_module_bench): its code is not run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.timing import median_us  # noqa: F401  (here too: scripts and tests import it from bench)
from gru_deploy.errors import UserInputError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from gru_deploy.convert.pipeline import Built
    from gru_deploy.models.user import UserModel
    from gru_deploy.spec import ModelSpec


SHAPES = ((1, 1), (1, 100), (32, 100), (1, 1000), (256, 200))
LARGE_SHAPES = ((1, 100), (64, 100))  # for the same model at hidden 256 / input 64
LARGE_SIZES = (64, 256)  # input, hidden
SCALING = (256, (1000, 2000))  # batch, seq lengths: is the loop's cost linear in T?
# Doubling T doubles a linear loop's time (ratio 2); the tutorial's batch-major slicing, whose
# cost grows with T², measured 3.8 (docs/performance.md). Below this ratio we call it linear.
LINEAR_BELOW = 3.0


def default_model() -> "UserModel":
    """The default-size tutorial classifier, untrained (seed 0; speed does not depend on the weights)."""
    import torch

    from gru_deploy.models import tutorial
    from gru_deploy.models.user import UserModel

    torch.manual_seed(0)
    return UserModel(tutorial.GRUClassifier().eval(), "gru_deploy.models.tutorial:GRUClassifier", tutorial.__file__)


def default_graphs() -> tuple["ModelSpec", dict[str, bytes]]:
    """The default-size model and its classifier's ONNX forms: what the benchmark scripts time."""
    from gru_deploy.convert.pipeline import every_form
    from gru_deploy.spec import ModelSpec

    forms = every_form(default_model())["classifier"]
    return ModelSpec(), {form: built.onnx_bytes for form, built in forms.items()}


def _session_call(built: "Built", threads: int) -> Callable[[dict[str, "np.ndarray"]], Any]:
    """A form's onnxruntime session as a call of its feed, the inputs checked first as infer
    checks them (check.runners.check_user_*): what a user's call costs."""
    import onnxruntime as ort

    from gru_deploy.check.runners import check_user_feed, session_options
    from gru_deploy.spec import LENGTHS_NAME, STATE_IN

    signature = built.signature.to_dict()
    session = ort.InferenceSession(built.onnx_bytes, session_options(threads), providers=["CPUExecutionProvider"])

    def run(feed: dict[str, "np.ndarray"]) -> Any:
        return session.run(None, check_user_feed(feed["x"], signature, True, feed.get(LENGTHS_NAME),
                                                 feed.get(STATE_IN)))
    return run


def _contenders(model: "UserModel", forms: dict[str, "Built"], threads: int) -> dict[str, Callable]:
    """Callables of x (float32 numpy): eager, TorchScript and onnxruntime in each form."""
    import torch

    from gru_deploy.models.user import baseline

    eager, _ = baseline(model.module)
    scripted = next(iter(forms.values())).scripted

    def torch_call(fn: Callable) -> Callable:
        def run(x):
            with torch.no_grad():
                return fn(torch.from_numpy(x))
        return run

    found: dict[str, Callable] = {"eager": torch_call(eager), "torchscript": torch_call(scripted)}
    for form, built in forms.items():
        call = _session_call(built, threads)
        found[f"onnxruntime {form}"] = (lambda c: lambda x: c({"x": x}))(call)
    return found


def _sizes(model: "UserModel") -> tuple[int, int]:
    from gru_deploy.models.user import input_size_of

    hidden = getattr(model.module, "hidden_size", None) or model.args.get("hidden_size")
    return int(input_size_of(model.module) or 0), int(hidden or 0)


def _rows(contenders: dict[str, Callable], sizes: tuple[int, int], shapes, budget_s: float,
          progress: Callable[[str], None]) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for batch, seq in shapes:
        x = np.random.default_rng(batch * 7919 + seq).standard_normal((batch, seq, sizes[0])).astype(np.float32)
        progress(f"batch {batch}, seq {seq}")
        timings = {name: median_us(lambda: fn(x), budget_s) for name, fn in contenders.items()}
        fastest = min(timings.values())
        rows.append({
            "input_size": sizes[0], "hidden_size": sizes[1], "batch": batch, "seq": seq,
            "median_us": timings,
            "speedup_vs_eager": {k: timings["eager"] / v for k, v in timings.items()},
            "times_fastest": {k: v / fastest for k, v in timings.items()},
        })
    return rows


def gru_step_reference(module: Any, threads: int) -> Callable[[], object] | None:
    """The floor for one streaming step: one ONNX `GRU` node (seq 1, batch 1, no head, no guard)
    with the first cell's weights, run with io_binding, its state ping-ponged between two bound
    buffers; None for a model whose cell is not the tutorial's (models.families.cell_layers)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gru_deploy.check.runners import session_options
    from gru_deploy.convert.graphs import float32_arrays, min_ir_version, tutorial_cell_gru_weights
    from gru_deploy.models.families import cell_layers

    layers = cell_layers(module)
    if not layers:
        return None
    W, R, B = (a[None] for a in tutorial_cell_gru_weights(float32_arrays(module.state_dict()), layers[0][0]))
    h, i = R.shape[2], W.shape[2]
    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["", "h_n"], hidden_size=h, linear_before_reset=0)],
        "one_gru_node",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, i]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, h])],
        [helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [1, 1, h])],
        [numpy_helper.from_array(array, name) for array, name in ((W, "W"), (R, "R"), (B, "B"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=min_ir_version(17))
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, i)).astype(np.float32)
    values = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, h), np.float32)) for _ in range(2)]
    x_value = ort.OrtValue.ortvalue_from_numpy(x)
    bindings = []
    for a, b in ((0, 1), (1, 0)):
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", x_value)
        binding.bind_ortvalue_input("h0", values[a])
        binding.bind_ortvalue_output("h_n", values[b])
        bindings.append(binding)
    turn = [0]

    def step() -> None:
        session.run_with_iobinding(bindings[turn[0]])
        turn[0] ^= 1

    return step


def streaming_step(model: "UserModel", forms: dict[str, "Built"], threads: int, budget_s: float) -> dict[str, Any]:
    """Per-step latency of streaming at batch 1, one step per call: eager (the author's step:
    models.user.baseline), the TorchScript and ONNX stream models (each form) with a plain call
    (inputs checked as infer checks them), the streaming API (`gru_deploy.Stream`, io_binding)
    over each (stepping the one-step model where the export has one, as an export's Stream
    does), and, for a tutorial-cell model, the one-step model's plain run() and the
    one-GRU-node io_binding floor."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from gru_deploy.check.module_parity import step_layout, step_state
    from gru_deploy.check.runners import session_options
    from gru_deploy.convert.pipeline import build_step_model

    from gru_deploy.models.user import baseline
    from gru_deploy.serve.stream import Stream

    _, eager_step = baseline(model.module)
    sizes = _sizes(model)
    first = "loop" if "loop" in forms else next(iter(forms))
    loop = forms[first]
    x = np.random.default_rng(0).standard_normal((1, 1, sizes[0])).astype(np.float32)
    h = np.zeros((1, *loop.signature.inputs[1]["shape"][1:]), np.float32)
    xt, ht = torch.from_numpy(x), torch.from_numpy(h)

    def timed_torch(fn: Callable) -> float:
        def once():
            with torch.no_grad():
                return fn(xt, ht)
        return median_us(once, budget_s)

    timings = {"eager step": timed_torch(eager_step), "torchscript stream": timed_torch(loop.scripted)}
    one_step = build_step_model(model, loop.signature, 17, {}, lambda message: None)
    if one_step is not None:  # the export's model_step.onnx, as a user outside gru-deploy runs it
        session = ort.InferenceSession(one_step[0], session_options(threads), providers=["CPUExecutionProvider"])
        feed = {"x": x.reshape(1, 1, -1), "h0": np.ascontiguousarray(step_state(h, step_layout(h.shape[1:])[0]))}
        timings["onnxruntime step model, run()"] = median_us(lambda: session.run(None, feed), budget_s)
    for form, built in forms.items():
        call = _session_call(built, threads)
        timings[f"onnxruntime stream {form}, run()"] = median_us(lambda: call({"x": x, "h0": h}), budget_s)
        api = Stream.from_onnx(built.onnx_bytes, built.signature.to_dict(), threads=threads,
                               step=one_step[0] if one_step is not None else None)
        x_t = x[0, 0]
        timings[f"Stream API, {form}"] = median_us(lambda: api.step(x_t), budget_s)
    floor_step = gru_step_reference(model.module, threads)
    if floor_step is not None:
        timings["one GRU node, io_binding"] = median_us(floor_step, budget_s)
    reference = f"onnxruntime stream {first}, run()"
    row = {"input_size": sizes[0], "hidden_size": sizes[1], "batch": 1, "chunk": 1, "median_us_per_step": timings,
           "speedup_vs_eager": {k: timings["eager step"] / v for k, v in timings.items()},
           "vs_loop_stream_run": {k: v / timings[reference] for k, v in timings.items()}}
    if floor_step is not None:
        row["vs_one_gru_node"] = {k: v / timings["one GRU node, io_binding"] for k, v in timings.items()}
    return row


LENGTHS_SHAPES = ((1, 100), (32, 100))


def lengths_rows(forms: dict[str, "Built"], threads: int, budget_s: float) -> list[dict[str, Any]]:
    """The variable-length model in each form on padded batches with lengths spread over
    1..seq; ratios to the loop form (the first form where there is no loop)."""
    import numpy as np

    calls = {f"onnxruntime lengths {form}": _session_call(built, threads) for form, built in forms.items()}
    reference = f"onnxruntime lengths {'loop' if 'loop' in forms else next(iter(forms))}"
    input_size = next(iter(forms.values())).signature.inputs[0]["shape"][2]
    rows = []
    for batch, seq in LENGTHS_SHAPES:
        rng = np.random.default_rng(batch * 31 + seq)
        feed = {"x": rng.standard_normal((batch, seq, input_size)).astype(np.float32),
                "lengths": rng.integers(1, seq + 1, batch).astype(np.int64)}
        timings = {name: median_us(lambda: call(feed), budget_s) for name, call in calls.items()}
        rows.append({"batch": batch, "seq": seq, "lengths": f"uniform in 1..{seq}", "median_us": timings,
                     "vs_loop": {name: value / timings[reference] for name, value in timings.items()}})
    return rows


def run_bench(model: "UserModel", threads: int = 1, budget_s: float = 0.5, large: bool = True,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Medians of every runtime and form on the standard shapes, in one run; ratios to eager
    and to the fastest. `large`: the same kind of model at input 64 / hidden 256 too (where
    gru-deploy defines its class: models.user.resized)."""
    import numpy as np
    import torch

    from gru_deploy.convert.pipeline import every_form
    from gru_deploy.models.user import resized
    from gru_deploy.versions import library_versions

    say = progress or (lambda message: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        say(f"building every form of {model.reference}")
        forms = every_form(model)
        contenders = _contenders(model, forms["classifier"], threads)
        rows = _rows(contenders, _sizes(model), SHAPES, budget_s, say)
        batch, (short, long) = SCALING
        scaled = "loop" if "loop" in forms["classifier"] else next(iter(forms["classifier"]))
        loop = contenders[f"onnxruntime {scaled}"]
        say(f"{scaled} scaling at batch {batch}, seq {short} and {long}")
        x_long = np.random.default_rng(1).standard_normal((batch, long, _sizes(model)[0])).astype(np.float32)
        x_short = np.ascontiguousarray(x_long[:, :short])
        times = [median_us(lambda: loop(x_short), budget_s), median_us(lambda: loop(x_long), budget_s)]
        ratio = times[1] / times[0]
        scaling = {"form": scaled, "batch": batch, "seq": [short, long], "median_us": times, "ratio": ratio,
                   "linear_below": LINEAR_BELOW, "linear": ratio < LINEAR_BELOW}
        big = resized(model, *LARGE_SIZES) if large else None
        big_forms = every_form(big) if big is not None else None
        if big is not None:
            rows += _rows(_contenders(big, big_forms["classifier"], threads), _sizes(big), LARGE_SHAPES, budget_s, say)
        streaming = []
        for each, each_forms in ((model, forms), (big, big_forms)):
            if each is not None and "stream" in each_forms:
                say(f"streaming, one step per call ({'%d/%d' % _sizes(each)})")
                streaming.append(streaming_step(each, each_forms["stream"], threads, budget_s))
        lengths = []
        if "lengths" in forms:
            say("the variable-length model in each form")
            lengths = lengths_rows(forms["lengths"], threads, budget_s)
    finally:
        torch.set_num_threads(previous_threads)
    return {"model": model.reference, "threads": threads, "budget_s": budget_s, "versions": library_versions(),
            "rows": rows, "loop_scaling": scaling, "streaming": streaming, "lengths": lengths}


ORDER = ("eager", "torchscript", "onnxruntime loop", "onnxruntime stepwise", "onnxruntime fused")


def format_table(result: dict[str, Any]) -> str:
    names = sorted(result["rows"][0]["median_us"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    lines = [f"median latency in µs (speed-up vs eager); threads={result['threads']}",
             f"{'I/H':>7} {'batch, seq':>11}" + "".join(f"{n:>26}" for n in names)]
    for row in result["rows"]:
        cells = "".join(f"{row['median_us'][n]:>16,.0f} ({row['speedup_vs_eager'][n]:>6.1f}x)" for n in names)
        lines.append(f"{row['input_size']:>3}/{row['hidden_size']:<3} {row['batch']:>4}, {row['seq']:<5}" + cells)
    s = result["loop_scaling"]
    lines.append(f"{s.get('form', 'loop')} scaling at batch {s['batch']}: seq {s['seq'][0]} "
                 f"{s['median_us'][0]:,.0f} µs, seq {s['seq'][1]} {s['median_us'][1]:,.0f} µs, "
                 f"ratio {s['ratio']:.2f} (2.00 = linear): "
                 + (f"linear (under {s['linear_below']:.2f})" if s["linear"]
                    else f"NOT LINEAR (at or over {s['linear_below']:.2f})"))
    for row in result["streaming"]:
        cells = ", ".join(f"{k} {v:,.1f} µs ({row['speedup_vs_eager'][k]:.1f}x)"
                          for k, v in row["median_us_per_step"].items())
        lines.append(f"streaming per step, batch 1, {row['input_size']}/{row['hidden_size']}: {cells}")
        api = [k for k in row["vs_loop_stream_run"] if k.startswith("Stream API")]
        lines.append("  Stream API per step: " + ", ".join(
            f"{k} {row['vs_loop_stream_run'][k]:.2f}x the loop stream model's run()"
            + (f", {row['vs_one_gru_node'][k]:.2f}x one GRU node with io_binding" if "vs_one_gru_node" in row else "")
            for k in api))
    for row in result.get("lengths", []):
        cells = ", ".join(f"{k} {v:,.0f} µs" for k, v in row["median_us"].items())
        ratios = ", ".join(f"{k.rsplit(' ', 1)[-1]} {v:.2f}x" for k, v in row["vs_loop"].items() if "loop" not in k)
        lines.append(f"lengths model at batch {row['batch']}, seq {row['seq']} (lengths {row['lengths']}): {cells}"
                     + (f"; vs loop: {ratios}" if ratios else ""))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: "Path") -> None:
    """A grouped bar chart of the medians (log scale); needs matplotlib (`pip install gru-deploy[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserInputError("--plot needs matplotlib: pip install 'gru-deploy[plot]'") from None
    import io

    from gru_deploy.manifest import atomic_write_bytes

    rows = result["rows"]
    names = list(rows[0]["median_us"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r["median_us"][name] for r in rows], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['input_size']}/{r['hidden_size']}\n{r['batch']}×{r['seq']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("median latency, µs (log)")
    ax.set_title(f"gru-deploy bench (threads={result['threads']})")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# --- a module's export (a built-in family or your own model) ------------------------------------

MODULE_SHAPES = ((1, 1), (1, 100), (32, 100), (1, 1000))


def run_module_bench(folder: "Path", manifest: dict[str, Any], threads: int = 1, budget_s: float = 0.5,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Medians of a module export's own models, in one run: TorchScript (model.pt, the
    reference) and onnxruntime (model.onnx, in its recorded form) on the classifier at
    MODULE_SHAPES; the lengths model at (32, 100) with lengths spread over 1..100 beside the
    classifier on the same padded batch; the stream model per step at batch 1, raw
    (session.run) and through gru_deploy.Stream. Files are chosen through `manifest` (which bench
    has read and checked) and checked against it. Over 60 lines: one timing run over the
    export's three models, each a few lines of setup and a median."""
    import onnxruntime as ort
    import torch

    from gru_deploy.check.runners import session_options
    from gru_deploy.check.module_parity import UserSignature, case_feed, pytorch_reference
    from gru_deploy.manifest import select_model, verified_path
    from gru_deploy.versions import library_versions

    step = progress or (lambda message: None)
    torch.set_num_threads(threads)

    def load(variant: str) -> tuple[Any, Any, UserSignature]:
        fmt, _, fn = pytorch_reference(folder, manifest, variant)
        pt = fmt, fn
        onnx_name = select_model(manifest, variant, "onnx", where=str(folder))
        session = ort.InferenceSession(verified_path(folder, manifest, onnx_name).read_bytes(),
                                       session_options(threads), providers=["CPUExecutionProvider"])
        raw = manifest["signature"] if variant == "classifier" else manifest["variants"][variant]["signature"]
        return pt, session, UserSignature(raw["inputs"], raw["outputs"])

    def pair(pt: tuple[str, Any], session: Any, signature: UserSignature, feed: dict[str, np.ndarray]
             ) -> dict[str, Any]:
        names = signature.output_names
        args = [torch.from_numpy(feed[t["name"]]) for t in signature.inputs]
        label, fn = pt

        def reference() -> None:
            with torch.no_grad():
                fn(*args)
        ts = median_us(reference, budget_s)
        ort_us = median_us(lambda: session.run(names, feed), budget_s)
        return {"pytorch": label, f"{label}_us": round(ts, 1), "onnxruntime_us": round(ort_us, 1),
                f"onnxruntime_vs_{label}": round(ort_us / ts, 3)}

    rows = []
    pt, session, signature = load("classifier")
    form = manifest["models"][select_model(manifest, "classifier", "onnx", where=str(folder))].get("strategy")
    for batch, seq in MODULE_SHAPES:
        step(f"classifier at batch {batch}, seq {seq}")
        feed = case_feed(signature, batch, seq)
        rows.append({"model": "classifier", "form": form, "batch": batch, "seq": seq,
                     **pair(pt, session, signature, feed)})
    variants = manifest.get("variants") or {}
    if "lengths" in variants:
        step("lengths model at batch 32, seq 100, lengths 1..100")
        lpt, lsession, lsig = load("lengths")
        feed = case_feed(lsig, 32, 100)
        row = {"model": "lengths", "form": variants["lengths"].get("strategy"), "batch": 32, "seq": 100,
               "lengths": "spread over 1..100", **pair(lpt, lsession, lsig, feed)}
        padded = {"x": feed["x"]}
        row["classifier_same_batch_us"] = round(median_us(lambda: session.run(signature.output_names, padded),
                                                          budget_s), 1)
        rows.append(row)
    if "stream" in variants:
        from gru_deploy.serve.stream import Stream

        step("stream model, one step at batch 1")
        spt, ssession, ssig = load("stream")
        feed = case_feed(ssig, 1, 1)
        row = {"model": "stream", "form": variants["stream"].get("strategy"), "batch": 1, "seq": 1,
               **pair(spt, ssession, ssig, feed)}
        stream = Stream(folder, 1, threads=threads)
        x_t = feed["x"][:, 0]
        row["stream_api_us"] = round(median_us(lambda: stream.step(x_t), budget_s), 1)
        row["stream_api_vs_run"] = round(row["stream_api_us"] / row["onnxruntime_us"], 3)
        rows.append(row)
    return {"export": str(folder), "model": manifest.get("model"), "threads": threads, "budget_s": budget_s,
            "rows": rows, "versions": library_versions()}


PYTORCH_LABELS = {"torchscript": "TorchScript (model*.pt)",
                  "torch-export": "the torch.export program (model*.pt2: the export has no TorchScript)"}


def format_module_table(result: dict[str, Any]) -> str:
    lines = [f"{result['export']} ({(result.get('model') or {}).get('reference')}), {result['threads']} thread(s); "
             "median µs",
             f"{'model':<11} {'form':<6} {'batch':>5} {'seq':>5} {'PyTorch':>12} {'onnxruntime':>12} {'ratio':>7}"]
    for r in result["rows"]:
        label = r["pytorch"]
        lines.append(f"{r['model']:<11} {str(r['form']):<6} {r['batch']:>5} {r['seq']:>5} "
                     f"{r[f'{label}_us']:>12,.1f} {r['onnxruntime_us']:>12,.1f} "
                     f"{r[f'onnxruntime_vs_{label}']:>7.2f}")
        if "classifier_same_batch_us" in r:
            lines.append(f"  the classifier on the same padded batch (every sample run to 100 steps): "
                         f"{r['classifier_same_batch_us']:,.1f} µs")
        if "stream_api_us" in r:
            lines.append(f"  gru_deploy.Stream.step: {r['stream_api_us']:,.1f} µs ({r['stream_api_vs_run']:.2f}x "
                         "the stream model's run)")
    labels = sorted({r["pytorch"] for r in result["rows"]})
    lines.append(f"PyTorch: {', '.join(PYTORCH_LABELS[label] for label in labels)}; ratio: onnxruntime / PyTorch, both "
                 "measured in this run")
    return "\n".join(lines)


TARGET_SHAPES = ((1, 100), (32, 100))


def time_targets(folder: "Path", manifest: dict[str, Any], threads: int = 1, budget_s: float = 0.5,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The export's --targets files (torch.export programs, AOTInductor packages, ExecuTorch
    programs, as the manifest lists them) timed in this run beside the same variant's ONNX model
    in onnxruntime and its TorchScript, on the same feed: the classifier at TARGET_SHAPES, the
    stream model one step at batch 1. An ExecuTorch program runs through gru-deploy's runner
    (its bounds checked; a larger batch in calls of its own). Rows: each file's median and its
    ratio to onnxruntime's. Empty without targets."""
    import onnxruntime as ort
    import torch

    from gru_deploy.check.module_parity import (AOTI_FORMAT, EXECUTORCH_FORMAT, PROGRAM_FORMAT, UserSignature,
                                                case_feed, executorch_runner, load_program)
    from gru_deploy.check.runners import session_options
    from gru_deploy.convert import script
    from gru_deploy.manifest import find_models, select_model, variant_record, verified_path

    step = progress or (lambda message: None)
    torch.set_num_threads(threads)
    rows = []
    for variant, shapes in (("classifier", TARGET_SHAPES), ("stream", ((1, 1),))):
        targets = [(n, fmt) for fmt in (PROGRAM_FORMAT, AOTI_FORMAT, EXECUTORCH_FORMAT)
                   for n in find_models(manifest, variant, fmt)]
        if not targets:
            continue
        raw = manifest["signature"] if variant == "classifier" else variant_record(manifest, variant)["signature"]
        signature = UserSignature(raw["inputs"], raw["outputs"])
        onnx_name = select_model(manifest, variant, "onnx", where=str(folder))
        session = ort.InferenceSession(verified_path(folder, manifest, onnx_name).read_bytes(),
                                       session_options(threads), providers=["CPUExecutionProvider"])
        pts = find_models(manifest, variant, "torchscript")  # none: a program model's (its program is a target)
        pt = script.load(verified_path(folder, manifest, pts[0])) if pts else None
        loaded = {name: load_program(verified_path(folder, manifest, name).read_bytes(), name, fmt)
                  for name, fmt in targets if fmt != EXECUTORCH_FORMAT}
        executorch = {name: executorch_runner(verified_path(folder, manifest, name).read_bytes(), signature, name,
                                              manifest["models"][name])
                      for name, fmt in targets if fmt == EXECUTORCH_FORMAT}
        for batch, seq in shapes:
            step(f"{variant} targets at batch {batch}, seq {seq}")
            feed = case_feed(signature, batch, seq)
            args = [torch.from_numpy(feed[t["name"]]) for t in signature.inputs]

            def timed(fn: Callable[..., Any]) -> float:
                def call() -> None:
                    with torch.no_grad():
                        fn(*args)
                return round(median_us(call, budget_s), 1)
            ort_us = round(median_us(lambda: session.run(signature.output_names, feed), budget_s), 1)
            row = {"model": variant, "batch": batch, "seq": seq, "onnxruntime_us": ort_us,
                   "onnxruntime_form": manifest["models"][onnx_name].get("strategy"),
                   **({"torchscript_us": timed(pt)} if pt is not None else {})}
            for name, fmt in targets:
                if fmt == EXECUTORCH_FORMAT:
                    fmt = f"{fmt}-{manifest['models'][name]['backend']}"
                    row[f"{fmt}_us"] = round(median_us(lambda: executorch[name].run(feed), budget_s), 1)
                else:
                    row[f"{fmt}_us"] = timed(loaded[name])
                row[f"{fmt}_vs_onnxruntime"] = round(row[f"{fmt}_us"] / ort_us, 2)
            rows.append(row)
    return rows


def format_targets(rows: list[dict[str, Any]]) -> str:
    formats = ("torch-export", "aoti", "executorch-portable", "executorch-xnnpack")
    lines = ["--targets files, median µs (ratio to the same variant's ONNX model in onnxruntime, this run)",
             f"{'model':<11} {'batch':>5} {'seq':>5} {'onnxruntime':>16} {'TorchScript':>12} {'torch.export':>18} "
             f"{'AOTInductor':>18} {'ExecuTorch':>18} {'ExecuTorch XNNPACK':>18}"]
    for r in rows:
        cells = [f"{r[f'{fmt}_us']:>10,.1f} ({r[f'{fmt}_vs_onnxruntime']:.2f}x)" if f"{fmt}_us" in r else f"{'-':>18}"
                 for fmt in formats]
        lines.append(f"{r['model']:<11} {r['batch']:>5} {r['seq']:>5} {r['onnxruntime_us']:>9,.1f} "
                     f"{'(' + str(r['onnxruntime_form']) + ')':>6} "
                     + (f"{r['torchscript_us']:>12,.1f} " if "torchscript_us" in r else f"{'-':>12} ") + " ".join(cells))
    return "\n".join(lines)


def bench(folder: "Path | None", threads: int = 1, budget_s: float = 0.5, large: bool = True,
          plot_path: "Path | None" = None, progress: Callable[[str], None] | None = None,
          say: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """`gru-deploy bench`: the result and its table. An export folder whose model gru-deploy
    can rebuild from its weights (the tutorial classifier, a built-in family), or no folder (an
    untrained default-size model): every variant in every form (run_bench). Your own model's
    export: its files (run_module_bench)."""
    if folder is None:
        (say or (lambda message: None))("no FOLDER given: benchmarking an untrained default-size model (speed does "
                                        "not depend on weights)")
        model = default_model()
    else:
        from gru_deploy.convert import script
        from gru_deploy.manifest import check_files, find_models, read_manifest, verified_path
        from gru_deploy.models.user import rebuild

        manifest = read_manifest(folder)
        check_files(folder, manifest)
        pts = find_models(manifest, "classifier", "torchscript")  # none: a program model's export
        model = rebuild(manifest, script.load(verified_path(folder, manifest, pts[0])).state_dict()) if pts else None
        if model is None:  # your own model: its code is not run
            if not large or plot_path is not None:
                raise UserInputError("--no-large and --plot apply where gru-deploy rebuilds the model (the tutorial "
                                     "classifier, a built-in family); your own model's export is timed from its files")
            result = run_module_bench(folder, manifest, threads=threads, budget_s=budget_s, progress=progress)
            return result, format_module_table(result)
    result = run_bench(model, threads=threads, budget_s=budget_s, large=large, progress=progress)
    if plot_path is not None:
        plot(result, plot_path)
    table = format_table(result)
    if folder is not None:
        result["targets"] = time_targets(folder, manifest, threads, budget_s, progress)
        table += "\n\n" + format_targets(result["targets"]) if result["targets"] else ""
    return result, table
