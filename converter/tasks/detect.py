"""The detection task: edgeq's anchor-free grid detector (converter/models/detector.py).

The K posterior samples ``W_k = mu + sigma * eps_k`` (seeded) of the per-cell ``BayesDense`` class head become
one Conv2D 1x1 with K*C output channels, sample-major (channel ``k*C + c``), so one invoke gives K class
distributions for every cell and the device views the output as ``[G_h, G_w, K, C]``; or, ``centred``, a 1x1
conv with the posterior mean plus one with each sample's residual. A deterministic class head is exported as it
is (K = 1). Output roles are read from the TFLite signature's order (the Keras output order) and then checked
numerically against the Keras model, since shapes alone cannot tell a 4-class head from the boxes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeq import records
from edgeq.density import FEATURES_ROLE, PROJECTION_ROLE
from edgeq.detection import BoundGrid, GridSpec, describe_grid_outputs, signature_outputs
from edgeq.errors import DataError, ModelError, QuantizationError
from edgeq.manifest import Density, Detector, Head, OutputSpec
from edgeq.runtime import Model

from ..context import ConvertContext
from ..models import bayes
from ..models.detector import class_head, export_detector
from ..products import Calibration, Converted, HeadExport, SourceModel, Validation
from ..spread import spread_check
from ..stages.taps import DetectorTaps
from .base import Task, raise_refused

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_NMS_IOU = 0.5


class DetectTask(Task):
    name = "detect"
    refuses = {("cluster", "clusters"): "--clusters", ("repair", "max_drop"): "--max-drop",
               ("repair", "keep_float"): "--keep-float", ("repair", "layer_errors"): "--layer-errors",
               ("cluster", "finetune"): "--finetune"}

    def __init__(self, category_ids: list[int], origin: str) -> None:
        self.category_ids = [int(c) for c in category_ids]
        self.origin = origin

    def classes(self, source: SourceModel) -> int:
        return int(source.keras_model.outputs[2].shape[-1])  # the class head's width, not the objectness output's

    def taps(self, ctx: ConvertContext) -> DetectorTaps:
        return DetectorTaps(ctx, self.category_ids, self.origin)

    def check(self, ctx: ConvertContext, source: SourceModel) -> None:
        from ..recipes import QuantMode

        super().check(ctx, source)
        if ctx.recipe.repair.bias_correction == "on":
            raise_refused("--bias-correction on", source.origin, self.name)
        if ctx.recipe.quant.mode not in (QuantMode.INT8, QuantMode.FLOAT32):
            raise QuantizationError(f"--quant {ctx.recipe.quant.mode.value}: a detector converts to int8 (default) "
                                    "or float32")
        deterministic = not isinstance(class_head(source.keras_model), bayes.bayes_dense_class())
        measure = ctx.recipe.validation.measure_for("detect", True)  # refuses the classifier's density measure
        if ctx.recipe.validation.val and deterministic and measure != "predictive_entropy":
            raise ModelError(f"--review-measure {measure}: the detector's class head is deterministic; only "
                             "predictive_entropy applies")

    # -- head export ----------------------------------------------------------------------------------------
    def bayes_head(self, ctx: ConvertContext, source: SourceModel) -> bool:
        if isinstance(class_head(source.keras_model), bayes.bayes_dense_class()):
            return True
        if ctx.recipe.bayes.samples is not None:
            raise ModelError(f"{source.keras_model.name}: --bayes-samples given, but the detector's class head is "
                             "deterministic; train it with edgeq train --task detect --head bayes, or drop "
                             "--bayes-samples")
        return False

    def export_dense(self, ctx: ConvertContext, source: SourceModel) -> HeadExport:
        model, head = export_detector(source.keras_model, None)
        return HeadExport(source.with_model(model), Head.model_validate(head))

    def export_bayes(self, ctx: ConvertContext, source: SourceModel, samples: int, seed: int,
                     layout: str) -> HeadExport:
        model, head = export_detector(source.keras_model, samples, seed, layout=layout)
        return HeadExport(source.with_model(model), Head.model_validate(head))

    def stacked_steps(self, stacked: HeadExport, calibration: Calibration) -> records.StackedEstimate:
        """The spread at the 4 cells per image most likely to hold an object, the output step over all cells."""
        x = calibration.samples[:32]
        obj, _, cls = (np.asarray(o, np.float64)
                       for o in stacked.source.keras_model.predict(x, batch_size=16, verbose=0))
        k, c = stacked.head.samples, stacked.head.classes
        step = (max(0.0, float(cls.max())) - min(0.0, float(cls.min()))) / 255.0
        top = np.argsort(-obj.reshape(len(x), -1), axis=1)[:, :4]
        cells = cls.reshape(len(x), -1, k, c)[np.arange(len(x))[:, None], top]
        spread = float(np.mean(np.std(cells, axis=2)))
        return records.StackedEstimate(spread=round(spread, 6), step=round(step, 8),
                                       steps=round(spread / step, 2) if step else 0.0)

    # -- converted models -----------------------------------------------------------------------------------
    def describe_outputs(self, model: Model, head: Head, density: Density | None) -> list[OutputSpec]:
        extra = () if density is None else (FEATURES_ROLE if density.normalise else PROJECTION_ROLE,)
        return describe_grid_outputs(model, signature_outputs(model), head.layout, extra)

    def detector(self, ctx: ConvertContext, outputs: list[OutputSpec]) -> Detector:
        """The grid's decoding with the defaults, until validation picks the score threshold on ``--val``."""
        grid = tuple(int(d) for d in outputs[0].shape[1:3])
        return Detector(stride=int(ctx.spec.height // grid[0]), grid=grid, category_ids=tuple(self.category_ids),
                        score_threshold=DEFAULT_SCORE_THRESHOLD, nms_iou=DEFAULT_NMS_IOU, max_candidates=100,
                        max_detections=50, box_encoding="ltrb_cells",
                        architecture="mobilenet_v2 stride-16 anchor-free (docs/detection.md)")

    def bind(self, ctx: ConvertContext, model: Model, outputs: list[OutputSpec], head: Head,
             density: Density | None) -> BoundGrid:
        spec = GridSpec.from_blocks(self.detector(ctx, outputs), head, len(ctx.labels))
        return spec.bind(model, outputs, density=density)

    def verify(self, ctx: ConvertContext, source: SourceModel, export: HeadExport, reference: Converted,
               quantised: Converted, calibration: Calibration | None) -> Head:
        spec = ctx.spec
        probe = calibration.samples[:1] if calibration is not None else \
            np.zeros((1, spec.height, spec.width, spec.channels), np.float32)
        _check_roles(source.keras_model, reference, probe)
        if export.head.samples == 1 or calibration is None:
            return export.head
        spread = spread_check(reference, quantised, calibration.samples[:32], "cells",
                              lambda c: c.bound.class_samples(c.bound.raw(c.model)),
                              lambda r: np.argsort(-r.model.get_float(r.bound.tensors[0]).reshape(-1))[:4])
        return export.head.model_copy(update={"spread": spread})

    # -- validation -----------------------------------------------------------------------------------------
    def read_validation(self, ctx: ConvertContext, source: SourceModel) -> Any:
        from ..data.coco import read_coco

        coco = read_coco(ctx.recipe.validation.val, flag="--val")
        coco.require_categories(self.category_ids, "--val", source.origin)
        return coco

    def score(self, ctx: ConvertContext, converted: Converted, data: Any, name: str) -> Any:
        from ..evaluation.detect import run_detector

        return run_detector(converted.model, converted.bound, ctx.spec, data, f"val {name}")

    def validate(self, ctx: ConvertContext, data: Any, reference: Any, quantised: Any, density: Density | None,
                 detector: Detector | None, models: tuple[Converted, Converted]) -> Validation:
        """The score threshold (best F1 on --val), then, unless ``--unknown off``, the objectness threshold and the
        unknown score, both from the known objects of --val (converter/evaluation/unknown.py); the review rule; and
        float vs int8 figures as the device would publish them."""
        from ..evaluation.detect import best_f1_threshold, calibrate_detection_rule, detection_figures, match_all
        from ..stages.density import unfamiliar_threshold

        coco, v, ids = data, ctx.recipe.validation, list(detector.category_ids)
        best = best_f1_threshold(quantised, coco, ids)
        if best["threshold"] is not None:
            detector = detector.model_copy(update={
                "score_threshold": best["threshold"], "score_threshold_calibration": records.ScoreThresholdCalibration(
                    rule="highest F1 on the known objects of --val (int8)", **best)})
            ctx.log(f"score threshold: {best['threshold']:.3f} (F1 {best['f1']:.3f}, precision "
                    f"{best['precision']:.3f}, recall {best['recall']:.3f} on --val)")
        unknown = None
        if ctx.recipe.unknown.unknown != "off":
            detector, unknown, reference, quantised = self._open_set(ctx, coco, detector, density, models)
        matched = match_all(quantised, coco, ids, detector.score_threshold, detector.objectness_threshold)
        if density is not None:
            density = _detection_reference(ctx, density, matched)
        rule = calibrate_detection_rule(matched, v.measure_for("detect", True), v.target_accuracy, v.review_budget,
                                        None if unknown is not None else unfamiliar_threshold(density, v.review_ood_rate),
                                        None if unknown is not None else v.review_ood_rate, ctx.log)
        if rule is None:
            ctx.log(f"needs_review: not calibrated: no int8 detection of --val at score >= "
                    f"{detector.score_threshold:g} matched a known object; the device reports needs_review null "
                    "unless its config sets thresholds.review")
        figures = {name: detection_figures(res, coco, ids, detector.score_threshold, rule,
                                           detector.objectness_threshold)
                   for name, res in (("float", reference), ("quantized", quantised))}
        block = records.DetectValidation(source=str(coco.path), images=len(coco.images), **figures)
        return Validation(block, None if rule is None else records.ReviewRule.model_validate(rule), detector, density,
                          unknown)

    def _open_set(self, ctx: ConvertContext, coco: Any, detector: Detector, density: Density | None,
                  models: tuple[Converted, Converted]) -> tuple[Detector, Any, Any, Any]:
        """The objectness threshold and the unknown score, calibrated on the int8 model's detections of the known
        objects of --val; and both models' passes over --val decoded as the device then decodes them."""
        from ..evaluation.detect import match_all, run_detector
        from ..evaluation.unknown import OBJECTNESS_FLOOR, best_objectness_threshold, calibrate_unknown, describe

        ids, head = list(detector.category_ids), _head_of(models[1])

        def rebind(converted: Converted, det: Detector, unknown: Any = None) -> Any:
            spec = GridSpec.from_blocks(det, head, len(ctx.labels))
            return spec.bind(converted.model, list(converted.outputs), density=density, unknown=unknown)

        at_floor = detector.model_copy(update={"objectness_threshold": OBJECTNESS_FLOOR})
        floor = run_detector(models[1].model, rebind(models[1], at_floor), ctx.spec, coco, "val objectness")
        m = match_all(floor, coco, ids, detector.score_threshold, OBJECTNESS_FLOOR)
        known_objects = sum(int(np.isin(c, ids).sum()) for c in coco.category_ids.values())
        calibration = best_objectness_threshold(m, m.measures["objectness"], known_objects, detector.score_threshold)
        if calibration.threshold is None:
            raise DataError(f"--val {coco.path}: no int8 detection found a known object, so the objectness threshold "
                            "cannot be calibrated; give a trained detector and scenes of its classes, or pass "
                            "--unknown off")
        detector = detector.model_copy(update={"objectness_threshold": calibration.threshold,
                                               "objectness_threshold_calibration": calibration})
        opened = run_detector(models[1].model, rebind(models[1], detector), ctx.spec, coco, "val open set")
        m = match_all(opened, coco, ids, detector.score_threshold, detector.objectness_threshold)
        measures = ctx.recipe.unknown.measures_for(density is not None, head.samples)
        unknown = calibrate_unknown({k: m.measures[k][m.known] for k in measures}, measures,
                                    ctx.recipe.unknown.combine, ctx.recipe.validation.review_ood_rate, str(coco.path))
        ctx.log(f"objectness threshold: {calibration.threshold:.3f} (class-agnostic F1 {calibration.f1:.3f}, recall "
                f"{calibration.recall:.3f} of the known objects of --val); " + describe(unknown, calibration.threshold))
        reference = run_detector(models[0].model, rebind(models[0], detector, unknown), ctx.spec, coco, "val float")
        quantised = run_detector(models[1].model, rebind(models[1], detector, unknown), ctx.spec, coco, "val int8")
        return detector, unknown, reference, quantised


def _head_of(converted: Converted) -> Head:
    s = converted.bound.spec
    return Head(type="bayes" if s.samples > 1 else "dense", samples=s.samples, classes=s.classes,
                layout="single" if s.samples == 1 else s.layout)


def _check_roles(keras_model: Any, reference: "Converted", x: np.ndarray) -> None:
    """Each output role of the float TFLite model must reproduce the Keras output it stands for: shapes alone
    cannot tell a 4-class deterministic head from the boxes, and the signature order is the converter's promise,
    not ours."""
    want = [np.asarray(o, np.float32) for o in keras_model.predict(x.astype(np.float32), verbose=0)]
    float_model, grid = reference.model, reference.bound
    float_model.set_input(x.astype(np.float32))
    float_model.invoke()
    density = () if grid.density is None else (PROJECTION_ROLE if grid.density.projection is not None else
                                               FEATURES_ROLE,)
    roles = (*grid.spec.roles, *density)
    for role, t, w in zip(roles, grid.all_tensors, want, strict=True):
        got = float_model.get_float(t)
        if got.size != w.size or not np.allclose(got.reshape(w.shape), w, atol=1e-3 * max(1.0, float(np.abs(w).max()))):
            raise QuantizationError(f"converted output {t.name} does not match the model's {role!r} output; the "
                                    "output roles could not be identified (this is a bug, please report it)")


MIN_REFERENCE_DETECTIONS = 20


def _detection_reference(ctx: ConvertContext, density: Density, matched: Any) -> Density:
    """Read a detector's unfamiliarity percentiles, and so the ``--review-ood-rate`` threshold, against what the
    device publishes: the int8 model's detections of known objects in --val, at the score threshold.

    The density's own held-out data are cells like those it was fitted on: every cell of --val within one cell of
    a known object's centre. A detection comes from the best-scoring cell, which scored as more familiar than those
    on the detection benchmark: read against the cells, a threshold meant to flag 5% of known detections flagged
    0.7%.
    With fewer than ``MIN_REFERENCE_DETECTIONS`` such detections the cells stay the reference. ``matched``:
    ``match_all`` of the int8 results at the score threshold."""
    from ..stages.density import reference_quantiles

    u = matched.measures.get("unfamiliarity")
    if u is None:
        return density
    u = u[matched.known]
    u = u[np.isfinite(u)]
    if len(u) < MIN_REFERENCE_DETECTIONS:
        ctx.log(f"unfamiliarity: only {len(u)} int8 detections of known objects in --val (fewer than "
                f"{MIN_REFERENCE_DETECTIONS}); percentiles stay read against the held-out cells")
        return density
    ctx.log(f"unfamiliarity: percentiles read against the {len(u)} int8 detections of known objects in --val")
    fit = density.fit.model_copy(update={"reference": "int8 detections matched to known objects of --val",
                                         "reference_samples": int(len(u))})
    return density.model_copy(update={"reference": tuple(reference_quantiles(u)), "fit": fit})
