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

from dataclasses import dataclass

import numpy as np

from edgeq.uncertainty import summarize


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

    def __len__(self) -> int:
        return int(len(self.scores))

    def measure(self, name: str) -> np.ndarray:
        return getattr(self, name)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def decode(objectness: np.ndarray, boxes: np.ndarray, class_logits: np.ndarray, stride: int,
           input_size: tuple[int, int], score_threshold: float = 0.3, nms_iou: float = 0.5,
           max_candidates: int = 100, max_detections: int = 50) -> Detections:
    """objectness ``[G_h, G_w]`` or ``[G_h, G_w, 1]`` logits, boxes ``[G_h, G_w, 4]`` in cells, class_logits
    ``[G_h, G_w, K, C]``; input_size ``(height, width)`` of the model input in pixels."""
    import cv2

    gh, gw = class_logits.shape[:2]
    k, c = class_logits.shape[2:]
    obj = _sigmoid(np.asarray(objectness, dtype=np.float32).reshape(gh * gw))
    logits = np.asarray(class_logits, dtype=np.float32).reshape(gh * gw, k, c)
    # cheap pre-filter on objectness before any softmax: a cell whose objectness is below the threshold cannot pass
    cand = np.flatnonzero(obj >= score_threshold)
    if cand.size > 4 * max_candidates:
        cand = cand[np.argpartition(-obj[cand], 4 * max_candidates)[: 4 * max_candidates]]
    summary = summarize(logits[cand])
    p = summary.mean  # [n, C]
    cls = p.argmax(axis=1)
    scores = obj[cand] * p[np.arange(len(cand)), cls]
    keep = scores >= score_threshold
    order = np.argsort(-scores[keep], kind="stable")[:max_candidates]
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
        std=summary.std[i, c_sel] if len(i) else np.zeros(0), samples=k,
    )
