"""What both trainers share: the result, reproducible start-up, batch-norm settling and saving a model with its
class names inside."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.errors import ModelError

from ..models.info import add_model_info


@dataclass
class TrainResult:
    output: Path
    labels: list[str]
    history: dict[str, float]
    seconds: float
    head: dict[str, Any]


def start_training(output: Path, seed: int) -> Any:
    """Check the output folder before the slow part, import TensorFlow quietly and seed it for reproducible runs;
    returns the tensorflow module."""
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ModelError(f"-o {output}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelError(f"-o {output}: folder {parent} is not writable")
    from ..tf import import_tensorflow

    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return tf


def settle_batchnorm(model: Any, momentum: float = 0.9) -> None:
    """Keras' MobileNetV2 uses momentum 0.999, whose moving statistics do not settle in a few hundred steps
    (shared/FINDINGS.md); short trainings use 0.9."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def save_model(model: Any, path: Path, info: dict[str, Any]) -> None:
    """Save atomically, with ``info`` (class names, task, ...) inside the ``.keras`` file (models/info.py)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(str(tmp))
        add_model_info(tmp, info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
