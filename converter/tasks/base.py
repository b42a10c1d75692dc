"""What a task adapter supplies to the one convert pipeline: everything that differs between classifying and
detecting. The stages (converter/stages/) do the rest the same way for every task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeq.manifest import OutputSpec
from edgeq.runtime import Model

if TYPE_CHECKING:
    from ..context import ConvertContext, Converted
    from ..stages.load import SourceModel


@dataclass(frozen=True)
class HeadExport:
    """A model whose head the TFLite converter can quantise (K weight samples as plain layers), the manifest's
    ``head`` block, and what the checks need afterwards (the float weight samples)."""

    keras_model: Any
    head: dict[str, Any]
    detail: Any = None


class Task(ABC):
    """One task's part of ``edgeq convert``."""

    name: str  # the manifest's task
    # recipe options this task does not take yet: (recipe, field) -> flag; refused rather than ignored
    refuses: dict[tuple[str, str], str] = {}

    @abstractmethod
    def classes(self, source: "SourceModel") -> int:
        """The number of classes the model predicts."""

    def check(self, ctx: "ConvertContext") -> None:
        """Refuse what this task cannot do, and read the validation data, before the slow part."""
        for (group, name), flag_name in self.refuses.items():
            if getattr(getattr(ctx.recipe, group), name):
                raise_refused(flag_name, ctx.source.origin, self.name)

    # -- head export (stages/export_head.py) --------------------------------------------------------------
    @abstractmethod
    def bayes_head(self, ctx: "ConvertContext") -> bool:
        """Whether the source model has a Bayesian head (refusing ``--bayes-samples`` when it does not)."""

    @abstractmethod
    def export_dense(self, ctx: "ConvertContext") -> HeadExport:
        """The model as it is, with a deterministic head."""

    @abstractmethod
    def export_bayes(self, ctx: "ConvertContext", samples: int, seed: int, layout: str) -> HeadExport:
        """The model with K weight samples of its Bayesian head fused in, in ``layout``."""

    @abstractmethod
    def stacked_steps(self, ctx: "ConvertContext", stacked: HeadExport) -> dict[str, float]:
        """Before converting: ``{"spread", "step", "steps"}``, how many int8 steps of the stacked output the
        spread between samples would span (the float model on calibration images)."""

    # -- converted models ----------------------------------------------------------------------------------
    @abstractmethod
    def describe_outputs(self, ctx: "ConvertContext", model: Model) -> list[OutputSpec]:
        """The manifest's outputs of a converted model, each with its role."""

    @abstractmethod
    def bind(self, ctx: "ConvertContext", model: Model, outputs: list[OutputSpec]) -> Any:
        """The core's reader of those outputs (the same one the device uses)."""

    @abstractmethod
    def verify(self, ctx: "ConvertContext") -> None:
        """Task checks of the converted models against the source: roles, sampled weights, spread."""

    # -- unfamiliarity (stages/density.py) -----------------------------------------------------------------
    # --density-method auto: the nearest class mean (measured best for a classifier, docs/uncertainty.md)
    density_method = "gda"
    # --density-normalise auto; None: the features as they are. A task that can normalise lists "l2" in
    # density_normalisations and adds its features as an output (add_density_outputs)
    density_normalise: str | None = None
    density_normalisations: tuple[str, ...] = ()

    def density_data(self, ctx: "ConvertContext", recipe: Any) -> Any:
        """The fitting and held-out data (a :class:`converter.stages.density.DensityData`), None without labels.

        One policy for every task: fit on ``--density-data``, else on a labelled ``--calib``, else on ``--val``;
        hold out ``--val`` when the fit came from elsewhere, else the other half of the fitting set. A task says
        what its labelled data is through the three ``density_*`` hooks below."""
        from ..stages.density import DensityData

        v = ctx.recipe.validation.val
        calib = ctx.recipe.quant.calib
        source = recipe.data
        if source is None and calib and self.density_labelled_calib(ctx, calib):
            source = calib  # a labelled calibration set: the training data, usually
        source = source or v
        if source is None:
            return None
        flag = "--density-data" if recipe.data else ("--calib" if source != v else "--val")
        data = self.density_load(ctx, source, flag, recipe.max_samples)
        if v is not None and source != v:
            fit, targets = self.density_subset(data, None, recipe.max_samples)
            held, _ = self.density_subset(self.density_load(ctx, v, "--val", recipe.max_samples), None, None)
            return DensityData(fit, targets, held, source, str(v))
        fit, targets = self.density_subset(data, 0, recipe.max_samples)
        held, _ = self.density_subset(data, 1, None)
        return DensityData(fit, targets, held, f"{source} (every other image)", f"{source} (the other half)")

    def density_labelled_calib(self, ctx: "ConvertContext", calib: str) -> bool:
        """Whether ``--calib`` carries this task's labels (then the density is fitted on it)."""
        return False

    def density_load(self, ctx: "ConvertContext", source: str, flag: str, max_samples: int) -> Any:
        """A labelled set read for the density (errors name ``flag``)."""
        raise NotImplementedError

    def density_subset(self, data: Any, half: int | None, max_samples: int | None) -> tuple[Any, Any]:
        """``(inputs, class indices)`` of ``data``: all of it (``half`` None) or one of its two deterministic halves
        (0: the fit, 1: held out), evenly thinned to ``max_samples`` (None: the task's own cap)."""
        raise NotImplementedError

    def density_tap_names(self, ctx: "ConvertContext") -> list[str]:
        raise NotImplementedError

    def density_features(self, ctx: "ConvertContext", data: Any) -> tuple[Any, Any]:
        """``[N, F]`` float features of the fitting data and their class indices."""
        raise NotImplementedError

    def density_tap_widths(self, ctx: "ConvertContext") -> list[int]:
        """The feature count of each tap, in :meth:`density_tap_names` order (they sum to the features' width)."""
        raise NotImplementedError

    def add_density_outputs(self, ctx: "ConvertContext", W: Any, keep: Any, normalise: str | None = None) -> None:
        """Add ``density_projection`` (the features' whitened coordinates, features @ W) to ``ctx.source``'s model,
        from the taps ``keep`` marks; with ``normalise`` l2, the features instead (``density_features``), which the
        device projects."""
        raise NotImplementedError

    def density_scores(self, ctx: "ConvertContext", converted: "Converted", held_out: Any) -> Any:
        """Unfamiliarity of the held-out data through a converted model."""
        raise NotImplementedError

    # -- validation (stages/validate.py) -----------------------------------------------------------------
    @abstractmethod
    def read_validation(self, ctx: "ConvertContext") -> Any:
        """The validation data of ``--val``, checked against the model's classes."""

    @abstractmethod
    def score(self, ctx: "ConvertContext", converted: "Converted", name: str) -> Any:
        """One pass of a converted model over the validation data."""

    def top1(self, scored: Any) -> float:
        """Top-1 accuracy of a pass (what bias correction and the accuracy-aware loop decide on)."""
        raise NotImplementedError(f"{self.name}: no top-1 accuracy")

    @abstractmethod
    def validate(self, ctx: "ConvertContext", reference: Any, quantised: Any) -> dict[str, Any]:
        """The manifest's validation block from the two passes; sets the head's review rule."""


def raise_refused(flag_name: str, origin: str, task: str) -> None:
    from edgeq.errors import ModelError

    kind = "detectors" if task == "detect" else f"{task} models"
    raise ModelError(f"{flag_name} does not apply to {kind} yet; convert {origin} without it")
