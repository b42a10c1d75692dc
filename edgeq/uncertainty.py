"""Uncertainty from class scores, pure numpy (the device imports this; nothing here needs TensorFlow).

A deterministic head gives one logit vector per image; its only measure is the entropy of its softmax
(``method: "softmax"``). A Monte-Carlo (Bayesian) head gives K sampled logit vectors ``z[k, c]`` per image, and the
total uncertainty splits into an aleatoric and an epistemic part (Depeweg et al. 2018; the decomposition that
Bayesian-Torch reports as ``predictive_entropy`` and ``mutual_information``)::

    p[k, c]   = softmax(z[k])[c]                       per-sample probabilities
    pbar[c]   = (1/K) sum_k p[k, c]                    mean probability (the prediction)
    PE        = H(pbar) = -sum_c pbar[c] log pbar[c]   predictive entropy (total)
    EE        = (1/K) sum_k H(p[k])                    expected entropy (aleatoric)
    MI        = PE - EE                                mutual information (epistemic), 0 <= MI <= PE <= log C
    std[c]    = sqrt((1/K) sum_k (p[k, c] - pbar[c])^2) per-class spread of the probability

All measures are in nats. Functions take arrays whose sample axis is ``-2`` and class axis ``-1``, so ``[K, C]``
for one image and ``[N, K, C]`` for a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MEASURES = ("predictive_entropy", "aleatoric", "mutual_information")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """``p_c = exp(z_c - max z) / sum_j exp(z_j - max z)``, numerically stable, along ``axis``."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats: ``H(p) = -sum_c p_c log p_c`` (with ``0 log 0 = 0``)."""
    p = np.asarray(p, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def sample_probabilities(sample_logits: np.ndarray) -> np.ndarray:
    """Softmax of each sample: ``p[..., k, c] = softmax(z[..., k, :])[c]``."""
    return softmax(sample_logits, axis=-1)


def mean_probability(probs: np.ndarray) -> np.ndarray:
    """The Monte-Carlo prediction: ``pbar[c] = (1/K) sum_k p[k, c]`` (sample axis -2)."""
    return np.mean(np.asarray(probs, dtype=np.float64), axis=-2)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Total uncertainty: ``PE = H(pbar) = -sum_c pbar[c] log pbar[c]``."""
    return entropy(mean_probability(probs))


def expected_entropy(probs: np.ndarray) -> np.ndarray:
    """Aleatoric uncertainty: ``EE = (1/K) sum_k H(p[k])``, the entropy each sample has on its own."""
    return np.mean(entropy(probs), axis=-1)


def mutual_information(probs: np.ndarray) -> np.ndarray:
    """Epistemic uncertainty: ``MI = H(pbar) - (1/K) sum_k H(p[k])``, how much the samples disagree.

    Jensen's inequality makes it non-negative; float rounding can give -1e-16, so it is clipped at 0.
    """
    return np.maximum(predictive_entropy(probs) - expected_entropy(probs), 0.0)


def class_std(probs: np.ndarray) -> np.ndarray:
    """Per-class spread over samples: ``std[c] = sqrt((1/K) sum_k (p[k, c] - pbar[c])^2)`` (population std)."""
    return np.std(np.asarray(probs, dtype=np.float64), axis=-2)


@dataclass(frozen=True)
class Summary:
    """Everything a result reports, for one image or a batch (leading axes kept)."""

    mean: np.ndarray  # [..., C] mean probability
    predictive_entropy: np.ndarray  # [...]
    aleatoric: np.ndarray  # [...]
    mutual_information: np.ndarray  # [...]
    std: np.ndarray  # [..., C]
    samples: int

    def measure(self, name: str) -> np.ndarray:
        if name not in MEASURES:
            raise ValueError(f"unknown uncertainty measure {name!r}; choose one of {', '.join(MEASURES)}")
        return getattr(self, name)


def summarize(sample_logits: np.ndarray) -> Summary:
    """All measures of ``[..., K, C]`` sampled logits; a deterministic head is the case K = 1 (MI = 0)."""
    z = np.asarray(sample_logits, dtype=np.float64)
    if z.ndim < 2:
        z = z[None, :]
    p = sample_probabilities(z)
    return Summary(
        mean=mean_probability(p),
        predictive_entropy=predictive_entropy(p),
        aleatoric=expected_entropy(p),
        mutual_information=mutual_information(p),
        std=class_std(p),
        samples=int(z.shape[-2]),
    )


@dataclass(frozen=True)
class ReviewThreshold:
    """The largest uncertainty threshold whose kept results (measure <= threshold) reach the target accuracy.

    threshold: flag a result when its measure exceeds this. When no non-empty subset reaches the target,
        it is just below the smallest measure (every result is flagged) and ``reached`` is False.
    coverage: fraction of the calibration results kept (not flagged).
    kept_accuracy: accuracy on the kept results (None when nothing is kept).
    """

    measure: str
    threshold: float
    target_accuracy: float
    coverage: float
    kept_accuracy: float | None
    reached: bool
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "threshold": self.threshold,
            "target_accuracy": self.target_accuracy,
            "coverage": round(self.coverage, 6),
            "kept_accuracy": None if self.kept_accuracy is None else round(self.kept_accuracy, 6),
            "reached": self.reached,
            "count": self.count,
        }


def pick_review_threshold(
    values: np.ndarray, correct: np.ndarray, target_accuracy: float = 0.995, measure: str = "predictive_entropy"
) -> ReviewThreshold:
    """Selective prediction: sort results by uncertainty, keep the most certain ones while their accuracy stays
    at or above ``target_accuracy``, and return the threshold that keeps the largest such set.

    Results with equal uncertainty are kept or flagged together (a threshold cannot split them).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if len(values) == 0 or len(values) != len(correct):
        raise ValueError("pick_review_threshold needs one correctness flag per value, and at least one value")
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target accuracy {target_accuracy} is not in (0, 1]")
    order = np.argsort(values, kind="stable")
    v, c = values[order], correct[order]
    cum_correct = np.cumsum(c)
    n_kept = np.arange(1, len(v) + 1)
    # only cut where the next value differs, so ties are never split
    last_of_tie = np.append(v[1:] != v[:-1], True)
    accuracy = cum_correct / n_kept
    ok = np.flatnonzero(last_of_tie & (accuracy >= target_accuracy - 1e-12))
    if len(ok) == 0:
        threshold = float(np.nextafter(v[0], -np.inf))
        return ReviewThreshold(measure, threshold, target_accuracy, 0.0, None, False, len(v))
    i = int(ok[-1])
    return ReviewThreshold(
        measure, float(v[i]), target_accuracy, float((i + 1) / len(v)), float(accuracy[i]), True, len(v)
    )


def result_uncertainty(summary: Summary, index: tuple[int, ...] = ()) -> dict[str, Any]:
    """The ``uncertainty`` object of a published result (detections schema 2) for one image of ``summary``."""
    pe = float(summary.predictive_entropy[index])
    if summary.samples == 1:
        return {"method": "softmax", "predictive_entropy": round(pe, 6)}
    return {
        "method": "mc",
        "samples": summary.samples,
        "predictive_entropy": round(pe, 6),
        "aleatoric": round(float(summary.aleatoric[index]), 6),
        "mutual_information": round(float(summary.mutual_information[index]), 6),
    }


@dataclass(frozen=True)
class Review:
    """A result's review: ``flag`` (None when no rule is known) and ``reason`` (None when not flagged)."""

    flag: bool | None
    reason: str | None


def review(ambiguity: float | None, threshold: float | None, unfamiliarity: float | None,
           unfamiliar_threshold: float | None) -> Review:
    """``needs_review`` from the two rules: *ambiguous* when ``ambiguity > threshold`` (the uncertainty measure
    against its threshold for the target accuracy, or its review budget), *unfamiliar* when ``unfamiliarity >
    unfamiliar_threshold`` (set for a false-flag rate on in-distribution data). A rule whose threshold or value is
    missing is not applied; with neither, the flag is None. A non-finite value counts as flagged: the result cannot
    be trusted."""
    reasons, known = [], False
    for name, value, limit in (("unfamiliar", unfamiliarity, unfamiliar_threshold), ("ambiguous", ambiguity, threshold)):
        if value is None or limit is None:
            continue
        known = True
        if not np.isfinite(value) or value > limit:
            reasons.append(name)
    if not known:
        return Review(None, None)
    return Review(bool(reasons), "+".join(reasons) or None)
