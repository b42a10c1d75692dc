"""``edgeq train``: fit a MobileNetV2 classifier with a deterministic or Bayesian head on a class folder.

Defaults are sized for a 2-core CPU: MobileNetV2 alpha 0.35 at 96 px. Two ways to get a Bayesian model:

- end to end: ``edgeq train DATA --head bayes`` trains backbone and variational head together;
- in two steps (quicker, and what the benchmarks do): ``edgeq train DATA --head dense -o det.keras``, then
  ``edgeq train DATA --head bayes --init det.keras --freeze-backbone -o bayes.keras``. The second step computes
  the backbone features once (and for ``--augment-copies`` augmented copies), caches them, and trains only the
  head, in seconds. ``--init`` starts the posterior and prior means at the deterministic weights.

Augmentations (training only): random horizontal flip, translation (10%), zoom (10%) and rotation (5%).
With ``--seed`` the run is reproducible: same seed, same data, same weights.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.errors import DataError, ModelError
from edgeq.preprocess import NORMALIZATIONS, Preprocessor, PreprocessSpec, read_image

from ..data.datasets import class_folder, progress
from ..models import bayes
from .common import TrainResult, save_model, settle_batchnorm, start_training

HEADS = ("dense", "bayes")
ARCHS = ("mobilenet_v2",)


def load_folder_arrays(
    root: str | Path, spec: PreprocessSpec, labels: list[str] | None = None, flag: str = "DATA_DIR"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a class folder through the core preprocessor (float32), their targets and labels."""
    data = class_folder(root, labels, flag=flag)
    pre = Preprocessor(spec.with_dtype("float32"))
    frames = []
    for f in progress(data.files, len(data.files), f"read {Path(root).name}"):
        frames.append(read_image(f))
    return pre.batch(frames), data.targets, data.labels


def fit_classifier(
    model: Any, x: np.ndarray, y: np.ndarray, epochs: int = 3, batch_size: int = 32, lr: float = 2e-3,
    seed: int = 0, verbose: int = 0,
) -> dict[str, float]:
    """Train ``model`` (logits output) with Adam and cross-entropy; return the last epoch's loss and accuracy."""
    import keras

    keras.utils.set_random_seed(seed)
    settle_batchnorm(model)
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=verbose)
    return {k: float(v[-1]) for k, v in history.history.items()}


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``edgeq train`` takes; see ``edgeq train --help``."""

    data: str
    output: Path
    arch: str = "mobilenet_v2"
    alpha: float = 0.35
    input_size: int = 96
    head: str = "dense"
    epochs: int = 10
    val: str | None = None
    freeze_backbone: bool = False
    init: str | None = None
    seed: int = 0
    batch_size: int = 32
    lr: float | None = None  # default 1e-3, or 1e-2 for a frozen backbone
    prior_sigma: float = 0.1
    augment: bool = True
    augment_copies: int = 2
    normalization: str = "mobilenet"

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.head not in HEADS:
            raise ModelError(f"--head {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.arch not in ARCHS:
            raise ModelError(f"--arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.output.suffix != ".keras":
            raise ModelError(f"-o {self.output}: give a .keras file name (Keras 3 format)")
        if self.epochs < 1:
            raise ModelError(f"--epochs {self.epochs}: give at least 1")
        if self.batch_size < 1:
            raise ModelError(f"--batch-size {self.batch_size}: give at least 1")
        if self.prior_sigma <= 0:
            raise ModelError(f"--prior-sigma {self.prior_sigma}: give a positive standard deviation, e.g. 0.1")
        if self.input_size < 32:
            raise ModelError(f"--input-size {self.input_size}: MobileNetV2 needs at least 32 px")
        if self.augment_copies < 0:
            raise ModelError(f"--augment-copies {self.augment_copies}: give 0 or more")
        if self.normalization not in NORMALIZATIONS:
            raise ModelError(f"--normalize {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")


def train(opts: TrainOptions, log: Callable[[str], None] = print) -> TrainResult:
    # over 60 lines: the frozen-backbone and end-to-end paths side by side, sharing set-up and saving
    started = time.perf_counter()
    tf = start_training(opts.output, opts.seed)
    import keras

    init_model = _load_init(opts.init) if opts.init else None
    if init_model is not None:
        size_h, size_w = (int(d) for d in init_model.inputs[0].shape[1:3])
    else:
        size_h = size_w = opts.input_size
    mean, std = NORMALIZATIONS[opts.normalization]
    spec = PreprocessSpec(size_h, size_w, 3, "RGB", "stretch", (mean,), (std,))
    x, y, labels = load_folder_arrays(opts.data, spec)
    if len(labels) < 2:
        raise DataError(f"DATA_DIR {opts.data}: {len(labels)} class folder; a classifier needs at least 2")
    val = load_folder_arrays(opts.val, spec, labels, flag="--val")[:2] if opts.val else None
    classes = len(labels)
    log(f"data: {len(x)} images in {classes} classes from {opts.data}" + (f", {len(val[0])} for validation" if val else ""))

    if init_model is not None:
        last = init_model.layers[-1]
        if not isinstance(last, (keras.layers.Dense, bayes.bayes_dense_class())):
            raise ModelError(f"--init {opts.init}: its last layer {last.name!r} is not a Dense head; give a model "
                             "trained with edgeq train")
        units = int(last.units)
        if units != classes:
            raise ModelError(f"--init {opts.init}: has {units} classes but DATA_DIR {opts.data} has {classes} "
                             "class folders; train on the same classes")
        backbone = keras.Model(init_model.inputs, last.input, name="backbone")
        init_weights = _head_weights(last, bayes)
    else:
        from ..stages.load import build_mobilenet_v2

        full = build_mobilenet_v2(opts.input_size, opts.alpha, classes, None, opts.seed)
        backbone = keras.Model(full.inputs, full.get_layer("logits").input, name="backbone")
        init_weights = None
    settle_batchnorm(backbone)

    n = len(x)
    head_layer = _make_head(opts, classes, n, init_weights, keras, bayes)
    lr = opts.lr if opts.lr is not None else (1e-2 if opts.freeze_backbone else 1e-3)
    verbose = 1 if sys.stdout.isatty() else 2
    augmenter = _augmenter(keras, opts.seed) if opts.augment else None

    if opts.freeze_backbone:
        backbone.trainable = False
        feats, targets = _cached_features(backbone, x, y, augmenter, opts.augment_copies, opts.batch_size)
        val_feats = (_features(backbone, val[0], opts.batch_size), val[1]) if val else None
        copies = opts.augment_copies if augmenter is not None else 0
        log(f"features: {feats.shape[1]} per image, cached for {len(feats)} images ({copies} augmented copies)")
        head_in = keras.Input((int(feats.shape[1]),), name="features")
        head_model = keras.Model(head_in, head_layer(head_in), name="head")
        history = _fit(head_model, feats, targets, val_feats, opts, lr, verbose, None, tf, keras)
        model = keras.Model(backbone.inputs, head_layer(backbone.outputs[0]), name=_name(opts, size_h))
    else:
        model = keras.Model(backbone.inputs, head_layer(backbone.outputs[0]), name=_name(opts, size_h))
        history = _fit(model, x, y, val, opts, lr, verbose, augmenter, tf, keras)

    head_info: dict[str, Any] = {"type": opts.head, "classes": classes}
    if opts.head == "bayes":
        post = head_layer.posterior()
        head_info.update(prior_sigma=opts.prior_sigma, posterior_sigma_mean=float(post["kernel_sigma"].mean()),
                         init=opts.init)
    save_model(model, opts.output, {"task": "classify", "labels": labels, "normalization": opts.normalization})
    return TrainResult(opts.output, labels, history, time.perf_counter() - started, head_info)


def _name(opts: TrainOptions, size: int) -> str:
    return f"mobilenet_v2_{opts.alpha:g}_{size}_{opts.head}"


def _load_init(path: str) -> Any:
    from ..stages.load import load_source_model

    p = Path(path)
    if p.suffix != ".keras" or not p.is_file():
        raise ModelError(f"--init {path}: give a .keras model file (from edgeq train)")
    return load_source_model(str(p)).keras_model


def _head_weights(layer: Any, bayes: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(layer, bayes.bayes_dense_class()):
        post = layer.posterior()
        return post["kernel_mu"].astype(np.float32), post["bias_mu"].astype(np.float32)
    kernel, bias = layer.get_weights()
    return kernel, bias


def _make_head(opts: TrainOptions, classes: int, n: int, init: tuple[np.ndarray, np.ndarray] | None,
               keras: Any, bayes: Any) -> Any:
    if opts.head == "dense":
        layer = keras.layers.Dense(classes, name="logits")
        if init is not None:
            layer.build((None, init[0].shape[0]))
            layer.set_weights(list(init))
        return layer
    layer = bayes.bayes_dense_class()(classes, prior_sigma=opts.prior_sigma, kl_weight=1.0 / n, seed=opts.seed,
                                      name="bayes_logits")
    if init is not None:
        bayes.start_at(layer, init[0], init[1])
    return layer


def _augmenter(keras: Any, seed: int) -> Any:
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 2),
        keras.layers.RandomRotation(0.05, fill_mode="nearest", seed=seed + 3),
    ], name="augment")


def _features(backbone: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.asarray(backbone.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def _cached_features(backbone: Any, x: np.ndarray, y: np.ndarray, augmenter: Any, copies: int,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    parts, targets = [_features(backbone, x, batch_size)], [y]
    if augmenter is not None:
        for _ in range(copies):
            aug = np.concatenate([
                np.asarray(augmenter(x[i:i + 256], training=True)) for i in range(0, len(x), 256)
            ])
            parts.append(_features(backbone, aug, batch_size))
            targets.append(y)
    return np.concatenate(parts), np.concatenate(targets)


def _fit(model: Any, x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None, opts: TrainOptions,
         lr: float, verbose: int, augmenter: Any, tf: Any, keras: Any) -> dict[str, float]:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=opts.seed).batch(opts.batch_size)
    if augmenter is not None:
        ds = ds.map(lambda a, b: (augmenter(a, training=True), b))
    ds = ds.prefetch(2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        history = model.fit(ds, epochs=opts.epochs, validation_data=val, verbose=verbose)
    return {k: round(float(v[-1]), 6) for k, v in history.history.items()}
