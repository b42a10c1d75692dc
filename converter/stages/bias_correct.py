"""Stage: bias-correct. Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"; OpenVINO's FastBiasCorrection), applied to the Keras model before conversion.

Rounding a layer's weights to int8 shifts the mean of its output: ``E[y_q - y] = E[conv(x, W_q - W)]``, where
``W_q`` is what the converter will store. For each Conv2D, DepthwiseConv2D and Dense kernel this module simulates
that rounding exactly as TFLite does it (symmetric, per output channel, ``s = max|w| / 127``, ``q = round(w / s)``;
a following batch norm, which the converter folds into the kernel, scales each output channel and so leaves the
rounding pattern unchanged), runs the float model on calibration images to get each layer's input ``x``, and
measures the per-channel shift ``delta``. Then it removes it:

- a layer with a bias: ``b -= delta``;
- a layer without one that feeds a BatchNormalization directly (MobileNetV2's convolutions): ``moving_mean +=
  delta``, which the converter folds into the same bias, since BN computes ``gamma * (y - mean) / sd + beta``.

Only weight rounding is corrected; activation quantisation errors are not (see accuracy-aware mode for those).
``on`` keeps the correction; ``auto`` keeps it when ``--val`` shows that top-1 does not go down (without ``--val``
auto does nothing: there is nothing to decide on).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgeq.records import BiasCorrection

from ..binding import Binding
from ..products import Calibration, Converted, Repairs, SourceModel
from ..recipes import QuantMode, QuantRecipe, RepairRecipe
from .validate import Scoring


def quantize_weights(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """What TFLite stores for a kernel, dequantised: symmetric int8 per output channel (-127..127)."""
    k = np.asarray(kernel, dtype=np.float64)
    axes = tuple(range(k.ndim - 2)) if depthwise else tuple(range(k.ndim - 1))
    amax = np.max(np.abs(k), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(k / scale), -127, 127) * scale


def _targets(model: Any) -> list[tuple[Any, Any]]:
    """(layer, batch norm it feeds or None) for every kernel layer of the model's own graph."""
    import keras

    consumers: dict[int, list[Any]] = {}
    for layer in model.layers:
        try:
            inputs = layer.input
        except (AttributeError, ValueError):
            continue
        for t in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            consumers.setdefault(id(t), []).append(layer)
    out = []
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            continue
        nxt = consumers.get(id(layer.output), [])
        bn = nxt[0] if len(nxt) == 1 and isinstance(nxt[0], keras.layers.BatchNormalization) else None
        out.append((layer, bn))
    return out


def _shift(layer: Any, x: Any, dw: np.ndarray) -> np.ndarray:
    """Per-output-channel sum over batch and positions of ``op(x, dW)``, and the number of positions."""
    import keras
    from keras import ops

    dw = ops.convert_to_tensor(dw.astype(np.float32))
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        y = ops.depthwise_conv(x, dw, strides=layer.strides, padding=layer.padding, data_format=layer.data_format,
                               dilation_rate=layer.dilation_rate)
    elif isinstance(layer, keras.layers.Conv2D):
        y = ops.conv(x, dw, strides=layer.strides, padding=layer.padding, data_format=layer.data_format,
                     dilation_rate=layer.dilation_rate)
    else:
        y = ops.matmul(x, dw)
    y = np.asarray(y, dtype=np.float64)
    channels_last = getattr(layer, "data_format", "channels_last") != "channels_first"
    flat = y.reshape(-1, y.shape[-1]) if channels_last else np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return flat.sum(axis=0), flat.shape[0]


def bias_correction(model: Any, samples: np.ndarray, batch_size: int = 16,
                    log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Correct the model in place; return one entry per kernel layer: the correction, or why it was skipped.

    samples: preprocessed float calibration images ``[N, H, W, C]``."""
    import keras

    targets = _targets(model)  # layers of nested sub-models are not reached (edgeq's models are flat)
    usable = []
    report = []
    for layer, bn in targets:
        entry = {"layer": layer.name, "type": layer.__class__.__name__}
        if not layer.use_bias and bn is None:
            report.append({**entry, "skipped": "no bias and no batch norm after it"})
            continue
        usable.append((layer, bn, entry))
    if not usable:
        return report
    probe = keras.Model(model.inputs, [layer.input for layer, _, _ in usable])
    deltas = [None] * len(usable)
    dws = []
    for layer, _, _ in usable:
        w = layer.get_weights()[0]
        dws.append(quantize_weights(w, isinstance(layer, keras.layers.DepthwiseConv2D)) - w)
    counts = [0] * len(usable)
    for start in range(0, len(samples), batch_size):
        xs = probe([samples[start:start + batch_size]], training=False)
        xs = xs if isinstance(xs, (list, tuple)) else [xs]
        for i, ((layer, _, _), x) in enumerate(zip(usable, xs)):
            s, n = _shift(layer, x, dws[i])
            deltas[i] = s if deltas[i] is None else deltas[i] + s
            counts[i] += n
    for i, (layer, bn, entry) in enumerate(usable):
        delta = deltas[i] / counts[i]
        if layer.use_bias:
            weights = layer.get_weights()
            weights[1] = (weights[1] - delta).astype(weights[1].dtype)
            layer.set_weights(weights)
            where = "bias"
        else:
            bn.moving_mean.assign((np.asarray(bn.moving_mean) + delta).astype(np.float32))
            where = f"{bn.name}.moving_mean"
        report.append({**entry, "corrected": where, "mean_abs_shift": float(np.mean(np.abs(delta))),
                       "max_abs_shift": float(np.max(np.abs(delta)))})
    log(f"bias correction: {len(usable)} of {len(targets)} kernel layers corrected")
    return report


def run(recipe: RepairRecipe, quant: QuantRecipe, binding: Binding, source: SourceModel,
        calibration: Calibration | None, quantised: Converted, scoring: Scoring) -> Repairs:
    """Convert again from corrected weights and keep whichever the rule prefers. The source model is left
    corrected only when the correction is kept (mixed precision re-quantises from it)."""
    mode, ctx = recipe.bias_correction, binding.ctx
    if quant.mode not in (QuantMode.INT8, QuantMode.UINT8) or calibration is None:
        return Repairs(source, quantised)
    if binding.task.name == "detect":  # not yet: --bias-correction on is refused for detectors
        return Repairs(source, quantised, BiasCorrection(mode=mode, applied=False,
                                                         reason="not applied to detectors yet"))
    if mode == "off" or source.keras_model is None:
        return Repairs(source, quantised, BiasCorrection(mode=mode, applied=False))
    if mode == "auto" and scoring.data is None:
        return Repairs(source, quantised, BiasCorrection(mode=mode, applied=False,
                                                         reason="auto decides on --val; none given"))
    from ..tflite import convert_model

    with ctx.timed("bias_correction_s"):
        snapshot = source.keras_model.get_weights()
        layers = bias_correction(source.keras_model, calibration.samples, log=ctx.log)
        corrected = convert_model(source, quant, calibration)
        shifts = [r["mean_abs_shift"] for r in layers if "corrected" in r]
        info: dict[str, Any] = {"mode": mode, "corrected_layers": len(shifts), "kernel_layers": len(layers),
                                "mean_abs_shift": round(float(np.mean(shifts)), 6) if shifts else None}
        applied = True
        if scoring.data is not None:
            info["top1_without"] = round(scoring.top1(quantised.data), 5)
            info["top1_with"] = round(scoring.top1(corrected), 5)
            applied = mode == "on" or info["top1_with"] >= info["top1_without"]
            ctx.log(f"bias correction: top-1 on --val {info['top1_without']:.4f} without, {info['top1_with']:.4f} "
                    "with: " + ("kept" if applied else "not kept (auto)"))
        if applied:
            quantised = binding.load(corrected)
        else:
            source.keras_model.set_weights(snapshot)
    return Repairs(source, quantised, BiasCorrection(**info, applied=applied),
                   report={"bias_correction": {"layers": layers}})
