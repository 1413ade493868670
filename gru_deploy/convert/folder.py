"""`export` of the tutorial classifier from its checkpoint: the one pipeline (convert.pipeline)
with the tutorial model's proof, `TutorialProof`: its noise-ceiling parity grid (check.verify)
on the staged files, eager being the tutorial's own batch-major loop and float64 a numpy
re-implementation of the equations; its golden cases, its ONNX metadata and its manifest
fields (the spec under `config`) as its exports always had them.

Everything is built in a staging folder beside the target and swapped in only after the
parity gate passes, so a failed or interrupted export leaves the earlier export whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gru_deploy.check.compare import DEFAULT_ATOL, DEFAULT_RTOL
from gru_deploy.convert.pipeline import Built, Proof, check_failed, export_model
from gru_deploy.errors import CheckFailed
from gru_deploy.manifest import TUTORIAL_MODEL_NAME
from gru_deploy.train import Checkpoint
from gru_deploy.versions import __version__

if TYPE_CHECKING:
    import torch

    from gru_deploy.check.grid import ParityReport
    from gru_deploy.check.module_parity import UserSignature
    from gru_deploy.models.user import UserModel
    from gru_deploy.spec import ModelSpec

# The golden cases a bundle ships: (variant, batch, seq); lengths cases use lengths {seq, 1, 0}.
GOLDEN_CASES = (("classifier", 1, 10), ("classifier", 2, 25), ("classifier", 3, 1),
                ("stream", 2, 12), ("lengths", 3, 15))


class TutorialProof(Proof):
    """The tutorial classifier's proof (see the module's docstring)."""

    def __init__(self, checkpoint: Checkpoint, atol: float, rtol: float) -> None:
        self.checkpoint, self.spec, self.atol, self.rtol = checkpoint, checkpoint.spec, atol, rtol

    def metadata(self, model: "UserModel") -> dict[str, Any]:
        return {"gru_deploy.version": __version__, "gru_deploy.config": self.spec.to_dict(),
                "gru_deploy.labels": list(self.spec.labels),
                "gru_deploy.source_checkpoint_sha256": self.checkpoint.sha256 or ""}

    def check(self, built: Built, model: "UserModel", choosing: bool, step: Callable[[str], None]) -> None:
        """auto's check before timing a candidate (the classifier's full grid, a variant's
        grid); a single form is proved on the staged files (prove)."""
        from gru_deploy.check.verify import VARIANT_CASES, build_runners, tutorial_grid

        if not choosing:
            return None
        what = f"the {built.variant} variant as {built.form}" if built.variant != "classifier" else \
            f"strategy {built.form}"
        step(f"checking parity of {what} before timing it")
        runners = build_runners(self.spec, built.scripted, built.onnx_bytes, variant=built.variant)
        cases = None if built.variant == "classifier" else VARIANT_CASES
        report = tutorial_grid(runners, self.spec, cases, built.variant, atol=self.atol, rtol=self.rtol)
        if not report:
            raise check_failed(f"parity failed for {what}", report)
        return None

    def golden(self, model: "UserModel", signatures: dict[str, "UserSignature"]) -> tuple[bytes, dict[str, Any]]:
        return golden_cases(model.module, self.spec)

    def finish(self, model: "UserModel", kept: str, parts: list["ParityReport"], files: dict[str, bytes],
               signatures: dict[str, "UserSignature"]) -> tuple[dict[str, Any], Callable]:
        from gru_deploy.check.verify import parity_for_dir

        def prove(stage: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            report = parity_for_dir(stage, manifest, self.atol, self.rtol)
            if not report:
                raise CheckFailed("parity failed, nothing written: " + "; ".join(report.failures()))
            return report.to_json(), report.record()

        checkpoint = self.checkpoint
        return {"model_name": TUTORIAL_MODEL_NAME, "config": self.spec.to_dict(), "labels": list(self.spec.labels),
                "metrics": checkpoint.metrics,
                "training": checkpoint.training, "source_checkpoint": {"sha256": checkpoint.sha256}}, prove


def export_to_dir(checkpoint: Checkpoint, out: Path, opset: int = 17, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, strategy: str = "loop", typical: tuple[int, int] = (1, 100),
                  on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
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
                        strategy=strategy, typical=typical, labels=tuple(checkpoint.spec.labels), on_step=on_step)


def golden_cases(model: "torch.nn.Module", spec: "ModelSpec") -> tuple[bytes, dict[str, Any]]:
    """The golden cases (GOLDEN_CASES; inputs from check.verify.make_feed) answered by the model
    eager in fp32 (check.runners.eager_runner): GOLDEN_FILE's bytes and the manifest's record."""
    from gru_deploy.check.module_parity import golden_store
    from gru_deploy.check.runners import eager_runner
    from gru_deploy.check.verify import make_feed

    cases = []
    for index, (variant, batch, seq) in enumerate(GOLDEN_CASES):
        feed = make_feed(spec, variant, batch, seq, seed=1000 + index)
        cases.append((f"{variant}_{index}", variant, feed, eager_runner(spec, model, variant).run(feed)))
    return golden_store(cases)
