"""Source models: a ``.keras``/``.h5`` file, a SavedModel folder, or the built-in MobileNetV2."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.errors import ModelError

BUILTIN_MODELS = ("mobilenet_v2",)


@dataclass
class SourceModel:
    """A float model ready for conversion.

    keras_model: the Keras model, or None for a SavedModel folder (then ``saved_model_dir`` is set).
    input_shape: (H, W, C) of the single image input.
    num_classes: size of the last axis of the output.
    name: what the manifest calls the model.
    origin: where it came from (path or ``builtin:mobilenet_v2``).
    """

    keras_model: Any
    saved_model_dir: Path | None
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str
    origin: str


def build_mobilenet_v2(
    input_size: int = 224, alpha: float = 1.0, classes: int = 1000, weights: str | None = None, seed: int = 0
) -> Any:
    """Keras 3 MobileNetV2 returning logits (no softmax: the device computes probabilities and uncertainty).

    weights: None (random, seeded), ``imagenet`` (needs the network), or a path to a weights file.
    """
    import keras

    keras.utils.set_random_seed(seed)
    pretrained = "imagenet" if weights == "imagenet" else None
    try:
        base = keras.applications.MobileNetV2(
            input_shape=(input_size, input_size, 3),
            alpha=alpha,
            include_top=False,
            weights=pretrained,
            pooling="avg",
        )
    except ValueError as exc:
        raise ModelError(f"mobilenet_v2: {exc}".splitlines()[0]) from None
    except Exception as exc:  # urllib errors when offline
        raise ModelError(
            f"mobilenet_v2: could not download imagenet weights ({exc.__class__.__name__}); "
            "this machine is offline: use --weights none or --weights PATH"
        ) from None
    x = keras.layers.Dropout(0.2, name="dropout")(base.output)
    logits = keras.layers.Dense(classes, name="logits")(x)
    model = keras.Model(base.input, logits, name=f"mobilenet_v2_{alpha:g}_{input_size}")
    if weights not in (None, "none", "imagenet"):
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"--weights {weights}: file not found")
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise ModelError(f"--weights {weights}: cannot load ({_first_line(exc)})") from None
    return model


def load_source_model(
    model: str,
    input_size: int = 224,
    alpha: float = 1.0,
    classes: int = 1000,
    weights: str | None = None,
) -> SourceModel:
    """Resolve MODEL from the command line into a SourceModel, or raise ModelError saying what is wrong."""
    if model in BUILTIN_MODELS:
        keras_model = build_mobilenet_v2(input_size, alpha, classes, None if weights in (None, "none") else weights)
        return _describe(keras_model, None, keras_model.name, f"builtin:{model}")
    path = Path(model)
    if not path.exists():
        raise ModelError(f"{model}: model not found; give a .keras/.h5 file, a SavedModel folder, or mobilenet_v2")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelError(f"{model}: folder has no saved_model.pb; not a SavedModel")
        return _load_saved_model(path)
    if path.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"{model}: unknown model format {path.suffix!r}; give a .keras or .h5 file or a SavedModel")
    import keras

    from .bayes import register

    register()  # so that .keras files with an edgeq BayesDense head load
    try:
        keras_model = keras.models.load_model(str(path), compile=False)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"{model}: cannot load the model ({_first_line(exc)}); is the file complete?") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{model}: cannot load the model ({_first_line(exc)})") from None
    except Exception as exc:
        raise ModelError(f"{model}: cannot load the model ({exc.__class__.__name__}: {_first_line(exc)})") from None
    return _describe(keras_model, None, path.stem, str(path))


def _describe(keras_model: Any, saved: Path | None, name: str, origin: str) -> SourceModel:
    inputs = keras_model.inputs
    if len(inputs) != 1:
        raise ModelError(f"{origin}: model has {len(inputs)} inputs; edgeq converts single-image models")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ModelError(f"{origin}: input shape {shape} is not (batch, H, W, C) with a fixed size; rebuild it fixed")
    out_shape = tuple(keras_model.outputs[0].shape)
    return SourceModel(keras_model, saved, tuple(int(d) for d in shape[1:]), int(out_shape[-1]), name, origin)


def _load_saved_model(path: Path) -> SourceModel:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except KeyError:
        raise ModelError(f"{path}: SavedModel has no serving_default signature") from None
    except Exception as exc:
        raise ModelError(f"{path}: cannot load the SavedModel ({_first_line(exc)})") from None
    specs = list(signature.structured_input_signature[1].values())
    if len(specs) != 1:
        raise ModelError(f"{path}: signature has {len(specs)} inputs; edgeq converts single-image models")
    shape = tuple(specs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ModelError(f"{path}: input shape {shape} is not (batch, H, W, C) with a fixed size")
    outputs = list(signature.structured_outputs.values())
    return SourceModel(
        None, path, tuple(int(d) for d in shape[1:]), int(outputs[0].shape[-1]), path.name, str(path)
    )


def leaf_layers(model: Any) -> list[Any]:
    """Every layer of a Keras model, nested models opened up (a MobileNetV2 used as one layer included)."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
