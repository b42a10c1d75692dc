"""Calibrating a detector's unknown objects (edgeq/unknown.py) on the known objects of ``--val``: convert never
sees an unknown object, so both thresholds are set from known ones alone.

- **Objectness threshold:** the one with the highest class-agnostic F1 on the known objects: a kept detection that
  finds a known object (IoU >= 0.5, any label) is a true positive, one that finds nothing a false positive, and a
  detection of an object of an unknown category (if ``--val`` holds any) counts as neither.
- **Unknown score:** each measure's values on the detections of known objects become its reference (sorted
  quantiles); the combined score's threshold flags ``--review-ood-rate`` of those detections.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeq.errors import DataError
from edgeq.manifest import Unknown
from edgeq.records import ScoreThresholdCalibration
from edgeq.unknown import UnknownRule

from .detect import Matched

OBJECTNESS_FLOOR = 0.05  # the lowest objectness threshold considered (and the decode floor it is chosen from)
MIN_KNOWN = 20  # detections of known objects needed to read a threshold for a 5% rate against


def best_objectness_threshold(m: Matched, objectness: np.ndarray, known_objects: int, score_threshold: float,
                              ceiling: float = 0.95) -> ScoreThresholdCalibration:
    """``m``: the matches of the detections kept at the floor (class score at ``score_threshold``, or objectness at
    ``OBJECTNESS_FLOOR``), ``objectness`` theirs. The threshold ``t`` keeps ``score >= score_threshold or
    objectness >= t``."""
    by_score = m.scores >= score_threshold
    candidates = np.unique(objectness[(objectness >= OBJECTNESS_FLOOR) & (objectness <= ceiling)])
    best = (-1.0, None, 0.0, 0.0)
    for t in candidates:
        keep = by_score | (objectness >= t)
        tp = int((keep & m.known).sum())
        fp = int((keep & ~m.matched).sum())
        f1 = 2 * tp / max(2 * tp + fp + (known_objects - tp), 1)
        if f1 > best[0]:
            best = (f1, float(t), tp / max(tp + fp, 1), tp / max(known_objects, 1))
    rule = "highest class-agnostic F1 on the known objects of --val (int8)"
    if best[1] is None:
        return ScoreThresholdCalibration(rule=rule, known_objects=known_objects)
    return ScoreThresholdCalibration(rule=rule, threshold=round(best[1], 6), f1=round(best[0], 6),
                                     precision=round(best[2], 6), recall=round(best[3], 6), known_objects=known_objects)


def calibrate_unknown(values: dict[str, np.ndarray], measures: tuple[str, ...], combine: str, ood_rate: float,
                      where: str) -> Unknown:
    """The ``unknown`` block from each measure's values on the detections of known objects of ``--val``."""
    from ..stages.density import reference_quantiles

    n = min(len(values[name]) for name in measures)
    if n < MIN_KNOWN:
        raise DataError(f"--val {where}: {n} int8 detections of known objects to calibrate the unknown-object "
                        f"score on; it needs at least {MIN_KNOWN}: give more scenes, or pass --unknown off")
    refs = []
    for name in measures:
        v = np.asarray(values[name], np.float64)
        refs.append(reference_quantiles(v[np.isfinite(v)]))
    rule = UnknownRule(measures, tuple(np.asarray(r) for r in refs), combine, float("inf"))
    scores = rule.scores({k: np.asarray(values[k], np.float64) for k in measures})
    threshold = float(np.quantile(scores, 1.0 - ood_rate))
    return Unknown(measures=measures, references=tuple(tuple(r) for r in refs), combine=combine,
                   threshold=round(threshold, 6), ood_rate=ood_rate, count=int(n),
                   calibrated_on="int8 detections matched to known objects of --val")


def describe(u: Unknown, objectness: float) -> str:
    return (f"unknown objects: a cell with objectness >= {objectness:.3f} is an object; published as 'unknown' when "
            f"the {u.combine} of the percentiles of {', '.join(u.measures)} passes {u.threshold:.4g} (flags "
            f"{u.ood_rate:.0%} of the {u.count} known detections of --val)")


def figures_of(figures: dict[str, Any]) -> str:
    """One line on what the unknown rule does on --val's known objects."""
    k = figures.get("known_objects") or {}
    return (f"known objects found {k.get('found')} of {k.get('objects')}, published as unknown "
            f"{k.get('published_unknown')}")
