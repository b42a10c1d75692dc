"""The detection task: edgeq's anchor-free grid detector (converter/models/detector.py).

The K posterior samples ``W_k = mu + sigma * eps_k`` (seeded) of the per-cell ``BayesDense`` class head become
one Conv2D 1x1 with K*C output channels, sample-major (channel ``k*C + c``), so one invoke gives K class
distributions for every cell and the device views the output as ``[G_h, G_w, K, C]``; or, ``centred``, a 1x1
conv with the posterior mean plus one with each sample's residual. A deterministic class head is exported as it
is (K = 1). Output roles are read from the TFLite signature's order (the Keras output order) and then checked
numerically against the Keras model, since shapes alone cannot tell a 4-class head from the boxes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.density import FEATURES_ROLE, PROJECTION_ROLE
from edgeq.detection import BoundGrid, GridSpec, describe_grid_outputs, signature_outputs
from edgeq.errors import ModelError, QuantizationError
from edgeq.manifest import Detector, Head, OutputSpec
from edgeq.runtime import Model, quantize_values
from edgeq.uncertainty import summarize

from ..models import bayes
from ..models.detector import class_head, export_detector
from .base import HeadExport, Task, raise_refused

if TYPE_CHECKING:
    from ..context import ConvertContext, Converted
    from ..stages.load import SourceModel

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_NMS_IOU = 0.5


class DetectTask(Task):
    name = "detect"
    # --density-method auto: the K-th nearest fitting sample; a detector's known objects are not one Gaussian per
    # class, and on the detection benchmark's detections it separates never-seen objects better (docs/detection.md)
    density_method = "knn"
    # --density-normalise l2 is on offer, not the default: on the detection benchmark it ranks unknown objects
    # better (AUROC 0.79 to 0.81) but flags no more of them at the 5% rule, and in the demo it flagged 15 of 96
    # known detections instead of 8 (docs/detection.md)
    density_normalisations = ("l2",)
    refuses = {("cluster", "clusters"): "--clusters", ("repair", "max_drop"): "--max-drop",
               ("repair", "keep_float"): "--keep-float", ("repair", "layer_errors"): "--layer-errors",
               ("cluster", "finetune"): "--finetune"}

    def __init__(self, category_ids: list[int]) -> None:
        self.category_ids = [int(c) for c in category_ids]

    def classes(self, source: "SourceModel") -> int:
        return int(source.keras_model.outputs[2].shape[-1])  # the class head's width, not the objectness output's

    def check(self, ctx: "ConvertContext") -> None:
        from ..recipes import QuantMode

        super().check(ctx)
        if ctx.recipe.repair.bias_correction == "on":
            raise_refused("--bias-correction on", ctx.source.origin, self.name)
        if ctx.recipe.quant.mode not in (QuantMode.INT8, QuantMode.FLOAT32):
            raise QuantizationError(f"--quant {ctx.recipe.quant.mode.value}: a detector converts to int8 (default) "
                                    "or float32")
        deterministic = not isinstance(class_head(ctx.source.keras_model), bayes.bayes_dense_class())
        measure = ctx.recipe.validation.measure_for("detect", True)  # refuses the classifier's density measure
        if ctx.recipe.validation.val and deterministic and measure != "predictive_entropy":
            raise ModelError(f"--review-measure {measure}: the detector's class head is deterministic; only "
                             "predictive_entropy applies")

    # -- head export ----------------------------------------------------------------------------------------
    def bayes_head(self, ctx: "ConvertContext") -> bool:
        if isinstance(class_head(ctx.source.keras_model), bayes.bayes_dense_class()):
            return True
        if ctx.recipe.bayes.samples is not None:
            raise ModelError(f"{ctx.source.keras_model.name}: --bayes-samples given, but the detector's class head is "
                             "deterministic; train it with edgeq train --task detect --head bayes, or drop "
                             "--bayes-samples")
        return False

    def export_dense(self, ctx: "ConvertContext") -> HeadExport:
        model, head = export_detector(ctx.source.keras_model, None)
        return HeadExport(model, head)

    def export_bayes(self, ctx: "ConvertContext", samples: int, seed: int, layout: str) -> HeadExport:
        model, head = export_detector(ctx.source.keras_model, samples, seed, layout=layout)
        return HeadExport(model, head)

    def stacked_steps(self, ctx: "ConvertContext", stacked: HeadExport) -> dict[str, float]:
        """The spread at the 4 cells per image most likely to hold an object, the output step over all cells."""
        x = ctx.calibration.samples[:32]
        obj, _, cls = (np.asarray(o, np.float64) for o in stacked.keras_model.predict(x, batch_size=16, verbose=0))
        k, c = stacked.head["samples"], stacked.head["classes"]
        step = (max(0.0, float(cls.max())) - min(0.0, float(cls.min()))) / 255.0
        top = np.argsort(-obj.reshape(len(x), -1), axis=1)[:, :4]
        cells = cls.reshape(len(x), -1, k, c)[np.arange(len(x))[:, None], top]
        spread = float(np.mean(np.std(cells, axis=2)))
        return {"spread": round(spread, 6), "step": round(step, 8), "steps": round(spread / step, 2) if step else 0.0}

    # -- converted models -----------------------------------------------------------------------------------
    def describe_outputs(self, ctx: "ConvertContext", model: Model) -> list[OutputSpec]:
        extra = () if ctx.density is None else (FEATURES_ROLE if ctx.density.get("normalise") else PROJECTION_ROLE,)
        return describe_grid_outputs(model, signature_outputs(model), ctx.head["layout"], extra)

    def bind(self, ctx: "ConvertContext", model: Model, outputs: list[OutputSpec]) -> BoundGrid:
        grid = tuple(int(d) for d in outputs[0].shape[1:3])
        height = ctx.spec.height
        if "detector" not in ctx.extras:
            ctx.extras["detector"] = {
                "type": "grid", "stride": int(height // grid[0]), "grid": list(grid),
                "category_ids": self.category_ids, "score_threshold": DEFAULT_SCORE_THRESHOLD,
                "nms_iou": DEFAULT_NMS_IOU, "max_candidates": 100, "max_detections": 50, "box_encoding": "ltrb_cells",
                "architecture": "mobilenet_v2 stride-16 anchor-free (docs/detection.md)"}
        head = Head.model_validate({k: v for k, v in ctx.head.items() if k in ("type", "samples", "classes", "layout")})
        spec = GridSpec.from_blocks(Detector.model_validate(ctx.extras["detector"]), head, len(ctx.labels))
        from ..stages.density import typed

        return spec.bind(model, outputs, density=typed(ctx))

    def verify(self, ctx: "ConvertContext") -> None:
        calibration = ctx.calibration
        spec = ctx.spec
        probe = calibration.samples[:1] if calibration is not None else \
            np.zeros((1, spec.height, spec.width, spec.channels), np.float32)
        _check_roles(ctx.source.keras_model, ctx.reference, probe)
        if ctx.head["samples"] > 1 and calibration is not None:
            ctx.head["spread"] = _spread_check(ctx.reference, ctx.quantised, calibration.samples[:32])

    # -- validation -----------------------------------------------------------------------------------------
    def read_validation(self, ctx: "ConvertContext") -> Any:
        from ..data.coco import read_coco

        coco = read_coco(ctx.recipe.validation.val, flag="--val")
        coco.require_categories(self.category_ids, "--val", ctx.source.origin)
        return coco

    def score(self, ctx: "ConvertContext", converted: "Converted", name: str) -> Any:
        from ..evaluation.detect import run_detector

        return run_detector(converted.model, converted.bound, ctx.spec, ctx.data, f"val {name}")

    def validate(self, ctx: "ConvertContext", reference: Any, quantised: Any) -> dict[str, Any]:
        from ..evaluation.detect import best_f1_threshold, calibrate_detection_rule, detection_figures, match_all
        from ..stages.density import unfamiliar_threshold

        detector, coco, v = ctx.extras["detector"], ctx.data, ctx.recipe.validation
        best = best_f1_threshold(quantised, coco, detector["category_ids"])
        if best["threshold"] is not None:
            detector["score_threshold"] = best["threshold"]
            detector["score_threshold_calibration"] = {"rule": "highest F1 on the known objects of --val (int8)",
                                                       **best}
            ctx.log(f"score threshold: {best['threshold']:.3f} (F1 {best['f1']:.3f}, precision "
                    f"{best['precision']:.3f}, recall {best['recall']:.3f} on --val)")
        matched = match_all(quantised, coco, detector["category_ids"], detector["score_threshold"])
        if ctx.density is not None:
            _detection_reference(ctx, matched)
        rule = calibrate_detection_rule(matched, v.measure_for("detect", True), v.target_accuracy, v.review_budget,
                                        unfamiliar_threshold(ctx, v.review_ood_rate), v.review_ood_rate, ctx.log)
        ctx.head["review"] = rule
        if rule is None:
            ctx.log(f"needs_review: not calibrated: no int8 detection of --val at score >= "
                    f"{detector['score_threshold']:g} matched a known object; the device reports needs_review null "
                    "unless its config sets thresholds.review")
        figures = {name: detection_figures(res, coco, detector["category_ids"], detector["score_threshold"], rule)
                   for name, res in (("float", reference), ("quantized", quantised))}
        return {"source": str(coco.path), "images": len(coco.images), **figures}

    # -- unfamiliarity (stages/density.py): the neck's features at the cells that hold known objects ----------
    # (with --val, its percentiles are then read against the detections themselves: _detection_reference)
    def density_labelled_calib(self, ctx: "ConvertContext", calib: str) -> bool:
        from ..data.coco import is_coco_path

        return is_coco_path(calib)

    def density_load(self, ctx: "ConvertContext", source: str, flag: str, max_samples: int) -> Any:
        return _positive_cells_data(ctx, source, flag, max_samples)  # capped at load: cells, not images

    def density_subset(self, data: Any, half: int | None, max_samples: int | None) -> tuple[Any, Any]:
        part = data if half is None else _split_images(data)[half]
        return part, part["targets"]

    def density_tap_names(self, ctx: "ConvertContext") -> list[str]:
        return [DENSITY_TAP]

    def density_features(self, ctx: "ConvertContext", data: Any) -> tuple[np.ndarray, np.ndarray]:
        import keras

        model = ctx.source.keras_model
        extractor = keras.Model(model.inputs, model.get_layer(DENSITY_TAP).output)
        maps = np.asarray(extractor.predict(data.fit["x"], batch_size=32, verbose=0), np.float64)
        return maps.reshape(-1, maps.shape[-1])[data.fit["cells"]], data.targets

    def density_tap_widths(self, ctx: "ConvertContext") -> list[int]:
        return [int(ctx.source.keras_model.get_layer(DENSITY_TAP).output.shape[-1])]

    def add_density_outputs(self, ctx: "ConvertContext", W: np.ndarray, keep: np.ndarray,
                            normalise: str | None = None) -> None:
        import keras

        model = ctx.source.keras_model
        tap = model.get_layer(DENSITY_TAP).output
        if normalise == "l2":  # the neck itself (an int8 tensor of the graph already): the device projects it
            out = tap
        else:
            conv = keras.layers.Conv2D(W.shape[1], 1, use_bias=False, name="density_projection")
            out = conv(tap)
            conv.set_weights([W.reshape(1, 1, *W.shape)])
        exported = keras.Model(model.inputs, [*model.outputs, out], name=model.name)
        ctx.source = dataclasses.replace(ctx.source, keras_model=exported)

    def density_scores(self, ctx: "ConvertContext", converted: "Converted", held_out: Any) -> np.ndarray:
        model, grid = converted.model, converted.bound
        t = model.input
        gcells = held_out["grid_cells"]
        out = []
        for i, x in enumerate(held_out["x"]):
            model.set_input(quantize_values(x[None], t.scale, t.zero_point, t.dtype) if t.quantized else x[None])
            model.invoke()
            cells = held_out["cells_of"][i]
            if len(cells):
                out.append(grid.density.scores(grid.raw(model), np.asarray(cells) - i * gcells))
        return np.concatenate(out) if out else np.zeros(0)


DENSITY_TAP = "neck"


def _positive_cells_data(ctx: "ConvertContext", source: str, flag: str, max_cells: int) -> dict[str, Any]:
    """A COCO set through the core preprocessor (float): the inputs, and each known object's positive cells
    (training's targets, converter/models/detector.py) with their class index, at most ``max_cells`` of them."""
    from edgeq.preprocess import Preprocessor, read_image

    from ..data.coco import read_coco
    from ..models.detector import encode_targets

    coco = read_coco(source, flag=flag)
    ids = ctx.extras.get("detector", {}).get("category_ids") or list(ctx.task.category_ids)  # type: ignore[attr-defined]
    coco.require_categories(ids, flag, ctx.source.origin)
    index = {c: i for i, c in enumerate(ids)}
    pre = Preprocessor(ctx.spec.with_dtype("float32"))
    stride = 16
    grid = ctx.spec.height // stride
    xs, cells, targets, cells_of = [], [], [], []
    for im in coco.images:
        x, tf = pre(read_image(coco.image_path(im)))
        b = coco.boxes[im["id"]] * np.array([tf.scale_x, tf.scale_y, tf.scale_x, tf.scale_y], np.float32)
        b = b + np.array([tf.pad_x, tf.pad_y, tf.pad_x, tf.pad_y], np.float32)
        cats = coco.category_ids[im["id"]]
        known = np.array([c in index for c in cats.tolist()], bool)
        cls = encode_targets(b[known], np.array([index[c] for c in cats[known].tolist()], np.int64), grid,
                             b[~known], stride)[2][..., 0].reshape(-1)
        pos = np.flatnonzero(cls >= 0)
        cells_of.append((pos + len(xs) * grid * grid).tolist())
        cells.extend(cells_of[-1])
        targets.extend(cls[pos].tolist())
        xs.append(x[0].copy())
        if len(cells) >= max_cells:
            break
    return {"x": np.stack(xs), "cells": np.asarray(cells, np.int64), "targets": np.asarray(targets, np.int64),
            "cells_of": cells_of, "grid_cells": grid * grid, "source": str(coco.path)}


def _split_images(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Even images for the fit, odd ones held out."""
    out = []
    for part in (0, 1):
        picked = list(range(part, len(data["x"]), 2))
        g = data["grid_cells"]
        cells_of = [[c - i * g + j * g for c in data["cells_of"][i]] for j, i in enumerate(picked)]
        flat = [c for cs in cells_of for c in cs]
        lookup = {c: t for c, t in zip(data["cells"].tolist(), data["targets"].tolist())}
        targets = [lookup[c - j * g + i * g] for j, i in enumerate(picked) for c in cells_of[j]]
        out.append({"x": data["x"][picked], "cells": np.asarray(flat, np.int64),
                    "targets": np.asarray(targets, np.int64), "cells_of": cells_of, "grid_cells": g,
                    "source": data["source"]})
    return out[0], out[1]


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


def _spread_check(reference: "Converted", quantised: "Converted", samples: np.ndarray) -> dict[str, Any]:
    """Spread of the class logits across samples at the cells most likely to hold an object, float vs int8, and
    how many output steps of the tensor holding the samples it spans."""
    from ..evaluation.classify import correlation

    ref, quant = [], []
    float_model, fgrid, model, qgrid = reference.model, reference.bound, quantised.model, quantised.bound
    for x in samples:
        float_model.set_input(x[None].astype(np.float32))
        float_model.invoke()
        cells = np.argsort(-float_model.get_float(fgrid.tensors[0]).reshape(-1))[:4]
        ref.append(fgrid.class_samples(fgrid.raw(float_model))[cells])
        t = model.input
        model.set_input(quantize_values(x[None], t.scale, t.zero_point, t.dtype) if t.quantized else x[None])
        model.invoke()
        quant.append(qgrid.class_samples(qgrid.raw(model))[cells])
    ref_a, quant_a = np.concatenate(ref), np.concatenate(quant)
    spread_f = float(np.mean(np.std(ref_a, axis=1)))
    spread_q = float(np.mean(np.std(quant_a, axis=1)))
    t = qgrid.tensors[-1]  # the stacked samples, or the centred residuals
    step = float(t.scale) if t.quantized else 0.0
    corr = correlation(summarize(ref_a).mutual_information, summarize(quant_a).mutual_information)
    return {"cells": int(len(ref_a)), "float": round(spread_f, 6), "quantized": round(spread_q, 6),
            "output_step": round(step, 8), "steps": round(spread_f / step, 2) if step else None,
            "mutual_information_correlation": None if corr is None else round(corr, 4)}


MIN_REFERENCE_DETECTIONS = 20


def _detection_reference(ctx: "ConvertContext", matched: Any) -> None:
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
        return
    u = u[matched.known]
    u = u[np.isfinite(u)]
    if len(u) < MIN_REFERENCE_DETECTIONS:
        ctx.log(f"unfamiliarity: only {len(u)} int8 detections of known objects in --val (fewer than "
                f"{MIN_REFERENCE_DETECTIONS}); percentiles stay read against the held-out cells")
        return
    ctx.density["reference"] = reference_quantiles(u)
    ctx.density["fit"]["reference"] = "int8 detections matched to known objects of --val"
    ctx.density["fit"]["reference_samples"] = int(len(u))
    ctx.log(f"unfamiliarity: percentiles read against the {len(u)} int8 detections of known objects in --val")
