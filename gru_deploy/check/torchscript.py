"""TorchScript files as the check layer reads them: load one (after its sha256 matched a
manifest), prove its time loop is a loop over the input, and keep torch's TorchScript
deprecation warnings quiet while remembering what they said. Scripting a model is convert's
(convert.script); reading what was scripted is here, so verify needs nothing above check.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gru_deploy.errors import CheckFailed, UserInputError

if TYPE_CHECKING:
    import torch

# Deprecation messages torch gave while gru-deploy scripted or exported (first line each, in
# order), silenced where they arose and reported once by whoever takes them (take_deprecations).
_DEPRECATIONS: dict[str, None] = {}
_DEPRECATION = re.compile(r"torch\.jit|TorchScript|legacy|[Tt]he feature will be removed")


@contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """Silence torch's TorchScript / legacy-exporter deprecation warnings, remembering what they
    said (take_deprecations); every other warning goes on as it would have."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message).strip()
        torch_deprecation = issubclass(w.category, (DeprecationWarning, FutureWarning, UserWarning)) and (
            _DEPRECATION.search(text) or (issubclass(w.category, DeprecationWarning) and "torch" in w.filename))
        if torch_deprecation:
            _DEPRECATIONS.setdefault((text.splitlines() or [""])[0][:300], None)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def take_deprecations() -> list[str]:
    """The deprecation messages torch gave since the last call (first line each), and forget them."""
    found = list(_DEPRECATIONS)
    _DEPRECATIONS.clear()
    return found


def check_loop(scripted: "torch.jit.ScriptModule") -> None:
    """Raise CheckFailed unless forward has a prim::Loop whose trip count comes from the input.

    A trip count that is a constant (or not derived from `x`) means the loop was
    specialised to one length, and the model would not accept other sequence lengths.
    """
    graph = scripted.forward.inlined_graph  # the loop may live in a method forward calls
    inputs = list(graph.inputs())
    if len(inputs) < 2:
        raise CheckFailed("scripted forward takes no input tensor")
    x = inputs[1]  # inputs[0] is self
    loops = [node for node in graph.nodes() if node.kind() == "prim::Loop"]
    if not loops:
        raise CheckFailed("the scripted model has no prim::Loop: its time loop was unrolled or removed")
    for loop in loops:
        if depends_on(next(loop.inputs()), x):
            return
    raise CheckFailed(
        "the scripted model's prim::Loop has a trip count that does not come from the input's "
        "sequence length; the loop is specialised to one length"
    )


def depends_on(value: "torch._C.Value", source: "torch._C.Value") -> bool:
    seen: set[str] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        name = current.debugName()
        if name == source.debugName():
            return True
        if name in seen:
            continue
        seen.add(name)
        node = current.node()
        if node.kind() != "prim::Param":
            stack.extend(node.inputs())
    return False


def load(path: Path) -> "torch.jit.ScriptModule":
    """Load a TorchScript file. It is a program: callers check its sha256 against a manifest first."""
    import torch

    try:
        with quiet_torchscript_deprecation():
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(f"{path}: not a loadable TorchScript file ({first[:200]})") from None
    return module.eval()
