"""Deployment accuracy (`verify DIR --data`): a data set's test split through PyTorch and the
deployed runtimes, fp32 and int8. In the face layer: it builds what it measures (the other
ONNX form, the int8 model), so it sits above check (which only runs and compares files),
convert and bundle, whose pieces it calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME, ModelSpec


def deployment_accuracy(folder: Path, data: str, test: str | None = None, seed: int = 0,
                        test_fraction: float = 0.2) -> dict[str, Any]:
    """Accuracy on a data set's test split of eager PyTorch, onnxruntime fp32 (the export's
    strategy and the other one, built from the same weights) and int8, with each one's argmax
    agreement with eager. Variable-length data runs through the lengths models."""
    from gru_deploy.data import load_data
    from gru_deploy.convert.families import export_fused
    from gru_deploy.convert.graphs import export_loop
    from gru_deploy.check import torchscript as script
    from gru_deploy.check.runners import eager_runner
    from gru_deploy.manifest import check_files, read_manifest, select_model, tutorial_only, verified_path
    from gru_deploy.models.tutorial import load_weights, tutorial_parameters
    from gru_deploy.bundle.quantize import quantize_int8
    from gru_deploy.check.runners import OnnxRuntimeRunner

    manifest = read_manifest(folder)
    tutorial_only(manifest, str(folder), "verify --data")
    check_files(folder, manifest)
    spec = ModelSpec.from_dict(manifest["config"])
    split = load_data(data, seed=seed, test_fraction=test_fraction, input_size=spec.input_size, test=test)
    dataset = split.test
    if list(dataset.labels) != list(spec.labels):
        raise UserInputError(f"{data}: its labels {list(dataset.labels)} are not the model's {list(spec.labels)}")
    variant = "lengths" if dataset.lengths is not None else "classifier"
    module = script.load(verified_path(folder, manifest, select_model(manifest, variant, "torchscript",
                                                                      where=str(folder))))
    eager = eager_runner(spec, load_weights(spec, tutorial_parameters(module.state_dict())), variant)
    graphs: dict[str, bytes] = {}
    onnx_name = select_model(manifest, variant, "onnx", where=str(folder))
    strategy = manifest["models"][onnx_name].get("strategy", "loop")
    graphs[f"onnxruntime {strategy} (exported)"] = (folder / onnx_name).read_bytes()  # checked above
    if strategy == "loop":
        loop_graph = graphs[f"onnxruntime {strategy} (exported)"]
        graphs["onnxruntime fused"] = export_fused(tutorial_parameters(module.state_dict()), spec,
                                                   variant=variant).onnx_bytes
    else:
        loop_graph = graphs["onnxruntime loop"] = export_loop(module, spec, variant=variant).onnx_bytes
    # int8 runs on the loop form: onnxruntime has no int8 GRU kernel (onnxruntime#9796)
    int8_bytes, int8_report = quantize_int8(loop_graph)
    graphs["onnxruntime int8 (loop form)"] = int8_bytes
    feed = {INPUT_NAME: dataset.x}
    if variant == "lengths":
        feed[LENGTHS_NAME] = dataset.lengths
    predictions = {"eager": eager.run(feed)[OUTPUT_NAME].argmax(1)}
    for name, graph in graphs.items():
        predictions[name] = OnnxRuntimeRunner(spec, graph, variant=variant).run(feed)[OUTPUT_NAME].argmax(1)
    rows = {name: {"accuracy": float((pred == dataset.y).mean()),
                   "agreement_with_eager": float((pred == predictions["eager"]).mean())}
            for name, pred in predictions.items()}
    return {"data": data, "test_samples": len(dataset), "variable_length": variant == "lengths", "runtimes": rows,
            "int8_weight_share": int8_report["weight_bytes_quantized_share"],
            "accuracy_recorded_at_training": manifest.get("metrics", {}).get("test_accuracy")}


def module_accuracy(folder: Path, manifest: dict[str, Any], data: str, test: str | None = None, seed: int = 0,
                    test_fraction: float = 0.2) -> dict[str, Any]:
    """Accuracy on a data set's test split of an export made by the generic path (a built-in
    family or your own classifier): TorchScript (model.pt), onnxruntime fp32 (model.onnx, the
    export's form) and int8 (onnxruntime's dynamic quantiser over the loop form, where it
    stores at least half the weight bytes as int8), with each one's argmax agreement with
    TorchScript. Variable-length data runs each sample at its own length, unpadded (samples of
    one length batched together), through the classifier: a module's lengths variant is
    optional, so it is not the one measured. Over 60 lines: the
    data's fit to the model is checked first, then each runtime predicts the test split, one
    pass per sequence length."""
    import onnxruntime as ort
    import torch

    from gru_deploy.bundle.parts import MIN_INT8_SHARE
    from gru_deploy.bundle.quantize import quantize_int8
    from gru_deploy.check.runners import session_options
    from gru_deploy.convert import script
    from gru_deploy.check.module_parity import UserSignature, as_outputs
    from gru_deploy.convert.pipeline import export_user_onnx
    from gru_deploy.data import load_data
    from gru_deploy.manifest import check_files, select_model, verified_path

    check_files(folder, manifest)
    signature = UserSignature(manifest["signature"]["inputs"], manifest["signature"]["outputs"])
    outputs = signature.outputs
    labels = list(manifest.get("labels") or [])
    if len(outputs) != 1 or [d for d in outputs[0]["shape"] if isinstance(d, str)] != ["batch"] \
            or len(outputs[0]["shape"]) != 2:
        raise UserInputError(f"{folder}: verify --data measures classifiers (one output [batch, classes]); this "
                             f"export's outputs are {[o['shape'] for o in outputs]}")
    input_size = signature.inputs[0]["shape"][2]
    split = load_data(data, seed=seed, test_fraction=test_fraction, input_size=input_size, test=test)
    dataset = split.test
    classes = outputs[0]["shape"][1]
    if labels and list(dataset.labels) != labels:
        raise UserInputError(f"{data}: its labels {list(dataset.labels)} are not the model's {labels}")
    if len(dataset.labels) != classes:
        raise UserInputError(f"{data} has {len(dataset.labels)} classes; the model outputs {classes}")
    scripted = script.load(verified_path(folder, manifest, select_model(manifest, "classifier", "torchscript",
                                                                        where=str(folder))))
    onnx_name = select_model(manifest, "classifier", "onnx", where=str(folder))
    onnx_bytes = verified_path(folder, manifest, onnx_name).read_bytes()
    form = manifest["models"][onnx_name].get("strategy", "loop")
    name = signature.output_names[0]
    runners: dict[str, Any] = {"torchscript": lambda x: as_outputs(scripted(torch.from_numpy(x)), "model.pt")[0].numpy()}
    sessions = {f"onnxruntime fp32 ({form}, exported)": onnx_bytes}
    int8_note = None
    loop_bytes = onnx_bytes if form == "loop" else export_user_onnx(scripted, signature, int(manifest["opset"]))[0]
    int8_bytes, report = quantize_int8(loop_bytes)
    share = report["weight_bytes_quantized_share"]
    if share >= MIN_INT8_SHARE:
        sessions["onnxruntime int8 (loop form)"] = int8_bytes
    else:
        int8_note = (f"int8 not measured: onnxruntime's dynamic quantiser stores only {share:.0%} of the weight bytes "
                     f"as int8 (kept in float: {', '.join(report['float_weight_consumers']) or 'none'}); onnxruntime "
                     "has no int8 GRU kernel (onnxruntime#9796)")
    for label, data_bytes in sessions.items():
        session = ort.InferenceSession(data_bytes, session_options(1), providers=["CPUExecutionProvider"])
        runners[label] = (lambda s: lambda x: s.run([name], {INPUT_NAME: x})[0])(session)
    lengths = dataset.lengths if dataset.lengths is not None else np.full(len(dataset), dataset.x.shape[1])
    if (lengths < 1).any():
        raise UserInputError(f"{data}: {int((lengths < 1).sum())} test samples have no steps; these exports take "
                             "sequences of at least one step")
    predictions = {label: np.empty(len(dataset), np.int64) for label in runners}
    for length in np.unique(lengths):
        index = np.nonzero(lengths == length)[0]
        x = np.ascontiguousarray(dataset.x[index, :int(length)])
        for label, run in runners.items():
            with torch.no_grad():
                predictions[label][index] = np.asarray(run(x)).argmax(1)
    rows = {label: {"accuracy": float((pred == dataset.y).mean()),
                    "agreement_with_torchscript": float((pred == predictions["torchscript"]).mean())}
            for label, pred in predictions.items()}
    return {"data": data, "test_samples": len(dataset), "variable_length": dataset.lengths is not None,
            "runtimes": rows, "int8_weight_share": share, "notes": [int8_note] if int8_note else [],
            "accuracy_recorded_at_training": manifest.get("metrics", {}).get("test_accuracy")}
