"""The classification task: a single-image classifier with a dense or a Bayesian (``BayesDense``) head.

A Bayesian head is exported as K weight samples in plain Dense layers (converter/models/bayes.py): ``stacked``
(one ``[K*C]`` output) or ``centred`` (the posterior mean ``[C]`` plus each sample's residual ``[K*C]``). Output
roles are told apart by size, never by order: ``logits`` has C values, ``samples`` and ``residuals`` K*C.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.density import PROJECTION_ROLE
from edgeq.errors import ModelError, QuantizationError
from edgeq.heads import BoundHead, HeadSpec, describe_outputs
from edgeq.manifest import OutputSpec
from edgeq.runtime import Model, quantize_values
from edgeq.uncertainty import summarize

from ..models import bayes
from .base import HeadExport, Task

if TYPE_CHECKING:
    from ..context import ConvertContext, Converted
    from ..stages.load import SourceModel


# -- unfamiliarity (stages/density.py) --------------------------------------------------------------------------
# MobileNetV2's block outputs whose spatial means join the pooled features: early blocks see what an unknown input
# looks like before the classifier's features map it onto a known class (measured: benchmarks/unknowns.py)
EARLY_TAPS = ("block_1_project_BN", "block_3_project_BN", "block_6_project_BN", "block_10_project_BN",
              "block_13_project_BN")
HELD_OUT_MAX = 2000


def _taps(model: Any) -> list[tuple[str, Any]]:
    """(name, pooled tensor) of each feature tap of an exported classifier: early block means, then the head's input."""
    import keras

    head = next(layer for layer in model.layers if layer.output is model.outputs[0])
    names = {layer.name for layer in model.layers}
    taps = [(n, keras.ops.mean(model.get_layer(n).output, axis=(1, 2))) for n in EARLY_TAPS if n in names]
    return taps + [("penultimate", head.input)]


def _split(files: list, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every other file of each class for the fit, the rest held out (deterministic)."""
    fit, held = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        fit.extend(idx[0::2])
        held.extend(idx[1::2])
    return np.sort(fit), np.sort(held)


def _even(idx: np.ndarray, n: int) -> np.ndarray:
    return idx if len(idx) <= n else idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]


class _ClassifyDensity:
    """The classifier's part of the density stage (mixed into ClassifyTask)."""

    def density_labelled_calib(self, ctx: "ConvertContext", calib: str) -> bool:
        from pathlib import Path

        if not Path(calib).is_dir():
            return False
        sub = {p.name for p in Path(calib).iterdir() if p.is_dir()}
        return bool(sub) and sub <= set(ctx.labels)  # class folders, each one of the model's labels

    def density_load(self, ctx: "ConvertContext", source: str, flag: str, max_samples: int) -> Any:
        from ..data.datasets import class_folder

        return class_folder(source, ctx.labels, flag=flag)

    def density_subset(self, data: Any, half: int | None, max_samples: int | None) -> tuple[Any, Any]:
        idx = np.arange(len(data.files)) if half is None else _split(data.files, data.targets)[half]
        idx = _even(idx, HELD_OUT_MAX if max_samples is None else max_samples)
        return [data.files[i] for i in idx], data.targets[idx]

    def density_tap_names(self, ctx: "ConvertContext") -> list[str]:
        return [name for name, _ in _taps(ctx.source.keras_model)]

    def density_features(self, ctx: "ConvertContext", data: Any) -> tuple[np.ndarray, np.ndarray]:
        import keras

        from edgeq.preprocess import Preprocessor, read_image

        model = ctx.source.keras_model
        taps = [t for _, t in _taps(model)]
        extractor = keras.Model(model.inputs, keras.ops.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0])
        pre = Preprocessor(ctx.spec.with_dtype("float32"))
        feats = []
        for start in range(0, len(data.fit), 256):
            x = pre.batch([read_image(f) for f in data.fit[start:start + 256]])
            feats.append(np.asarray(extractor.predict(x, batch_size=64, verbose=0), np.float64))
        return np.concatenate(feats), np.asarray(data.targets)

    def density_tap_widths(self, ctx: "ConvertContext") -> list[int]:
        return [int(t.shape[-1]) for _, t in _taps(ctx.source.keras_model)]

    def add_density_outputs(self, ctx: "ConvertContext", W: np.ndarray, keep: np.ndarray,
                            normalise: str | None = None) -> None:
        """The whitening as one Dense per kept tap (no bias), summed: the ``density_projection`` output (taps of
        different ranges keep their own int8 scales, where one concatenated tensor would share one)."""
        import keras

        model = ctx.source.keras_model
        taps = [t for _, t in _taps(model)]
        parts, row = [], 0
        for i, t in enumerate(taps):
            width = int(t.shape[-1])
            if keep[i]:
                dense = keras.layers.Dense(W.shape[1], use_bias=False, name=f"density_projection_{i}")
                parts.append(dense(t))
                dense.set_weights([W[row:row + width]])
            row += width
        projection = parts[0] if len(parts) == 1 else keras.layers.Add(name="density_projection")(parts)
        exported = keras.Model(model.inputs, [*model.outputs, projection], name=model.name)
        ctx.source = dataclasses.replace(ctx.source, keras_model=exported)

    def density_scores(self, ctx: "ConvertContext", converted: "Converted", files: list) -> np.ndarray:
        from ..evaluation.classify import run_files

        return run_files(converted.model, ctx.spec, files, converted.bound, "unfamiliarity")[1]


class ClassifyTask(_ClassifyDensity, Task):
    name = "classify"

    def classes(self, source: "SourceModel") -> int:
        return source.num_classes

    def check(self, ctx: "ConvertContext") -> None:
        super().check(ctx)
        ctx.recipe.validation.measure_for("classify", ctx.recipe.density.density != "off")  # refused before the work
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
        outputs = describe_outputs(model, _head_spec(ctx))
        if ctx.density is not None:  # its size, the rank, is kept apart from the head's (stages/density.py)
            size = ctx.density["rank"]
            found = [t for t in model.outputs if int(np.prod(t.shape)) == size]
            if len(found) != 1:
                raise QuantizationError(f"converted model has {len(found)} outputs of size {size} for "
                                        f"{PROJECTION_ROLE!r}")
            outputs.append(OutputSpec(role=PROJECTION_ROLE, **found[0].to_dict()))
        return outputs

    def bind(self, ctx: "ConvertContext", model: Model, outputs: list[OutputSpec]) -> BoundHead:
        from ..stages.density import typed

        return _head_spec(ctx).bind(model, outputs, density=typed(ctx))

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
        from ..evaluation.classify import compare_scored
        from ..evaluation.review import calibrate_rule, flag_rates
        from ..stages.density import unfamiliar_threshold

        validation = compare_scored(reference, quantised)
        validation["source"] = str(ctx.recipe.validation.val)
        v = ctx.recipe.validation
        measure = v.measure_for("classify", ctx.density is not None)
        values = quantised.measure(measure)
        rule = calibrate_rule(values, quantised.correct, measure, v.target_accuracy, v.review_budget,
                              unfamiliar_threshold(ctx, v.review_ood_rate), v.review_ood_rate, ctx.log)
        ctx.head["review"] = rule
        validation["review"] = flag_rates(values, quantised.unfamiliarity, rule, quantised.correct)
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
