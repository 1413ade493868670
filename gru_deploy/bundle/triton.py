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


def triton_config(name: str, platform: str, signature: dict[str, Any], libtorch_names: bool = False,
                  max_batch: int = 64, idle_s: float = 60.0) -> str:
    """config.pbtxt text of one model from its signature (tensors {"name", "dtype", "shape"}, the
    batch first): Triton's batch axis is max_batch_size, other named (dynamic) axes are -1, and a
    per-sample scalar ([batch], e.g. lengths) is dims [1] reshaped to []. A stream signature (h0
    in, h_n out) gets the sequence batcher, which keeps the state between a sequence's requests
    (implicit state, zeros at its start; idle sequences freed after `idle_s`): clients send x
    only. Otherwise dynamic batching. `libtorch_names`: tensors named <name>__<index>, as the
    pytorch backend maps them by position."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    from gru_deploy.spec import STATE_IN, STATE_OUT

    config = pb.ModelConfig(name=name, platform=platform, max_batch_size=max_batch)
    inputs, outputs = signature["inputs"], signature["outputs"]
    h0 = next((t for t in inputs if t["name"] == STATE_IN), None)
    if h0 is not None:
        inputs = [t for t in inputs if t["name"] != STATE_IN]
        outputs = [t for t in outputs if t["name"] != STATE_OUT]
    for tensors, specs in ((config.input, inputs), (config.output, outputs)):
        for i, spec in enumerate(specs):
            tensor = tensors.add(name=f"{spec['name']}__{i}" if libtorch_names else spec["name"],
                                 data_type=pb.DataType.Value(DATA_TYPES[spec["dtype"]]))
            dims = [-1 if isinstance(d, str) else int(d) for d in spec["shape"][1:]]
            tensor.dims.extend(dims or [1])
            if not dims:  # a per-sample scalar
                tensor.reshape.SetInParent()
    if h0 is not None:
        batching = config.sequence_batching
        batching.max_sequence_idle_microseconds = int(idle_s * 1_000_000)
        shape = [int(d) for d in h0["shape"][1:]]
        kept = batching.state.add(input_name=STATE_IN, output_name=STATE_OUT, data_type=pb.DataType.Value("TYPE_FP32"),
                                  dims=shape)
        kept.initial_state.add(data_type=pb.DataType.Value("TYPE_FP32"), zero_data=True, name="zeros", dims=shape)
    else:
        config.dynamic_batching.max_queue_delay_microseconds = 1000
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    return text_format.MessageToString(config)
