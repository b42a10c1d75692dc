"""Stage: QAT. Quantisation-aware fine-tuning on Keras 3 with TensorFlow's own fake-quant ops (``--qat DIR``), then
the int8 conversion that reads the ranges training learned.

The float model is cloned layer for layer into a graph that computes what the int8 model will:

- each Conv2D and DepthwiseConv2D takes the batch norm after it into its weights, as TFLite folds it
  (``w * gamma / sqrt(var + eps)``, ``beta - mean * gamma / sqrt(var + eps)``; the batch norm's statistics are then
  frozen), and rounds those weights per output channel, symmetric, -127..127, as TFLite stores them;
- a Dense layer's weights are rounded per tensor (TFLite's converter cannot take per-channel fake-quant ranges on
  a fully connected layer: it has to transpose the kernel, and refuses);
- every tensor the int8 graph keeps (the input, each activation's output, each add, pooling and dense output; not
  a convolution's output that its ReLU or batch norm is fused into) is rounded per tensor to 8 bits, with a range
  taken first as the minimum and maximum over the calibration samples, then followed as a moving average while
  training (momentum 0.99). The input's range stays the calibration samples'.

Rounding passes gradients straight through (TensorFlow's FakeQuant ops), so training learns weights that survive
int8. ``TFLiteConverter`` then converts that graph with no representative dataset: every int8 scale comes from the
fake-quant ranges, so the converted model computes what training saw (tests/test_qat.py: the bundle's outputs
equal the fake-quant model's).

A Bayesian head (its K weight samples already exported into plain layers, either layout) is fine-tuned with its
samples frozen: only the backbone trains, on the negative log of the mean over the K samples' probabilities of the
true class, so the samples keep the spread the posterior gave them and the backbone learns features that survive
int8 under all of them.

Not done yet (refused with a message): a detector, ``--clusters``, the density (``--density off``),
``--max-drop``/``--keep-float``, bias correction, a model nested in another, and any layer this module does not
know. No maintained library does QAT for Keras 3 (tfmot needs tf_keras; tensorflow/model-optimization
#1119), hence this module.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from edgeq import records
from edgeq.errors import DataError, ModelError, QuantizationError
from edgeq.manifest import Head

from ..context import ConvertContext
from ..products import Calibration, SourceModel
from ..recipes import QuantMode, QuantRecipe, RepairRecipe
from ..tf import batch_norm_weights, consumers, import_tensorflow, quiet_output, relu_kind

MOMENTUM = 0.99
LEARNING_RATE = 1e-4
BATCH = 32
# layers that only move values: the int8 graph keeps their input's scale, so no rounding is added after them
PASS_THROUGH = ("Dropout", "Reshape", "Flatten", "ZeroPadding2D", "Identity", "InputLayer", "SpatialDropout2D")
# layers whose output is a new int8 tensor of its own scale
REQUANTISED = ("Add", "GlobalAveragePooling2D", "AveragePooling2D", "MaxPooling2D", "Concatenate", "Multiply")
ACTIVATIONS = ("ReLU", "Activation")


def _classes() -> dict[str, Any]:
    """The fake-quant layers, made once TensorFlow is imported (keeps it out of module import)."""
    # over 60 lines: five short Keras layer classes, which need TensorFlow and keras at definition time
    tf = import_tensorflow()
    import keras

    class ActivationQuant(keras.layers.Layer):
        """A tensor rounded to 8 bits per tensor; range: calibration min/max, then a moving average in training."""

        def __init__(self, fixed: bool = False, **kw: Any) -> None:
            super().__init__(**kw)
            self.fixed = fixed
            self.mode = "calibrate"

        def build(self, shape: Any) -> None:
            self.lo = self.add_weight(shape=(), initializer=keras.initializers.Constant(1e9), trainable=False,
                                      name="range_min")
            self.hi = self.add_weight(shape=(), initializer=keras.initializers.Constant(-1e9), trainable=False,
                                      name="range_max")

        def call(self, x: Any, training: bool = False) -> Any:
            if self.mode == "calibrate":  # eager, before training: the true extremes of the samples
                self.lo.assign(tf.minimum(self.lo, tf.reduce_min(x)))
                self.hi.assign(tf.maximum(self.hi, tf.reduce_max(x)))
                return x
            if training and not self.fixed:
                self.lo.assign(MOMENTUM * self.lo + (1 - MOMENTUM) * tf.reduce_min(x))
                self.hi.assign(MOMENTUM * self.hi + (1 - MOMENTUM) * tf.reduce_max(x))
            return tf.quantization.fake_quant_with_min_max_vars(x, tf.minimum(self.lo, 0.0), tf.maximum(self.hi, 0.0),
                                                                num_bits=8)

    class QuantConv(keras.layers.Layer):
        """A Conv2D or DepthwiseConv2D with the batch norm after it folded in, weights rounded per output channel,
        then its own activation and, unless a ReLU or batch-norm-free consumer fuses it, the output rounded."""

        def __init__(self, conv: Any, bn: Any | None, quantise_output: bool, **kw: Any) -> None:
            super().__init__(name=conv.name, **kw)
            self.depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
            self.strides = (1, *conv.strides, 1)
            self.dilations = tuple(conv.dilation_rate)
            self.padding = conv.padding.upper()
            self.activation = conv.activation
            kernel = conv.get_weights()[0]
            n = kernel.shape[2] if self.depthwise else kernel.shape[3]
            bias = conv.get_weights()[1] if conv.use_bias else np.zeros(n, np.float32)
            if bn is not None:
                w = batch_norm_weights(bn)
                scale = w.get("gamma", np.ones(n, np.float32)) / np.sqrt(w["moving_variance"] + bn.epsilon)
                shift = w.get("beta", np.zeros(n, np.float32)) + (bias - w["moving_mean"]) * scale
            else:
                scale, shift = np.ones(n, np.float32), bias
            const = keras.initializers.Constant
            self.kernel = self.add_weight(shape=kernel.shape, initializer=const(kernel), name="kernel")
            self.scale = self.add_weight(shape=(n,), initializer=const(scale.astype(np.float32)), name="bn_scale")
            self.bias = self.add_weight(shape=(n,), initializer=const(shift.astype(np.float32)), name="bias")
            self.out = ActivationQuant(name=f"{conv.name}_out_quant") if quantise_output else None

        def folded(self) -> tuple[Any, Any]:
            if self.depthwise:
                return self.kernel * self.scale[None, None, :, None], self.bias
            return self.kernel * self.scale, self.bias

        def call(self, x: Any, training: bool = False, **kwargs: Any) -> Any:
            w, b = self.folded()
            if self.depthwise:  # per channel on the last axis: the depthwise kernel's channel axis moved there
                t = tf.transpose(w, [0, 1, 3, 2])
                m = tf.reduce_max(tf.abs(t), axis=[0, 1, 2])
                w = tf.transpose(tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    t, -m, m, num_bits=8, narrow_range=True), [0, 1, 3, 2])
                y = tf.nn.depthwise_conv2d(x, w, self.strides, self.padding, dilations=self.dilations)
            else:
                m = tf.reduce_max(tf.abs(w), axis=[0, 1, 2])
                w = tf.quantization.fake_quant_with_min_max_vars_per_channel(w, -m, m, num_bits=8, narrow_range=True)
                y = tf.nn.conv2d(x, w, self.strides, self.padding, dilations=self.dilations)
            y = self.activation(y + b)
            return self.out(y, training=training) if self.out is not None else y

    class QuantDense(keras.layers.Layer):
        """A Dense layer with its weights rounded per tensor, its activation, its output rounded."""

        def __init__(self, dense: Any, **kw: Any) -> None:
            super().__init__(name=dense.name, **kw)
            const = keras.initializers.Constant
            weights = dense.get_weights()
            self.kernel = self.add_weight(shape=weights[0].shape, initializer=const(weights[0]), name="kernel")
            self.bias = (self.add_weight(shape=weights[1].shape, initializer=const(weights[1]), name="bias")
                         if dense.use_bias else None)
            self.activation = dense.activation
            self.out = ActivationQuant(name=f"{dense.name}_out_quant")

        def call(self, x: Any, training: bool = False, **kwargs: Any) -> Any:
            m = tf.reduce_max(tf.abs(self.kernel))
            w = tf.quantization.fake_quant_with_min_max_vars(self.kernel, -m, m, num_bits=8, narrow_range=True)
            y = tf.matmul(x, w)
            if self.bias is not None:
                y = y + self.bias
            return self.out(self.activation(y), training=training)

    class Requantised(keras.layers.Layer):
        """A layer as it was, its output rounded (an activation, an add, a pooling)."""

        def __init__(self, layer: Any, **kw: Any) -> None:
            super().__init__(name=layer.name, **kw)
            self.inner = layer.__class__.from_config({**layer.get_config(), "name": f"{layer.name}_inner"})
            self.out = ActivationQuant(name=f"{layer.name}_out_quant")

        def call(self, x: Any, training: bool = False, **kwargs: Any) -> Any:  # kwargs: the mask Keras passes an Add
            return self.out(self.inner(x), training=training)

    class Folded(keras.layers.Layer):
        """A batch norm folded into the convolution before it: passes its input on."""

        def call(self, x: Any, training: bool = False, **kwargs: Any) -> Any:  # kwargs: the mask a batch norm takes
            return x

    return {"ActivationQuant": ActivationQuant, "QuantConv": QuantConv, "QuantDense": QuantDense,
            "Requantised": Requantised, "Folded": Folded}


def _fused_into_next(layer: Any) -> bool:
    """Whether the int8 graph has no tensor of its own for ``layer``'s output: its only consumer is a batch norm
    (folded into it) or a ReLU or ReLU6 (which TFLite fuses into the op before)."""
    out = consumers(layer)
    return len(out) == 1 and (type(out[0]).__name__ == "BatchNormalization" or relu_kind(out[0]) is not None)


def _own_activation(layer: Any) -> None:
    """A convolution's or Dense layer's own activation must be one the int8 op fuses (or none): any other would
    need a range for the tensor before it, which the fused layer cannot give."""
    name = getattr(layer.activation, "__name__", "")
    if name not in ("linear", "relu", "relu6"):
        raise ModelError(f"--qat: layer {layer.name} ({type(layer).__name__}) has activation {name!r}; QAT knows "
                         "relu, relu6 or none there (a separate activation layer is fine)")


def build(model: Any, samples: np.ndarray) -> Any:
    """The fake-quant clone of ``model`` (a flat functional Keras model), its ranges calibrated on ``samples``."""
    import keras

    q = _classes()
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ModelError(f"--qat: {layer.name} is a model nested in the model; QAT takes a flat Keras model "
                             "(as edgeq train writes) for now")
    folded: set[str] = set()

    def clone(layer: Any) -> Any:
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D"):
            _own_activation(layer)
            nxt = consumers(layer)
            bn = nxt[0] if len(nxt) == 1 and type(nxt[0]).__name__ == "BatchNormalization" else None
            if bn is not None:
                folded.add(bn.name)
            return q["QuantConv"](layer, bn, bn is None and not _fused_into_next(layer))
        if kind == "BatchNormalization":
            if layer.name not in folded:
                raise ModelError(f"--qat: batch norm {layer.name} does not follow a convolution; QAT cannot fold it")
            if _fused_into_next(layer):
                return q["Folded"](name=layer.name)
            return q["Requantised"](q["Folded"](name=layer.name))  # the folded conv's output is a tensor of its own
        if kind == "Dense":
            _own_activation(layer)
            return q["QuantDense"](layer)
        if kind in ACTIVATIONS or kind in REQUANTISED:
            return q["Requantised"](layer)
        if kind in PASS_THROUGH:
            return layer.__class__.from_config(layer.get_config())
        raise ModelError(f"--qat: layer {layer.name} ({kind}) is not one QAT knows yet; convert without --qat")

    inner = keras.models.clone_model(model, clone_function=clone)
    if len(model.inputs) != 1:
        raise ModelError(f"--qat: the model has {len(model.inputs)} inputs; QAT takes one image input")
    inp = keras.Input(model.inputs[0].shape[1:], name="qat_input")
    quantised_input = q["ActivationQuant"](fixed=True, name="input_quant")(inp)
    # the clone takes its input in the structure the model was built with (a list of one, as edgeq train's)
    qat = keras.Model(inp, inner([quantised_input] if isinstance(model.input, list) else quantised_input),
                      name=f"{model.name}_qat")
    for start in range(0, len(samples), BATCH):  # the ranges: calibration min/max, eagerly
        qat(samples[start:start + BATCH], training=False)
    for layer in _fake_quants(qat):
        layer.mode = "train"
    return qat


def _fake_quants(model: Any) -> list[Any]:
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer).__name__ == "ActivationQuant":
            out.append(layer)
    return out


def check(recipe: RepairRecipe, quant: QuantRecipe, source: SourceModel, clustered: bool, density: bool,
          detector: bool) -> None:
    """Everything --qat does not do yet, refused before any work."""
    from pathlib import Path

    if not Path(recipe.qat).is_dir():
        raise DataError(f"--qat {recipe.qat}: not a folder; give a class folder (one subfolder of images per class)")
    if quant.mode not in (QuantMode.INT8, QuantMode.UINT8):
        raise QuantizationError(f"--qat trains for --quant int8 or uint8, not {quant.mode.value}")
    for flag, given in (("--clusters", clustered), ("a detector", detector),
                        ("the density (give --density off)", density), ("--max-drop or --keep-float", recipe.mixed),
                        ("--bias-correction on", recipe.bias_correction == "on")):
        if given:
            raise QuantizationError(f"--qat: {flag} is not supported with QAT yet; convert without --qat")
    if source.keras_model is None:
        raise ModelError(f"--qat: {source.origin} is a SavedModel; QAT needs a Keras model (.keras)")


def convert(qat: Any, quant: QuantRecipe) -> bytes:
    """The fake-quant model converted with no representative dataset: every scale from its learned ranges."""
    tf = import_tensorflow()
    with quiet_output():
        converter = tf.lite.TFLiteConverter.from_keras_model(qat)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        io_type = tf.int8 if quant.mode is QuantMode.INT8 else tf.uint8
        converter.inference_input_type = converter.inference_output_type = io_type
        return bytes(converter.convert())


# the layers bayes.export_model writes a Bayesian head's K samples into (converter/models/bayes.py)
BAYES_HEAD_LAYERS = ("sample_logits", "mean_logits", "sample_residuals")


def _trainer(qat: Any, head: Head) -> tuple[Any, Any]:
    """The model ``fit`` trains and its loss: ``qat`` itself on the logits for a dense head; for a Bayesian head,
    ``qat`` under a wrapper that turns its outputs into the mean of the K samples' probabilities, its sample
    layers frozen."""
    import keras

    if head.samples < 2:
        return qat, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    inner = next(x for x in qat.layers if isinstance(x, keras.Model))
    for name in BAYES_HEAD_LAYERS:
        if name in {x.name for x in inner.layers}:
            inner.get_layer(name).trainable = False
    k, c = head.samples, head.classes
    outputs = qat.outputs
    if head.layout == "stacked":
        logits = keras.ops.reshape(outputs[0], (-1, k, c))
    else:  # centred: the posterior mean's logits plus each sample's residual
        logits = keras.ops.expand_dims(outputs[0], 1) + keras.ops.reshape(outputs[1], (-1, k, c))
    mean_probability = keras.ops.mean(keras.ops.softmax(logits, axis=-1), axis=1)
    return (keras.Model(qat.inputs, mean_probability, name=f"{qat.name}_mean_of_{k}"),
            keras.losses.SparseCategoricalCrossentropy(from_logits=False))


def run(recipe: RepairRecipe, quant: QuantRecipe, ctx: ConvertContext, source: SourceModel, head: Head,
        calibration: Calibration, log: Callable[[str], None]) -> tuple[bytes, records.Qat]:
    """Fine-tune ``source``'s fake-quant clone on ``--qat DIR`` for ``--qat-epochs``, then convert it with the
    ranges it learned. ``head``: the exported head (a Bayesian head's samples stay frozen). Returns the TFLite
    bytes and the manifest's record."""
    from ..training.classifier import load_folder_arrays

    import_tensorflow()
    import keras

    x, y, _ = load_folder_arrays(recipe.qat, ctx.spec, list(ctx.labels), flag="--qat")
    if len(x) < BATCH:
        raise DataError(f"--qat {recipe.qat}: {len(x)} images; give at least {BATCH}")
    samples = np.asarray(calibration.samples, dtype=np.float32)
    qat = build(source.keras_model, samples)
    keras.utils.set_random_seed(0)
    trainer, loss = _trainer(qat, head)
    if trainer is not qat:
        log(f"qat: the Bayesian head's {head.samples} weight samples stay as exported; the backbone trains on "
            f"the mean of their probabilities")
    trainer.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=loss, metrics=["accuracy"])
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            history.append({"loss": round(float(logs.get("loss", np.nan)), 5),
                            "accuracy": round(float(logs.get("accuracy", np.nan)), 5)})
            log(f"qat: epoch {epoch + 1}/{recipe.qat_epochs}, loss {history[-1]['loss']:.4f}, train accuracy "
                f"{history[-1]['accuracy']:.4f}, {time.perf_counter() - t0:.0f} s")

    trainer.fit(x, y, epochs=recipe.qat_epochs, batch_size=BATCH, shuffle=True, verbose=0, callbacks=[Progress()])
    seconds = time.perf_counter() - t0
    data = convert(qat, quant)
    record = records.Qat(data=recipe.qat, images=int(len(x)), epochs=recipe.qat_epochs, learning_rate=LEARNING_RATE,
                         seconds=round(seconds, 1), history=tuple(records.QatEpoch(**h) for h in history),
                         fake_quant_tensors=len(_fake_quants(qat)))
    log(f"qat: {len(x)} images, {recipe.qat_epochs} epoch(s) in {seconds:.0f} s; converted with the ranges "
        f"training learned ({record.fake_quant_tensors} tensors)")
    return data, record
