"""Uncertainty maths and the metrics they are judged by: hand-computed cases, an independent formulation,
and properties that must hold for any input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgeq.converter.evaluation import metrics
from edgeq.uncertainty import (
    class_std,
    expected_entropy,
    mean_probability,
    mutual_information,
    pick_review_threshold,
    predictive_entropy,
    result_uncertainty,
    review,
    summarize,
)


def test_hand_computed_two_samples_that_disagree():
    # two confident samples pointing at different classes: high total uncertainty, all of it epistemic-ish
    p = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert np.allclose(mean_probability(p), [0.5, 0.5])
    assert predictive_entropy(p) == pytest.approx(math.log(2))
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # 0.325083
    assert expected_entropy(p) == pytest.approx(h)
    assert mutual_information(p) == pytest.approx(math.log(2) - h)
    assert np.allclose(class_std(p), [0.4, 0.4])


def test_hand_computed_samples_that_agree():
    # identical samples: no disagreement, MI = 0, std = 0, entropy all aleatoric
    p = np.array([[0.5, 0.25, 0.25]] * 4)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.039721
    assert predictive_entropy(p) == pytest.approx(expected)
    assert expected_entropy(p) == pytest.approx(expected)
    assert mutual_information(p) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(class_std(p), 0.0)


def test_summarize_from_logits_and_deterministic_case():
    s = summarize(np.log(np.array([[0.9, 0.1], [0.1, 0.9]])))
    assert s.samples == 2 and s.mean == pytest.approx([0.5, 0.5])
    assert result_uncertainty(s)["method"] == "mc"
    d = summarize(np.array([2.0, 0.0, 0.0]))  # one logit vector
    assert d.samples == 1 and d.mutual_information == pytest.approx(0.0)
    u = result_uncertainty(d)
    assert u == {"method": "softmax", "predictive_entropy": pytest.approx(float(d.predictive_entropy), abs=1e-6)}


def _reference_measures(mc_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An independent formulation, as Bayesian-Torch writes it (utils/util.py): samples on axis 0,
    ``entropy(p) = -sum p log(p + 1e-15)``, ``PE = entropy(mean_k p)``, ``MI = PE - mean_k entropy(p_k)``."""
    ent = lambda p: -np.sum(p * np.log(p + 1e-15), axis=-1)  # noqa: E731
    pe = ent(np.mean(mc_probs, axis=0))
    return pe, pe - np.mean(ent(mc_probs), axis=0)


def test_matches_bayesian_torch_formulation():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=(16, 50, 7))  # K=16 samples, 50 images, 7 classes (their axis order)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ref_pe, ref_mi = _reference_measures(probs)
    ours = summarize(np.transpose(logits, (1, 0, 2)))  # ours: [N, K, C]
    assert np.allclose(ours.predictive_entropy, ref_pe, atol=1e-9)
    assert np.allclose(ours.mutual_information, ref_mi, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(2, 9)),
           elements=st.floats(-60, 60, allow_nan=False, allow_infinity=False))
)
def test_bounds_hold_for_any_logits(logits):
    s = summarize(logits)
    c = logits.shape[-1]
    eps = 1e-9
    assert -eps <= float(s.mutual_information) <= float(s.predictive_entropy) + eps
    assert float(s.predictive_entropy) <= math.log(c) + eps
    assert -eps <= float(s.aleatoric) <= float(s.predictive_entropy) + eps
    assert np.all(s.std >= 0) and np.all(s.std <= 0.5 + eps)
    assert float(s.mean.sum()) == pytest.approx(1.0)


def test_review_threshold_hand_computed():
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    correct = np.array([1, 1, 1, 0, 1], dtype=bool)
    r = pick_review_threshold(values, correct, target_accuracy=0.75)
    # keep 1..3: 1.0; keep 4: 0.75 -> ok; keep 5: 0.8 -> ok: the largest kept set is all five
    assert r.threshold == 0.5 and r.coverage == 1.0 and r.kept_accuracy == pytest.approx(0.8)
    r = pick_review_threshold(values, correct, target_accuracy=0.95)
    assert r.threshold == 0.3 and r.coverage == pytest.approx(0.6) and r.kept_accuracy == 1.0 and r.reached
    assert review(0.31, r.threshold, None, None).flag is True and review(0.3, r.threshold, None, None).flag is False
    assert review(0.3, None, None, None).flag is None


def test_review_threshold_never_splits_ties_and_can_fail():
    values = np.array([0.1, 0.2, 0.2, 0.3])
    correct = np.array([1, 1, 0, 1], dtype=bool)
    r = pick_review_threshold(values, correct, target_accuracy=1.0)
    assert r.threshold == 0.1 and r.coverage == 0.25  # 0.2 cannot be kept: one of the tied results is wrong
    r = pick_review_threshold(np.array([0.1, 0.2]), np.array([0, 1], dtype=bool), target_accuracy=0.9)
    assert not r.reached and r.coverage == 0.0 and r.threshold < 0.1  # everything flagged
    assert review(0.1, r.threshold, None, None).flag is True


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    targets = np.array([0, 1, 1, 0])
    # bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10, 0.6 -> bin 8; one sample each
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(expected)
    assert metrics.expected_calibration_error(np.array([[1.0, 0.0]] * 3), np.array([0, 0, 0])) == 0.0


def test_roc_auc_hand_computed_and_against_scikit_learn():
    assert metrics.roc_auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert metrics.roc_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert metrics.roc_auc([0.5], [0.5]) == 0.5
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    neg = np.round(rng.normal(0, 1, 300), 1)  # rounding makes ties
    pos = np.round(rng.normal(0.7, 1, 200), 1)
    ours = metrics.roc_auc(neg, pos)
    ref = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[neg, pos])
    assert ours == pytest.approx(ref, abs=1e-12)


def test_nll_and_brier_hand_computed_and_against_scikit_learn():
    from sklearn.metrics import brier_score_loss, log_loss

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    targets = np.array([0, 1, 0])
    nll = -(math.log(0.7) + math.log(0.8) + math.log(0.3)) / 3
    assert metrics.negative_log_likelihood(probs, targets) == pytest.approx(nll)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.2**2 + 0.1**2) + (0.7**2 + 0.3**2 + 0.4**2)) / 3
    assert metrics.brier_score(probs, targets) == pytest.approx(brier)
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=200)
    y = rng.integers(0, 4, 200)
    assert metrics.negative_log_likelihood(p, y) == pytest.approx(log_loss(y, p, labels=range(4)), rel=1e-9)
    # scikit-learn's Brier is binary: compare on a two-class problem (its score is the positive class's)
    p2 = np.c_[1 - p[:, 0], p[:, 0]]
    y2 = (y == 0).astype(int)
    assert metrics.brier_score(p2, y2) == pytest.approx(2 * brier_score_loss(y2, p2[:, 1]), rel=1e-9)


def test_uce_hand_computed():
    u = np.array([0.05, 0.1, 0.9, 0.95])
    correct = np.array([1, 1, 0, 1], dtype=bool)
    # bins of 1/15: 0.05 and 0.1 share bin 1 (err 0, unc 0.075); 0.9 bin 14 (err 1); 0.95 bin 15 (err 0)
    expected = 0.5 * abs(0 - 0.075) + 0.25 * abs(1 - 0.9) + 0.25 * abs(0 - 0.95)
    assert metrics.uncertainty_calibration_error(u, correct) == pytest.approx(expected)
    with pytest.raises(ValueError):
        metrics.uncertainty_calibration_error(np.array([1.5]), np.array([True]))


def test_selective_curve_and_reliability_bins():
    curve = metrics.selective_accuracy_curve([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 1], points=5)
    assert curve["referral_rate"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve["accuracy"] == pytest.approx([0.75, 2 / 3, 1.0, 1.0, 1.0])
    r = metrics.reliability_bins(np.array([[0.9, 0.1], [0.95, 0.05], [0.4, 0.6]]), np.array([0, 1, 1]), bins=5)
    assert r["count"] == [0, 0, 1, 0, 2]
    assert r["accuracy"][4] == 0.5 and r["confidence"][4] == pytest.approx(0.925) and r["accuracy"][0] is None


def test_roc_curve_points():
    c = metrics.roc_curve([0.1, 0.4], [0.35, 0.8])
    assert list(zip(c["fpr"], c["tpr"])) == [(0, 0), (0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
    auc = np.trapezoid(c["tpr"], c["fpr"]) if hasattr(np, "trapezoid") else np.trapz(c["tpr"], c["fpr"])
    assert auc == pytest.approx(metrics.roc_auc([0.1, 0.4], [0.35, 0.8]))
