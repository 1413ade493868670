"""Benchmark harness: medians over repeats, ratios to a reference measured in the same run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.timing import median_us  # noqa: F401  (here too: scripts and tests import it from bench)

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from gru_deploy.spec import ModelSpec


SHAPES = ((1, 1), (1, 100), (32, 100), (1, 1000), (256, 200))
LARGE_SHAPES = ((1, 100), (64, 100))  # for the hidden-256 / input-64 model
SCALING = (256, (1000, 2000))  # batch, seq lengths: is the loop's cost linear in T?
# Doubling T doubles a linear loop's time (ratio 2); the tutorial's batch-major slicing, whose
# cost grows with T², measured 3.8 (docs/performance.md). Below this ratio we call it linear.
LINEAR_BELOW = 3.0


def classifier_graphs(spec: "ModelSpec", model: Any, scripted: Any = None) -> dict[str, bytes]:
    """The classifier's ONNX forms, {"loop", "stepwise", "fused"}, of one eager model."""
    return variant_graphs(spec, model, "classifier", scripted)


def variant_graphs(spec: "ModelSpec", model: Any, variant: str, scripted: Any = None) -> dict[str, bytes]:
    """A variant's ONNX forms, {"loop", "stepwise", "fused"}, of one eager model
    (`scripted`: the variant's TorchScript module when the caller has it)."""
    from gru_deploy.convert import script
    from gru_deploy.convert.families import export_fused
    from gru_deploy.convert.graphs import export_loop
    from gru_deploy.models.tutorial import as_variant

    scripted = scripted if scripted is not None else script.torchscript(as_variant(model, variant))
    stepwise = script.torchscript(as_variant(model, variant, hoist=False))
    return {"loop": export_loop(scripted, spec, variant=variant).onnx_bytes,
            "stepwise": export_loop(stepwise, spec, variant=variant, strategy="stepwise").onnx_bytes,
            "fused": export_fused(model.state_dict(), spec, variant=variant).onnx_bytes}


def default_graphs() -> tuple["ModelSpec", dict[str, bytes]]:
    """The default-size model, untrained (seed 0; speed does not depend on the weights), and its
    three ONNX forms: what the benchmark scripts time."""
    import torch

    from gru_deploy.models.tutorial import GRUClassifier
    from gru_deploy.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec()
    return spec, classifier_graphs(spec, GRUClassifier().eval())


def _contenders(spec: "ModelSpec", state_dict: dict, threads: int) -> dict[str, Callable[["np.ndarray"], object]]:
    """Callables of x (float32 numpy) for eager, TorchScript and each ONNX strategy."""
    import torch

    from gru_deploy.convert import script
    from gru_deploy.models.tutorial import load_weights, tutorial_forward

    model = load_weights(spec, state_dict)
    scripted = script.torchscript(model)
    graphs = {f"onnxruntime {name}": graph for name, graph in classifier_graphs(spec, model, scripted).items()}

    def eager(x):
        with torch.no_grad():
            return tutorial_forward(model, torch.from_numpy(x))

    def torchscript(x):
        with torch.no_grad():
            return scripted(torch.from_numpy(x))

    found: dict[str, Callable] = {"eager": eager, "torchscript": torchscript}
    for name, graph in graphs.items():
        found[name] = _ort_call(spec, graph, threads)
    return found


def _ort_call(spec: "ModelSpec", graph: bytes, threads: int) -> Callable:
    from gru_deploy.check.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(spec, graph, threads=threads)
    return lambda x: runner.run({"x": x})


def _rows(contenders: dict[str, Callable], spec: "ModelSpec", shapes, budget_s: float,
          progress: Callable[[str], None]) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for batch, seq in shapes:
        x = np.random.default_rng(batch * 7919 + seq).standard_normal((batch, seq, spec.input_size)).astype(np.float32)
        progress(f"batch {batch}, seq {seq}")
        timings = {name: median_us(lambda: fn(x), budget_s) for name, fn in contenders.items()}
        fastest = min(timings.values())
        rows.append({
            "input_size": spec.input_size, "hidden_size": spec.hidden_size, "batch": batch, "seq": seq,
            "median_us": timings,
            "speedup_vs_eager": {k: timings["eager"] / v for k, v in timings.items()},
            "times_fastest": {k: v / fastest for k, v in timings.items()},
        })
    return rows


def gru_step_reference(spec: "ModelSpec", state_dict: dict, threads: int) -> Callable[[], object]:
    """The floor for one streaming step: one ONNX `GRU` node (seq 1, batch 1, no head, no guard)
    run with io_binding, its state ping-ponged between two bound buffers."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gru_deploy.convert.graphs import fused_weights, min_ir_version
    from gru_deploy.check.runners import session_options

    w = fused_weights(state_dict)
    h, i = spec.hidden_size, spec.input_size
    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["", "h_n"], hidden_size=h, linear_before_reset=0)],
        "one_gru_node",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, i]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, h])],
        [helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [1, 1, h])],
        [numpy_helper.from_array(w[k], k) for k in ("W", "R", "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=min_ir_version(17))
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, i)).astype(np.float32)
    buffers = [np.zeros((1, 1, h), np.float32), np.zeros((1, 1, h), np.float32)]
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
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


def streaming_step(spec: "ModelSpec", state_dict: dict, threads: int, budget_s: float) -> dict[str, Any]:
    """Per-step latency of streaming at batch 1, one step per call: the eager cell, the
    TorchScript and ONNX stream models (each form) with a plain `run()`, the
    streaming API (`gru_deploy.Stream`, io_binding) over each, and the one-GRU-node io_binding floor."""
    import numpy as np
    import torch

    from gru_deploy.convert import script
    from gru_deploy.models.tutorial import as_variant, load_weights
    from gru_deploy.check.runners import OnnxRuntimeRunner
    from gru_deploy.serve.stream import Stream

    model = load_weights(spec, state_dict)
    stream = script.torchscript(as_variant(model, "stream"))
    graphs = variant_graphs(spec, model, "stream", stream)
    x = np.random.default_rng(0).standard_normal((1, 1, spec.input_size)).astype(np.float32)
    h = np.zeros((1, spec.hidden_size), np.float32)
    xt, ht = torch.from_numpy(x), torch.from_numpy(h)

    def eager_cell():
        with torch.no_grad():
            return model.gru(xt[:, 0], ht)

    def torchscript_stream():
        with torch.no_grad():
            return stream(xt, ht)

    timings = {"eager cell": median_us(eager_cell, budget_s),
               "torchscript stream": median_us(torchscript_stream, budget_s)}
    for form, graph in graphs.items():
        runner = OnnxRuntimeRunner(spec, graph, threads=threads, variant="stream")
        timings[f"onnxruntime stream {form}, run()"] = median_us(lambda: runner.run({"x": x, "h0": h}), budget_s)
        api = Stream.from_onnx(graph, spec.signature("stream"), threads=threads)
        x_t = x[0, 0]
        timings[f"Stream API, {form}"] = median_us(lambda: api.step(x_t), budget_s)
    timings["one GRU node, io_binding"] = median_us(gru_step_reference(spec, state_dict, threads), budget_s)
    floor = timings["one GRU node, io_binding"]
    today = timings["onnxruntime stream loop, run()"]
    return {"input_size": spec.input_size, "hidden_size": spec.hidden_size, "batch": 1, "chunk": 1,
            "median_us_per_step": timings,
            "speedup_vs_eager": {k: timings["eager cell"] / v for k, v in timings.items()},
            "vs_loop_stream_run": {k: v / today for k, v in timings.items()},
            "vs_one_gru_node": {k: v / floor for k, v in timings.items()}}


LENGTHS_SHAPES = ((1, 100), (32, 100))


def lengths_rows(spec: "ModelSpec", state_dict: dict, threads: int, budget_s: float) -> list[dict[str, Any]]:
    """The variable-length model in each form (loop, stepwise, fused) on padded batches with lengths
    spread over 1..seq; ratios to the loop form."""
    import numpy as np

    from gru_deploy.models.tutorial import load_weights
    from gru_deploy.check.runners import OnnxRuntimeRunner

    graphs = variant_graphs(spec, load_weights(spec, state_dict), "lengths")
    runners = {f"onnxruntime lengths {form}": OnnxRuntimeRunner(spec, graph, threads=threads, variant="lengths")
               for form, graph in graphs.items()}
    rows = []
    for batch, seq in LENGTHS_SHAPES:
        rng = np.random.default_rng(batch * 31 + seq)
        feed = {"x": rng.standard_normal((batch, seq, spec.input_size)).astype(np.float32),
                "lengths": rng.integers(1, seq + 1, batch).astype(np.int64)}
        timings = {name: median_us(lambda: r.run(feed), budget_s) for name, r in runners.items()}
        loop = timings["onnxruntime lengths loop"]
        rows.append({"batch": batch, "seq": seq, "lengths": f"uniform in 1..{seq}", "median_us": timings,
                     "vs_loop": {name: value / loop for name, value in timings.items()}})
    return rows


def run_bench(spec: "ModelSpec", state_dict: dict, threads: int = 1, budget_s: float = 0.5,
              large: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Medians of every runtime on the standard shapes, in one run; ratios to eager and to the fastest."""
    import numpy as np
    import torch

    from gru_deploy.models.tutorial import GRUClassifier
    from gru_deploy.spec import ModelSpec as Spec
    from gru_deploy.versions import library_versions

    say = progress or (lambda message: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        contenders = _contenders(spec, state_dict, threads)
        rows = _rows(contenders, spec, SHAPES, budget_s, say)
        batch, (short, long) = SCALING
        loop = contenders["onnxruntime loop"]
        say(f"loop scaling at batch {batch}, seq {short} and {long}")
        x_long = np.random.default_rng(1).standard_normal((batch, long, spec.input_size)).astype(np.float32)
        x_short = np.ascontiguousarray(x_long[:, :short])
        scaling = {"batch": batch, "seq": [short, long],
                   "median_us": [median_us(lambda: loop(x_short), budget_s),
                                 median_us(lambda: loop(x_long), budget_s)]}
        scaling["ratio"] = scaling["median_us"][1] / scaling["median_us"][0]
        scaling["linear_below"] = LINEAR_BELOW
        scaling["linear"] = scaling["ratio"] < LINEAR_BELOW
        if large:
            torch.manual_seed(0)
            big = Spec(input_size=64, hidden_size=256, output_size=spec.output_size)
            big_state = GRUClassifier(64, 256, spec.output_size).state_dict()
            rows += _rows(_contenders(big, big_state, threads), big, LARGE_SHAPES, budget_s, say)
        say("streaming, one step per call")
        streaming = [streaming_step(spec, state_dict, threads, budget_s)]
        if large:
            streaming.append(streaming_step(big, big_state, threads, budget_s))
        say("the variable-length model in each form")
        lengths = lengths_rows(spec, state_dict, threads, budget_s)
    finally:
        torch.set_num_threads(previous_threads)
    return {"threads": threads, "budget_s": budget_s, "versions": library_versions(), "rows": rows,
            "loop_scaling": scaling, "streaming": streaming, "lengths": lengths}


ORDER = ("eager", "torchscript", "onnxruntime loop", "onnxruntime stepwise", "onnxruntime fused")


def format_table(result: dict[str, Any]) -> str:
    names = sorted(result["rows"][0]["median_us"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    lines = [f"median latency in µs (speed-up vs eager); threads={result['threads']}",
             f"{'I/H':>7} {'batch, seq':>11}" + "".join(f"{n:>26}" for n in names)]
    for row in result["rows"]:
        cells = "".join(f"{row['median_us'][n]:>16,.0f} ({row['speedup_vs_eager'][n]:>6.1f}x)" for n in names)
        lines.append(f"{row['input_size']:>3}/{row['hidden_size']:<3} {row['batch']:>4}, {row['seq']:<5}" + cells)
    s = result["loop_scaling"]
    lines.append(f"loop scaling at batch {s['batch']}: seq {s['seq'][0]} {s['median_us'][0]:,.0f} µs, "
                 f"seq {s['seq'][1]} {s['median_us'][1]:,.0f} µs, ratio {s['ratio']:.2f} (2.00 = linear): "
                 + (f"linear (under {s['linear_below']:.2f})" if s["linear"]
                    else f"NOT LINEAR (at or over {s['linear_below']:.2f})"))
    for row in result["streaming"]:
        cells = ", ".join(f"{k} {v:,.1f} µs ({row['speedup_vs_eager'][k]:.1f}x)"
                          for k, v in row["median_us_per_step"].items())
        lines.append(f"streaming per step, batch 1, {row['input_size']}/{row['hidden_size']}: {cells}")
        api = [k for k in row["vs_one_gru_node"] if k.startswith("Stream API")]
        lines.append("  Stream API per step: " + ", ".join(
            f"{k} {row['vs_loop_stream_run'][k]:.2f}x the loop stream model's run(), "
            f"{row['vs_one_gru_node'][k]:.2f}x one GRU node with io_binding" for k in api))
    for row in result.get("lengths", []):
        cells = ", ".join(f"{k} {v:,.0f} µs" for k, v in row["median_us"].items())
        ratios = ", ".join(f"{k.rsplit(' ', 1)[-1]} {v:.2f}x" for k, v in row["vs_loop"].items() if "loop" not in k)
        lines.append(f"lengths model at batch {row['batch']}, seq {row['seq']} (lengths {row['lengths']}): {cells}; "
                     f"vs loop: {ratios}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: "Path") -> None:
    """A grouped bar chart of the medians (log scale); needs matplotlib (`pip install gru-deploy[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from gru_deploy.errors import UserInputError

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


def run_module_bench(folder: Any, threads: int = 1, budget_s: float = 0.5,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Medians of a module export's own models, in one run: TorchScript (model.pt, the
    reference) and onnxruntime (model.onnx, in its recorded form) on the classifier at
    MODULE_SHAPES; the lengths model at (32, 100) with lengths spread over 1..100 beside the
    classifier on the same padded batch; the stream model per step at batch 1, raw
    (session.run) and through gru_deploy.Stream. Files are chosen through the manifest and
    checked against it. Over 60 lines: one timing run over the export's three models, each a
    few lines of setup and a median."""
    from pathlib import Path

    import onnxruntime as ort
    import torch

    from gru_deploy.check.runners import session_options
    from gru_deploy.convert import script
    from gru_deploy.check.module_parity import UserSignature, case_feed
    from gru_deploy.manifest import check_files, read_manifest, select_model, verified_path
    from gru_deploy.versions import library_versions

    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    step = progress or (lambda message: None)
    torch.set_num_threads(threads)

    def load(variant: str) -> tuple[Any, Any, UserSignature]:
        pt = script.load(verified_path(folder, manifest, select_model(manifest, variant, "torchscript",
                                                                      where=str(folder))))
        onnx_name = select_model(manifest, variant, "onnx", where=str(folder))
        session = ort.InferenceSession(verified_path(folder, manifest, onnx_name).read_bytes(),
                                       session_options(threads), providers=["CPUExecutionProvider"])
        raw = manifest["signature"] if variant == "classifier" else manifest["variants"][variant]["signature"]
        return pt, session, UserSignature(raw["inputs"], raw["outputs"])

    def pair(pt: Any, session: Any, signature: UserSignature, feed: dict[str, np.ndarray]) -> dict[str, float]:
        names = signature.output_names
        args = [torch.from_numpy(feed[t["name"]]) for t in signature.inputs]

        def torchscript() -> None:
            with torch.no_grad():
                pt(*args)
        ts = median_us(torchscript, budget_s)
        ort_us = median_us(lambda: session.run(names, feed), budget_s)
        return {"torchscript_us": round(ts, 1), "onnxruntime_us": round(ort_us, 1),
                "onnxruntime_vs_torchscript": round(ort_us / ts, 3)}

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


def format_module_table(result: dict[str, Any]) -> str:
    lines = [f"{result['export']} ({(result.get('model') or {}).get('reference')}), {result['threads']} thread(s); "
             "median µs",
             f"{'model':<11} {'form':<6} {'batch':>5} {'seq':>5} {'TorchScript':>12} {'onnxruntime':>12} {'ratio':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<11} {str(r['form']):<6} {r['batch']:>5} {r['seq']:>5} {r['torchscript_us']:>12,.1f} "
                     f"{r['onnxruntime_us']:>12,.1f} {r['onnxruntime_vs_torchscript']:>7.2f}")
        if "classifier_same_batch_us" in r:
            lines.append(f"  the classifier on the same padded batch (every sample run to 100 steps): "
                         f"{r['classifier_same_batch_us']:,.1f} µs")
        if "stream_api_us" in r:
            lines.append(f"  gru_deploy.Stream.step: {r['stream_api_us']:,.1f} µs ({r['stream_api_vs_run']:.2f}x "
                         "the stream model's run)")
    lines.append("ratio: onnxruntime / TorchScript, both measured in this run")
    return "\n".join(lines)


def bench(folder: "Path | None", threads: int = 1, budget_s: float = 0.5, large: bool = True,
          plot_path: "Path | None" = None, progress: Callable[[str], None] | None = None,
          say: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """`gru-deploy bench`: the result and its table. An export folder of the tutorial model: every
    runtime and form on its weights (run_bench); of a module (a built-in family or your own
    model): its own models (run_module_bench); no folder: an untrained default-size model."""
    import torch

    from gru_deploy.errors import UserInputError
    from gru_deploy.manifest import is_module_export, read_manifest, select_model, verified_path
    from gru_deploy.models.tutorial import GRUClassifier, tutorial_parameters
    from gru_deploy.spec import ModelSpec

    if folder is None:
        (say or (lambda message: None))("no FOLDER given: benchmarking an untrained default-size model (speed does "
                                        "not depend on weights)")
        torch.manual_seed(0)
        spec, state = ModelSpec(), GRUClassifier().state_dict()
    else:
        from gru_deploy.convert import script

        manifest = read_manifest(folder)
        if is_module_export(manifest):  # a built-in family or your own model: its own models
            if not large or plot_path is not None:
                raise UserInputError("--no-large and --plot apply to the tutorial model's bench")
            result = run_module_bench(folder, threads=threads, budget_s=budget_s, progress=progress)
            return result, format_module_table(result)
        spec = ModelSpec.from_dict(manifest["config"])
        pt_name = select_model(manifest, "classifier", "torchscript", where=str(folder))
        state = tutorial_parameters(script.load(verified_path(folder, manifest, pt_name)).state_dict())
    result = run_bench(spec, state, threads=threads, budget_s=budget_s, large=large, progress=progress)
    if plot_path is not None:
        plot(result, plot_path)
    return result, format_table(result)
