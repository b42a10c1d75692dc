"""Stage: load. The source model (a ``.keras``/``.h5`` file, a SavedModel folder, or the built-in MobileNetV2),
its class names, its task and the preprocessing recorded in the bundle: the start of every conversion.

Class names come from ``--labels``, else from the model itself (``edgeq train`` stores them, models/info.py),
else from the ``--val`` class folders when their count matches. A model file with none of these is refused: a
bundle of ``class_N`` labels is a silent loss. Only the built-in ``mobilenet_v2``, which has no names, gets
``class_N``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeq.errors import BundleError, ModelError
from edgeq.fsutil import probe_writable
from edgeq.preprocess import NORMALIZATIONS, PreprocessSpec

from ..models.info import read_model_info
from ..products import SourceModel
from ..recipes import ConvertRecipe
from ..tf import first_line, import_tensorflow

BUILTIN_MODELS = ("mobilenet_v2",)


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
            raise ModelError(f"--weights {weights}: cannot load ({first_line(exc)})") from None
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
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        # Keras itself reports this as "File not found", which sends people looking in the wrong place
        raise ModelError(f"{model}: cannot load the model: not a zip archive, as a .keras file is; is the file "
                         "complete? re-save or copy it again")
    import keras

    from ..models.bayes import register

    register()  # so that .keras files with an edgeq BayesDense head load
    try:
        keras_model = keras.models.load_model(str(path), compile=False)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"{model}: cannot load the model ({first_line(exc)}); is the file complete?") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{model}: cannot load the model ({first_line(exc)})") from None
    except Exception as exc:
        raise ModelError(f"{model}: cannot load the model ({exc.__class__.__name__}: {first_line(exc)})") from None
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
        raise ModelError(f"{path}: cannot load the SavedModel ({first_line(exc)})") from None
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


def check_output_path(path: Path) -> None:
    """Fail before the slow part if the bundle could not be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BundleError(f"-o {path}: is a folder; give a file name such as model.edgeq")
    if not parent.is_dir():
        raise BundleError(f"-o {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"-o {path}: folder {parent} is not writable")
    try:
        probe_writable(parent)
    except OSError as exc:
        raise BundleError(f"-o {path}: cannot create files in {parent} ({exc.strerror or exc}); choose a writable "
                          "folder") from None


def read_labels(path: str, num_classes: int) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"--labels {path}: cannot read ({exc.__class__.__name__})") from None
    labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(labels) != num_classes:
        raise ModelError(f"--labels {path}: {len(labels)} labels but the model has {num_classes} classes; give one "
                         "per line")
    return labels


def resolve_labels(recipe: ConvertRecipe, source: SourceModel, info: dict[str, Any], classes: int,
                   log: Callable[[str], None]) -> list[str]:
    """Class names, from the first of: ``--labels``, the model's stored names, the ``--val`` class folders."""
    if recipe.input.labels_file is not None:
        return read_labels(recipe.input.labels_file, classes)
    stored = info.get("labels")
    if stored is not None:
        if len(stored) != classes:
            raise ModelError(f"{source.origin}: stores {len(stored)} class names for {classes} classes; give "
                             "--labels FILE")
        return [str(n) for n in stored]
    val = recipe.validation.val
    if val and Path(val).is_dir() and not (Path(val) / "annotations.json").exists():
        names = sorted(p.name for p in Path(val).iterdir() if p.is_dir())
        if len(names) == classes:
            log(f"labels: the --val class folders ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
            return names
    if source.origin.startswith("builtin:"):
        return [f"class_{i}" for i in range(classes)]
    raise ModelError(f"{source.origin}: no class names stored with the model; give --labels FILE (one name per "
                     "line), or --val DIR with one folder per class")


@dataclass(frozen=True)
class Loaded:
    """What the load stage found: the model, what edgeq train stored with it, whether it is edgeq's detector,
    its class names and the (float) preprocessing recorded in the bundle."""

    source: SourceModel
    info: dict[str, Any]
    detector: bool
    labels: list[str]
    spec: PreprocessSpec


def run(recipe: ConvertRecipe, log: Callable[[str], None]) -> Loaded:
    """Check the output path, load the model, resolve its labels and preprocessing."""
    from ..models.detector import is_detector

    check_output_path(recipe.output)
    import_tensorflow()
    r = recipe.input
    source = load_source_model(recipe.model, r.input_size, r.alpha, r.classes, r.weights)
    info = read_model_info(recipe.model) if not source.origin.startswith("builtin:") else {}
    detector = is_detector(source.keras_model)
    # a detector's class head is its third output (the first is objectness)
    classes = int(source.keras_model.outputs[2].shape[-1]) if detector else source.num_classes
    labels = resolve_labels(recipe, source, info, classes, log)
    height, width, channels = source.input_shape
    if channels not in (1, 3):
        raise ModelError(f"{source.origin}: input has {channels} channels; edgeq takes 1 (grey) or 3 (colour)")
    mean, std = NORMALIZATIONS[r.normalization]
    return Loaded(source, info, detector, labels, PreprocessSpec(height, width, channels, r.color_order, r.resize,
                                                                 (mean,), (std,), interpolation=r.interpolation))
