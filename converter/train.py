"""Small-scale training used by the demo and the benchmarks: fit a Keras classifier on preprocessed arrays.

The full ``edgeq train`` command (augmentations, Bayesian heads, feature caching) builds on this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeq.datasets import class_folder
from edgeq.preprocess import Preprocessor, PreprocessSpec, read_image


def settle_batchnorm(model: Any, momentum: float = 0.9) -> None:
    """Keras' MobileNetV2 uses momentum 0.999, whose moving statistics do not settle in a few hundred steps
    (shared/FINDINGS.md); short trainings use 0.9."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def load_folder_arrays(root: str | Path, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of a class folder through the core preprocessor (float32), their targets and labels."""
    data = class_folder(root, flag="DATA_DIR")
    x = Preprocessor(spec.with_dtype("float32")).batch([read_image(f) for f in data.files])
    return x, data.targets, data.labels


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
