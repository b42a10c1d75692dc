"""Metrics shared by ``convert --val``, ``edgeq eval`` and the benchmarks: one implementation each."""

from __future__ import annotations

import numpy as np


def top1_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the target: ``mean(argmax_c s[i, c] == y[i])``."""
    scores = np.asarray(scores)
    if len(scores) == 0:
        raise ValueError("top1_accuracy of an empty set")
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(targets)))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where two models pick the same class: ``mean(argmax a[i] == argmax b[i])``."""
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two score arrays of equal shape: ``mean |a - b|``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.mean(np.abs(a - b)))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (Guo et al. 2017):
    ``ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|``, where confidence is ``max_c p[i, c]`` and bin b holds
    confidences in ``((b-1)/bins, b/bins]`` (the first bin also takes 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(probs) == 0:
        raise ValueError("expected_calibration_error of an empty set")
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == targets).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve for telling ``positives`` (should score higher) from ``negatives``: the
    probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U statistic divided by ``n_pos * n_neg``)."""
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    scores = np.concatenate([neg, pos])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))
