"""Where the unfamiliarity measure (stages/density.py) reads a task's features, and how: the density's own small
interface, one implementation per task.

A task's taps say which of the model's tensors the density taps, what counts as one sample (an image for a
classifier; for a detector a grid cell that holds a known object), how a sample becomes a feature vector, how the
whitening joins the graph as an output, and how a converted model scores held-out samples. The policy for which
labelled data to fit on is the same for every task (:meth:`Taps.data`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from ..context import ConvertContext
from ..products import Converted, DensityData
from ..recipes import DensityRecipe

# MobileNetV2's block outputs whose spatial means join a classifier's pooled features: early blocks see what an
# unknown input looks like before the classifier's features map it onto a known class (benchmarks/unknowns.py)
EARLY_TAPS = ("block_1_project_BN", "block_3_project_BN", "block_6_project_BN", "block_10_project_BN",
              "block_13_project_BN")
HELD_OUT_MAX = 2000
DETECTOR_TAP = "neck"
STRIDE = 16


class Taps(ABC):
    """One task's feature taps for the density."""

    task_name: str
    # --density-method auto
    method: str = "gda"
    # --density-normalise auto (None: the features as they are), and what else the taps can do
    normalise: str | None = None
    normalisations: tuple[str, ...] = ()

    def __init__(self, ctx: ConvertContext) -> None:
        self.ctx = ctx

    def data(self, recipe: DensityRecipe) -> DensityData | None:
        """The fitting and held-out data, None without labels. One policy for every task: fit on
        ``--density-data``, else on a labelled ``--calib``, else on ``--val``; hold out ``--val`` when the fit came
        from elsewhere, else the other half of the fitting set."""
        v = self.ctx.recipe.validation.val
        calib = self.ctx.recipe.quant.calib
        source = recipe.data
        if source is None and calib and self.labelled(calib):
            source = calib  # a labelled calibration set: the training data, usually
        source = source or v
        if source is None:
            return None
        flag = "--density-data" if recipe.data else ("--calib" if source != v else "--val")
        data = self.load(source, flag, recipe.max_samples)
        if v is not None and source != v:
            fit, targets = self.subset(data, None, recipe.max_samples)
            held, _ = self.subset(self.load(v, "--val", recipe.max_samples), None, None)
            return DensityData(fit, targets, held, source, str(v))
        fit, targets = self.subset(data, 0, recipe.max_samples)
        held, _ = self.subset(data, 1, None)
        return DensityData(fit, targets, held, f"{source} (every other image)", f"{source} (the other half)")

    @abstractmethod
    def labelled(self, calib: str) -> bool:
        """Whether ``--calib`` carries this task's labels (then the density is fitted on it)."""

    @abstractmethod
    def load(self, source: str, flag: str, max_samples: int) -> Any:
        """A labelled set read for the density (errors name ``flag``)."""

    @abstractmethod
    def subset(self, data: Any, half: int | None, max_samples: int | None) -> tuple[Any, np.ndarray]:
        """``(inputs, class indices)`` of ``data``: all of it (``half`` None) or one of its two deterministic halves
        (0: the fit, 1: held out), evenly thinned to ``max_samples`` (None: the taps' own cap)."""

    @abstractmethod
    def names(self, model: Any) -> list[str]:
        """The taps, in the order their features are concatenated."""

    @abstractmethod
    def widths(self, model: Any) -> list[int]:
        """The feature count of each tap, in :meth:`names` order (they sum to the features' width)."""

    @abstractmethod
    def features(self, model: Any, inputs: Any) -> np.ndarray:
        """``[N, F]`` float features of the fitting inputs."""

    @abstractmethod
    def add_outputs(self, model: Any, W: np.ndarray, keep: np.ndarray, normalise: str | None) -> Any:
        """``model`` with ``density_projection`` (the features' whitened coordinates, features @ W) from the taps
        ``keep`` marks added as an output; with ``normalise`` l2, the features instead (``density_features``), which
        the device projects."""

    @abstractmethod
    def scores(self, converted: Converted, held_out: Any) -> np.ndarray:
        """Unfamiliarity of the held-out data through a converted model."""


# -- a classifier: pooled early blocks and the penultimate features, one sample per image -----------------------

def _classifier_taps(model: Any) -> list[tuple[str, Any]]:
    """(name, pooled tensor) of each feature tap of an exported classifier: early block means, then the head's input."""
    import keras

    head = next(layer for layer in model.layers if layer.output is model.outputs[0])
    names = {layer.name for layer in model.layers}
    taps = [(n, keras.ops.mean(model.get_layer(n).output, axis=(1, 2))) for n in EARLY_TAPS if n in names]
    return taps + [("penultimate", head.input)]


def _halves(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every other file of each class for the fit, the rest held out (deterministic)."""
    fit, held = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        fit.extend(idx[0::2])
        held.extend(idx[1::2])
    return np.sort(fit), np.sort(held)


def _even(idx: np.ndarray, n: int) -> np.ndarray:
    return idx if len(idx) <= n else idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]


class ClassifierTaps(Taps):
    task_name = "classify"

    def labelled(self, calib: str) -> bool:
        if not Path(calib).is_dir():
            return False
        sub = {p.name for p in Path(calib).iterdir() if p.is_dir()}
        return bool(sub) and sub <= set(self.ctx.labels)  # class folders, each one of the model's labels

    def load(self, source: str, flag: str, max_samples: int) -> Any:
        from ..data.datasets import class_folder

        return class_folder(source, list(self.ctx.labels), flag=flag)

    def subset(self, data: Any, half: int | None, max_samples: int | None) -> tuple[Any, np.ndarray]:
        idx = np.arange(len(data.files)) if half is None else _halves(data.targets)[half]
        idx = _even(idx, HELD_OUT_MAX if max_samples is None else max_samples)
        return [data.files[i] for i in idx], data.targets[idx]

    def names(self, model: Any) -> list[str]:
        return [name for name, _ in _classifier_taps(model)]

    def widths(self, model: Any) -> list[int]:
        return [int(t.shape[-1]) for _, t in _classifier_taps(model)]

    def features(self, model: Any, inputs: Any) -> np.ndarray:
        import keras

        from edgeq.preprocess import Preprocessor, read_image

        taps = [t for _, t in _classifier_taps(model)]
        extractor = keras.Model(model.inputs, keras.ops.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0])
        pre = Preprocessor(self.ctx.spec.with_dtype("float32"))
        feats = []
        for start in range(0, len(inputs), 256):
            x = pre.batch([read_image(f) for f in inputs[start:start + 256]])
            feats.append(np.asarray(extractor.predict(x, batch_size=64, verbose=0), np.float64))
        return np.concatenate(feats)

    def add_outputs(self, model: Any, W: np.ndarray, keep: np.ndarray, normalise: str | None) -> Any:
        """The whitening as one Dense per kept tap (no bias), summed: the ``density_projection`` output (taps of
        different ranges keep their own int8 scales, where one concatenated tensor would share one)."""
        import keras

        parts, row = [], 0
        for i, (_, t) in enumerate(_classifier_taps(model)):
            width = int(t.shape[-1])
            if keep[i]:
                dense = keras.layers.Dense(W.shape[1], use_bias=False, name=f"density_projection_{i}")
                parts.append(dense(t))
                dense.set_weights([W[row:row + width]])
            row += width
        projection = parts[0] if len(parts) == 1 else keras.layers.Add(name="density_projection")(parts)
        return keras.Model(model.inputs, [*model.outputs, projection], name=model.name)

    def scores(self, converted: Converted, held_out: Any) -> np.ndarray:
        from ..evaluation.classify import run_files

        return run_files(converted.model, self.ctx.spec, held_out, converted.bound, "unfamiliarity")[1]


# -- a detector: the neck at the cells that hold known objects ----------------------------------------------------

class DetectorTaps(Taps):
    task_name = "detect"
    # the K-th nearest fitting sample: a detector's known objects are not one Gaussian per class, and on the
    # detection benchmark's detections it separates never-seen objects better (docs/detection.md)
    method = "knn"
    # --density-normalise l2 is on offer, not the default: on the detection benchmark it ranks unknown objects
    # better (AUROC 0.79 to 0.81) but flags no more of them at the 5% rule, and in the demo it flagged 15 of 96
    # known detections instead of 8 (docs/detection.md)
    normalisations = ("l2",)

    def __init__(self, ctx: ConvertContext, category_ids: list[int], origin: str) -> None:
        super().__init__(ctx)
        self.category_ids, self.origin = list(category_ids), origin

    def labelled(self, calib: str) -> bool:
        from ..data.coco import is_coco_path

        return is_coco_path(calib)

    def load(self, source: str, flag: str, max_samples: int) -> Any:
        return self._positive_cells(source, flag, max_samples)  # capped at load: cells, not images

    def subset(self, data: Any, half: int | None, max_samples: int | None) -> tuple[Any, np.ndarray]:
        part = data if half is None else _image_halves(data)[half]
        return part, part["targets"]

    def names(self, model: Any) -> list[str]:
        return [DETECTOR_TAP]

    def widths(self, model: Any) -> list[int]:
        return [int(model.get_layer(DETECTOR_TAP).output.shape[-1])]

    def features(self, model: Any, inputs: Any) -> np.ndarray:
        import keras

        extractor = keras.Model(model.inputs, model.get_layer(DETECTOR_TAP).output)
        maps = np.asarray(extractor.predict(inputs["x"], batch_size=32, verbose=0), np.float64)
        return maps.reshape(-1, maps.shape[-1])[inputs["cells"]]

    def add_outputs(self, model: Any, W: np.ndarray, keep: np.ndarray, normalise: str | None) -> Any:
        import keras

        tap = model.get_layer(DETECTOR_TAP).output
        if normalise == "l2":  # the neck itself (an int8 tensor of the graph already): the device projects it
            out = tap
        else:
            conv = keras.layers.Conv2D(W.shape[1], 1, use_bias=False, name="density_projection")
            out = conv(tap)
            conv.set_weights([W.reshape(1, 1, *W.shape)])
        return keras.Model(model.inputs, [*model.outputs, out], name=model.name)

    def scores(self, converted: Converted, held_out: Any) -> np.ndarray:
        from edgeq.runtime import quantize_values

        model, grid = converted.model, converted.bound
        t = model.input
        gcells = held_out["grid_cells"]
        out = []
        for i, x in enumerate(held_out["x"]):
            model.set_input(quantize_values(x[None], t.scale, t.zero_point, t.dtype) if t.quantized else x[None])
            model.invoke()
            cells = held_out["cells_of"][i]
            if len(cells):
                out.append(grid.density.scores(grid.raw(model), np.asarray(cells) - i * gcells))
        return np.concatenate(out) if out else np.zeros(0)

    def _positive_cells(self, source: str, flag: str, max_cells: int) -> dict[str, Any]:
        """A COCO set through the core preprocessor (float): the inputs, and each known object's positive cells
        (training's targets, converter/models/detector.py) with their class index, at most ``max_cells``."""
        from edgeq.preprocess import Preprocessor, read_image

        from ..data.coco import read_coco
        from ..models.detector import encode_targets

        coco = read_coco(source, flag=flag)
        coco.require_categories(self.category_ids, flag, self.origin)
        index = {c: i for i, c in enumerate(self.category_ids)}
        pre = Preprocessor(self.ctx.spec.with_dtype("float32"))
        grid = self.ctx.spec.height // STRIDE
        xs, cells, targets, cells_of = [], [], [], []
        for im in coco.images:
            x, tf = pre(read_image(coco.image_path(im)))
            b = coco.boxes[im["id"]] * np.array([tf.scale_x, tf.scale_y, tf.scale_x, tf.scale_y], np.float32)
            b = b + np.array([tf.pad_x, tf.pad_y, tf.pad_x, tf.pad_y], np.float32)
            cats = coco.category_ids[im["id"]]
            known = np.array([c in index for c in cats.tolist()], bool)
            cls = encode_targets(b[known], np.array([index[c] for c in cats[known].tolist()], np.int64), grid,
                                 b[~known], STRIDE)[2][..., 0].reshape(-1)
            pos = np.flatnonzero(cls >= 0)
            cells_of.append((pos + len(xs) * grid * grid).tolist())
            cells.extend(cells_of[-1])
            targets.extend(cls[pos].tolist())
            xs.append(x[0].copy())
            if len(cells) >= max_cells:
                break
        return {"x": np.stack(xs), "cells": np.asarray(cells, np.int64), "targets": np.asarray(targets, np.int64),
                "cells_of": cells_of, "grid_cells": grid * grid, "source": str(coco.path)}


def _image_halves(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Even images for the fit, odd ones held out."""
    out = []
    for part in (0, 1):
        picked = list(range(part, len(data["x"]), 2))
        g = data["grid_cells"]
        cells_of = [[c - i * g + j * g for c in data["cells_of"][i]] for j, i in enumerate(picked)]
        flat = [c for cs in cells_of for c in cs]
        lookup = {c: t for c, t in zip(data["cells"].tolist(), data["targets"].tolist())}
        targets = [lookup[c - j * g + i * g] for j, i in enumerate(picked) for c in cells_of[j]]
        out.append({"x": data["x"][picked], "cells": np.asarray(flat, np.int64),
                    "targets": np.asarray(targets, np.int64), "cells_of": cells_of, "grid_cells": g,
                    "source": data["source"]})
    return out[0], out[1]
