"""The classification task: a single-image classifier with a dense or a Bayesian (``BayesDense``) head.

A Bayesian head is exported as K weight samples in plain Dense layers (converter/models/bayes.py): ``stacked``
(one ``[K*C]`` output) or ``centred`` (the posterior mean ``[C]`` plus each sample's residual ``[K*C]``). Output
roles are told apart by size, never by order: ``logits`` has C values, ``samples`` and ``residuals`` K*C.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeq import records
from edgeq.density import PROJECTION_ROLE
from edgeq.errors import ModelError, QuantizationError
from edgeq.heads import BoundHead, HeadSpec, describe_outputs
from edgeq.manifest import Density, Detector, Head, OutputSpec
from edgeq.runtime import Model

from ..context import ConvertContext
from ..models import bayes
from ..products import Calibration, Converted, HeadExport, SourceModel, Validation
from ..recipes import DEFAULT_COMBINE
from ..spread import spread_check
from ..stages.taps import ClassifierTaps
from .base import Task


class ClassifyTask(Task):
    name = "classify"

    def classes(self, source: SourceModel) -> int:
        return source.num_classes

    def taps(self, ctx: ConvertContext) -> ClassifierTaps:
        return ClassifierTaps(ctx)

    def check(self, ctx: ConvertContext, source: SourceModel) -> None:
        super().check(ctx, source)
        u = ctx.recipe.unknown
        if u.measures != "auto" or u.combine != DEFAULT_COMBINE:
            raise ModelError("--unknown-measures and --unknown-combine apply to detectors: a classifier's unknown "
                             "inputs are flagged by its unfamiliarity (--review-ood-rate)")
        ctx.recipe.validation.measure_for("classify", ctx.recipe.density.density != "off")  # refused before the work
        if ctx.recipe.bayes.samples is not None and source.keras_model is None:
            raise ModelError(f"{source.origin}: --bayes-samples needs a .keras model with a BayesDense head, "
                             "not a SavedModel")

    # -- head export ----------------------------------------------------------------------------------------
    def bayes_head(self, ctx: ConvertContext, source: SourceModel) -> bool:
        if source.keras_model is not None and bayes.find_bayes_heads(source.keras_model):
            return True
        if ctx.recipe.bayes.samples is not None:  # raises, saying there is no Bayesian head to sample
            bayes.export_model(source.keras_model, ctx.recipe.bayes.samples, origin=source.origin)
        return False

    def export_dense(self, ctx: ConvertContext, source: SourceModel) -> HeadExport:
        return HeadExport(source, Head(type="dense", samples=1, classes=len(ctx.labels), layout="single"))

    def export_bayes(self, ctx: ConvertContext, source: SourceModel, samples: int, seed: int,
                     layout: str) -> HeadExport:
        exported = bayes.export_model(source.keras_model, samples, seed, layout, source.origin)
        return HeadExport(source.with_model(exported.model), Head.model_validate(exported.describe()), exported)

    def stacked_steps(self, stacked: HeadExport, calibration: Calibration) -> records.StackedEstimate:
        return records.StackedEstimate(**bayes.stacked_steps_estimate(stacked.detail, calibration.samples))

    # -- converted models -----------------------------------------------------------------------------------
    def describe_outputs(self, model: Model, head: Head, density: Density | None) -> list[OutputSpec]:
        outputs = describe_outputs(model, _head_spec(head))
        if density is not None:  # its size, the rank, is kept apart from the head's (stages/density.py)
            found = [t for t in model.outputs if int(np.prod(t.shape)) == density.rank]
            if len(found) != 1:
                raise QuantizationError(f"converted model has {len(found)} outputs of size {density.rank} for "
                                        f"{PROJECTION_ROLE!r}")
            outputs.append(OutputSpec(role=PROJECTION_ROLE, **found[0].to_dict()))
        return outputs

    def bind(self, ctx: ConvertContext, model: Model, outputs: list[OutputSpec], head: Head,
             density: Density | None) -> BoundHead:
        return _head_spec(head).bind(model, outputs, density=density)

    def verify(self, ctx: ConvertContext, source: SourceModel, export: HeadExport, reference: Converted,
               quantised: Converted, calibration: Calibration | None) -> Head:
        if export.detail is None:
            return export.head
        weights = _weight_check(quantised.model, export.detail)
        spread = None if calibration is None else spread_check(
            reference, quantised, calibration.samples[:64], "images", lambda c: c.bound.read(c.model)[None])
        return export.head.model_copy(update={"weights": weights, "spread": spread})

    # -- validation -----------------------------------------------------------------------------------------
    def read_validation(self, ctx: ConvertContext, source: SourceModel) -> Any:
        from ..data.datasets import class_folder

        return class_folder(ctx.recipe.validation.val, list(ctx.labels))

    def score(self, ctx: ConvertContext, converted: Converted, data: Any, name: str) -> Any:
        from ..evaluation.classify import score

        return score(converted.model, converted.bound, ctx.spec, data, name)

    def top1(self, scored: Any) -> float:
        return float(scored.correct.mean())

    def validate(self, ctx: ConvertContext, data: Any, reference: Any, quantised: Any, density: Density | None,
                 detector: Detector | None, models: tuple[Converted, Converted]) -> Validation:
        from ..evaluation.classify import compare_scored
        from ..evaluation.review import calibrate_rule, flag_rates
        from ..stages.density import unfamiliar_threshold

        v = ctx.recipe.validation
        measure = v.measure_for("classify", density is not None)
        values = quantised.measure(measure)
        rule = calibrate_rule(values, quantised.correct, measure, v.target_accuracy, v.review_budget,
                              unfamiliar_threshold(density, v.review_ood_rate), v.review_ood_rate, ctx.log)
        block = records.ClassifyValidation(**compare_scored(reference, quantised), source=str(v.val),
                                           review=flag_rates(values, quantised.unfamiliarity, rule, quantised.correct))
        return Validation(block, records.ReviewRule.model_validate(rule))


def _head_spec(head: Head) -> HeadSpec:
    return HeadSpec(head.type, head.samples, head.classes, head.layout)


def _weight_check(model: Model, exported: bayes.BayesExport) -> records.HeadWeights:
    """Dequantise the int8 stacked kernel and compare it with the float samples, per output channel."""
    k, c, f = exported.samples, exported.classes, exported.features
    for d in model.interpreter.get_tensor_details():
        if tuple(d["shape"]) == (k * c, f) and d["dtype"] in (np.int8, np.int16):
            scales = d["quantization_parameters"]["scales"]
            mean_kernel = None
            if exported.layout == "centred":
                mean_kernel = np.asarray(exported.model.get_layer("mean_logits").get_weights()[0], dtype=np.float64)
            return records.HeadWeights(**bayes.weight_faithfulness(
                exported.sampled_kernels, model.interpreter.get_tensor(d["index"]), scales, exported.layout,
                mean_kernel))
    return records.HeadWeights(note="no quantised stacked kernel found (float model)")
