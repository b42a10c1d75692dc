"""The TFLite converter in each ``--quant`` mode (full-integer PTQ by default), reading converted graphs back for
float ops, and TFLite's QuantizationDebugger: what the quantise, mixed-precision and verify stages and the float
reference build on.

The converter does **not** fail when an op has no int8 kernel, even with ``TFLITE_BUILTINS_INT8`` only: it
silently wraps it in DEQUANTIZE/QUANTIZE. So the converted graph is read back and any float op is refused
(naming op and layer) unless ``--allow-float-fallback``.
"""

from __future__ import annotations

import tempfile
from typing import Any

from edgeq.errors import QuantizationError
from edgeq.runtime import Model, OpInfo

from .products import Calibration, SourceModel
from .recipes import QuantMode, QuantRecipe
from .tf import import_tensorflow, quiet_output


def configure(converter: Any, recipe: QuantRecipe, calibration: Calibration | None) -> None:
    import tensorflow as tf

    mode = recipe.mode
    if mode is QuantMode.FLOAT32:
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode is QuantMode.FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
        return
    if mode is QuantMode.DYNAMIC:
        return
    if calibration is None:
        raise QuantizationError(f"--quant {mode.value} needs calibration data: give --calib")
    converter.representative_dataset = calibration.representative_dataset
    if mode is QuantMode.INT16X8:
        ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        io_type = tf.int16
    else:
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = tf.int8 if mode is QuantMode.INT8 else tf.uint8
    if recipe.allow_float_fallback:
        ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
    converter.target_spec.supported_ops = ops
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type


def convert_model(
    source: SourceModel,
    recipe: QuantRecipe,
    calibration: Calibration | None,
    routes: tuple[str, ...] = ("keras", "export"),
) -> bytes:
    """Run the TFLite converter. Keras 3 models go through ``from_keras_model``; where that fails, through
    ``model.export()`` to a SavedModel and ``from_saved_model`` (``routes`` picks which to try, in order)."""
    tf = import_tensorflow()

    errors: list[str] = []
    attempts: list[str] = ["saved_model"] if source.keras_model is None else list(routes)
    for attempt in attempts:
        with tempfile.TemporaryDirectory(prefix="edgeq-export-") as tmp:
            try:
                with quiet_output():
                    if attempt == "keras":
                        converter = tf.lite.TFLiteConverter.from_keras_model(source.keras_model)
                    elif attempt == "export":
                        source.keras_model.export(tmp, format="tf_saved_model")
                        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
                    else:
                        converter = tf.lite.TFLiteConverter.from_saved_model(str(source.saved_model_dir))
                    configure(converter, recipe, calibration)
                    return bytes(converter.convert())
            except QuantizationError:
                raise
            except Exception as exc:
                errors.append(f"{attempt}: {_converter_message(exc)}")
    raise QuantizationError(f"{source.origin}: the TFLite converter failed ({'; '.join(errors)})")


def _converter_message(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln.lower():
            return ln[ln.lower().index("error:") + 6 :].strip()[:300]
    return (lines[0][:300] if lines else exc.__class__.__name__)


def float_ops(model: Model) -> list[OpInfo]:
    """Ops of a converted model that compute in float (what an integer-only accelerator path cannot take)."""
    return [op for op in model.ops if op.is_float]


def describe_float_ops(ops: list[OpInfo]) -> str:
    """``SIN (model/lambda/Sin)`` style list; QUANTIZE/DEQUANTIZE glue is counted, not listed."""
    glue = [op for op in ops if op.name in ("QUANTIZE", "DEQUANTIZE")]
    compute = [op for op in ops if op not in glue]
    parts = [f"{op.name} ({op.output_names[0] if op.output_names and op.output_names[0] else f'op {op.index}'})"
             for op in compute]
    if glue:
        parts.append(f"{len(glue)} QUANTIZE/DEQUANTIZE around them")
    return ", ".join(parts)


def layer_statistics(debugger: Any) -> list[dict[str, str]]:
    """Run a TFLite QuantizationDebugger and return its per-layer statistics, one dict per quantised op (keys
    ``op_name``, ``tensor_name``, ``scale``, ``mean_squared_error``, ...), in graph order."""
    import csv
    import io

    with quiet_output():
        debugger.run()
        buf = io.StringIO()
        debugger.layer_statistics_dump(buf)
    return list(csv.DictReader(io.StringIO(buf.getvalue())))


def layer_errors(source: SourceModel, calibration: Calibration, samples: int = 16) -> list[dict[str, Any]]:
    """Per-layer quantisation error from TFLite's QuantizationDebugger: each quantised op's output compared with
    its float counterpart on ``samples`` calibration images (the float op fed the same dequantised input).

    ``rmse_over_scale`` (root-mean-square error divided by the output's quantisation step) makes layers with
    different ranges comparable: about 0.29 (the RMS of uniform rounding) is as good as int8 gets; much larger
    means the layer's range or outliers hurt it. Sorted worst first. Keras models only."""
    tf = import_tensorflow()
    if source.keras_model is None:
        raise QuantizationError(f"{source.origin}: --layer-errors needs a Keras model")
    data = calibration.samples[:samples]
    with quiet_output():
        converter = tf.lite.TFLiteConverter.from_keras_model(source.keras_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration.representative_dataset
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([x[None, ...]] for x in data)
        )
    rows = []
    for row in layer_statistics(debugger):
        scale = float(row["scale"])
        mse = float(row["mean_squared_error"])
        name = row["tensor_name"].split(";")[0]
        rows.append({
            "op": row["op_name"], "layer": name, "mean_error": float(row["mean_error"]),
            "max_abs_error": float(row["max_abs_error"]), "rmse": mse ** 0.5, "scale": scale,
            "rmse_over_scale": (mse ** 0.5) / scale if scale else None,
        })
    rows.sort(key=lambda r: -(r["rmse_over_scale"] or 0.0))
    return rows
