"""Turn model outputs into detections.

``ClassificationDecoder``: top-k labels with softmax scores, and the softmax entropy as uncertainty.
``SSDDecoder``: the standard TFLite SSD post-processing outputs (boxes, classes, scores, count), located by name
and shape, with boxes mapped back through the preprocessing onto the frame (normalised ymin, xmin, ymax, xmax).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edgeq.bundle import Bundle
from edgeq.errors import BundleError
from edgeq.preprocess import FrameTransform
from edgeq.runtime import Model, TensorInfo
from edgeq.uncertainty import entropy, softmax


class Decoder(Protocol):
    """``tensors``: the outputs the decoder reads. The inference loop copies their raw values
    (``{index: array}``) and the publishing stage calls ``decode`` on them, off the inference thread."""

    tensors: list[TensorInfo]

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]: ...


class ClassificationDecoder:
    def __init__(self, model: Model, bundle: Bundle, top_k: int = 3) -> None:
        spec = bundle.manifest["outputs"][0]
        self.output: TensorInfo = model.find_output(spec["name"], spec["shape"])
        self.labels = bundle.labels
        self.top_k = max(1, min(top_k, len(self.labels)))
        self.tensors = [self.output]

    def decode(self, raw: dict[int, np.ndarray], transform: FrameTransform) -> list[dict[str, Any]]:
        logits = self.output.dequantize(raw[self.output.index]).reshape(-1)
        p = softmax(logits)
        order = np.argsort(-p)[: self.top_k]
        h = float(entropy(p))
        uncertainty = {"method": "softmax", "predictive_entropy": round(h, 6)}
        return [
            {"label": self.labels[int(c)], "class_id": int(c), "score": round(float(p[c]), 6), "uncertainty": uncertainty}
            for c in order
        ]


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
            "box": [round(float(v), 6) for v in box], "uncertainty": None,
        })
    return out


def make_decoder(model: Model, bundle: Bundle, score_threshold: float, top_k: int) -> Decoder:
    if bundle.task == "classify":
        return ClassificationDecoder(model, bundle, top_k)
    if bundle.task == "detect":
        return SSDDecoder(model, bundle, score_threshold)
    raise BundleError(f"{bundle.path}: task {bundle.task!r} has no decoder in this edgeq")
