"""``edgeq convert``: source model -> calibration -> TFLite converter -> verification -> bundle."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeq.bundle import write_bundle
from edgeq.datasets import class_folder
from edgeq.errors import BundleError, ModelError, QuantizationError
from edgeq.evaluate import compare_classifiers, model_input_spec
from edgeq.preprocess import NORMALIZATIONS, PreprocessSpec
from edgeq.runtime import Model, load_runtime

from .calibration import load_calibration
from .models import SourceModel, load_source_model
from .quantize import (
    QuantMode,
    QuantRecipe,
    convert_model,
    describe_float_ops,
    float_ops,
    import_tensorflow,
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "quant", QuantMode(self.quant))
        object.__setattr__(self, "output", Path(self.output))
        if self.normalization not in NORMALIZATIONS:
            raise ModelError(f"--normalize {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
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
    default_labels = None
    if opts.labels_file is None and opts.val:
        names = sorted(p.name for p in Path(opts.val).iterdir() if p.is_dir()) if Path(opts.val).is_dir() else []
        default_labels = names if len(names) == source.num_classes else None
    labels = read_labels(opts.labels_file, source.num_classes, default_labels)
    height, width, channels = source.input_shape
    if channels not in (1, 3):
        raise ModelError(f"{source.origin}: input has {channels} channels; edgeq takes 1 (grey) or 3 (colour)")
    mean, std = NORMALIZATIONS[opts.normalization]
    spec = PreprocessSpec(height, width, channels, opts.color_order, opts.resize, (mean,), (std,))

    calibration = None
    if opts.quant.needs_calibration:
        t0 = time.perf_counter()
        calibration = load_calibration(opts.calib, spec, opts.calib_samples)
        timings["calibration_s"] = time.perf_counter() - t0
        log(f"calibration: {len(calibration.samples)} samples from {calibration.source} ({calibration.kind})")

    t0 = time.perf_counter()
    model_bytes = convert_model(source, recipe, calibration)
    timings["convert_s"] = time.perf_counter() - t0
    runtime = load_runtime()
    with quiet_output():  # the runtime announces its delegate on stderr
        model = Model(model_bytes, num_threads=opts.threads, runtime=runtime)
    remaining_float = float_ops(model)
    if recipe.mode.integer_only and remaining_float and not recipe.allow_float_fallback:
        raise QuantizationError(
            f"{source.origin}: ops stay float in --quant {recipe.mode.value}: {describe_float_ops(remaining_float)}; "
            "replace them, or pass --allow-float-fallback to keep them float"
        )

    t0 = time.perf_counter()
    float_bytes = model_bytes if recipe.mode is QuantMode.FLOAT32 else convert_model(
        source, QuantRecipe(QuantMode.FLOAT32), None
    )
    timings["convert_float_reference_s"] = time.perf_counter() - t0

    validation = None
    if opts.val:
        t0 = time.perf_counter()
        data = class_folder(opts.val, labels)
        with quiet_output():
            float_model = Model(float_bytes, num_threads=opts.threads, runtime=runtime)
        validation = compare_classifiers(float_model, model, spec, data)
        validation["source"] = str(opts.val)
        timings["validation_s"] = time.perf_counter() - t0

    manifest = build_manifest(source, labels, spec, model, recipe, calibration, remaining_float)
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
    write_bundle(opts.output, manifest, model_bytes, report)
    return ConvertResult(opts.output, manifest, report, timings)


def build_manifest(
    source: SourceModel,
    labels: list[str],
    spec: PreprocessSpec,
    model: Model,
    recipe: QuantRecipe,
    calibration: Any,
    remaining_float: list[Any],
) -> dict[str, Any]:
    input_spec = model_input_spec(model, spec).to_dict()
    input_spec["name"] = model.input.name
    outputs = [{"role": "logits", **model.outputs[0].to_dict()}]
    quantization = recipe.describe()
    quantization["float_ops"] = sorted({op.name for op in remaining_float})
    return {
        "name": source.name,
        "source": source.origin,
        "task": "classify",
        "labels": labels,
        "input": input_spec,
        "outputs": outputs,
        "head": {"type": "dense", "samples": 1, "classes": len(labels)},
        "quantization": quantization,
        "calibration": calibration.summary() if calibration is not None else {"count": 0, "source": None},
        "converter": {"tensorflow": _tf_version()},
    }


def _tf_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)
