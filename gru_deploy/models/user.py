"""The user's own model: `--model path/to/file.py:Name` or `package.module:Name`.

This imports and runs the user's code (that is what `--model` asks for); checkpoints stay
data: `torch.load(weights_only=True)`, holding a `state_dict` and, optionally, the
constructor arguments under `model_args`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from gru_deploy.errors import UserInputError

if TYPE_CHECKING:
    import torch


@dataclass
class UserModel:
    """A user's module, built and loaded, with where it came from (for the manifest)."""

    module: "torch.nn.Module"
    reference: str  # as given: file.py:Name or package.module:Name
    source_file: str | None  # the file the class or factory is defined in, when known
    args: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    family: str | None = None  # a built-in family's name (gru_deploy.models.families), else None
    # its recurrence a torch.while_loop or scan, which TorchScript cannot compile: exported with
    # torch.export and torch.onnx's dynamo exporter, its programs in TorchScript's place
    program: bool = False

    def record(self) -> dict[str, Any]:
        record = {"kind": "family" if self.family else "user", "reference": self.reference, "args": self.args,
                  "class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                  "source_checkpoint_sha256": self.checkpoint_sha256}
        if self.family:
            record["family"] = self.family
        return record


def _import_target(reference: str) -> tuple[Any, str | None]:
    """The class or factory named by `file.py:Name` or `package.module:Name`."""
    path_part, sep, name = reference.rpartition(":")
    if not sep or not path_part or not name.isidentifier():
        raise UserInputError(f"--model {reference!r}: give path/to/file.py:Name or package.module:Name")
    if path_part.endswith(".py"):
        path = Path(path_part)
        if not path.is_file():
            raise UserInputError(f"--model {reference!r}: {path} is not a file")
        module_name = f"gru_deploy_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UserInputError(f"--model {reference!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # TorchScript reads the source through the module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's code failed at import: say where, no traceback
            del sys.modules[module_name]
            raise UserInputError(f"--model {reference!r}: importing {path} failed: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    else:
        try:
            module = importlib.import_module(path_part)
        except Exception as exc:
            raise UserInputError(f"--model {reference!r}: cannot import {path_part}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    target = getattr(module, name, None)
    if target is None:
        raise UserInputError(f"--model {reference!r}: {path_part} has no {name!r}")
    return target, getattr(module, "__file__", None)


def parse_model_args(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"--model-args is not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise UserInputError("--model-args must be a JSON object of keyword arguments, e.g. '{\"hidden\": 12}'")
    return args


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(state_dict, model_args, sha256) of a checkpoint: a plain state_dict, or a mapping with
    `state_dict` and optional `model_args`; loaded with weights_only=True."""
    import torch

    from gru_deploy.manifest import sha256_file

    if not Path(path).is_file():
        raise UserInputError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(f"checkpoint {path} is not a data-only torch checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"checkpoint {path} holds a {type(data).__name__}, not a state_dict")
    if "state_dict" in data:
        state, args = data["state_dict"], data.get("model_args") or {}
    else:
        state, args = data, {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"checkpoint {path}: its state_dict must map names to tensors")
    if not isinstance(args, dict):
        raise UserInputError(f"checkpoint {path}: model_args must be a mapping of constructor arguments")
    return state, dict(args), sha256_file(Path(path))


def load_user_model(reference: str, model_args: dict[str, Any] | None = None,
                    checkpoint: Path | None = None) -> UserModel:
    """Build the user's module (constructor arguments: the checkpoint's, overridden by
    `model_args`) and load the checkpoint's state_dict strictly; eval mode."""
    import torch

    target, source_file = _import_target(reference)
    state, stored_args, sha = (read_checkpoint(checkpoint) if checkpoint is not None else ({}, {}, None))
    args = {**stored_args, **(model_args or {})}
    try:
        module = target(**args)
    except TypeError as exc:
        raise UserInputError(f"--model {reference!r}: building it with {args} failed: {exc}; "
                             "give its constructor arguments with --model-args or in the checkpoint") from None
    if not isinstance(module, torch.nn.Module):
        raise UserInputError(f"--model {reference!r} built a {type(module).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            raise UserInputError(f"checkpoint {checkpoint} does not fit {reference}: {first}") from None
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserInputError(f"{name} holds NaN or inf; refusing to export")
    return UserModel(module.eval(), reference, source_file, args, sha)


def input_size_of(module: "torch.nn.Module") -> int | None:
    """The input size read off the first layer that states one (Linear, GRU/LSTM and their cells)."""
    from torch import nn

    for sub in module.modules():
        if isinstance(sub, (nn.GRU, nn.LSTM, nn.RNN, nn.GRUCell, nn.LSTMCell, nn.RNNCell)):
            return int(sub.input_size)
        if isinstance(sub, nn.Linear):
            return int(sub.in_features)
    return None


def rebuild(manifest: dict[str, Any], state_dict: Mapping[str, Any]) -> UserModel | None:
    """The module an export was made from, rebuilt from its weights where gru-deploy defines its
    class (the tutorial classifier, a built-in family); None for your own model (verify does
    not run your code)."""
    from gru_deploy.models import families, tutorial
    from gru_deploy.spec import ModelSpec

    record = manifest.get("model")
    if isinstance(record, dict) and record.get("kind") == "family":
        module = families.build_family(record["family"], dict(record.get("args") or {}))
        own = module.state_dict()  # TorchScript also keeps the non-persistent buffers (the normalization)
        module.load_state_dict({k: v for k, v in state_dict.items() if k in own})
        return UserModel(module.eval(), record["reference"], families.__file__, record.get("args") or {},
                         family=record["family"])
    if record is None and "config" in manifest:  # the tutorial classifier: its spec is the config
        spec = ModelSpec.from_dict(manifest["config"])
        module = tutorial.load_weights(spec, tutorial.tutorial_parameters(state_dict))
        return UserModel(module.eval(), "gru_deploy.models.tutorial:GRUClassifier", tutorial.__file__)
    return None


def resized(model: UserModel, input_size: int, hidden_size: int) -> UserModel | None:
    """The same kind of model at other sizes, untrained (seed 0: speed does not depend on the
    weights), for bench's large rows; None where gru-deploy does not define its class."""
    import torch

    from gru_deploy.models import families, tutorial

    torch.manual_seed(0)
    outputs = model.module.fc.out_features if hasattr(model.module, "fc") else None
    if model.family:
        args = {**model.args, "input_size": input_size, "hidden_size": hidden_size}
        args.pop("normalization", None)
        return UserModel(families.build_family(model.family, args).eval(), model.reference, model.source_file, args,
                         family=model.family)
    if isinstance(model.module, tutorial.GRUClassifier):
        return UserModel(tutorial.GRUClassifier(input_size, hidden_size, outputs).eval(), model.reference,
                         model.source_file)
    return None


def baseline(module: "torch.nn.Module") -> tuple[Any, Any]:
    """What bench calls eager: (the model run as its author wrote it, one step of it from a
    state, or None where it cannot stream). The tutorial classifier's are its own batch-major
    loop and its cell; any other module's, its forward and forward_stream."""
    from gru_deploy.models import tutorial

    if isinstance(module, tutorial.GRUClassifier):
        return (lambda x: tutorial.tutorial_forward(module, x)), (lambda x, h: module.gru(x[:, 0], h))
    stream = getattr(module, "forward_stream", None)
    return module, (stream if stream is not None and module.initial_state(1) is not None else None)
