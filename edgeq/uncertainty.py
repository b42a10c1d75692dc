"""Uncertainty from class scores, pure numpy.

For a deterministic head (one logit vector) the only measure is the entropy of its softmax
(``method: "softmax"``). Monte-Carlo heads (K sampled logit vectors) add the decomposition into aleatoric and
epistemic parts.
"""

from __future__ import annotations

import numpy as np


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
