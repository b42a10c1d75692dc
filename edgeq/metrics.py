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
