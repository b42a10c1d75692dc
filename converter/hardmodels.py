"""Models that are hard for int8 post-training quantisation on purpose, for tests and benchmarks.

``add_outlier_channel`` keeps a trained model's float function and breaks its int8 one: it scales one output
channel of a convolution by ``factor`` and the matching input channel of the next convolution by ``1 / factor``.
ReLU commutes with a positive scale, so float outputs do not change (up to rounding); but TFLite quantises
activations per tensor, so that one channel now sets the int8 step of the whole tensor and the other channels
are rounded to a few levels. This is the "outlier channel" failure that per-channel activation ranges or mixed
precision repair.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def small_cnn(input_size: int, classes: int, seed: int = 0) -> Any:
    """Conv 16 - Conv 32 stride 2 - Conv 32 - GAP - Dense: trains in seconds on 28-32 px images."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((input_size, input_size, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_c")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(classes, name="logits")(x), name="small_cnn")


def add_outlier_channel(model: Any, producer: str, consumer: str, factor: float = 300.0, channel: int = 0) -> None:
    """In place: output ``channel`` of ``producer`` x factor, the same input channel of ``consumer`` / factor."""
    p, c = model.get_layer(producer), model.get_layer(consumer)
    pw = p.get_weights()
    pw[0] = pw[0].copy()
    pw[0][..., channel] *= factor
    if len(pw) > 1:
        pw[1] = pw[1].copy()
        pw[1][channel] *= factor
    p.set_weights(pw)
    cw = c.get_weights()
    cw[0] = cw[0].copy()
    cw[0][..., channel, :] /= factor
    c.set_weights(cw)


def train_small(x: np.ndarray, y: np.ndarray, classes: int, epochs: int = 8, seed: int = 0) -> Any:
    """small_cnn fitted on preprocessed images ``x`` ([-1, 1]) with integer labels ``y``."""
    import keras

    model = small_cnn(x.shape[1], classes, seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    return model
