"""Stage: validate. The float reference and the quantised model over ``--val`` through the same preprocessing
and runtime, side by side (the manifest's ``validation`` block), and the ``needs_review`` rule calibrated on the
quantised results. The task adapter supplies the pass and the figures (top-1 and calibration for a classifier,
mAP and unknown-object AUROC for a detector).

Each distinct model is run over ``--val`` once (:class:`Scoring`): bias correction, the accuracy-aware loop and
the final validation ask for the same models again.
"""

from __future__ import annotations

from typing import Any

from edgeq.manifest import Density, Detector

from ..binding import Binding
from ..context import ConvertContext
from ..products import Converted, SourceModel, Validation
from ..recipes import ValidationRecipe
from ..tasks.base import Task


def read(recipe: ValidationRecipe, ctx: ConvertContext, task: Task, source: SourceModel) -> Any:
    """The validation data, read and checked before the slow part (None without ``--val``)."""
    return task.read_validation(ctx, source) if recipe.val else None


class Scoring:
    """The task's pass over ``--val`` of each distinct model, made once and kept (a cache, not a product)."""

    def __init__(self, ctx: ConvertContext, binding: Binding, data: Any, reference: Converted) -> None:
        self.ctx, self.binding, self.data, self.reference = ctx, binding, data, reference
        self._scored: dict[bytes, Any] = {}
        self._reference: Any = None

    def of(self, converted: Converted) -> Any:
        if converted.data not in self._scored:
            self._scored[converted.data] = self.binding.task.score(self.ctx, converted, self.data, "quantized")
        return self._scored[converted.data]

    def of_reference(self) -> Any:
        if self._reference is None:
            self._reference = self.binding.task.score(self.ctx, self.reference, self.data, "float")
        return self._reference

    def top1(self, data: bytes) -> float:
        """Top-1 accuracy on ``--val`` of converted bytes (NaN without ``--val``); loaded only if not scored yet."""
        if self.data is None:
            return float("nan")
        if data not in self._scored:
            self.of(self.binding.load(data))
        return self.binding.task.top1(self._scored[data])


def run(recipe: ValidationRecipe, ctx: ConvertContext, scoring: Scoring, quantised: Converted,
        density: Density | None, detector: Detector | None) -> Validation | None:
    if scoring.data is None:
        return None
    with ctx.timed("validation_s"):
        return scoring.binding.task.validate(ctx, scoring.data, scoring.of_reference(), scoring.of(quantised),
                                             density, detector, (scoring.reference, quantised))
