"""Decoding edgeq's anchor-free detector (numpy, NMS by OpenCV): shared by the device, ``convert --val`` and eval.

The detector (converter/detect.py) predicts on a grid of ``stride``-pixel cells, per cell:

- ``objectness``: one logit, ``sigmoid`` is the probability that an object's centre region covers the cell;
- ``boxes``: four distances ``(left, top, right, bottom)`` from the cell centre to the box sides, in cells;
- class logits: ``[K, C]`` per cell, K posterior samples of a Bayesian 1x1 layer fused into one int8 conv
  (K = 1 for a deterministic class head).

Decoding keeps cells whose score ``sigmoid(objectness) * max_c p(c)`` (p the mean over samples) passes the
threshold, at most ``max_candidates`` of them (highest first), turns them into boxes, runs class-aware NMS
(``cv2.dnn.NMSBoxesBatched``) and computes each surviving detection's uncertainty from the K class
distributions at its cell: predictive entropy, aleatoric entropy, mutual information and the std of its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edgeq.density import BoundDensity, bind_density
from edgeq.errors import BundleError
from edgeq.heads import BoundOutputs, bind_roles
from edgeq.manifest import Density, Detector, Head, Manifest, OutputSpec, Unknown
from edgeq.runtime import Model, TensorInfo
from edgeq.uncertainty import summarize
from edgeq.unknown import UnknownRule, energy

if TYPE_CHECKING:
    from edgeq.preprocess import FrameTransform

GRID_ROLES = ("objectness", "boxes", "class_logits")
# the centred layout adds each sample's deviation from the posterior-mean logits, with its own int8 scale
CENTRED_ROLES = (*GRID_ROLES, "class_residuals")


@dataclass(frozen=True)
class Detections:
    """Per detection: ``boxes`` ``[N, 4]`` (ymin, xmin, ymax, xmax) normalised to the model input, ``classes``,
    ``scores``, ``objectness``, mean class ``probabilities`` ``[N, C]`` and the uncertainty measures ``[N]``."""

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    objectness: np.ndarray
    probabilities: np.ndarray
    predictive_entropy: np.ndarray
    aleatoric: np.ndarray
    mutual_information: np.ndarray
    std: np.ndarray
    samples: int
    cells: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the grid cell of each detection
    unfamiliarity: np.ndarray | None = None  # [N] when the bundle has a density (edgeq/density.py)
    energy: np.ndarray | None = None  # [N] -logsumexp of the mean class logits (edgeq/unknown.py)
    unknown_score: np.ndarray | None = None  # [N] when the bundle has an unknown block (edgeq/unknown.py)
    unknown: np.ndarray | None = None  # [N] bool: published as label "unknown"

    @property
    def class_doubt(self) -> np.ndarray:
        """``-log`` of the top class's mean probability (edgeq/unknown.py)."""
        from edgeq.unknown import class_doubt

        return class_doubt(self.probabilities) if len(self) else np.zeros(0)

    @property
    def objectness_doubt(self) -> np.ndarray:
        """``-log`` of the objectness (edgeq/unknown.py)."""
        from edgeq.unknown import objectness_doubt

        return objectness_doubt(self.objectness)

    def __len__(self) -> int:
        return int(len(self.scores))

    def take(self, keep: np.ndarray) -> "Detections":
        """The detections ``keep`` selects (a bool mask or indices), every per-detection field alike."""
        n = len(self)
        per_detection = {f.name: getattr(self, f.name)[keep] for f in fields(self)
                         if isinstance(getattr(self, f.name), np.ndarray) and len(getattr(self, f.name)) == n}
        return replace(self, **per_detection)

    def on_frame(self, transform: "FrameTransform") -> tuple["Detections", np.ndarray]:
        """The detections that are on the frame, and their boxes mapped onto it (normalised): a box in the
        letterbox padding has no pixel of the frame left (:meth:`FrameTransform.visible`) and is dropped. What the
        device publishes, and so what ``edgeq eval`` counts."""
        boxes = transform.boxes_to_frame(self.boxes)
        keep = transform.visible(boxes)
        return self.take(keep), boxes[keep]

    def measure(self, name: str) -> np.ndarray:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"no {name} in these detections (the bundle has no density)")
        return value


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def decode(objectness: np.ndarray, boxes: np.ndarray, class_logits: np.ndarray, stride: int,
           input_size: tuple[int, int], score_threshold: float = 0.3, nms_iou: float = 0.5,
           max_candidates: int = 100, max_detections: int = 50,
           objectness_threshold: float | None = None) -> Detections:
    """objectness ``[G_h, G_w]`` or ``[G_h, G_w, 1]`` logits, boxes ``[G_h, G_w, 4]`` in cells, class_logits
    ``[G_h, G_w, K, C]``; input_size ``(height, width)`` of the model input in pixels. With
    ``objectness_threshold`` a cell is also kept when its objectness alone passes it (an object of no known class
    has one, but not a class score), candidates are ranked by objectness and NMS is class-agnostic (an unknown
    object's cells need not agree on a class)."""
    import cv2

    gh, gw = class_logits.shape[:2]
    k, c = class_logits.shape[2:]
    obj = _sigmoid(np.asarray(objectness, dtype=np.float32).reshape(gh * gw))
    logits = np.asarray(class_logits, dtype=np.float32).reshape(gh * gw, k, c)
    open_set = objectness_threshold is not None
    floor = min(score_threshold, objectness_threshold) if open_set else score_threshold
    # cheap pre-filter on objectness before any softmax: a cell whose objectness is below the threshold cannot pass
    cand = np.flatnonzero(obj >= floor)
    if cand.size > 4 * max_candidates:
        cand = cand[np.argpartition(-obj[cand], 4 * max_candidates)[: 4 * max_candidates]]
    summary = summarize(logits[cand])
    p = summary.mean  # [n, C]
    cls = p.argmax(axis=1)
    scores = obj[cand] * p[np.arange(len(cand)), cls]
    keep = scores >= score_threshold
    rank = scores
    if open_set:
        keep |= obj[cand] >= objectness_threshold
        rank = obj[cand]
    order = np.argsort(-rank[keep], kind="stable")[:max_candidates]
    idx = np.flatnonzero(keep)[order]
    cells = cand[idx]
    cy = (cells // gw + 0.5) * stride
    cx = (cells % gw + 0.5) * stride
    d = np.asarray(boxes, dtype=np.float32).reshape(gh * gw, 4)[cells] * stride
    h, w = input_size
    x0 = np.clip(cx - d[:, 0], 0, w)
    y0 = np.clip(cy - d[:, 1], 0, h)
    x1 = np.clip(cx + d[:, 2], 0, w)
    y1 = np.clip(cy + d[:, 3], 0, h)
    ok = (x1 - x0 > 1) & (y1 - y0 > 1)
    sel = np.flatnonzero(ok)
    if sel.size:
        rects = np.stack([x0[sel], y0[sel], x1[sel] - x0[sel], y1[sel] - y0[sel]], axis=1).astype(np.float32)
        if open_set:
            kept = cv2.dnn.NMSBoxes(rects.tolist(), rank[idx][sel].astype(float).tolist(), 0.0, nms_iou)
        else:
            kept = cv2.dnn.NMSBoxesBatched(rects.tolist(), scores[idx][sel].astype(float).tolist(),
                                           cls[idx][sel].astype(int).tolist(), score_threshold, nms_iou)
        sel = sel[np.asarray(kept, dtype=np.int64).reshape(-1)][:max_detections]
    i = idx[sel]
    out_boxes = np.stack([y0[sel] / h, x0[sel] / w, y1[sel] / h, x1[sel] / w], axis=1) if sel.size else np.zeros((0, 4))
    c_sel = cls[i]
    return Detections(
        boxes=out_boxes.astype(np.float32), classes=c_sel.astype(np.int64), scores=scores[i].astype(np.float32),
        objectness=obj[cand][i].astype(np.float32), probabilities=p[i],
        predictive_entropy=summary.predictive_entropy[i], aleatoric=summary.aleatoric[i],
        mutual_information=summary.mutual_information[i],
        std=summary.std[i, c_sel] if len(i) else np.zeros(0), samples=k, cells=cand[i].astype(np.int64),
        energy=energy(logits[cand][i]) if len(i) else np.zeros(0),
    )


@dataclass(frozen=True)
class GridSpec:
    """The manifest's ``detector`` block of a grid detector (``"type": "grid"``) with its head's K and C:
    ``stride`` (pixels per cell), ``grid`` ``[G_h, G_w]``, ``category_ids`` (COCO id of each class index),
    ``score_threshold``, ``nms_iou``, ``max_candidates``, ``max_detections``."""

    stride: int
    grid: tuple[int, int]
    samples: int
    classes: int
    category_ids: tuple[int, ...]
    layout: str = "stacked"  # stacked: class_logits holds K*C; centred: class_logits C (mean) + class_residuals K*C
    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_candidates: int = 100
    max_detections: int = 50
    objectness_threshold: float | None = None  # unknown objects: keep a cell by objectness alone too

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str = "manifest") -> "GridSpec":
        if manifest.detector is None:
            raise BundleError(f"{where}: no grid 'detector' block; this is not an edgeq grid detector")
        return cls.from_blocks(manifest.detector, manifest.head_or_dense, len(manifest.labels))

    @classmethod
    def from_blocks(cls, det: Detector, head: Head, labels: int) -> "GridSpec":
        return cls(det.stride, det.grid, head.samples, head.classes or labels, det.category_ids, head.layout,
                   det.score_threshold, det.nms_iou, det.max_candidates, det.max_detections, det.objectness_threshold)

    @property
    def roles(self) -> tuple[str, ...]:
        return CENTRED_ROLES if self.layout == "centred" else GRID_ROLES

    def channels(self, role: str) -> int:
        kc = self.samples * self.classes
        return {"objectness": 1, "boxes": 4, "class_logits": self.classes if self.layout == "centred" else kc,
                "class_residuals": kc}[role]

    def bind(self, model: Model, outputs: Sequence[OutputSpec], where: str = "manifest",
             density: Density | None = None, unknown: Unknown | None = None) -> "BoundGrid":
        tensors = bind_roles(model, outputs, self.roles, "a grid detector", where)
        for role, t in zip(self.roles, tensors):
            want = (1, *self.grid, self.channels(role))
            if tuple(int(d) for d in t.shape) != want:
                raise BundleError(f"{where}: output {role!r} has shape {list(t.shape)}, expected {list(want)}")
        rule = None if unknown is None else UnknownRule.from_block(unknown)
        return BoundGrid(self, tensors, bind_density(density, model, list(outputs), where), rule)


@dataclass(frozen=True)
class BoundGrid(BoundOutputs):
    """A grid spec with the model's objectness, boxes and class tensors."""

    spec: GridSpec
    unknown: UnknownRule | None = None

    def decode(self, raw: dict[int, np.ndarray], input_size: tuple[int, int],
               score_threshold: float | None = None) -> Detections:
        """Decode raw (possibly quantised) output values keyed by tensor index; with a density, each detection's
        unfamiliarity at its cell; with an unknown rule, its unknown score and whether it is an unknown object."""
        s = self.spec
        obj, box = (t.dequantize(raw[t.index]) for t in self.tensors[:2])
        gh, gw = s.grid
        d = decode(obj.reshape(gh, gw), box.reshape(gh, gw, 4), self.class_samples(raw).reshape(gh, gw, s.samples, s.classes),
                   s.stride, input_size, s.score_threshold if score_threshold is None else score_threshold,
                   s.nms_iou, s.max_candidates, s.max_detections, s.objectness_threshold)
        if self.density is not None:
            d = replace(d, unfamiliarity=self.density.scores(raw, d.cells))
        if self.unknown is not None:
            scores = self.unknown.scores(unknown_measures(d))
            d = replace(d, unknown_score=scores, unknown=self.unknown.flags(scores))
        return d

    def class_samples(self, raw: dict[int, np.ndarray]) -> np.ndarray:
        """``[G_h * G_w, K, C]`` float class logits of every cell."""
        s = self.spec
        cells = s.grid[0] * s.grid[1]
        first = self.tensors[2].dequantize(raw[self.tensors[2].index])
        if s.layout != "centred":
            return first.reshape(cells, s.samples, s.classes)
        residuals = self.tensors[3].dequantize(raw[self.tensors[3].index])
        return first.reshape(cells, 1, s.classes) + residuals.reshape(cells, s.samples, s.classes)

    def read(self, model: Model, input_size: tuple[int, int], score_threshold: float | None = None) -> Detections:
        """Detections of the model's last invoke."""
        return self.decode(self.raw(model), input_size, score_threshold)


def unknown_measures(d: Detections) -> dict[str, np.ndarray]:
    """Every measure an unknown rule can read (edgeq/unknown.py), per detection."""
    out = {"class_doubt": d.class_doubt, "energy": d.energy, "mutual_information": d.mutual_information,
           "objectness_doubt": d.objectness_doubt}
    if d.unfamiliarity is not None:
        out["unfamiliarity"] = d.unfamiliarity
    return out


def describe_grid_outputs(model: Model, signature_order: list[int] | None = None,
                          layout: str = "stacked", extra_roles: tuple[str, ...] = ()) -> list[OutputSpec]:
    """The manifest's ``outputs`` of a converted grid detector (objectness, boxes, class logits and, for the
    centred layout, class residuals, then ``extra_roles`` such as the density's projection), taken in the source
    model's output order from the TFLite signature (``output_0``, ``output_1``, ...) when ``signature_order``
    (their tensor indices) is given, else, without extra roles, by channel count."""
    roles = (*(CENTRED_ROLES if layout == "centred" else GRID_ROLES), *extra_roles)
    by_index = {t.index: t for t in model.outputs}
    if signature_order is not None and all(i in by_index for i in signature_order) and len(signature_order) == len(roles):
        found = [by_index[i] for i in signature_order]
    else:
        found = sorted(model.outputs, key=lambda t: int(t.shape[-1]))
        if extra_roles or len(found) != len(roles) or int(found[0].shape[-1]) != 1 or int(found[1].shape[-1]) != 4:
            have = ", ".join(f"{t.name} {list(t.shape)}" for t in model.outputs)
            raise BundleError(f"converted model outputs ({have}) do not fit a {layout} grid detector")
    return [OutputSpec(role=role, **t.to_dict()) for role, t in zip(roles, found)]


def signature_outputs(model: Model) -> list[int] | None:
    """Tensor indices of the serving signature's outputs ``output_0, output_1, ...`` (the Keras output order)."""
    try:
        sigs = model.interpreter._get_full_signature_list()  # the runtimes' own accessor of the index map
    except AttributeError:
        return None
    if len(sigs) != 1:
        return None
    outs = next(iter(sigs.values())).get("outputs", {})
    try:
        return [int(outs[f"output_{i}"]) for i in range(len(outs))]
    except KeyError:
        return None
