"""Turn model outputs into detections.

``ClassificationDecoder``: top-k labels by mean probability. A deterministic head reports the entropy of its
softmax (``method: "softmax"``); a Monte-Carlo head (K posterior samples in one invoke) reports predictive
entropy, aleatoric (expected) entropy, mutual information and the label's probability spread (``method: "mc"``).
A bundle converted with labelled data also has a feature density: every result then carries its
``unfamiliarity`` and ``unfamiliarity_percentile`` (edgeq/density.py), and a classifier's result its
``density_disagreement`` (one minus the density's probability of the top label). Every result carries
``needs_review`` and ``review_reason``: *unfamiliar* (unfamiliarity above the threshold set for a false-flag rate)
and/or *ambiguous* (the uncertainty measure above its threshold), by the rule calibrated at conversion or the device
config's; ``needs_review`` is null when neither rule is known.
``GridDecoder``: edgeq's anchor-free detector (``detector.type: grid``): objectness, box distances and K x C class
logits per cell, decoded by :mod:`edgeq.detection`; every detection carries its box on the frame, the uncertainty of
the K class distributions and the unfamiliarity at its cell, and its review. A bundle that detects unknown objects
(an ``unknown`` block, edgeq/unknown.py) keeps cells by objectness too, and publishes an object of no known class as
label ``unknown`` with its ``nearest_label``.
``SSDDecoder``: the standard TFLite SSD post-processing outputs (boxes, classes, scores, count), located by name
and shape, with boxes mapped back through the preprocessing onto the frame (normalised ymin, xmin, ymax, xmax).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeq.bundle import Bundle
from edgeq.density import BoundDensity, finite_or_none
from edgeq.detection import GridSpec
from edgeq.errors import ConfigError
from edgeq.heads import HeadSpec, bind_roles
from edgeq.manifest import DENSITY_MEASURES, REVIEW_MEASURES
from edgeq.preprocess import FrameTransform
from edgeq.runtime import Model, TensorInfo
from edgeq.uncertainty import result_uncertainty, review, summarize


class Decoder(Protocol):
    """``tensors``: the outputs the decoder reads. The inference loop copies their raw values
    (``{index: array}``) and the publishing stage calls ``decode`` on them, off the inference thread."""

    tensors: list[TensorInfo]

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class ReviewPolicy:
    """How a result gets ``needs_review`` and ``review_reason`` (edgeq.uncertainty.review): the ambiguity measure
    and its threshold, and the unfamiliarity threshold. The device config overrides the bundle's calibrated rule:
    ``thresholds.review`` / ``review_measure`` the ambiguity part, ``thresholds.unfamiliar_percentile`` the
    unfamiliar part (as a percentile of the bundle's held-out in-distribution scores)."""

    measure: str
    threshold: float | None
    unfamiliar_threshold: float | None

    @classmethod
    def of(cls, bundle: Bundle, samples: int, override: tuple[str | None, float | None],
           unfamiliar_percentile: float | None = None) -> "ReviewPolicy":
        rule = bundle.manifest.head_or_dense.review
        measure = override[0] or (rule.measure if rule else None) or "predictive_entropy"
        threshold = override[1] if override[1] is not None else (rule.threshold if rule else None)
        density = bundle.manifest.density
        if measure not in REVIEW_MEASURES:
            raise ConfigError(f"thresholds.review_measure {measure!r}: choose one of {', '.join(REVIEW_MEASURES)}")
        if measure in DENSITY_MEASURES:
            if density is None or bundle.task != "classify":
                raise ConfigError(f"thresholds.review_measure {measure!r}: only a classifier converted with a density "
                                  f"has it, and {bundle.name} is not one; use predictive_entropy")
        elif samples == 1 and measure != "predictive_entropy":
            raise ConfigError(f"thresholds.review_measure {measure!r}: {bundle.name} has a deterministic head; only "
                              "predictive_entropy applies")
        if override[0] and override[1] is None and rule is not None and rule.threshold is not None \
                and override[0] != rule.measure:
            # the bundle's threshold is on its own measure's scale (an entropy in nats, a probability, ...)
            raise ConfigError(f"thresholds.review_measure {measure!r}: {bundle.name}'s calibrated threshold is for "
                              f"{rule.measure}; set thresholds.review to a threshold for {measure} as well")
        unfamiliar = rule.unfamiliar_threshold if rule is not None else None
        if unfamiliar_percentile is not None:
            if density is None:
                raise ConfigError(f"thresholds.unfamiliar_percentile: {bundle.name} has no unfamiliarity measure; "
                                  "convert it with labelled data (--val or --density-data)")
            unfamiliar = float(np.percentile(np.asarray(density.reference), unfamiliar_percentile))
        return cls(measure, threshold, unfamiliar)

    def apply(self, item: dict[str, Any], ambiguity: float, unfamiliarity: float | None,
              bound: BoundDensity | None) -> dict[str, Any]:
        """Add the unfamiliarity (and its percentile) to ``item['uncertainty']``, and the review fields."""
        value = finite_or_none(unfamiliarity) if unfamiliarity is not None and bound is not None else None
        if value is not None:  # a non-finite score is never published: the keys stay out, review() flags it
            item["uncertainty"]["unfamiliarity"] = value
            item["uncertainty"]["unfamiliarity_percentile"] = round(
                float(bound.density.percentile(np.array([unfamiliarity]))[0]), 2)
        r = review(ambiguity, self.threshold, unfamiliarity, self.unfamiliar_threshold)
        item["needs_review"], item["review_reason"] = r.flag, r.reason
        return item


class ClassificationDecoder:
    """Top-k labels of one image, with the image's uncertainty and review."""

    def __init__(self, model: Model, bundle: Bundle, top_k: int = 3, policy: ReviewPolicy | None = None) -> None:
        spec = HeadSpec.from_manifest(bundle.manifest)
        self.head = spec.bind(model, bundle.manifest.outputs, bundle.where, bundle.manifest.density)
        self.labels = bundle.labels
        self.top_k = max(1, min(top_k, len(self.labels)))
        self.tensors = self.head.all_tensors
        self.policy = policy or ReviewPolicy.of(bundle, spec.samples, (None, None))

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]:
        summary = summarize(self.head.sample_logits(raw)[None])
        p = summary.mean[0]
        order = np.argsort(-p, kind="stable")[: self.top_k]
        uncertainty = result_uncertainty(summary, (0,))
        unfamiliarity, disagreement = self.head.density_measures(raw, int(order[0]))
        published = None if disagreement is None else finite_or_none(disagreement)
        if published is not None:  # like unfamiliarity: a non-finite value is left out, and flags the result
            uncertainty["density_disagreement"] = published
        if self.policy.measure in DENSITY_MEASURES:
            ambiguity = np.nan if disagreement is None else disagreement  # unknown: flagged, never trusted
        else:
            ambiguity = float(summary.measure(self.policy.measure)[0])
        out = []
        for c in order:
            u = dict(uncertainty)
            if summary.samples > 1:
                u["std"] = round(float(summary.std[0, c]), 6)
            item = {"label": self.labels[int(c)], "class_id": int(c), "score": round(float(p[c]), 6), "uncertainty": u}
            out.append(self.policy.apply(item, ambiguity, unfamiliarity, self.head.density))
        return out


def box_fields(box: np.ndarray, transform: FrameTransform) -> dict[str, Any]:
    """A detection's box three ways: ``bbox`` (x_min, y_min, x_max, y_max normalised to the frame), ``bbox_px``
    (the same in the frame's pixels) and the deprecated ``box`` array (TFLite's order: ymin, xmin, ymax, xmax;
    kept for schema 3 only)."""
    ymin, xmin, ymax, xmax = (round(float(v), 6) for v in box)
    w, h = transform.frame_width, transform.frame_height
    return {
        "bbox": {"x_min": xmin, "y_min": ymin, "x_max": xmax, "y_max": ymax},
        "bbox_px": {"x_min": int(round(xmin * w)), "y_min": int(round(ymin * h)), "x_max": int(round(xmax * w)),
                    "y_max": int(round(ymax * h))},
        "box": [ymin, xmin, ymax, xmax],
    }


class GridDecoder:
    """edgeq's grid detector: detections with their boxes on the frame, the uncertainty of the K class
    distributions and the unfamiliarity at their cell, and their review. score_threshold and nms_iou: None keeps
    the bundle's ``detector.score_threshold`` and ``detector.nms_iou``."""

    def __init__(self, model: Model, bundle: Bundle, score_threshold: float | None = None,
                 policy: ReviewPolicy | None = None, nms_iou: float | None = None) -> None:
        spec = GridSpec.from_manifest(bundle.manifest, bundle.where)
        if nms_iou is not None:
            spec = dataclasses.replace(spec, nms_iou=nms_iou)
        self.spec = spec
        self.grid = spec.bind(model, bundle.manifest.outputs, bundle.where, bundle.manifest.density,
                              bundle.manifest.unknown)
        self.labels = bundle.labels
        self.tensors = self.grid.all_tensors
        self.score_threshold = spec.score_threshold if score_threshold is None else score_threshold
        self.input_size = (bundle.manifest.input.height, bundle.manifest.input.width)
        self.policy = policy or ReviewPolicy.of(bundle, spec.samples, (None, None))

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]:
        d = self.grid.decode(raw, self.input_size, self.score_threshold)
        d, frame_boxes = d.on_frame(transform)
        mc = d.samples > 1
        values = d.measure(self.policy.measure)
        out = []
        for i in range(len(d)):
            u: dict[str, Any] = {"method": "mc" if mc else "softmax",
                                 "predictive_entropy": round(float(d.predictive_entropy[i]), 6)}
            if mc:
                u.update(samples=d.samples, aleatoric=round(float(d.aleatoric[i]), 6),
                         mutual_information=round(float(d.mutual_information[i]), 6), std=round(float(d.std[i]), 6))
            c = int(d.classes[i])
            item = {"label": self.labels[c], "class_id": c, "score": round(float(d.scores[i]), 6),
                    "objectness": round(float(d.objectness[i]), 6), **box_fields(frame_boxes[i], transform),
                    "uncertainty": u}
            unfamiliarity = float(d.unfamiliarity[i]) if d.unfamiliarity is not None else None
            item = self.policy.apply(item, float(values[i]), unfamiliarity, self.grid.density)
            if d.unknown_score is not None:
                mark_unknown(item, float(d.unknown_score[i]), bool(d.unknown[i]))
            out.append(item)
        return out


def mark_unknown(item: dict[str, Any], score: float, unknown: bool) -> dict[str, Any]:
    """A detection of a bundle that detects unknown objects: its unknown score, and when it passes the bundle's
    threshold, label ``unknown`` with the nearest known class beside it (``class_id`` stays that class's index,
    so a subscriber of schema 3 that reads only class_id still gets a class), flagged for review as unknown."""
    value = finite_or_none(score)
    if value is not None:
        item["uncertainty"]["unknown_score"] = value
    if unknown or value is None:
        item["nearest_label"] = item["label"]
        item["label"] = "unknown"
        item["needs_review"], item["review_reason"] = True, "unknown"
    return item


SSD_ROLES = ("boxes", "classes", "scores", "count")


class SSDDecoder:
    """Outputs of TFLite_Detection_PostProcess: boxes [1, N, 4], classes [1, N], scores [1, N], count [1]."""

    def __init__(self, model: Model, bundle: Bundle, score_threshold: float = 0.5) -> None:
        self.labels = bundle.labels
        self.threshold = score_threshold
        self.tensors = bind_roles(model, bundle.manifest.outputs, SSD_ROLES, "an SSD detect bundle (boxes, classes, "
                                  "scores, count)", bundle.where)
        self.boxes, self.classes, self.scores, self.count = self.tensors

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
    on_frame = transform.visible(frame_boxes)
    frame_boxes, classes, scores = frame_boxes[on_frame], classes[keep][on_frame], scores[keep][on_frame]
    out = []
    for box, c, s in zip(frame_boxes, classes, scores):
        label = labels[int(c)] if 0 <= int(c) < len(labels) else str(int(c))
        out.append({
            "label": label, "class_id": int(c), "score": round(float(s), 6), **box_fields(box, transform),
            "uncertainty": None, "needs_review": None,
        })
    return out


def make_decoder(model: Model, bundle: Bundle, score_threshold: float | None, top_k: int,
                 review: tuple[str | None, float | None] = (None, None), nms_iou: float | None = None,
                 unfamiliar_percentile: float | None = None) -> Decoder:
    samples = bundle.manifest.head_or_dense.samples
    if bundle.task == "classify":
        return ClassificationDecoder(model, bundle, top_k, ReviewPolicy.of(bundle, samples, review,
                                                                            unfamiliar_percentile))
    if bundle.manifest.detector is not None:
        return GridDecoder(model, bundle, score_threshold,
                           ReviewPolicy.of(bundle, samples, review, unfamiliar_percentile), nms_iou)
    return SSDDecoder(model, bundle, score_threshold if score_threshold is not None else 0.5)
