"""``edgeq train --task detect``: training edgeq's grid detector (converter/models/detector.py).

Training has two stages (``--head bayes``, the default for detection):

1. the whole network end to end with a deterministic 1x1 class conv;
2. the class head replaced by a Bayesian 1x1 layer (``BayesDense`` applied per cell) whose posterior and prior
   means start at the stage-1 weights; the rest is frozen. The neck features of every positive cell (of the
   training images and ``augment_copies`` augmented copies) are computed once and cached, so this stage trains
   in seconds, like ``edgeq train --freeze-backbone`` for classifiers.

Augmentations (stage 1, every batch anew): horizontal flip, scale 0.75-1.25 with translation (boxes transformed,
boxes with less than half their area left dropped) and brightness/contrast jitter.

Outlier exposure: boxes of ``"outlier"`` categories in the training set (``edgeq datasets scenes --outliers``), and
with ``--outliers DIR`` a user's own images pasted into training images at free spots, are objects of no known
class: objectness and box as any object, a uniform class distribution as the class target (converter/models/
detector.py), in both stages.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.errors import DataError, ModelError
from edgeq.preprocess import NORMALIZATIONS, Preprocessor, PreprocessSpec, read_image

from ..data.coco import CocoSet, read_coco
from ..data.datasets import progress
from ..models import bayes
from ..models.detector import (
    BAYES_CLASS_HEAD,
    OUTLIER_TARGET,
    OUTLIER_WEIGHT,
    STRIDE,
    build_detector,
    class_head,
    encode_targets,
    losses,
)
from ..tf import leaf_layers
from .common import TrainResult, save_model, settle_batchnorm, start_training


# -- data --------------------------------------------------------------------------------------------------------


@dataclass
class DetectionData:
    """A COCO set in memory at the model's input size: BGR uint8 images, boxes in input pixels and class indices
    (into ``category_ids``, the known categories), plus the boxes of unknown categories (never trained on)."""

    images: np.ndarray  # [N, S, S, 3] uint8 BGR
    boxes: list[np.ndarray]  # [n_i, 4] x0, y0, x1, y1
    classes: list[np.ndarray]  # [n_i]
    unknown: list[np.ndarray]  # [m_i, 4]
    category_ids: list[int]
    labels: list[str]
    coco: CocoSet
    outliers: list[np.ndarray] = None  # type: ignore[assignment]  # [o_i, 4] objects of no known class

    def __post_init__(self) -> None:
        if self.outliers is None:
            self.outliers = [np.zeros((0, 4), np.float32) for _ in self.boxes]


def load_detection_data(path: str, size: int, flag: str = "DATA", category_ids: list[int] | None = None) -> DetectionData:
    """Read a COCO set (see edgeq/scenes.py for what is refused) and stretch every image to ``size``."""
    import cv2

    coco = read_coco(path, flag=flag)
    known = coco.known_categories
    if category_ids is None:
        category_ids = [int(c["id"]) for c in known]
    if not category_ids:
        raise DataError(f"{flag} {coco.path}: every category is marked unknown; a detector needs known classes")
    coco.require_categories(category_ids, flag, "the training set")
    names = {int(c["id"]): str(c["name"]) for c in coco.categories}
    index = {c: i for i, c in enumerate(category_ids)}
    outlier_ids = list(coco.outlier_category_ids)
    images, boxes, classes, unknown, outliers = [], [], [], [], []
    for im in progress(coco.images, len(coco.images), f"read {coco.path.parent.name}"):
        frame = read_image(coco.image_path(im))
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        frame = frame[..., :3]
        h, w = frame.shape[:2]
        sx, sy = size / w, size / h
        images.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR))
        b = coco.boxes[im["id"]] * np.array([sx, sy, sx, sy], np.float32)
        cats = coco.category_ids[im["id"]]
        is_known = np.array([c in index for c in cats.tolist()], bool)
        is_outlier = np.isin(cats, outlier_ids)
        boxes.append(b[is_known])
        classes.append(np.array([index[c] for c in cats[is_known].tolist()], np.int64))
        unknown.append(b[~is_known & ~is_outlier])
        outliers.append(b[is_outlier])
    return DetectionData(np.stack(images), boxes, classes, unknown, list(category_ids),
                         [names[c] for c in category_ids], coco, outliers)


def augment(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
            *others: np.ndarray) -> tuple[Any, ...]:
    """Flip, scale/translate and colour-jitter one image; returns image, kept boxes, their indices and each of
    ``others`` (unknown boxes, outliers) transformed alike."""
    import cv2

    s = image.shape[0]
    scale = float(rng.uniform(0.75, 1.25))
    tx, ty = (rng.uniform(-0.15, 0.15, 2) * s).tolist()
    flip = bool(rng.random() < 0.5)
    m = np.array([[scale, 0, (1 - scale) * s / 2 + tx], [0, scale, (1 - scale) * s / 2 + ty]], np.float32)
    if flip:
        m[0] = [-scale, 0, s - ((1 - scale) * s / 2 + tx)]
    fill = tuple(int(v) for v in image.reshape(-1, 3).mean(axis=0))
    out = cv2.warpAffine(image, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    gain, bias = float(rng.uniform(0.75, 1.25)), float(rng.uniform(-25, 25))
    out = np.clip(out.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)

    def move(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = np.asarray(b, np.float32).reshape(-1, 4)
        xs = b[:, [0, 2]] * m[0, 0] + m[0, 2]
        ys = b[:, [1, 3]] * m[1, 1] + m[1, 2]
        nb = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        clipped = np.clip(nb, 0, s)
        area = (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1])
        left = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = np.flatnonzero(left >= 0.5 * np.maximum(area, 1e-6))
        return clipped[keep], keep

    kept, idx = move(boxes)
    return (out, kept, idx, *(move(o)[0] for o in others))


class OutlierPool:
    """A user's outlier images (``edgeq train --outliers DIR``), pasted into training images at free spots: objects
    of no known class for outlier exposure. Each is scaled to 28-72 px (at 192 px input; in proportion otherwise)
    under a soft oval mask, so that its own border does not teach the detector what an outlier looks like."""

    SHARE = 0.5  # training images that get one pasted outlier

    def __init__(self, folder: str) -> None:
        from edgeq.errors import SourceError
        from edgeq.preprocess import list_images, to_channels

        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"--outliers {folder}: not a folder; give a folder of outlier images")
        files = list_images(root)
        if not files:
            raise DataError(f"--outliers {folder}: no jpg/png/bmp images in it; add images of objects of no known "
                            "class, or drop --outliers")
        self.images, bad = [], []
        for f in files:
            try:
                self.images.append(to_channels(read_image(f), 3, source=str(f)))
            except (SourceError, DataError, ValueError):
                bad.append(f)
        if not self.images:
            raise DataError(f"--outliers {folder}: none of its {len(files)} images could be read (first: "
                            f"{bad[0].name}); give readable jpg/png/bmp images")
        self.skipped = len(bad)

    def paste(self, image: np.ndarray, taken: list[np.ndarray], outliers: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``image`` with one outlier pasted (``SHARE`` of the calls) where it overlaps no box of ``taken``, and
        ``outliers`` with its box added."""
        import cv2

        from ..data.objects import _oval
        from ..data.scenes import _paste_patch, free_spot

        if rng.random() >= self.SHARE:
            return image, outliers
        size = image.shape[0]
        placed = [tuple(int(v) for v in b) for group in taken for b in np.asarray(group).reshape(-1, 4)]
        spot = free_spot(rng, size, (max(8, size * 28 // 192), max(9, size * 72 // 192)), placed)
        if spot is None:
            return image, outliers
        _, s, centre = spot
        patch = cv2.resize(self.images[int(rng.integers(0, len(self.images)))], (64, 64), interpolation=cv2.INTER_AREA)
        canvas = image.copy()
        box = _paste_patch(canvas, patch, _oval(rng, 64), s, float(rng.uniform(-30, 30)), centre)
        if box is None:
            return image, outliers
        return canvas, np.concatenate([np.asarray(outliers, np.float32).reshape(-1, 4),
                                       np.asarray([box], np.float32)])


def _sequence_class() -> type:
    import keras

    class DetectionSequence(keras.utils.PyDataset):
        """Batches of (preprocessed images, grid targets); augmented anew every epoch when ``augment``."""

        def __init__(self, data: DetectionData, pre: Preprocessor, batch_size: int, seed: int, augment_: bool,
                     pool: "OutlierPool | None" = None) -> None:
            super().__init__()
            self.data, self.pre, self.batch_size, self.augment, self.pool = data, pre, batch_size, augment_, pool
            self.rng = np.random.default_rng(seed)
            self.grid = data.images.shape[1] // STRIDE
            self.order = self.rng.permutation(len(data.images))

        def __len__(self) -> int:
            return int(np.ceil(len(self.data.images) / self.batch_size))

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(self.data.images))

        def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
            frames, objs, boxes, classes = [], [], [], []
            for j in idx:
                img, b, c = self.data.images[j], self.data.boxes[j], self.data.classes[j]
                u, out = self.data.unknown[j], self.data.outliers[j]
                if self.pool is not None:
                    img, out = self.pool.paste(img, [b, u, out], out, self.rng)
                if self.augment:
                    img, b, keep, u, out = augment(img, b, self.rng, u, out)
                    c = c[keep]
                o, bx, cl = encode_targets(b, c, self.grid, u, outliers=out)
                frames.append(img)
                objs.append(o)
                boxes.append(bx)
                classes.append(cl)
            return self.pre.batch(frames), {"objectness": np.stack(objs), "boxes": np.stack(boxes),
                                            "class_logits": np.stack(classes)}

    return DetectionSequence


# -- training ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectTrainOptions:
    """What ``edgeq train --task detect`` takes; see ``edgeq train --help``."""

    data: str
    output: Path
    val: str | None = None
    head: str = "bayes"
    alpha: float = 0.35
    input_size: int = 192
    epochs: int = 20
    bayes_epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    prior_sigma: float = 0.1
    augment: bool = True
    augment_copies: int = 2
    neck: int = 96
    normalization: str = "mobilenet"
    init_backbone: str | None = None
    outliers: str | None = None  # a folder of outlier images, pasted into training images (outlier exposure)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.head not in ("dense", "bayes"):
            raise ModelError(f"--head {self.head!r}: choose dense or bayes")
        if self.output.suffix != ".keras":
            raise ModelError(f"-o {self.output}: give a .keras file name (Keras 3 format)")
        if self.epochs < 1 or self.bayes_epochs < 1:
            raise ModelError(f"--epochs {self.epochs} / --bayes-epochs {self.bayes_epochs}: give at least 1")
        if self.batch_size < 1:
            raise ModelError(f"--batch-size {self.batch_size}: give at least 1")
        if not self.lr > 0:
            raise ModelError(f"--lr {self.lr}: give a positive learning rate, e.g. 2e-3")
        if self.augment_copies < 0:
            raise ModelError(f"--augment-copies {self.augment_copies}: give 0 or more")
        if self.prior_sigma <= 0:
            raise ModelError(f"--prior-sigma {self.prior_sigma}: give a positive standard deviation, e.g. 0.1")
        if self.input_size % STRIDE or self.input_size < 4 * STRIDE:
            raise ModelError(f"--input-size {self.input_size}: a detector needs a multiple of {STRIDE}, "
                             f"at least {4 * STRIDE}")
        if self.normalization not in NORMALIZATIONS:
            raise ModelError(f"--normalize {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")


def train_detector(opts: DetectTrainOptions, log: Callable[[str], None] = print) -> Any:
    """Train and save the detector (its class names and COCO category ids stored in the ``.keras`` file)."""
    started = time.perf_counter()
    start_training(opts.output, opts.seed)
    import keras

    pool = OutlierPool(opts.outliers) if opts.outliers else None  # a bad folder is refused before the slow part
    data = load_detection_data(opts.data, opts.input_size)
    val = load_detection_data(opts.val, opts.input_size, "--val", data.category_ids) if opts.val else None
    n_boxes = sum(len(b) for b in data.boxes)
    if n_boxes == 0:
        raise DataError(f"DATA {data.coco.path}: no boxes of known categories to train on")
    n_outliers = sum(len(o) for o in data.outliers)
    log(f"data: {len(data.images)} images, {n_boxes} boxes of {len(data.labels)} known classes from {data.coco.path}"
        + (f", {n_outliers} outlier objects" if n_outliers else "")
        + (f", {len(pool.images)} outlier images to paste from {opts.outliers}" if pool else "")
        + (f", {len(val.images)} images for validation" if val else ""))
    mean, std = NORMALIZATIONS[opts.normalization]
    spec = PreprocessSpec(opts.input_size, opts.input_size, 3, "RGB", "stretch", (mean,), (std,))
    pre = Preprocessor(spec)
    seq = _sequence_class()
    model = build_detector(opts.input_size, opts.alpha, len(data.labels), opts.seed, opts.neck)
    if opts.init_backbone:
        log(f"backbone: {init_backbone(model, opts.init_backbone)} layers initialised from {opts.init_backbone}")
    settle_batchnorm(model)
    steps = opts.epochs * int(np.ceil(len(data.images) / opts.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(opts.lr, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=losses(),
                  loss_weights={"objectness": 1.0, "boxes": 2.0, "class_logits": 1.0})
    verbose = 1 if sys.stdout.isatty() else 2
    val_seq = seq(val, pre, opts.batch_size, opts.seed, False) if val else None
    log(f"stage 1: detector end to end, deterministic class head, {opts.epochs} epochs")
    hist = model.fit(seq(data, pre, opts.batch_size, opts.seed, opts.augment, pool), epochs=opts.epochs,
                     validation_data=val_seq, verbose=verbose)
    history = {k: round(float(v[-1]), 6) for k, v in hist.history.items()}
    head_info: dict[str, Any] = {"type": opts.head, "classes": len(data.labels), "task": "detect"}
    if opts.head == "bayes":
        model, bayes_history, post_sigma = _train_bayes_class_head(model, data, pre, opts, verbose, log, pool)
        history.update({f"bayes_{k}": v for k, v in bayes_history.items()})
        head_info.update(prior_sigma=opts.prior_sigma, posterior_sigma_mean=post_sigma)
    save_model(model, opts.output, {"task": "detect", "labels": data.labels, "category_ids": data.category_ids,
                                    "stride": STRIDE, "normalization": opts.normalization,
                                    "train": str(data.coco.path)})
    return TrainResult(opts.output, data.labels, history, time.perf_counter() - started, head_info)


def init_backbone(model: Any, path: str) -> int:
    """Copy the weights of every layer of ``path`` (a MobileNetV2 from ``edgeq train``, same width) whose name and
    weight shapes match a layer of the detector's backbone; return how many were copied. A classifier trained on
    object crops stands in for the ImageNet weights a detector usually starts from (they cannot be downloaded
    here), and its class features are what the detector's class head needs."""
    from ..stages.load import load_source_model

    p = Path(path)
    if p.suffix != ".keras" or not p.is_file():
        raise ModelError(f"--init-backbone {path}: give a .keras classifier from edgeq train")
    donor = {layer.name: layer for layer in leaf_layers(load_source_model(str(p)).keras_model)}
    copied, mismatched = 0, []
    for layer in leaf_layers(model):
        other = donor.get(layer.name)
        if other is None or not layer.weights:
            continue
        mine, theirs = layer.get_weights(), other.get_weights()
        if [w.shape for w in mine] != [w.shape for w in theirs]:
            mismatched.append(layer.name)
            continue
        layer.set_weights(theirs)
        copied += 1
    if not copied:
        hint = f" ({len(mismatched)} layers differ in shape: train it with the same --alpha)" if mismatched else ""
        raise ModelError(f"--init-backbone {path}: no layer matches the detector's MobileNetV2 backbone{hint}")
    return copied


def positive_cell_features(features_model: Any, data: DetectionData, pre: Preprocessor, copies: int,
                           rng: np.random.Generator, augment_: bool, batch: int = 32,
                           pool: OutlierPool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Neck features ``[n, F]`` and class targets ``[n]`` of every positive cell (a class index, or
    ``OUTLIER_TARGET`` on an outlier's cells), for the images and ``copies`` augmented copies of each."""
    grid = data.images.shape[1] // STRIDE
    feats, targets = [], []
    rounds = 1 + (copies if augment_ else 0)
    for r in range(rounds):
        for start in range(0, len(data.images), batch):
            frames, cls_maps = [], []
            for j in range(start, min(start + batch, len(data.images))):
                img, b, c, u, out = (data.images[j], data.boxes[j], data.classes[j], data.unknown[j],
                                     data.outliers[j])
                if pool is not None:
                    img, out = pool.paste(img, [b, u, out], out, rng)
                if r > 0:
                    img, b, keep, u, out = augment(img, b, rng, u, out)
                    c = c[keep]
                cls_maps.append(encode_targets(b, c, grid, u, outliers=out)[2][..., 0])
                frames.append(img)
            f = np.asarray(features_model([pre.batch(frames)], training=False))
            cm = np.stack(cls_maps)
            pos = (cm >= 0) | (cm == OUTLIER_TARGET)
            feats.append(f[pos])
            targets.append(cm[pos])
    return np.concatenate(feats).astype(np.float32), np.concatenate(targets).astype(np.int64)


def cell_class_loss(outlier_weight: float = OUTLIER_WEIGHT) -> Callable[[Any, Any], Any]:
    """The class loss of converter/models/detector.py on cached cells ``[n]``: cross-entropy on known objects'
    cells, cross-entropy to the uniform distribution on outliers' cells."""
    from keras import ops

    def loss(y_true: Any, logits: Any) -> Any:
        y = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        logp = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
        known = ops.cast(y >= 0, "float32")
        ce = -ops.sum(ops.one_hot(ops.maximum(y, 0), ops.shape(logits)[-1]) * logp, axis=-1)
        outlier = ops.cast(y == OUTLIER_TARGET, "float32")
        return ops.mean(ce * known + outlier_weight * outlier * -ops.mean(logp, axis=-1))

    return loss


def _train_bayes_class_head(model: Any, data: DetectionData, pre: Preprocessor, opts: DetectTrainOptions,
                            verbose: int, log: Callable[[str], None], pool: OutlierPool | None
                            ) -> tuple[Any, dict[str, float], float]:
    import keras

    head = class_head(model)
    features_model = keras.Model(model.inputs, head.input, name="detector_features")
    rng = np.random.default_rng(opts.seed + 1)
    x, y = positive_cell_features(features_model, data, pre, opts.augment_copies, rng, opts.augment, pool=pool)
    exposed = int((y == OUTLIER_TARGET).sum())
    log(f"stage 2: Bayesian class head on {len(x)} cached positive-cell features ({x.shape[1]} each"
        + (f", {exposed} of outliers" if exposed else "") + f"), {opts.bayes_epochs} epochs, prior N(stage-1 "
        f"weights, {opts.prior_sigma}^2)")
    kernel, bias = head.get_weights()
    kernel = kernel.reshape(kernel.shape[-2], kernel.shape[-1])
    layer = bayes.start_at(bayes.bayes_dense_class()(len(data.labels), prior_sigma=opts.prior_sigma,
                                                     kl_weight=1.0 / len(x), seed=opts.seed, name=BAYES_CLASS_HEAD),
                           kernel, bias)
    inp = keras.Input((kernel.shape[0],), name="cell_features")
    head_model = keras.Model(inp, layer(inp))
    if exposed:  # known cells' cross-entropy and the outliers' uniform target together
        head_model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=cell_class_loss())
    else:
        head_model.compile(optimizer=keras.optimizers.Adam(1e-2),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    hist = head_model.fit(x, y, batch_size=256, epochs=opts.bayes_epochs, shuffle=True, verbose=verbose)
    history = {k: round(float(v[-1]), 6) for k, v in hist.history.items()}
    if exposed:
        known = y >= 0
        pred = np.argmax(np.asarray(head_model.predict(x[known], batch_size=1024, verbose=0)), axis=-1)
        history["accuracy"] = round(float(np.mean(pred == y[known])), 6)
    obj_t, box_t = model.outputs[0], model.outputs[1]
    final = keras.Model(model.inputs, [obj_t, box_t, layer(head.input)], name=model.name + "_bayes")
    sigma = float(layer.posterior()["kernel_sigma"].mean())
    return final, history, sigma
