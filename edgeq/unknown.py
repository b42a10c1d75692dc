"""Unknown objects: a detection of an object that is none of the detector's classes.

A detector that keeps only what it scores as a known class hides such objects: its score is objectness times the
top class probability, and on an object of no known class the classes disagree, so the score falls under the
threshold while the objectness does not. A bundle with an ``unknown`` block keeps every cell whose objectness
passes ``detector.objectness_threshold`` (calibrated on the known objects of ``--val``) as an object, and judges
each detection by the evidence it carries that its object is none of the known classes:

- ``class_doubt``: ``-log max_c p(c)``, the gap between "there is an object" and "it is one of my classes" (p the
  mean over the K posterior samples);
- ``objectness_doubt``: ``-log objectness``: the objectness head learns "an object" from known objects only, and
  fires less surely on one of no known class;
- ``energy``: ``-logsumexp`` of the mean class logits (Liu et al. 2020): low where some class fires strongly;
- ``mutual_information``: the posterior samples' disagreement;
- ``unfamiliarity``: the feature density at the detection's cell (edgeq/density.py).

Each measure becomes its percentile among the same measure on the known detections of ``--val``, and the
percentiles are combined into one ``unknown_score`` (``combine``): ``max`` (the most extreme measure decides) or
``fisher`` (``-sum log(1 - percentile)``, so two measures moderately in their tails add up). The detection is
published as ``label: "unknown"`` when the score passes ``threshold``, set so that ``ood_rate`` of the known
detections of ``--val`` pass it; its nearest known class stays beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEASURES = ("class_doubt", "energy", "mutual_information", "unfamiliarity", "objectness_doubt")
COMBINES = ("max", "fisher")
# percentiles are read with this resolution: the tail of -log(1 - p) stays finite
TAIL = 1e-3


@dataclass(frozen=True)
class UnknownRule:
    """The ``unknown`` block of a manifest, ready for numpy."""

    measures: tuple[str, ...]
    references: tuple[np.ndarray, ...]  # per measure: sorted values on the known detections of --val
    combine: str
    threshold: float

    @classmethod
    def from_block(cls, block: "object") -> "UnknownRule":
        return cls(tuple(block.measures), tuple(np.asarray(r, np.float64) for r in block.references),
                   block.combine, float(block.threshold))

    def percentiles(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """``[M, N]``: each measure's share of the reference at or below each value (0..1); a missing or
        non-finite value counts as the most extreme."""
        out = []
        for name, ref in zip(self.measures, self.references):
            v = np.asarray(values[name], np.float64)
            p = np.interp(v, ref, np.linspace(0.0, 1.0, len(ref)), left=0.0, right=1.0)
            out.append(np.where(np.isfinite(v), p, 1.0))
        return np.asarray(out).reshape(len(self.measures), -1)

    def scores(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """``[N]`` unknown scores (higher: less like a known object)."""
        return combine(self.percentiles(values), self.combine)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


def combine(percentiles: np.ndarray, how: str) -> np.ndarray:
    """``[M, N]`` percentiles (0..1) -> ``[N]`` scores: their maximum, or Fisher's ``-sum log(1 - p)``."""
    p = np.asarray(percentiles, np.float64)
    if how == "max":
        return p.max(axis=0)
    return -np.log(np.clip(1.0 - p, TAIL, 1.0)).sum(axis=0)


def class_doubt(mean_probabilities: np.ndarray) -> np.ndarray:
    """``[N, C]`` mean class probabilities -> ``[N]`` ``-log max_c p(c)``."""
    return -np.log(np.maximum(np.max(mean_probabilities, axis=-1), 1e-12))


def objectness_doubt(objectness: np.ndarray) -> np.ndarray:
    """``[N]`` objectness (0..1) -> ``[N]`` ``-log objectness``."""
    return -np.log(np.maximum(np.asarray(objectness, np.float64), 1e-12))


def energy(sample_logits: np.ndarray) -> np.ndarray:
    """``[N, K, C]`` class logits -> ``[N]`` ``-logsumexp`` of the mean logits over the K samples."""
    m = np.asarray(sample_logits, np.float64).mean(axis=1)
    top = m.max(axis=-1)
    return -(top + np.log(np.exp(m - top[:, None]).sum(axis=-1)))
