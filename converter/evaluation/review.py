"""The ``needs_review`` rule a bundle ships, calibrated on ``--val`` (one implementation for both tasks).

- **ambiguous**: the uncertainty measure above the largest threshold whose kept results reach
  ``--target-accuracy``; when no threshold reaches it while flagging at most ``--review-budget`` of the results,
  the threshold that flags that budget of the most ambiguous (said in one line: a rule that flags nearly
  everything tells a dashboard nothing);
- **unfamiliar**: the unfamiliarity above the threshold that flags ``--review-ood-rate`` of held-out
  in-distribution data (stages/density.py), when the bundle has a density.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgeq.errors import DataError
from edgeq.manifest import REVIEW_MEASURES
from edgeq.uncertainty import pick_review_threshold


def calibrate_rule(values: np.ndarray, correct: np.ndarray, measure: str, target_accuracy: float, budget: float,
                   unfamiliar_threshold: float | None = None, ood_rate: float | None = None,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    if measure not in REVIEW_MEASURES:
        raise DataError(f"--review-measure {measure!r}: choose one of {', '.join(REVIEW_MEASURES)}")
    values = np.asarray(values, np.float64)
    rule = pick_review_threshold(values, correct, target_accuracy, measure).to_dict()
    if rule["reached"] and rule["coverage"] >= 1.0 - budget:
        rule["mode"] = "target"
    else:
        needed = "every result" if not rule["reached"] else f"{1.0 - rule['coverage']:.0%} of the results"
        threshold = float(np.quantile(values, 1.0 - budget))
        kept = values <= threshold
        rule.update(mode="budget", budget=budget, threshold=threshold, coverage=round(float(kept.mean()), 6),
                    kept_accuracy=round(float(np.asarray(correct)[kept].mean()), 6) if kept.any() else None)
        log(f"needs_review: accuracy {target_accuracy} would mean flagging {needed} of --val as ambiguous; flagging "
            f"the {budget:.0%} most ambiguous by {measure} instead (--review-budget), which keeps accuracy "
            f"{rule['kept_accuracy']:.4f}")
    if unfamiliar_threshold is not None:
        rule.update(unfamiliar_threshold=unfamiliar_threshold, ood_rate=ood_rate,
                    unfamiliar_percentile=round(100.0 * (1.0 - ood_rate), 4))
    return rule


def flag_rates(ambiguity: np.ndarray, unfamiliarity: np.ndarray | None, rule: dict[str, Any],
               correct: np.ndarray | None = None) -> dict[str, Any]:
    """How a rule flags a set: the fraction flagged (and why), and with ``correct`` the accuracy of all results
    against the accuracy of those it leaves unflagged."""
    amb = np.asarray(ambiguity, np.float64) > (rule["threshold"] if rule.get("threshold") is not None else np.inf)
    unf = np.zeros_like(amb)
    if unfamiliarity is not None and rule.get("unfamiliar_threshold") is not None:
        u = np.asarray(unfamiliarity, np.float64)
        unf = ~np.isfinite(u) | (u > rule["unfamiliar_threshold"])
    flagged = amb | unf
    out = {"count": int(len(flagged)), "flagged": round(float(flagged.mean()), 6),
           "unfamiliar": round(float(unf.mean()), 6), "ambiguous": round(float(amb.mean()), 6)}
    if correct is not None:
        c = np.asarray(correct, bool)
        out["accuracy_all"] = round(float(c.mean()), 6)
        out["accuracy_unflagged"] = round(float(c[~flagged].mean()), 6) if (~flagged).any() else None
    return out
