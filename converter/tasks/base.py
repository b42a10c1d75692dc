"""What a task adapter supplies to the one convert pipeline: everything that differs between classifying and
detecting. The stages (converter/stages/) do the rest the same way for every task; the density's part of a task
is its own small interface (stages/taps.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from edgeq import records
from edgeq.manifest import Density, Detector, Head, OutputSpec
from edgeq.runtime import Model

from ..context import ConvertContext
from ..products import Calibration, Converted, HeadExport, SourceModel, Validation
from ..stages.taps import Taps


class Task(ABC):
    """One task's part of ``edgeq convert``."""

    name: str  # the manifest's task
    # recipe options this task does not take yet: (recipe, field) -> flag; refused rather than ignored
    refuses: dict[tuple[str, str], str] = {}

    @abstractmethod
    def classes(self, source: SourceModel) -> int:
        """The number of classes the model predicts."""

    def check(self, ctx: ConvertContext, source: SourceModel) -> None:
        """Refuse what this task cannot do, before the slow part."""
        for (group, name), flag_name in self.refuses.items():
            if getattr(getattr(ctx.recipe, group), name):
                raise_refused(flag_name, source.origin, self.name)

    @abstractmethod
    def taps(self, ctx: ConvertContext) -> Taps:
        """Where the density reads this task's features, and how (stages/taps.py)."""

    # -- head export (stages/export_head.py) --------------------------------------------------------------
    @abstractmethod
    def bayes_head(self, ctx: ConvertContext, source: SourceModel) -> bool:
        """Whether the source model has a Bayesian head (refusing ``--bayes-samples`` when it does not)."""

    @abstractmethod
    def export_dense(self, ctx: ConvertContext, source: SourceModel) -> HeadExport:
        """The model as it is, with a deterministic head."""

    @abstractmethod
    def export_bayes(self, ctx: ConvertContext, source: SourceModel, samples: int, seed: int,
                     layout: str) -> HeadExport:
        """The model with K weight samples of its Bayesian head fused in, in ``layout``."""

    @abstractmethod
    def stacked_steps(self, stacked: HeadExport, calibration: Calibration) -> records.StackedEstimate:
        """Before converting: how many int8 steps of the stacked output the spread between samples would span
        (the float model on calibration images)."""

    # -- converted models ----------------------------------------------------------------------------------
    @abstractmethod
    def describe_outputs(self, model: Model, head: Head, density: Density | None) -> list[OutputSpec]:
        """The manifest's outputs of a converted model, each with its role."""

    def detector(self, ctx: ConvertContext, outputs: list[OutputSpec]) -> Detector | None:
        """The manifest's detector block of a converted model (None: not a detector)."""
        return None

    @abstractmethod
    def bind(self, ctx: ConvertContext, model: Model, outputs: list[OutputSpec], head: Head,
             density: Density | None) -> Any:
        """The core's reader of those outputs (the same one the device uses)."""

    @abstractmethod
    def verify(self, ctx: ConvertContext, source: SourceModel, export: HeadExport, reference: Converted,
               quantised: Converted, calibration: Calibration | None) -> Head:
        """Task checks of the converted models against the source (roles, sampled weights, spread); the head block
        with what they measured."""

    # -- validation (stages/validate.py) -----------------------------------------------------------------
    @abstractmethod
    def read_validation(self, ctx: ConvertContext, source: SourceModel) -> Any:
        """The validation data of ``--val``, checked against the model's classes."""

    @abstractmethod
    def score(self, ctx: ConvertContext, converted: Converted, data: Any, name: str) -> Any:
        """One pass of a converted model over the validation data."""

    def top1(self, scored: Any) -> float:
        """Top-1 accuracy of a pass (what bias correction and the accuracy-aware loop decide on)."""
        raise NotImplementedError(f"{self.name}: no top-1 accuracy")

    @abstractmethod
    def validate(self, ctx: ConvertContext, data: Any, reference: Any, quantised: Any, density: Density | None,
                 detector: Detector | None, models: tuple[Converted, Converted]) -> Validation:
        """The validation block from the two passes (``models``: the float reference and the int8 model, for a task
        that needs another pass), with the review rule calibrated on the int8 one."""


def raise_refused(flag_name: str, origin: str, task: str) -> None:
    from edgeq.errors import ModelError

    kind = "detectors" if task == "detect" else f"{task} models"
    raise ModelError(f"{flag_name} does not apply to {kind} yet; convert {origin} without it")
