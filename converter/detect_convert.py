"""``edgeq convert`` for a grid detector (converter/detect.py): Bayesian class head fused into one 1x1 conv,
full-integer PTQ, float-vs-int8 validation on a COCO set, ``needs_review`` calibrated on it, a ``task: detect``
bundle.

The K posterior samples ``W_k = mu + sigma * eps_k`` (seeded) of the per-cell ``BayesDense`` class head become
one Conv2D 1x1 with K*C output channels, sample-major (channel ``k*C + c``), so one invoke gives K class
distributions for every cell and the device views the output as ``[G_h, G_w, K, C]``. A deterministic class head
is exported as it is (K = 1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.bundle import write_bundle
from edgeq.detection import GridSpec, describe_grid_outputs, signature_outputs
from edgeq.errors import ModelError, QuantizationError
from edgeq.preprocess import NORMALIZATIONS, PreprocessSpec
from edgeq.runtime import Model, load_runtime, quantize_values
from edgeq.uncertainty import summarize

from . import bayes
from .calibration import load_calibration_logged
from .detect import class_head, read_detect_info
from .models import SourceModel
from .quantize import QuantMode, QuantRecipe, convert_model, describe_float_ops, float_ops, quiet_output

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_NMS_IOU = 0.5
# options of edgeq convert that the detector path does not take (yet); refused rather than ignored
UNSUPPORTED = {"clusters": "--clusters", "max_drop": "--max-drop", "keep_float": "--keep-float",
               "layer_errors": "--layer-errors", "finetune": "--finetune"}


def export_detector(model: Any, samples: int | None, seed: int = 0, mean_only: bool = False,
                    layout: str = "stacked") -> tuple[Any, dict[str, Any]]:
    """The exportable detector (Conv2D class head) and the manifest's ``head``; ``samples`` None: 32 for a
    Bayesian class head. ``mean_only``: a deterministic head from the posterior means (the benchmark's baseline)."""
    import keras

    head = class_head(model)
    obj, box = model.outputs[0], model.outputs[1]
    features = head.input
    f = int(features.shape[-1])
    if not isinstance(head, bayes.bayes_dense_class()):
        if samples is not None:
            raise ModelError(f"{model.name}: --bayes-samples given, but the detector's class head is deterministic; "
                             "train it with edgeq train --task detect --head bayes, or drop --bayes-samples")
        c = int(head.get_weights()[0].shape[-1])
        return model, {"type": "dense", "samples": 1, "classes": c, "layout": "single", "features": f}
    if mean_only:
        post = head.posterior()
        c = post["kernel_mu"].shape[1]
        conv = keras.layers.Conv2D(c, 1, name="class_mean")
        out = conv(features)
        conv.set_weights([post["kernel_mu"].reshape(1, 1, f, c).astype(np.float32), post["bias_mu"].astype(np.float32)])
        return keras.Model(model.inputs, [obj, box, out], name=f"{model.name}_mean"), {
            "type": "dense", "samples": 1, "classes": int(c), "layout": "single", "features": f}
    k = 32 if samples is None else samples
    if k < 2 or k > bayes.MAX_SAMPLES:
        raise ModelError(f"--bayes-samples {k}: give 2 to {bayes.MAX_SAMPLES}; 32 is usual")
    post = head.posterior()
    c = post["kernel_mu"].shape[1]
    rng = np.random.default_rng(seed)
    kernels = post["kernel_mu"][None] + post["kernel_sigma"][None] * rng.standard_normal((k, f, c))
    biases = post["bias_mu"][None] + post["bias_sigma"][None] * rng.standard_normal((k, c))
    if layout not in ("stacked", "centred"):
        raise ModelError(f"--bayes-layout {layout!r}: choose stacked or centred")

    def stacked(kern: np.ndarray) -> np.ndarray:  # [K, F, C] -> [1, 1, F, K*C], channel k*C + c
        return np.transpose(kern, (1, 0, 2)).reshape(1, 1, f, k * c).astype(np.float32)

    if layout == "stacked":
        conv = keras.layers.Conv2D(k * c, 1, name="class_samples")
        outs = [conv(features)]
        conv.set_weights([stacked(kernels), biases.reshape(-1).astype(np.float32)])
    else:
        mean_conv = keras.layers.Conv2D(c, 1, name="class_mean")
        res_conv = keras.layers.Conv2D(k * c, 1, name="class_residuals")
        outs = [mean_conv(features), res_conv(features)]
        mean_conv.set_weights([post["kernel_mu"].reshape(1, 1, f, c).astype(np.float32),
                               post["bias_mu"].astype(np.float32)])
        res_conv.set_weights([stacked(kernels - post["kernel_mu"][None]),
                              (biases - post["bias_mu"][None]).reshape(-1).astype(np.float32)])
    exported = keras.Model(model.inputs, [obj, box, *outs], name=f"{model.name}_mc{k}")
    backbone_macs = bayes.count_macs(keras.Model(model.inputs, features))
    gh, gw = int(features.shape[1]), int(features.shape[2])
    info = {"type": "bayes", "samples": k, "classes": int(c), "layout": layout, "seed": seed, "features": f,
            "prior_sigma": head.prior_sigma, "posterior_sigma_mean": round(float(post["kernel_sigma"].mean()), 6),
            "head_macs": gh * gw * f * c * (k + (1 if layout == "centred" else 0)), "deterministic_head_macs": gh * gw * f * c,
            "backbone_macs": backbone_macs}
    return exported, info


def convert_detector(opts: Any, source: SourceModel, labels: list[str], log: Callable[[str], None]) -> Any:
    """The detector branch of :func:`converter.pipeline.convert` (same options, same result type)."""
    from .pipeline import ConvertResult, build_manifest

    for field, flag in UNSUPPORTED.items():
        if getattr(opts, field):
            raise ModelError(f"{flag} does not apply to detectors yet; convert {source.origin} without it")
    if opts.bias_correction == "on":
        raise ModelError("--bias-correction on does not apply to detectors yet; convert without it")
    if opts.quant not in (QuantMode.INT8, QuantMode.FLOAT32):
        raise QuantizationError(f"--quant {opts.quant.value}: a detector converts to int8 (default) or float32")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    info = read_detect_info(source.origin, source.num_classes) if Path(source.origin).is_file() else \
        read_detect_info("", source.num_classes)
    height, width, channels = source.input_shape
    mean, std = NORMALIZATIONS[opts.normalization]
    spec = PreprocessSpec(height, width, channels, opts.color_order, opts.resize, (mean,), (std,))
    coco = None
    if opts.val:  # before the slow part: a broken --val fails fast
        from edgeq.scenes import read_coco

        coco = read_coco(opts.val, flag="--val")
        coco.require_categories(info["category_ids"], "--val", source.origin)
        if not isinstance(class_head(source.keras_model), bayes.bayes_dense_class()) and \
                opts.review_measure != "predictive_entropy":
            raise ModelError(f"--review-measure {opts.review_measure}: the detector's class head is deterministic; "
                             "only predictive_entropy applies")
    calibration = (load_calibration_logged(opts.calib, spec, opts.calib_samples, timings, log)
                   if opts.quant.needs_calibration else None)
    layout, choice, stacked = _choose_layout(source.keras_model, opts, calibration, log)
    exported, head = stacked or export_detector(source.keras_model, opts.bayes_samples, opts.bayes_seed, layout=layout)
    if choice:
        head["layout_choice"] = choice
    if head["samples"] > 1:
        log(f"bayesian class head: {head['samples']} samples x {head['classes']} classes fused into one 1x1 conv "
            f"(seed {opts.bayes_seed}), {head['head_macs'] / head['backbone_macs']:.1%} of the backbone's "
            "multiply-accumulates")
    source = SourceModel(exported, None, source.input_shape, exported.outputs[2].shape[-1], source.name, source.origin)
    runtime = load_runtime()
    t0 = time.perf_counter()
    float_bytes = convert_model(source, QuantRecipe(QuantMode.FLOAT32), None)
    timings["convert_float_reference_s"] = time.perf_counter() - t0
    recipe = QuantRecipe(opts.quant, opts.allow_float_fallback)
    t0 = time.perf_counter()
    model_bytes = float_bytes if recipe.mode is QuantMode.FLOAT32 else convert_model(source, recipe, calibration)
    timings["convert_s"] = time.perf_counter() - t0
    with quiet_output():
        float_model = Model(float_bytes, num_threads=opts.threads, runtime=runtime)
        model = Model(model_bytes, num_threads=opts.threads, runtime=runtime)
    remaining = float_ops(model)
    if recipe.mode.integer_only and remaining and not recipe.allow_float_fallback:
        raise QuantizationError(f"{source.origin}: ops stay float in --quant {recipe.mode.value}: "
                                f"{describe_float_ops(remaining)}; replace them, or pass --allow-float-fallback")
    outputs = describe_grid_outputs(model, signature_outputs(model), head["layout"])
    float_outputs = describe_grid_outputs(float_model, signature_outputs(float_model), head["layout"])
    grid = (int(outputs[0]["shape"][1]), int(outputs[0]["shape"][2]))
    detector = {"type": "grid", "stride": int(height // grid[0]), "grid": list(grid),
                "category_ids": [int(c) for c in info["category_ids"]],
                "score_threshold": DEFAULT_SCORE_THRESHOLD, "nms_iou": DEFAULT_NMS_IOU,
                "max_candidates": 100, "max_detections": 50, "box_encoding": "ltrb_cells",
                "architecture": "mobilenet_v2 stride-16 anchor-free (docs/detection.md)"}
    pseudo = {"labels": labels, "head": head, "detector": detector}
    gspec = GridSpec.from_manifest(pseudo)
    qgrid, fgrid = gspec.bind(model, outputs), gspec.bind(float_model, float_outputs)
    probe = calibration.samples[:1] if calibration is not None else np.zeros((1, height, width, channels), np.float32)
    _check_roles(exported, float_model, fgrid, probe)
    if head["samples"] > 1 and calibration is not None:
        head["spread"] = _spread_check(float_model, fgrid, model, qgrid, calibration.samples[:32])
        if head["spread"]["steps"] is not None and head["spread"]["steps"] < 2:
            log(f"warning: the class samples spread over only {head['spread']['steps']:.1f} output quantisation "
                "steps; int8 distorts mutual information below about 2")
    validation = None
    if coco is not None:
        from edgeq.detect_eval import best_f1_threshold, detection_figures, run_detector

        t0 = time.perf_counter()
        measure = opts.review_measure
        results = {name: run_detector(m, g, spec, coco, f"val {name}")
                   for name, m, g in (("float", float_model, fgrid), ("quantized", model, qgrid))}
        best = best_f1_threshold(results["quantized"], coco, detector["category_ids"])
        if best["threshold"] is not None:
            detector["score_threshold"] = best["threshold"]
            detector["score_threshold_calibration"] = {"rule": "highest F1 on the known objects of --val (int8)",
                                                       **best}
            log(f"score threshold: {best['threshold']:.3f} (F1 {best['f1']:.3f}, precision {best['precision']:.3f}, "
                f"recall {best['recall']:.3f} on --val)")
        figs = {name: detection_figures(res, coco, detector["category_ids"], detector["score_threshold"],
                                        opts.target_accuracy, measure) for name, res in results.items()}
        validation = {"source": str(coco.path), "images": len(coco.images), **figs}
        head["review"] = figs["quantized"]["review"]
        if head["review"] is None:
            log(f"needs_review: not calibrated: no int8 detection of --val at score >= {detector['score_threshold']:g} "
                "matched a known object; the device reports needs_review null unless its config sets "
                "thresholds.review")
        timings["validation_s"] = time.perf_counter() - t0
    manifest = build_manifest(source, labels, spec, model, recipe, calibration, remaining, outputs, head)
    manifest["task"] = "detect"
    manifest["detector"] = detector
    manifest["sizes"] = {"float32_tflite": len(float_bytes), "model_tflite": len(model_bytes),
                         "ratio_to_float32": round(len(model_bytes) / len(float_bytes), 4)}
    if validation is not None:
        manifest["validation"] = validation
    timings["total_s"] = time.perf_counter() - started
    report = {
        "ops": [{"index": op.index, "op": op.name, "operands": list(op.operand_types),
                 "results": list(op.result_types)} for op in model.ops],
        "runtime": model.describe(), "sizes": manifest["sizes"],
        "timings": {k: round(v, 3) for k, v in timings.items()}, "validation": validation,
    }
    write_bundle(opts.output, manifest, model_bytes, report)
    return ConvertResult(opts.output, manifest, report, timings)


def _choose_layout(model: Any, opts: Any, calibration: Any, log: Callable[[str], None]
                   ) -> tuple[str, dict | None, tuple[Any, dict[str, Any]] | None]:
    """``--bayes-layout auto`` (the default): stacked when its int8 output would resolve the spread between samples
    in at least ``bayes.AUTO_MIN_STEPS`` steps, else centred (the classifier's rule, docs/bayesian.md). The spread
    is measured at the cells most likely to hold an object, the output step over all cells, on the float model.
    Returns the layout, the manifest's record of the choice, and the stacked export when that is the one chosen
    (it was built to measure it)."""
    if not isinstance(class_head(model), bayes.bayes_dense_class()):
        return "single", None, None
    if opts.bayes_layout != "auto":
        return opts.bayes_layout, {"mode": opts.bayes_layout}, None
    if calibration is None:
        return "centred", {"mode": "auto", "reason": "no calibration data to measure the spread: centred"}, None
    exported, head = export_detector(model, opts.bayes_samples, opts.bayes_seed, layout="stacked")
    x = calibration.samples[:32]
    obj, _, cls = (np.asarray(o, np.float64) for o in exported.predict(x, batch_size=16, verbose=0))
    k, c = head["samples"], head["classes"]
    step = (max(0.0, float(cls.max())) - min(0.0, float(cls.min()))) / 255.0
    top = np.argsort(-obj.reshape(len(x), -1), axis=1)[:, :4]
    cells = cls.reshape(len(x), -1, k, c)[np.arange(len(x))[:, None], top]
    spread = float(np.mean(np.std(cells, axis=2)))
    steps = spread / step if step else 0.0
    layout = "stacked" if steps >= bayes.AUTO_MIN_STEPS else "centred"
    reason = (f"stacked output would resolve the spread in {steps:.2f} int8 steps "
              f"({'>=' if layout == 'stacked' else '<'} {bayes.AUTO_MIN_STEPS:g}): {layout}")
    log(f"bayes layout: {reason}")
    choice = {"mode": "auto", "reason": reason,
              "stacked_estimate": {"spread": round(spread, 6), "step": round(step, 8), "steps": round(steps, 2)}}
    return layout, choice, ((exported, head) if layout == "stacked" else None)


def _check_roles(keras_model: Any, float_model: Model, grid: Any, x: np.ndarray) -> None:
    """Each output role of the float TFLite model must reproduce the Keras output it stands for: shapes alone
    cannot tell a 4-class deterministic head from the boxes, and the signature order is the converter's promise,
    not ours."""
    want = [np.asarray(o, np.float32) for o in keras_model.predict(x.astype(np.float32), verbose=0)]
    float_model.set_input(x.astype(np.float32))
    float_model.invoke()
    for role, t, w in zip(grid.spec.roles, grid.tensors, want):
        got = float_model.get_float(t)
        if got.size != w.size or not np.allclose(got.reshape(w.shape), w, atol=1e-3 * max(1.0, float(np.abs(w).max()))):
            raise QuantizationError(f"converted output {t.name} does not match the model's {role!r} output; the "
                                    "output roles could not be identified (this is a bug, please report it)")


def _spread_check(float_model: Model, fgrid: Any, model: Model, qgrid: Any, samples: np.ndarray) -> dict[str, Any]:
    """Spread of the class logits across samples at the cells most likely to hold an object, float vs int8, and
    how many output steps of the tensor holding the samples it spans."""
    ref, quant = [], []
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
    mi_f, mi_q = summarize(ref_a).mutual_information, summarize(quant_a).mutual_information
    corr = float(np.corrcoef(mi_f, mi_q)[0, 1]) if np.std(mi_f) > 0 and np.std(mi_q) > 0 else None
    return {"cells": int(len(ref_a)), "float": round(spread_f, 6), "quantized": round(spread_q, 6),
            "output_step": round(step, 8), "steps": round(spread_f / step, 2) if step else None,
            "mutual_information_correlation": None if corr is None else round(corr, 4)}


def float_reference_detector(model_path: str, manifest: dict[str, Any], threads: int = 1) -> tuple[Model, Any]:
    """The float32 counterpart of a detection bundle from its source ``.keras``: the same K weight samples (seed
    from the manifest), so float and int8 differ only by quantisation."""
    from .detect import is_detector
    from .models import load_source_model
    from .quantize import import_tensorflow

    import_tensorflow()
    source = load_source_model(model_path)
    if not is_detector(source.keras_model):
        raise ModelError(f"--reference {model_path}: not an edgeq detector (edgeq train --task detect)")
    head = manifest.get("head") or {}
    samples = int(head["samples"]) if head.get("type") == "bayes" else None
    layout = head.get("layout", "stacked") if samples else "single"
    exported, _ = export_detector(source.keras_model, samples, int(head.get("seed", 0)),
                                  layout=layout if samples else "stacked")
    src = SourceModel(exported, None, source.input_shape, int(exported.outputs[2].shape[-1]), source.name, model_path)
    with quiet_output():
        model = Model(convert_model(src, QuantRecipe(QuantMode.FLOAT32), None), num_threads=threads)
    spec = GridSpec.from_manifest(manifest)
    return model, spec.bind(model, describe_grid_outputs(model, signature_outputs(model), spec.layout))
