"""The classification task: a single-image classifier with a dense or a Bayesian (``BayesDense``) head.

A Bayesian head is exported as K weight samples in plain Dense layers (converter/models/bayes.py): ``stacked``
(one ``[K*C]`` output) or ``centred`` (the posterior mean ``[C]`` plus each sample's residual ``[K*C]``). Output
roles are told apart by size, never by order: ``logits`` has C values, ``samples`` and ``residuals`` K*C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.errors import ModelError
from edgeq.heads import BoundHead, HeadSpec, describe_outputs
from edgeq.manifest import OutputSpec
from edgeq.runtime import Model, quantize_values
from edgeq.uncertainty import summarize

from ..models import bayes
from .base import HeadExport, Task

if TYPE_CHECKING:
    from ..context import ConvertContext, Converted
    from ..stages.load import SourceModel


class ClassifyTask(Task):
    name = "classify"

    def classes(self, source: "SourceModel") -> int:
        return source.num_classes

    def check(self, ctx: "ConvertContext") -> None:
        super().check(ctx)
        if ctx.recipe.bayes.samples is not None and ctx.source.keras_model is None:
            raise ModelError(f"{ctx.source.origin}: --bayes-samples needs a .keras model with a BayesDense head, "
                             "not a SavedModel")

    # -- head export ----------------------------------------------------------------------------------------
    def bayes_head(self, ctx: "ConvertContext") -> bool:
        keras_model = ctx.source.keras_model
        if keras_model is not None and bayes.find_bayes_heads(keras_model):
            return True
        if ctx.recipe.bayes.samples is not None:  # raises, saying there is no Bayesian head to sample
            bayes.export_model(keras_model, ctx.recipe.bayes.samples, origin=ctx.source.origin)
        return False

    def export_dense(self, ctx: "ConvertContext") -> HeadExport:
        head = {"type": "dense", "samples": 1, "classes": len(ctx.labels), "layout": "single"}
        return HeadExport(ctx.source.keras_model, head)

    def export_bayes(self, ctx: "ConvertContext", samples: int, seed: int, layout: str) -> HeadExport:
        exported = bayes.export_model(ctx.source.keras_model, samples, seed, layout, ctx.source.origin)
        return HeadExport(exported.model, exported.describe(), exported)

    def stacked_steps(self, ctx: "ConvertContext", stacked: HeadExport) -> dict[str, float]:
        return bayes.stacked_steps_estimate(stacked.detail, ctx.calibration.samples)

    # -- converted models -----------------------------------------------------------------------------------
    def describe_outputs(self, ctx: "ConvertContext", model: Model) -> list[OutputSpec]:
        return describe_outputs(model, _head_spec(ctx))

    def bind(self, ctx: "ConvertContext", model: Model, outputs: list[OutputSpec]) -> BoundHead:
        return _head_spec(ctx).bind(model, outputs)

    def verify(self, ctx: "ConvertContext") -> None:
        if ctx.export is None:
            return
        ctx.head["weights"] = _weight_check(ctx.quantised.model, ctx.export)
        if ctx.calibration is not None:
            ctx.head["spread"] = _spread_check(ctx.reference, ctx.quantised, ctx.calibration.samples[:64])

    # -- validation -----------------------------------------------------------------------------------------
    def read_validation(self, ctx: "ConvertContext") -> Any:
        from ..data.datasets import class_folder

        return class_folder(ctx.recipe.validation.val, ctx.labels)

    def score(self, ctx: "ConvertContext", converted: "Converted", name: str) -> Any:
        from ..evaluation.classify import score

        return score(converted.model, converted.bound, ctx.spec, ctx.data, name)

    def top1(self, scored: Any) -> float:
        return float(scored.correct.mean())

    def validate(self, ctx: "ConvertContext", reference: Any, quantised: Any) -> dict[str, Any]:
        from ..evaluation.classify import calibrate_review, compare_scored

        validation = compare_scored(reference, quantised)
        validation["source"] = str(ctx.recipe.validation.val)
        v = ctx.recipe.validation
        ctx.head["review"] = calibrate_review(quantised, v.review_measure, v.target_accuracy)
        return validation


def _head_spec(ctx: "ConvertContext") -> HeadSpec:
    return HeadSpec(ctx.head["type"], ctx.head["samples"], len(ctx.labels), ctx.head["layout"])


def _weight_check(model: Model, exported: bayes.BayesExport) -> dict[str, Any]:
    """Dequantise the int8 stacked kernel and compare it with the float samples, per output channel."""
    k, c, f = exported.samples, exported.classes, exported.features
    for d in model.interpreter.get_tensor_details():
        if tuple(d["shape"]) == (k * c, f) and d["dtype"] in (np.int8, np.int16):
            scales = d["quantization_parameters"]["scales"]
            mean_kernel = None
            if exported.layout == "centred":
                mean_kernel = np.asarray(exported.model.get_layer("mean_logits").get_weights()[0], dtype=np.float64)
            return bayes.weight_faithfulness(
                exported.sampled_kernels, model.interpreter.get_tensor(d["index"]), scales, exported.layout, mean_kernel
            )
    return {"per_channel": None, "note": "no quantised stacked kernel found (float model)"}


def _spread_check(reference: "Converted", quantised: "Converted", samples: np.ndarray) -> dict[str, Any]:
    """The spread of the logits across samples, before and after quantisation, on calibration images."""
    from ..evaluation.classify import correlation, logit_spread

    ref, quant = [], []
    float_model, model = reference.model, quantised.model
    for x in samples:
        float_model.set_input(x[None].astype(np.float32))
        float_model.invoke()
        ref.append(reference.bound.read(float_model))
        t = model.input
        model.set_input(quantize_values(x[None], t.scale, t.zero_point, t.dtype) if t.quantized else x[None])
        model.invoke()
        quant.append(quantised.bound.read(model))
    ref_a, quant_a = np.stack(ref), np.stack(quant)
    spread_float, spread_quant = logit_spread(ref_a), logit_spread(quant_a)
    last = quantised.bound.tensors[-1]
    step = last.scale if last.quantized else 0.0
    corr = correlation(summarize(ref_a).mutual_information, summarize(quant_a).mutual_information)
    return {
        "images": int(len(samples)),
        "float": round(spread_float, 6),
        "quantized": round(spread_quant, 6),
        "kept": round(spread_quant / spread_float, 4) if spread_float > 0 else None,
        "output_step": round(float(step), 8),
        "steps": round(spread_float / step, 2) if step else None,
        "mutual_information_correlation": None if corr is None else round(corr, 4),
    }
