"""Metrics shared by ``convert --val``, ``edgeq eval`` and the benchmarks: one implementation each.

ROC/AUC, NLL and the Brier score are scikit-learn's. The binned calibration errors (ECE, UCE, D-ECE) and the
selective-accuracy curve are written here: scikit-learn has only ``calibration_curve``, which bins one binary
probability and returns neither the counts nor the weighted gap these need.
"""

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


def _bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1]: bin b (0-based) holds values in ``(b/bins, (b+1)/bins]``, the first also 0."""
    return np.clip(np.ceil(values * bins).astype(np.int64) - 1, 0, bins - 1)


def _binned_gap(values: np.ndarray, outcomes: np.ndarray, bins: int) -> float:
    """``sum_b (|B_b| / N) * |mean outcome(B_b) - mean value(B_b)|`` over :func:`_bin_index`'s bins of ``values``
    in [0, 1]: the form D-ECE and UCE share."""
    which = _bin_index(values, bins)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(outcomes[in_bin].mean() - values[in_bin].mean())
    return float(total)


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> dict[str, list]:
    """Confidence histogram of a reliability diagram: ``bins`` equal-width bins of the confidence ``max_c p[i, c]``;
    bin b holds confidences in ``((b-1)/bins, b/bins]`` (the first also takes 0). Per bin: count, mean confidence
    and accuracy (None for an empty bin)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if len(probs) == 0:
        raise ValueError("reliability_bins of an empty set")
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == targets).astype(np.float64)
    which = _bin_index(confidence, bins)
    out: dict[str, list] = {"edges": [b / bins for b in range(bins + 1)], "count": [], "confidence": [], "accuracy": []}
    for b in range(bins):
        in_bin = which == b
        n = int(in_bin.sum())
        out["count"].append(n)
        out["confidence"].append(float(confidence[in_bin].mean()) if n else None)
        out["accuracy"].append(float(correct[in_bin].mean()) if n else None)
    return out


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (Guo et al. 2017, "On calibration of modern neural
    networks"): ``ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|``, where confidence is ``max_c p[i, c]``,
    binned as in :func:`reliability_bins`."""
    r = reliability_bins(probs, targets, bins)
    total = sum(r["count"])
    return float(sum(n / total * abs(a - c) for n, a, c in zip(r["count"], r["accuracy"], r["confidence"]) if n))


def detection_calibration_error(scores: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Detection ECE (D-ECE, Kueppers et al. 2020, confidence only): detections binned by score into ``bins``
    equal-width bins, ``sum_b (|B_b| / N) * |precision(B_b) - mean score(B_b)|``."""
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    if len(s) == 0 or len(s) != len(c):
        raise ValueError("detection_calibration_error needs one correctness flag per score, and at least one score")
    return _binned_gap(s, c, bins)


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve for telling ``positives`` (should score higher) from ``negatives``: the
    probability that a random positive scores above a random negative, ties counting one half
    (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    neg, pos = _pair(negatives, positives)
    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def fpr_at_tpr(negatives: np.ndarray, positives: np.ndarray, tpr: float = 0.95) -> float:
    """The false-positive rate at the lowest threshold that still catches ``tpr`` of the positives (the OOD
    literature's FPR95 when ``tpr`` is 0.95)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    neg, pos = _pair(negatives, positives)
    fpr, tpr_points, _ = sk_roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos],
                                      drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr_points, tpr - 1e-12, side="left")])


def _pair(negatives: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("an ROC needs at least one positive and one negative")
    return neg, pos


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean NLL in nats, ``-(1/N) sum_i log p[i, y_i]`` (scikit-learn's ``log_loss``, which clips p away from 0
    so that one zero probability does not make it infinite)."""
    from sklearn.metrics import log_loss

    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        raise ValueError("negative_log_likelihood of an empty set")
    return float(log_loss(np.asarray(targets, dtype=np.int64), probs, labels=np.arange(probs.shape[1])))


def brier_score(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-class Brier score (Brier 1950): ``(1/N) sum_i sum_c (p[i, c] - [y_i == c])^2``, in [0, 2]
    (scikit-learn's ``brier_score_loss``)."""
    from sklearn.metrics import brier_score_loss

    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        raise ValueError("brier_score of an empty set")
    return float(brier_score_loss(np.asarray(targets, dtype=np.int64), probs, labels=np.arange(probs.shape[1]),
                                  scale_by_half=False))


def uncertainty_calibration_error(uncertainty: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """UCE (Laves et al. 2019, "Well-calibrated model uncertainty with temperature scaling for dropout variational
    inference"): with uncertainty normalised to [0, 1] (e.g. predictive entropy / log C), bins of equal width,
    ``UCE = sum_b (|B_b| / N) * |err(B_b) - unc(B_b)|``, where err is the error rate and unc the mean uncertainty
    of bin b (bin b holds values in ``((b-1)/bins, b/bins]``, the first bin also takes 0)."""
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    wrong = 1.0 - np.asarray(correct, dtype=np.float64).reshape(-1)
    if len(u) == 0 or len(u) != len(wrong):
        raise ValueError("uncertainty_calibration_error needs one correctness flag per value")
    if u.min() < 0 or u.max() > 1 + 1e-9:
        raise ValueError("uncertainty must be normalised to [0, 1]")
    return _binned_gap(u, wrong, bins)


def selective_accuracy_curve(uncertainty: np.ndarray, correct: np.ndarray, points: int = 21) -> dict[str, list[float]]:
    """Accuracy vs referral rate: refer the most uncertain fraction r of results to a person and score the rest.
    For r in ``linspace(0, 1, points)`` (the last point keeps one result), ``accuracy(r)`` is the accuracy of the
    ``ceil((1 - r) N)`` least uncertain results (ties broken by order, stable)."""
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    order = np.argsort(u, kind="stable")
    cum = np.cumsum(c[order])
    rates = np.linspace(0.0, 1.0, points)
    kept = np.maximum(1, np.ceil((1.0 - rates) * len(u) - 1e-9).astype(np.int64))
    return {"referral_rate": [round(float(r), 6) for r in rates],
            "accuracy": [float(cum[k - 1] / k) for k in kept]}


def roc_curve(negatives: np.ndarray, positives: np.ndarray) -> dict[str, list[float]]:
    """ROC points for telling ``positives`` (higher scores) from ``negatives``, from (0, 0) to (1, 1)
    (scikit-learn's ``roc_curve``, every threshold kept)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    neg, pos = _pair(negatives, positives)
    fpr, tpr, _ = sk_roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos],
                               drop_intermediate=False)
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
