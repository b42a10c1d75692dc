"""``edgeq convert``: source model -> calibration -> TFLite converter -> verification -> bundle."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.bundle import write_bundle
from edgeq.datasets import class_folder
from edgeq.errors import BundleError, ModelError, QuantizationError
from edgeq.evaluate import calibrate_review, compare_scored, correlation, logit_spread, model_input_spec, score
from edgeq.heads import BoundHead, HeadSpec
from edgeq.packing import MAX_CODEBOOK, pack_model
from edgeq.preprocess import NORMALIZATIONS, PreprocessSpec
from edgeq.runtime import Model, load_runtime, quantize_values, weight_kernels
from edgeq.uncertainty import MEASURES, summarize

from . import bayes
from .calibration import CalibrationSet, load_calibration_logged
from .models import SourceModel, load_source_model
from .train import labels_path
from .quantize import (
    QuantMode,
    QuantRecipe,
    convert_model,
    describe_float_ops,
    float_ops,
    import_tensorflow,
    layer_errors,
    quiet_output,
)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``edgeq convert`` takes; see ``edgeq convert --help`` for each field."""

    model: str
    output: Path
    calib: str | None = None
    calib_samples: int = 200
    quant: QuantMode = QuantMode.INT8
    labels_file: str | None = None
    val: str | None = None
    allow_float_fallback: bool = False
    input_size: int = 224
    alpha: float = 1.0
    classes: int = 1000
    weights: str | None = None
    normalization: str = "mobilenet"
    color_order: str = "RGB"
    resize: str = "stretch"
    threads: int = 1
    bayes_samples: int | None = None  # None: 32 when the model has a Bayesian head
    bayes_seed: int = 0
    bayes_layout: str = "auto"
    review_measure: str = "predictive_entropy"
    target_accuracy: float = 0.995
    layer_errors: bool = False
    clusters: int | None = None
    cluster_init: str = "linear"
    cluster_per_channel: bool = False
    cluster_skip: str | None = None
    finetune: str | None = None
    finetune_epochs: int = 1
    bias_correction: str = "auto"  # auto: keep it when --val shows it does not lower top-1; on; off
    keep_float: str | None = None  # regex of op names kept in float
    int16: str | None = None  # refused: the converter has no per-layer 16x8
    max_drop: float | None = None  # accuracy-aware mode: top-1 drop bound on --val
    drop_type: str = "absolute"
    max_reverts: int = 10
    best_effort: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "quant", QuantMode(self.quant))
        object.__setattr__(self, "output", Path(self.output))
        if self.normalization not in NORMALIZATIONS:
            raise ModelError(f"--normalize {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
        if self.bayes_layout not in ("auto", *bayes.LAYOUTS):
            raise ModelError(f"--bayes-layout {self.bayes_layout!r}: choose auto or one of {', '.join(bayes.LAYOUTS)}")
        if self.review_measure not in MEASURES:
            raise ModelError(f"--review-measure {self.review_measure!r}: choose one of {', '.join(MEASURES)}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ModelError(f"--target-accuracy {self.target_accuracy}: give a fraction in (0, 1], e.g. 0.995")
        if self.finetune is not None and self.clusters is None:
            raise ModelError("--finetune applies to clustered models: give --clusters N too")
        if self.finetune_epochs < 1:
            raise ModelError(f"--finetune-epochs {self.finetune_epochs}: give at least 1")
        if self.layer_errors and self.quant not in (QuantMode.INT8, QuantMode.UINT8):
            raise QuantizationError(f"--layer-errors measures int8 layers; it does not apply to --quant {self.quant.value}")
        if self.bayes_samples is not None and self.bayes_samples < 2:
            raise ModelError(f"--bayes-samples {self.bayes_samples}: a Monte-Carlo head needs at least 2 samples (default 32)")
        if self.bias_correction not in ("auto", "on", "off"):
            raise ModelError(f"--bias-correction {self.bias_correction!r}: choose auto, on or off")
        if self.int16 is not None:
            raise QuantizationError(
                f"--int16 {self.int16!r}: the TFLite converter quantises 16x8 only for a whole model (--quant int16x8), "
                "not per layer; keep those layers in float with --keep-float REGEX")
        mixed = self.keep_float is not None or self.max_drop is not None
        if mixed and self.quant not in (QuantMode.INT8, QuantMode.UINT8):
            raise QuantizationError(f"--keep-float and --max-drop apply to --quant int8 or uint8, not {self.quant.value}")
        if self.max_drop is not None:
            if not self.val:
                raise ModelError("--max-drop needs --val DIR: the accuracy drop is measured on it")
            if not 0.0 <= self.max_drop < 1.0:
                raise ModelError(f"--max-drop {self.max_drop}: give a fraction of accuracy, e.g. 0.01 for one point")
        if self.drop_type not in ("absolute", "relative"):
            raise ModelError(f"--drop-type {self.drop_type!r}: choose absolute or relative")
        if self.max_reverts < 1:
            raise ModelError(f"--max-reverts {self.max_reverts}: give at least 1")
        if self.quant.needs_calibration and not self.calib:
            raise QuantizationError(f"--quant {self.quant.value} needs --calib (an image folder, video or .npy/.npz)")


@dataclass
class ConvertResult:
    output: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def check_output_path(path: Path) -> None:
    """Fail before the slow part if the bundle could not be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BundleError(f"-o {path}: is a folder; give a file name such as model.edgeq")
    if not parent.is_dir():
        raise BundleError(f"-o {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"-o {path}: folder {parent} is not writable")


def read_labels(path: str | None, num_classes: int, default: list[str] | None = None) -> list[str]:
    if path is None:
        labels = default or [f"class_{i}" for i in range(num_classes)]
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"--labels {path}: cannot read ({exc.__class__.__name__})") from None
        labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(labels) != num_classes:
        where = f"--labels {path}" if path else "labels"
        raise ModelError(f"{where}: {len(labels)} labels but the model has {num_classes} classes; give one per line")
    return labels


def convert(opts: ConvertOptions, log: Callable[[str], None] = print) -> ConvertResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_output_path(opts.output)
    import_tensorflow()
    recipe = QuantRecipe(opts.quant, opts.allow_float_fallback)

    t0 = time.perf_counter()
    source = load_source_model(opts.model, opts.input_size, opts.alpha, opts.classes, opts.weights)
    timings["load_model_s"] = time.perf_counter() - t0
    from .detect import is_detector

    detector = is_detector(source.keras_model)
    if detector:  # the class head's width, not the objectness output's
        source = dataclasses.replace(source, num_classes=int(source.keras_model.outputs[2].shape[-1]))
    default_labels = None
    labels_file = opts.labels_file
    if labels_file is None and labels_path(opts.model).is_file():
        labels_file = str(labels_path(opts.model))  # written by edgeq train next to the model
        log(f"labels: {labels_file}")
    if labels_file is None and opts.val:
        names = sorted(p.name for p in Path(opts.val).iterdir() if p.is_dir()) if Path(opts.val).is_dir() else []
        default_labels = names if len(names) == source.num_classes else None
    labels = read_labels(labels_file, source.num_classes, default_labels)
    height, width, channels = source.input_shape
    if channels not in (1, 3):
        raise ModelError(f"{source.origin}: input has {channels} channels; edgeq takes 1 (grey) or 3 (colour)")
    if detector:
        from .detect_convert import convert_detector

        return convert_detector(opts, source, labels, log)
    mean, std = NORMALIZATIONS[opts.normalization]
    spec = PreprocessSpec(height, width, channels, opts.color_order, opts.resize, (mean,), (std,))

    calibration = (load_calibration_logged(opts.calib, spec, opts.calib_samples, timings, log)
                   if opts.quant.needs_calibration else None)
    clustering = _cluster(source, opts, labels, spec, log) if opts.clusters is not None else None
    source, exported, layout_choice = _export_bayes_head(source, opts, calibration, log)

    runtime = load_runtime()
    # the float reference first: bias correction changes the weights the int8 model is made from, never the reference
    t0 = time.perf_counter()
    float_bytes = convert_model(source, QuantRecipe(QuantMode.FLOAT32), None)
    timings["convert_float_reference_s"] = time.perf_counter() - t0
    with quiet_output():
        float_model = Model(float_bytes, num_threads=opts.threads, runtime=runtime)
    head_info = exported.describe() if exported else {"type": "dense", "samples": 1, "classes": len(labels)}
    head_info["layout"] = exported.layout if exported else "single"
    head_spec = HeadSpec.from_manifest({"head": head_info, "labels": labels})
    float_head = head_spec.bind(float_model, describe_outputs(float_model, head_spec))
    data = class_folder(opts.val, labels) if opts.val else None
    float_scored = score(float_model, float_head, spec, data, "float") if data is not None else None

    def load(b: bytes) -> tuple[Model, BoundHead]:
        with quiet_output():  # the runtime announces its delegate on stderr
            m = Model(b, num_threads=opts.threads, runtime=runtime)
        return m, head_spec.bind(m, describe_outputs(m, head_spec))

    scored: dict[bytes, Any] = {}  # one pass over --val per distinct model: bias correction, the accuracy-aware
    # loop and the final validation ask for the same models again

    def scored_of(b: bytes) -> Any:
        if b not in scored:
            m, h = load(b)
            scored[b] = score(m, h, spec, data, "quantized")
        return scored[b]

    def top1_of(b: bytes) -> float:
        return float(scored_of(b).correct.mean()) if data is not None else float("nan")

    t0 = time.perf_counter()
    model_bytes = float_bytes if recipe.mode is QuantMode.FLOAT32 else convert_model(source, recipe, calibration)
    timings["convert_s"] = time.perf_counter() - t0
    precision: dict[str, Any] = {}
    precision_report: dict[str, Any] = {}
    if recipe.mode in (QuantMode.INT8, QuantMode.UINT8) and calibration is not None:
        t0 = time.perf_counter()
        model_bytes, precision["bias_correction"], precision_report["bias_correction"] = _bias_correction(
            source, opts, recipe, calibration, model_bytes, top1_of if data is not None else None, log)
        timings["bias_correction_s"] = time.perf_counter() - t0
    if opts.keep_float is not None or opts.max_drop is not None:
        t0 = time.perf_counter()
        model_bytes, mixed = _mixed_precision(source, opts, recipe, calibration, model_bytes, float_model,
                                              float_scored, top1_of, log)
        precision.update(mixed)
        timings["mixed_precision_s"] = time.perf_counter() - t0
    model, quant_head = load(model_bytes)
    outputs = describe_outputs(model, head_spec)
    remaining_float = float_ops(model)
    if recipe.mode.integer_only and remaining_float and not recipe.allow_float_fallback and not precision.get("float_layers"):
        raise QuantizationError(
            f"{source.origin}: ops stay float in --quant {recipe.mode.value}: {describe_float_ops(remaining_float)}; "
            "replace them, or pass --allow-float-fallback to keep them float"
        )

    if exported is not None:
        head_info["layout_choice"] = layout_choice
        head_info["weights"] = _weight_check(model, exported)
        if calibration is not None:
            head_info["spread"] = _spread_check(float_model, float_head, model, quant_head, calibration)
            _warn_spread(head_info["spread"], opts, log)

    validation = None
    if data is not None:
        t0 = time.perf_counter()
        quant_scored = scored_of(model_bytes)
        validation = compare_scored(float_scored, quant_scored)
        validation["source"] = str(opts.val)
        head_info["review"] = calibrate_review(quant_scored, opts.review_measure, opts.target_accuracy)
        timings["validation_s"] = time.perf_counter() - t0

    layers = None
    if opts.layer_errors and calibration is not None:
        t0 = time.perf_counter()
        layers = layer_errors(source, calibration)
        timings["layer_errors_s"] = time.perf_counter() - t0
        worst = layers[0] if layers else None
        if worst:
            log(f"layer errors: {len(layers)} layers; worst {worst['layer']} ({worst['op']}), "
                f"RMSE {worst['rmse_over_scale']:.2f} quantisation steps")

    manifest = build_manifest(source, labels, spec, model, recipe, calibration, remaining_float, outputs, head_info)
    manifest["quantization"].update(precision)
    manifest["sizes"] = {
        "float32_tflite": len(float_bytes),
        "model_tflite": len(model_bytes),
        "ratio_to_float32": round(len(model_bytes) / len(float_bytes), 4),
    }
    if validation is not None:
        manifest["validation"] = validation
    timings["total_s"] = time.perf_counter() - started
    report = {
        "ops": [
            {"index": op.index, "op": op.name, "operands": list(op.operand_types), "results": list(op.result_types)}
            for op in model.ops
        ],
        "runtime": model.describe(),
        "sizes": manifest["sizes"],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "validation": validation,
    }
    if layers is not None:
        report["layers"] = layers
    report.update(precision_report)
    packed = None
    if clustering is not None:
        clustering["shipped"] = _check_clusters(model, clustering, opts.clusters)
        if opts.clusters <= MAX_CODEBOOK:
            packed = pack_model(model_bytes, [(n, w, a) for _, n, w, a, per_channel in weight_kernels(model) if per_channel])
            clustering["packed_kernels"] = len(packed[2])
        manifest["clustering"] = {k: v for k, v in clustering.items() if k != "layers"}
        report["clustering"] = clustering
        log(f"clustering: {clustering['clustered']} layers to {opts.clusters} values, shipped int8 kernels hold at most "
            f"{clustering['shipped']['max_distinct_per_channel']} distinct values per channel")
    write_bundle(opts.output, manifest, model_bytes, report, packed)
    aa = precision.get("accuracy_aware")
    if aa is not None and not aa["met"] and not opts.best_effort:
        raise QuantizationError(
            f"--max-drop {opts.max_drop:g}: not reached after trying {len(aa['steps'])} layer(s) in float "
            f"(--max-reverts {opts.max_reverts}); best {aa['drop_type']} drop {aa['final_drop']:.4f} "
            f"({len(aa['float_layers'])} float), kept in {opts.output}; "
            "raise --max-reverts, or accept it with --best-effort")
    return ConvertResult(opts.output, manifest, report, timings)


def build_manifest(
    source: SourceModel,
    labels: list[str],
    spec: PreprocessSpec,
    model: Model,
    recipe: QuantRecipe,
    calibration: Any,
    remaining_float: list[Any],
    outputs: list[dict[str, Any]],
    head: dict[str, Any],
) -> dict[str, Any]:
    input_spec = model_input_spec(model, spec).to_dict()
    input_spec["name"] = model.input.name
    quantization = recipe.describe()
    quantization["float_ops"] = sorted({op.name for op in remaining_float})
    return {
        "name": source.name,
        "source": source.origin,
        "task": "classify",
        "labels": labels,
        "input": input_spec,
        "outputs": outputs,
        "head": head,
        "quantization": quantization,
        "calibration": calibration.summary() if calibration is not None else {"count": 0, "source": None},
        "converter": {"tensorflow": _tf_version()},
    }


def _tf_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)


def describe_outputs(model: Model, head: HeadSpec) -> list[dict[str, Any]]:
    """The manifest's ``outputs``: each output tensor with its role, told apart by size (never by order):
    ``logits`` has C values, ``samples`` and ``residuals`` K*C."""
    sizes = {"logits": head.classes, "samples": head.samples * head.classes, "residuals": head.samples * head.classes}
    out = []
    for role in head.roles:
        found = [t for t in model.outputs if int(np.prod(t.shape)) == sizes[role]]
        if len(found) != 1:
            have = ", ".join(f"{t.name} {list(t.shape)}" for t in model.outputs)
            raise QuantizationError(f"converted model outputs ({have}) do not fit a {head.layout} head")
        out.append({"role": role, **found[0].to_dict()})
    return out


def _export_bayes_head(
    source: SourceModel, opts: ConvertOptions, calibration: CalibrationSet | None, log: Callable[[str], None]
) -> tuple[SourceModel, bayes.BayesExport | None, dict[str, Any] | None]:
    """Swap a Bayesian head for K stacked weight samples; refuse --bayes-samples without one.

    ``--bayes-layout auto`` (the default) takes ``stacked`` when its int8 output would resolve the spread between
    samples in at least ``bayes.AUTO_MIN_STEPS`` steps (one output, a little cheaper), else ``centred``."""
    if source.keras_model is None:
        if opts.bayes_samples is not None:
            raise ModelError(f"{source.origin}: --bayes-samples needs a .keras model with a BayesDense head, not a SavedModel")
        return source, None, None
    if not bayes.find_bayes_heads(source.keras_model):
        if opts.bayes_samples is not None:
            bayes.export_model(source.keras_model, opts.bayes_samples, origin=source.origin)  # raises: no head
        return source, None, None
    samples = opts.bayes_samples if opts.bayes_samples is not None else 32
    layout, choice = opts.bayes_layout, {"mode": opts.bayes_layout}
    exported = None
    if layout == "auto":
        stacked = bayes.export_model(source.keras_model, samples, opts.bayes_seed, "stacked", source.origin)
        if calibration is None:
            layout = "centred"
            choice["reason"] = "no calibration data to measure the spread: centred"
        else:
            estimate = bayes.stacked_steps_estimate(stacked, calibration.samples)
            layout = "stacked" if estimate["steps"] >= bayes.AUTO_MIN_STEPS else "centred"
            choice.update(stacked_estimate=estimate, min_steps=bayes.AUTO_MIN_STEPS)
            choice["reason"] = (f"stacked output would resolve the spread in {estimate['steps']} int8 steps "
                                f"({'>=' if layout == 'stacked' else '<'} {bayes.AUTO_MIN_STEPS:g}): {layout}")
        log(f"bayes layout: {choice['reason']}")
        exported = stacked if layout == "stacked" else None
    if exported is None:
        exported = bayes.export_model(source.keras_model, samples, opts.bayes_seed, layout, source.origin)
    log(f"bayesian head: {samples} samples x {exported.classes} classes ({exported.layout}, seed {exported.seed}), "
        f"head {exported.head_macs / exported.backbone_macs:.1%} of the backbone's multiply-accumulates")
    return dataclasses.replace(source, keras_model=exported.model), exported, choice


def _weight_check(model: Model, exported: bayes.BayesExport) -> dict[str, Any]:
    """Dequantise the int8 stacked kernel and compare it with the float samples, per output channel."""
    k, c, f = exported.samples, exported.classes, exported.features
    for d in model.interpreter.get_tensor_details():
        if tuple(d["shape"]) == (k * c, f) and d["dtype"] in (np.int8, np.int16):
            scales = d["quantization_parameters"]["scales"]
            mean_kernel = _posterior_mean(exported) if exported.layout == "centred" else None
            return bayes.weight_faithfulness(
                exported.sampled_kernels, model.interpreter.get_tensor(d["index"]), scales, exported.layout, mean_kernel
            )
    return {"per_channel": None, "note": "no quantised stacked kernel found (float model)"}


def _posterior_mean(exported: bayes.BayesExport) -> np.ndarray:
    layer = exported.model.get_layer("mean_logits")
    return np.asarray(layer.get_weights()[0], dtype=np.float64)


def _spread_check(
    float_model: Model, float_head: BoundHead, model: Model, head: BoundHead, calibration: CalibrationSet,
    limit: int = 64,
) -> dict[str, Any]:
    """The spread of the logits across samples, before and after quantisation, on calibration images."""
    samples = calibration.samples[:limit]
    ref, quant = [], []
    for x in samples:
        float_model.set_input(x[None].astype(np.float32))
        float_model.invoke()
        ref.append(float_head.read(float_model))
        t = model.input
        model.set_input(quantize_values(x[None], t.scale, t.zero_point, t.dtype) if t.quantized else x[None])
        model.invoke()
        quant.append(head.read(model))
    ref_a, quant_a = np.stack(ref), np.stack(quant)
    spread_float, spread_quant = logit_spread(ref_a), logit_spread(quant_a)
    step = head.tensors[-1].scale if head.tensors[-1].quantized else 0.0
    mi_f = summarize(ref_a).mutual_information
    mi_q = summarize(quant_a).mutual_information
    corr = correlation(mi_f, mi_q)
    return {
        "images": int(len(samples)),
        "float": round(spread_float, 6),
        "quantized": round(spread_quant, 6),
        "kept": round(spread_quant / spread_float, 4) if spread_float > 0 else None,
        "output_step": round(float(step), 8),
        "steps": round(spread_float / step, 2) if step else None,
        "mutual_information_correlation": None if corr is None else round(corr, 4),
    }


def _warn_spread(spread: dict[str, Any], opts: ConvertOptions, log: Callable[[str], None]) -> None:
    steps = spread.get("steps")
    if steps is not None and steps < 2:
        hint = " (try --bayes-layout centred)" if opts.bayes_layout == "stacked" else ""
        log(f"warning: the spread between samples is only {steps:.1f} output quantisation steps; int8 distorts "
            f"mutual information below about 2{hint}")


def float_reference(model_path: str, manifest: dict[str, Any], threads: int = 1) -> tuple[Model, BoundHead]:
    """The float32 counterpart of a bundle, built from its source model: for a Bayesian head, the same K weight
    samples (seed and layout from the manifest), so float and int8 differ only by quantisation."""
    source = load_source_model(model_path)
    head = manifest.get("head") or {}
    if head.get("type") == "bayes":
        if source.keras_model is None:
            raise ModelError(f"{model_path}: a SavedModel cannot hold the bundle's Bayesian head; give the .keras file")
        exported = bayes.export_model(source.keras_model, int(head["samples"]), int(head["seed"]), head["layout"],
                                      model_path)
        source = dataclasses.replace(source, keras_model=exported.model)
    spec = HeadSpec.from_manifest(manifest)
    if source.num_classes != spec.classes and head.get("type") != "bayes":
        raise ModelError(f"{model_path}: {source.num_classes} classes, but the bundle has {spec.classes}")
    with quiet_output():
        model = Model(convert_model(source, QuantRecipe(QuantMode.FLOAT32), None), num_threads=threads)
    return model, spec.bind(model, describe_outputs(model, spec))


def _cluster(
    source: SourceModel, opts: ConvertOptions, labels: list[str], spec: PreprocessSpec, log: Callable[[str], None]
) -> dict[str, Any]:
    """k-means weight sharing of the source model's kernels, before PTQ, optionally fine-tuned with the weights kept
    on their clusters (see converter/cluster.py)."""
    import re

    from .cluster import ClusterOptions, cluster_model, finetune, vq_posterior

    copts = ClusterOptions(opts.clusters, opts.cluster_init, opts.cluster_per_channel, opts.cluster_skip, opts.bayes_seed)
    if source.keras_model is None:
        raise ModelError(f"{source.origin}: --clusters needs a Keras model (.keras/.h5 or built in), not a SavedModel")
    data = None
    if opts.finetune is not None:  # check the folder before the slow part
        from .train import load_folder_arrays

        data = load_folder_arrays(opts.finetune, spec, labels, flag="--finetune")
    t0 = time.perf_counter()
    assignments: dict[str, np.ndarray] = {}
    layers = cluster_model(source.keras_model, copts, assignments)
    done = [r for r in layers if "clusters" in r]
    log(f"clustering: {len(done)} of {len(layers)} kernels to {opts.clusters} values "
        f"({'per channel' if opts.cluster_per_channel else 'per tensor'}, {opts.cluster_init} init), "
        f"{time.perf_counter() - t0:.1f} s")
    out: dict[str, Any] = {
        "clusters": opts.clusters, "init": opts.cluster_init, "per_channel": opts.cluster_per_channel,
        "skip": copts.skip_pattern, "clustered": len(done), "skipped": len(layers) - len(done),
        "clustered_weights": int(sum(r["weights"] for r in done)),
        "all_weights": int(sum(r["weights"] for r in layers)), "layers": layers,
    }
    if data is not None:
        t0 = time.perf_counter()
        with quiet_output():
            history = finetune(source.keras_model, data[0], data[1], assignments, opts.cluster_per_channel,
                               opts.finetune_epochs, seed=opts.bayes_seed)
        out["finetune"] = {"data": str(opts.finetune), "images": int(len(data[0])), "epochs": opts.finetune_epochs,
                           "train_accuracy": round(history.get("accuracy", float("nan")), 4)}
        log(f"fine-tuning: {opts.finetune_epochs} epoch(s) on {len(data[0])} images, weights kept on their clusters, "
            f"train accuracy {out['finetune']['train_accuracy']}, {time.perf_counter() - t0:.1f} s")
    for head in bayes.find_bayes_heads(source.keras_model):  # after fine-tuning, which moves the posterior
        if re.search(copts.skip_pattern, head.name):
            out["posterior"] = {"layer": head.name, "skipped": "matches --cluster-skip"}
            continue
        out["posterior"] = vq_posterior(head, opts.clusters, copts.seed)
        log(f"posterior: {head.name}'s {out['posterior']['weights']:,} (mu, sigma) pairs vector-quantised to "
            f"{out['posterior']['codewords']} codewords (relative error mu {out['posterior']['relative_rmse_mu']:.3f}, "
            f"sigma {out['posterior']['relative_rmse_sigma']:.3f}); samples are drawn from it")
    return out


def _check_clusters(model: Model, clustering: dict[str, Any], clusters: int) -> dict[str, Any]:
    """Read the int8 kernels back: the clustered layers must hold at most ``clusters`` values per channel."""
    import re

    from edgeq.runtime import weight_stats

    names = [r["layer"] for r in clustering["layers"] if "clusters" in r]
    patterns = [re.compile(rf"(^|/){re.escape(n)}(_\d+)?/") for n in names]
    stats = weight_stats(model)
    matched = [w for w in stats if any(p.search(w["name"]) for p in patterns)]
    worst = max((w["max_distinct_per_channel"] for w in matched), default=0)
    if worst > clusters:
        raise QuantizationError(f"clustered kernels came out of the converter with {worst} distinct values in a channel "
                                f"(more than --clusters {clusters}); this is a bug, please report it")
    return {"kernels_checked": len(matched), "max_distinct_per_channel": int(worst)}


def _bias_correction(
    source: SourceModel, opts: ConvertOptions, recipe: QuantRecipe, calibration: CalibrationSet, plain: bytes,
    top1_of: Callable[[bytes], float] | None, log: Callable[[str], None],
) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Empirical bias correction (converter/biascorrect.py). ``on`` keeps it; ``auto`` keeps it when --val shows
    that top-1 does not go down (without --val, auto does nothing: there is nothing to decide on). Returns the
    model bytes, the manifest's summary and the report's per-layer corrections. The source model is left corrected
    only when the correction is kept (mixed precision re-quantises from it)."""
    from .biascorrect import bias_correction

    mode = opts.bias_correction
    if mode == "off" or source.keras_model is None:
        return plain, {"mode": mode, "applied": False}, {}
    if mode == "auto" and top1_of is None:
        return plain, {"mode": mode, "applied": False, "reason": "auto decides on --val; none given"}, {}
    snapshot = source.keras_model.get_weights()
    layers = bias_correction(source.keras_model, calibration.samples, log=log)
    corrected = convert_model(source, recipe, calibration)
    info: dict[str, Any] = {"mode": mode, "corrected_layers": sum(1 for r in layers if "corrected" in r),
                            "kernel_layers": len(layers)}
    shifts = [r["mean_abs_shift"] for r in layers if "corrected" in r]
    if shifts:
        info["mean_abs_shift"] = round(float(np.mean(shifts)), 6)
    applied = True
    if top1_of is not None:
        info["top1_without"], info["top1_with"] = round(top1_of(plain), 5), round(top1_of(corrected), 5)
        applied = mode == "on" or info["top1_with"] >= info["top1_without"]
        log(f"bias correction: top-1 on --val {info['top1_without']:.4f} without, {info['top1_with']:.4f} with: "
            + ("kept" if applied else "not kept (auto)"))
    if not applied:
        source.keras_model.set_weights(snapshot)
    info["applied"] = applied
    return (corrected if applied else plain), info, {"layers": layers}


def _mixed_precision(
    source: SourceModel, opts: ConvertOptions, recipe: QuantRecipe, calibration: CalibrationSet, model_bytes: bytes,
    float_model: Model, float_scored: Any, top1_of: Callable[[bytes], float], log: Callable[[str], None],
) -> tuple[bytes, dict[str, Any]]:
    """--keep-float and the accuracy-aware loop (converter/mixed.py)."""
    from edgeq.runtime import interleaved_latency

    from .mixed import MixedQuantizer, accuracy_aware, short_name

    mq = MixedQuantizer(source, recipe, calibration)
    float_nodes = mq.match(opts.keep_float) if opts.keep_float is not None else []
    if float_nodes:
        model_bytes = mq.quantize(float_nodes)
        log(f"--keep-float: {len(float_nodes)} op(s) in float: {', '.join(short_name(n) for n in float_nodes)}")
    out: dict[str, Any] = {"float_layers": [short_name(n) for n in float_nodes]}
    if opts.max_drop is None:
        return model_bytes, out
    float_top1 = float(float_scored.correct.mean())
    aa, best = accuracy_aware(mq, float_model, calibration.samples[:32], top1_of, float_top1, top1_of(model_bytes),
                              opts.max_drop, opts.drop_type, opts.max_reverts, float_nodes, log)
    record = aa.describe()
    if best is not None:
        with quiet_output():
            plain_m, best_m = Model(model_bytes), Model(best)
        x = [np.zeros(m.input.shape, dtype=m.input.dtype) for m in (plain_m, best_m)]
        t_plain, t_best = interleaved_latency([plain_m, best_m], x, runs=100, warmup=10)
        record["cost"] = {
            "model_bytes": [len(model_bytes), len(best)],
            "latency_ms_median": [round(float(np.median(t_plain)), 4), round(float(np.median(t_best)), 4)],
            "latency_ratio": round(float(np.median(t_best) / np.median(t_plain)), 4),
            "xnnpack": best_m.delegation.to_dict(),
        }
        model_bytes = best
        out["float_layers"] = record["float_layers"]
    state = "reached" if aa.met else "NOT reached"
    log(f"accuracy-aware: bound {state}: {opts.drop_type} drop {aa.plain_drop:.4f} -> {aa.final_drop:.4f} with "
        f"{len(out['float_layers'])} layer(s) in float" + (f": {', '.join(out['float_layers'])}" if out["float_layers"] else ""))
    out["accuracy_aware"] = record
    return model_bytes, out
