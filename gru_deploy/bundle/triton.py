"""Triton model configurations (config.pbtxt), built as Triton's own `ModelConfig` protobuf
(`model_config_pb2`, shipped with tritonclient) and written with protobuf's `text_format`, so
a field Triton does not know cannot be written, and every value has the type Triton expects."""

from __future__ import annotations

from typing import Any

DATA_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def triton_name(base: str, variant: str, fmt: str = "onnx") -> str:
    """A model's name in a server bundle's Triton repository (and in `serve`): the classifier is
    `base`, another variant `base_<variant>`, a TorchScript copy that name + `_torchscript`."""
    name = base if variant == "classifier" else f"{base}_{variant}"
    return f"{name}_torchscript" if fmt == "torchscript" else name


def model_config(name: str, platform: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                 max_batch: int = 64, state: dict[str, Any] | None = None, idle_s: float = 60.0) -> str:
    """config.pbtxt text for one model. `inputs`/`outputs`: tensors as the manifest records them
    ({"name", "dtype", "shape"}, the batch first): Triton's batch axis is max_batch_size, other
    named (dynamic) axes are -1, and a per-sample scalar ([batch], e.g. lengths) is dims [1]
    reshaped to []. With `state` ({"input", "output", "shape"}: the state tensor without its
    batch axis), the sequence batcher keeps it between a sequence's requests (implicit state,
    zeros at the start; idle sequences freed after `idle_s`); otherwise dynamic batching."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=name, platform=platform, max_batch_size=max_batch)

    def tensor(target: Any, spec: dict[str, Any]) -> None:
        target.name = spec["name"]
        target.data_type = pb.DataType.Value(DATA_TYPES[spec["dtype"]])
        dims = [-1 if isinstance(d, str) else int(d) for d in spec["shape"][1:]]
        if dims:
            target.dims.extend(dims)
        else:  # a per-sample scalar
            target.dims.append(1)
            target.reshape.SetInParent()

    for spec in inputs:
        tensor(config.input.add(), spec)
    for spec in outputs:
        tensor(config.output.add(), spec)
    if state is not None:
        batching = config.sequence_batching
        batching.max_sequence_idle_microseconds = int(idle_s * 1_000_000)
        kept = batching.state.add(input_name=state["input"], output_name=state["output"],
                                  data_type=pb.DataType.Value("TYPE_FP32"))
        kept.dims.extend(int(d) for d in state["shape"])
        zeros = kept.initial_state.add(data_type=pb.DataType.Value("TYPE_FP32"), zero_data=True, name="zeros")
        zeros.dims.extend(int(d) for d in state["shape"])
    else:
        config.dynamic_batching.max_queue_delay_microseconds = 1000
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    return text_format.MessageToString(config)


def triton_config(name: str, platform: str, signature: dict[str, Any], libtorch_names: bool = False,
                  max_batch: int = 64, idle_s: float = 60.0) -> str:
    """config.pbtxt of one model from its signature (model_config): the batch axis is Triton's,
    other named axes are -1, a per-sample scalar (lengths) is dims [1] reshaped to []. A stream
    signature (h0 in, h_n out) gets the sequence batcher, which keeps the state between a
    sequence's requests (zeros at its start): clients send x only. `libtorch_names`: tensors
    named <name>__<index>, as the pytorch backend maps them by position."""
    from gru_deploy.spec import STATE_IN, STATE_OUT

    def tensors(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**t, "name": f"{t['name']}__{i}" if libtorch_names else t["name"]} for i, t in enumerate(specs)]

    inputs, outputs, state = signature["inputs"], signature["outputs"], None
    h0 = next((t for t in inputs if t["name"] == STATE_IN), None)
    if h0 is not None:
        state = {"input": STATE_IN, "output": STATE_OUT, "shape": h0["shape"][1:]}
        inputs = [t for t in inputs if t["name"] != STATE_IN]
        outputs = [t for t in outputs if t["name"] != STATE_OUT]
    return model_config(name, platform, tensors(inputs), tensors(outputs), max_batch, state, idle_s)
