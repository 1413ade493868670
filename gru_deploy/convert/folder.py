"""`export` of the tutorial classifier from its checkpoint: the one pipeline (convert.pipeline)
with every model's proof (convert.user.ModuleProof) and what the tutorial model has of its
own: its float64 reference is a numpy re-implementation of the equations (written from the
design, not from our torch code) that also estimates float32's own error, so it is proved on
the wide grid (batch up to 64, empty sequences, inputs at scales 0.01 to 10, the widening for
float32's own error below its ceiling); its ONNX metadata and manifest fields (the spec under
`config`) are as its exports always had them.

Everything is built in a staging folder beside the target and swapped in only after the
parity gate passes, so a failed or interrupted export leaves the earlier export whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.compare import DEFAULT_ATOL, DEFAULT_RTOL
from gru_deploy.check.module_parity import WIDE_GRID, Call
from gru_deploy.convert.pipeline import export_model
from gru_deploy.convert.user import ModuleProof
from gru_deploy.manifest import TUTORIAL_MODEL_NAME
from gru_deploy.train import Checkpoint
from gru_deploy.versions import __version__

if TYPE_CHECKING:
    from gru_deploy.check.module_parity import UserSignature
    from gru_deploy.models.user import UserModel


class TutorialProof(ModuleProof):
    """The tutorial classifier's proof (see the module's docstring)."""

    def __init__(self, checkpoint: Checkpoint, atol: float, rtol: float) -> None:
        super().__init__(atol, rtol, tuple(checkpoint.spec.labels), checkpoint.metrics, checkpoint.training, WIDE_GRID)
        self.checkpoint, self.spec = checkpoint, checkpoint.spec

    def metadata(self, model: "UserModel") -> dict[str, Any]:
        return {"gru_deploy.version": __version__, "gru_deploy.config": self.spec.to_dict(),
                "gru_deploy.labels": list(self.spec.labels),
                "gru_deploy.source_checkpoint_sha256": self.checkpoint.sha256 or ""}

    def float64_runner(self, model: "UserModel", variant: str) -> Call:
        from gru_deploy.check.runners import Float64Runner
        from gru_deploy.models.tutorial import weights_numpy

        runner = Float64Runner(self.spec, weights_numpy(model.module), variant)
        return Call("float64", runner.run, noise=runner.float32_noise)

    def reference_source(self, model: "UserModel") -> str:
        return "the GRU equations re-implemented in float64 numpy (check.runners.Float64Runner)"

    def fields(self, model: "UserModel", kept: str, signatures: dict[str, "UserSignature"]) -> dict[str, Any]:
        checkpoint = self.checkpoint
        return {"model_name": TUTORIAL_MODEL_NAME, "config": self.spec.to_dict(), "labels": list(self.spec.labels),
                "metrics": checkpoint.metrics, "training": checkpoint.training,
                "source_checkpoint": {"sha256": checkpoint.sha256}}


def export_to_dir(checkpoint: Checkpoint, out: Path, opset: int = 17, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, strategy: str = "loop", typical: tuple[int, int] = (1, 100),
                  on_step: Callable[[str], None] | None = None, targets: tuple[str, ...] = (),
                  executorch_batch: int = 1, executorch_max_seq: int = 2048, onnx_exporter: str = "torchscript") -> dict[str, Any]:
    """Write the tutorial classifier's export folder into `out` (model.pt, model.onnx, the
    variants, parity.json, manifest.json, …) by the one pipeline; return the manifest.
    `strategy` is loop, fused, stepwise or auto (every form checked, timed at `typical` (batch,
    seq) in onnxruntime, the fastest kept). Raises CheckFailed (and writes nothing) when a guard
    or the parity gate fails."""
    from gru_deploy.models import tutorial
    from gru_deploy.models.user import UserModel

    model = UserModel(checkpoint.model(), "gru_deploy.models.tutorial:GRUClassifier", tutorial.__file__, {},
                      checkpoint.sha256)
    return export_model(model, Path(out), TutorialProof(checkpoint, atol, rtol), opset=opset, atol=atol, rtol=rtol,
                        strategy=strategy, typical=typical, labels=tuple(checkpoint.spec.labels), on_step=on_step,
                        targets=targets, executorch_batch=executorch_batch, executorch_max_seq=executorch_max_seq,
                        onnx_exporter=onnx_exporter)
