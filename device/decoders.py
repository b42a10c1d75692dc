"""Turn model outputs into detections.

``ClassificationDecoder``: top-k labels by mean probability. A deterministic head reports the entropy of its
softmax (``method: "softmax"``); a Monte-Carlo head (K posterior samples in one invoke) reports predictive
entropy, aleatoric (expected) entropy, mutual information and the label's probability spread (``method: "mc"``).
Every result carries ``needs_review``: the uncertainty exceeds the threshold calibrated at conversion (or set in
the device config); null when neither gives one.
``GridDecoder``: edgeq's anchor-free detector (``detector.type: grid``): objectness, box distances and K x C class
logits per cell, decoded with class-aware NMS by :mod:`edgeq.detection`; every detection carries its box on the
frame and the uncertainty of the K class distributions at its cell, and ``needs_review``.
``SSDDecoder``: the standard TFLite SSD post-processing outputs (boxes, classes, scores, count), located by name
and shape, with boxes mapped back through the preprocessing onto the frame (normalised ymin, xmin, ymax, xmax).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edgeq.bundle import Bundle
from edgeq.detection import GridSpec
from edgeq.errors import BundleError, ConfigError
from edgeq.heads import HeadSpec
from edgeq.preprocess import FrameTransform
from edgeq.runtime import Model, TensorInfo
from edgeq.uncertainty import MEASURES, needs_review, result_uncertainty, summarize


class Decoder(Protocol):
    """``tensors``: the outputs the decoder reads. The inference loop copies their raw values
    (``{index: array}``) and the publishing stage calls ``decode`` on them, off the inference thread."""

    tensors: list[TensorInfo]

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]: ...


class ClassificationDecoder:
    """review: ``(measure, threshold)`` from the device config, overriding the bundle's calibrated rule."""

    def __init__(self, model: Model, bundle: Bundle, top_k: int = 3,
                 review: tuple[str | None, float | None] = (None, None)) -> None:
        where = str(bundle.path)
        spec = HeadSpec.from_manifest(bundle.manifest, where)
        if spec.classes != len(bundle.labels):
            raise BundleError(f"{where}: head has {spec.classes} classes but the bundle has {len(bundle.labels)} labels")
        self.head = spec.bind(model, bundle.manifest["outputs"], where)
        self.labels = bundle.labels
        self.top_k = max(1, min(top_k, len(self.labels)))
        self.tensors = self.head.tensors
        rule = spec.review or {}
        self.review_measure = review[0] or rule.get("measure") or "predictive_entropy"
        self.review_threshold = review[1] if review[1] is not None else rule.get("threshold")
        if self.review_measure not in MEASURES:
            raise ConfigError(f"thresholds.review_measure {self.review_measure!r}: choose one of {', '.join(MEASURES)}")
        if spec.samples == 1 and self.review_measure != "predictive_entropy":
            raise ConfigError(f"thresholds.review_measure {self.review_measure!r}: {bundle.name} has a deterministic "
                              "head; only predictive_entropy applies")

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]:
        summary = summarize(self.head.sample_logits(raw)[None])
        p = summary.mean[0]
        order = np.argsort(-p, kind="stable")[: self.top_k]
        uncertainty = result_uncertainty(summary, (0,))
        flag = needs_review(float(summary.measure(self.review_measure)[0]), self.review_threshold)
        out = []
        for c in order:
            u = dict(uncertainty)
            if summary.samples > 1:
                u["std"] = round(float(summary.std[0, c]), 6)
            out.append({"label": self.labels[int(c)], "class_id": int(c), "score": round(float(p[c]), 6),
                        "uncertainty": u, "needs_review": flag})
        return out


class GridDecoder:
    """review: ``(measure, threshold)`` from the device config, overriding the bundle's calibrated rule;
    score_threshold: None keeps the bundle's ``detector.score_threshold``."""

    def __init__(self, model: Model, bundle: Bundle, score_threshold: float | None = None,
                 review: tuple[str | None, float | None] = (None, None)) -> None:
        where = str(bundle.path)
        self.spec = GridSpec.from_manifest(bundle.manifest, where)
        self.grid = self.spec.bind(model, bundle.manifest["outputs"], where)
        self.labels = bundle.labels
        self.tensors = self.grid.tensors
        self.score_threshold = self.spec.score_threshold if score_threshold is None else score_threshold
        spec = bundle.preprocess_spec
        self.input_size = (spec.height, spec.width)
        rule = (bundle.manifest.get("head") or {}).get("review") or {}
        self.review_measure = review[0] or rule.get("measure") or "predictive_entropy"
        self.review_threshold = review[1] if review[1] is not None else rule.get("threshold")
        if self.review_measure not in MEASURES:
            raise ConfigError(f"thresholds.review_measure {self.review_measure!r}: choose one of {', '.join(MEASURES)}")
        if self.spec.samples == 1 and self.review_measure != "predictive_entropy":
            raise ConfigError(f"thresholds.review_measure {self.review_measure!r}: {bundle.name} has a deterministic "
                              "class head; only predictive_entropy applies")

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]:
        d = self.grid.decode(raw, self.input_size, self.score_threshold)
        frame_boxes = transform.boxes_to_frame(d.boxes)
        mc = d.samples > 1
        values = d.measure(self.review_measure)
        out = []
        for i in range(len(d)):
            u: dict[str, Any] = {"method": "mc" if mc else "softmax",
                                 "predictive_entropy": round(float(d.predictive_entropy[i]), 6)}
            if mc:
                u.update(samples=d.samples, aleatoric=round(float(d.aleatoric[i]), 6),
                         mutual_information=round(float(d.mutual_information[i]), 6), std=round(float(d.std[i]), 6))
            c = int(d.classes[i])
            out.append({
                "label": self.labels[c], "class_id": c, "score": round(float(d.scores[i]), 6),
                "objectness": round(float(d.objectness[i]), 6),
                "box": [round(float(v), 6) for v in frame_boxes[i]], "uncertainty": u,
                "needs_review": needs_review(float(values[i]), self.review_threshold),
            })
        return out


class SSDDecoder:
    """Outputs of TFLite_Detection_PostProcess: boxes [1, N, 4], classes [1, N], scores [1, N], count [1]."""

    def __init__(self, model: Model, bundle: Bundle, score_threshold: float = 0.5) -> None:
        self.labels = bundle.labels
        self.threshold = score_threshold
        by_role = {o.get("role"): o for o in bundle.manifest["outputs"]}
        self.boxes, self.classes, self.scores, self.count = (
            self._find(model, by_role, role) for role in ("boxes", "classes", "scores", "count")
        )
        self.tensors = [self.boxes, self.classes, self.scores, self.count]

    @staticmethod
    def _find(model: Model, by_role: dict[str | None, dict[str, Any]], role: str) -> TensorInfo:
        spec = by_role.get(role)
        if spec is None:
            raise BundleError(f"manifest outputs have no '{role}' entry; a detect bundle needs boxes, classes, scores, count")
        return model.find_output(spec.get("name"), spec.get("shape"))

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]:
        values = [t.dequantize(raw[t.index]) for t in self.tensors]
        return decode_ssd(*values, transform, self.labels, self.threshold)


def decode_ssd(
    boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray, count: np.ndarray, transform: FrameTransform,
    labels: list[str], threshold: float,
) -> list[dict[str, Any]]:
    n = int(np.asarray(count).reshape(-1)[0])
    boxes = np.asarray(boxes).reshape(-1, 4)[:n]
    classes = np.asarray(classes).reshape(-1)[:n].astype(np.int64)
    scores = np.asarray(scores).reshape(-1)[:n]
    keep = scores >= threshold
    frame_boxes = transform.boxes_to_frame(boxes[keep])
    out = []
    for box, c, s in zip(frame_boxes, classes[keep], scores[keep]):
        label = labels[int(c)] if 0 <= int(c) < len(labels) else str(int(c))
        out.append({
            "label": label, "class_id": int(c), "score": round(float(s), 6),
            "box": [round(float(v), 6) for v in box], "uncertainty": None, "needs_review": None,
        })
    return out


def make_decoder(model: Model, bundle: Bundle, score_threshold: float | None, top_k: int,
                 review: tuple[str | None, float | None] = (None, None)) -> Decoder:
    if bundle.task == "classify":
        return ClassificationDecoder(model, bundle, top_k, review)
    if bundle.task == "detect" and (bundle.manifest.get("detector") or {}).get("type") == "grid":
        return GridDecoder(model, bundle, None if score_threshold is None else score_threshold, review)
    if bundle.task == "detect":
        return SSDDecoder(model, bundle, score_threshold if score_threshold is not None else 0.5)
    raise BundleError(f"{bundle.path}: task {bundle.task!r} has no decoder in this edgeq")
