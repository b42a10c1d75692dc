"""edgeq's detector: an anchor-free MobileNetV2 with a Bayesian class head (trained by converter/training/detector.py).

Architecture (FCOS/CenterNet-style, one stride; docs/detection.md has the reasons):

- MobileNetV2 cut at ``block_13_expand_relu``: stride 16, so a 192x192 input gives a 12x12 grid;
- a light neck: 3x3 depthwise + 1x1 conv (``neck`` channels), batch norm, ReLU6;
- 1x1 heads on every cell: ``objectness`` (1 logit), ``boxes`` (4 distances left, top, right, bottom from the
  cell centre to the box sides, in cells; ReLU) and, after a 1x1 conv to 32 ``class_features`` (ReLU6), the
  ``class_logits`` (C logits). The narrow class features keep the K-sample class conv cheap: K * C * 32
  multiply-accumulates per cell.

Every op is a CONV_2D, DEPTHWISE_CONV_2D, ADD or ReLU, so the model converts to full int8 with no custom op
and no float post-processing; decoding and NMS run on the device (edgeq/detection.py).

Targets: a known object's positive cells are those whose centre lies inside its box and within
``CENTER_RADIUS`` cells of its centre (FCOS centre sampling; the centre's own cell always counts); a cell claimed by
two boxes goes to the smaller. Losses: sigmoid focal loss on objectness (normalised by the number of positives),
1 - GIoU on the box distances and cross-entropy on the class logits, both on positive cells only. Boxes of
categories marked ``"supercategory": "unknown"`` are never trained on: their cells are ignored by every loss.
Boxes marked ``"outlier"`` (and images pasted from ``edgeq train --outliers``) are objects of no known class:
objectness and box as any object, and on their cells the class logits learn a uniform distribution (outlier
exposure), so that an object of a new kind is detected and its classes disagree.

``export_detector`` fuses the Bayesian class head's K weight samples into plain 1x1 convs for conversion.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgeq.errors import ModelError

from ..tf import count_macs
from .bayes import MAX_SAMPLES, bayes_dense_class

STRIDE = 16
FEATURE_LAYER = "block_13_expand_relu"
CENTER_RADIUS = 1.0
HEAD_NAMES = ("objectness", "boxes", "class_logits")
# the class target of an outlier's cells: an object (objectness 1, its box learned) of no known class, whose class
# distribution should be uniform (outlier exposure); its weight against the known objects' cross-entropy
OUTLIER_TARGET = -2
OUTLIER_WEIGHT = 0.5
BAYES_CLASS_HEAD = "bayes_class_logits"


def build_detector(input_size: int = 192, alpha: float = 0.35, classes: int = 8, seed: int = 0,
                   neck: int = 96, class_features: int = 32) -> Any:
    """The detector with a deterministic class head; outputs ``[objectness, boxes, class_logits]``."""
    import keras

    keras.utils.set_random_seed(seed)
    if input_size % STRIDE or input_size < 4 * STRIDE:
        raise ModelError(f"--input-size {input_size}: give a multiple of {STRIDE}, at least {4 * STRIDE}")
    base = keras.applications.MobileNetV2(input_shape=(input_size, input_size, 3), alpha=alpha, include_top=False,
                                          weights=None)
    x = base.get_layer(FEATURE_LAYER).output
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="neck_dw")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="neck_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name="neck_dw_relu")(x)
    x = keras.layers.Conv2D(neck, 1, use_bias=False, name="neck_pw")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="neck_pw_bn")(x)
    features = keras.layers.ReLU(6.0, name="neck")(x)
    prior = float(np.log(0.01 / 0.99))  # objectness starts at p = 0.01 (focal loss's usual prior)
    obj = keras.layers.Conv2D(1, 1, name="objectness", bias_initializer=keras.initializers.Constant(prior))(features)
    box = keras.layers.Conv2D(4, 1, activation="relu", name="boxes",
                              bias_initializer=keras.initializers.Constant(1.0))(features)
    # the class branch narrows to class_features channels first: the K-sample class conv reads these, so its cost
    # is K * C * class_features per cell instead of K * C * neck
    narrow = keras.layers.Conv2D(class_features, 1, name="class_features_conv")(features)
    narrow = keras.layers.ReLU(6.0, name="class_features")(narrow)
    cls = keras.layers.Conv2D(classes, 1, name="class_logits")(narrow)
    return keras.Model(base.input, [obj, box, cls], name=f"detector_mobilenet_v2_{alpha:g}_{input_size}")


def is_detector(model: Any) -> bool:
    """A model ``edgeq train --task detect`` made: three outputs, the first two named objectness and boxes."""
    if model is None or len(model.outputs) != 3:
        return False
    names = list(getattr(model, "output_names", None) or [])
    return names[:2] == ["objectness", "boxes"]


def class_head(model: Any) -> Any:
    """The layer producing the class logits (a Conv2D, or a BayesDense applied per cell)."""
    return model.get_layer(model.output_names[2])


# -- targets -----------------------------------------------------------------------------------------------------


def encode_targets(boxes: np.ndarray, classes: np.ndarray, grid: int, ignore: np.ndarray | None = None,
                   stride: int = STRIDE, outliers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid targets for one image. boxes ``[N, 4]`` (x0, y0, x1, y1) in input pixels, classes ``[N]`` (0..C-1);
    ignore ``[M, 4]`` boxes whose cells every loss skips; outliers ``[O, 4]`` objects of no known class, trained as
    objects whose class distribution should be uniform (class target ``OUTLIER_TARGET``). Returns objectness
    ``[G, G, 1]`` (1, 0, or -1 = ignore), boxes ``[G, G, 5]`` (distances l, t, r, b in cells and a positive mask)
    and classes ``[G, G, 1]`` (-1: none)."""
    obj = np.zeros((grid, grid, 1), np.float32)
    box = np.zeros((grid, grid, 5), np.float32)
    cls = np.full((grid, grid, 1), -1, np.int32)
    centres = (np.arange(grid, dtype=np.float32) + 0.5) * stride
    cx, cy = np.meshgrid(centres, centres)  # [G, G], x along columns
    owner_area = np.full((grid, grid), np.inf, np.float32)
    if ignore is not None:
        for x0, y0, x1, y1 in np.asarray(ignore, np.float32).reshape(-1, 4):
            inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
            obj[inside, 0] = -1
    objects = [(b, int(c)) for b, c in zip(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes).reshape(-1))]
    if outliers is not None:
        objects += [(b, OUTLIER_TARGET) for b in np.asarray(outliers, np.float32).reshape(-1, 4)]
    for (x0, y0, x1, y1), c in objects:
        bx, by = (x0 + x1) / 2, (y0 + y1) / 2
        r = CENTER_RADIUS * stride
        region = ((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
                  & (np.abs(cx - bx) <= r) & (np.abs(cy - by) <= r))
        gi, gj = min(int(by // stride), grid - 1), min(int(bx // stride), grid - 1)
        region[gi, gj] = True
        area = (x1 - x0) * (y1 - y0)
        take = region & (area < owner_area)
        owner_area[take] = area
        obj[take, 0] = 1.0
        box[take, 0] = (cx[take] - x0) / stride
        box[take, 1] = (cy[take] - y0) / stride
        box[take, 2] = (x1 - cx[take]) / stride
        box[take, 3] = (y1 - cy[take]) / stride
        box[take, 4] = 1.0
        cls[take, 0] = c
    return obj, box, cls


def losses(outlier_weight: float = OUTLIER_WEIGHT) -> dict[str, Callable[[Any, Any], Any]]:
    from keras import ops

    def objectness_loss(y_true: Any, logits: Any) -> Any:
        valid = ops.cast(y_true >= 0, "float32")
        t = ops.clip(y_true, 0.0, 1.0)
        p = ops.sigmoid(logits)
        ce = ops.maximum(logits, 0.0) - logits * t + ops.log1p(ops.exp(-ops.abs(logits)))
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = 0.25 * t + 0.75 * (1 - t)
        loss = alpha_t * ops.square(1 - p_t) * ce * valid
        return ops.sum(loss) / ops.maximum(ops.sum(t * valid), 1.0)

    def box_loss(y_true: Any, pred: Any) -> Any:
        mask = y_true[..., 4]
        t = y_true[..., :4]
        area_t = (t[..., 0] + t[..., 2]) * (t[..., 1] + t[..., 3])
        area_p = (pred[..., 0] + pred[..., 2]) * (pred[..., 1] + pred[..., 3])
        iw = ops.minimum(t[..., 0], pred[..., 0]) + ops.minimum(t[..., 2], pred[..., 2])
        ih = ops.minimum(t[..., 1], pred[..., 1]) + ops.minimum(t[..., 3], pred[..., 3])
        inter = iw * ih
        union = area_t + area_p - inter + 1e-6
        cw = ops.maximum(t[..., 0], pred[..., 0]) + ops.maximum(t[..., 2], pred[..., 2])
        ch = ops.maximum(t[..., 1], pred[..., 1]) + ops.maximum(t[..., 3], pred[..., 3])
        enclose = cw * ch + 1e-6
        giou = inter / union - (enclose - union) / enclose
        return ops.sum((1 - giou) * mask) / ops.maximum(ops.sum(mask), 1.0)

    def class_loss(y_true: Any, logits: Any) -> Any:
        y = ops.cast(y_true[..., 0], "int32")
        mask = ops.cast(y >= 0, "float32")
        logp = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
        onehot = ops.one_hot(ops.maximum(y, 0), ops.shape(logits)[-1])
        ce = -ops.sum(onehot * logp, axis=-1)
        # outlier exposure (Hendrycks et al. 2019): on an outlier's cells, cross-entropy to the uniform distribution
        outlier = ops.cast(y == OUTLIER_TARGET, "float32")
        uniform = -ops.mean(logp, axis=-1)
        loss = ops.sum(ce * mask) + outlier_weight * ops.sum(uniform * outlier)
        return loss / ops.maximum(ops.sum(mask) + ops.sum(outlier), 1.0)

    return {"objectness": objectness_loss, "boxes": box_loss, "class_logits": class_loss}


def export_detector(model: Any, samples: int | None, seed: int = 0, mean_only: bool = False,
                    layout: str = "stacked") -> tuple[Any, dict[str, Any]]:
    """The exportable detector (Conv2D class head) and the manifest's ``head``; ``samples`` None: 32 for a
    Bayesian class head. ``mean_only``: a deterministic head from the posterior means (the benchmark's baseline)."""
    import keras

    head = class_head(model)
    obj, box = model.outputs[0], model.outputs[1]
    features = head.input
    f = int(features.shape[-1])
    if not isinstance(head, bayes_dense_class()):
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
    if k < 2 or k > MAX_SAMPLES:
        raise ModelError(f"--bayes-samples {k}: give 2 to {MAX_SAMPLES}; 32 is usual")
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
    backbone_macs = count_macs(keras.Model(model.inputs, features))
    gh, gw = int(features.shape[1]), int(features.shape[2])
    info = {"type": "bayes", "samples": k, "classes": int(c), "layout": layout, "seed": seed, "features": f,
            "prior_sigma": head.prior_sigma, "posterior_sigma_mean": round(float(post["kernel_sigma"].mean()), 6),
            "head_macs": gh * gw * f * c * (k + (1 if layout == "centred" else 0)), "deterministic_head_macs": gh * gw * f * c,
            "backbone_macs": backbone_macs}
    return exported, info
