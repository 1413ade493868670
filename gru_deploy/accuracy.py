"""Deployment accuracy (`verify DIR --data`): a data set's test split through PyTorch and the
deployed runtimes, fp32 and int8, one path for every classifier export. In the face layer: it
builds what it measures (the other ONNX forms, the int8 model), so it sits above check (which
only runs and compares files), convert and bundle, whose pieces it calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gru_deploy.errors import UserInputError
from gru_deploy.spec import INPUT_NAME


def deployment_accuracy(folder: Path, data: str, test: str | None = None, seed: int = 0,
                        test_fraction: float = 0.2) -> dict[str, Any]:
    """Accuracy on a data set's test split of a classifier export (one output [batch, classes]):
    TorchScript (model.pt; a program model's export: its torch.export program, `reference`
    says which); eager PyTorch and every other ONNX form built from the same weights
    where gru-deploy can rebuild the module (the tutorial classifier, a built-in family:
    models.user.rebuild); onnxruntime fp32 in the exported form; int8 (onnxruntime's dynamic
    quantiser over the loop form, where it stores at least half the weight bytes as int8). Each
    with its argmax agreement with that reference. Variable-length samples run each at its own
    length, unpadded (samples of one length batched together). Over 60 lines: the data's fit to
    the model is checked first, then the runtimes are gathered, then each predicts the test
    split, one pass per sequence length."""
    import onnxruntime as ort
    import torch

    from gru_deploy.bundle.parts import MIN_INT8_SHARE
    from gru_deploy.bundle.quantize import quantize_int8
    from gru_deploy.check.module_parity import UserSignature, as_outputs, pytorch_reference
    from gru_deploy.check.recurrence import check_recurrence
    from gru_deploy.check.runners import session_options
    from gru_deploy.convert.pipeline import export_user_onnx, module_graphs
    from gru_deploy.data import load_data
    from gru_deploy.manifest import check_files, labels_of, read_manifest, select_model, verified_path
    from gru_deploy.models.user import rebuild

    manifest = read_manifest(folder)
    check_files(folder, manifest)
    signature = UserSignature(manifest["signature"]["inputs"], manifest["signature"]["outputs"])
    outputs = signature.outputs
    if len(outputs) != 1 or [d for d in outputs[0]["shape"] if isinstance(d, str)] != ["batch"] \
            or len(outputs[0]["shape"]) != 2:
        raise UserInputError(f"{folder}: verify --data measures classifiers (one output [batch, classes]); this "
                             f"export's outputs are {[o['shape'] for o in outputs]}")
    split = load_data(data, seed=seed, test_fraction=test_fraction, input_size=signature.inputs[0]["shape"][2],
                      test=test)
    dataset, labels, classes = split.test, labels_of(manifest), outputs[0]["shape"][1]
    if labels and list(dataset.labels) != labels:
        raise UserInputError(f"{data}: its labels {list(dataset.labels)} are not the model's {labels}")
    if len(dataset.labels) != classes:
        raise UserInputError(f"{data} has {len(dataset.labels)} classes; the model outputs {classes}")
    side, pt_name, scripted = pytorch_reference(folder, manifest, "classifier")  # a program model's: its .pt2
    onnx_name = select_model(manifest, "classifier", "onnx", where=str(folder))
    form = manifest["models"][onnx_name].get("strategy", "loop")
    runners: dict[str, Any] = {side: lambda x: as_outputs(scripted(x), pt_name)[0]}
    sessions = {f"onnxruntime fp32 ({form}, exported)": verified_path(folder, manifest, onnx_name).read_bytes()}
    model = rebuild(manifest, scripted.state_dict()) if side == "torchscript" else None
    if model is not None:  # its class is ours: eager, and every other form from the same weights
        runners["eager"] = lambda x: as_outputs(model.module(x), model.reference)[0]
        kept = check_recurrence(scripted, f"{folder}/{pt_name}")
        graphs = module_graphs(model, scripted, kept, signature, int(manifest["opset"]), "auto", lambda m: None)
        sessions.update({f"onnxruntime fp32 ({other})": graph for other, (graph, _) in graphs.items() if other != form})
        loop_bytes = graphs["loop"][0] if "loop" in graphs else None
    else:
        loop_bytes = sessions[f"onnxruntime fp32 ({form}, exported)"] if form == "loop" else None
    if loop_bytes is None:
        loop_bytes = export_user_onnx(scripted, signature, int(manifest["opset"]))[0]
    int8_bytes, report = quantize_int8(loop_bytes)
    share = report["weight_bytes_quantized_share"]
    notes = []
    if share >= MIN_INT8_SHARE:
        sessions["onnxruntime int8 (loop form)"] = int8_bytes
    else:
        notes.append(f"int8 not measured: onnxruntime's dynamic quantiser stores only {share:.0%} of the weight bytes "
                     f"as int8 (kept in float: {', '.join(report['float_weight_consumers']) or 'none'}); onnxruntime "
                     "has no int8 GRU kernel (onnxruntime#9796)")
    name = signature.output_names[0]
    for label, data_bytes in sessions.items():
        session = ort.InferenceSession(data_bytes, session_options(1), providers=["CPUExecutionProvider"])
        runners[label] = (lambda s: lambda x: s.run([name], {INPUT_NAME: x.numpy()})[0])(session)
    lengths = dataset.lengths if dataset.lengths is not None else np.full(len(dataset), dataset.x.shape[1])
    if (lengths < 1).any():
        raise UserInputError(f"{data}: {int((lengths < 1).sum())} test samples have no steps; verify --data takes "
                             "sequences of at least one step")
    predictions = {label: np.empty(len(dataset), np.int64) for label in runners}
    for length in np.unique(lengths):
        index = np.nonzero(lengths == length)[0]
        x = torch.from_numpy(np.ascontiguousarray(dataset.x[index, :int(length)]))
        for label, run in runners.items():
            with torch.no_grad():
                predictions[label][index] = np.asarray(run(x)).argmax(1)
    rows = {label: {"accuracy": float((pred == dataset.y).mean()),
                    f"agreement_with_{side}": float((pred == predictions[side]).mean())}
            for label, pred in predictions.items()}
    return {"data": data, "test_samples": len(dataset), "variable_length": dataset.lengths is not None,
            "reference": side, "runtimes": rows, "int8_weight_share": share, "notes": notes,
            "accuracy_recorded_at_training": manifest.get("metrics", {}).get("test_accuracy")}
