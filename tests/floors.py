"""The quality floors the suite holds its trained models to, each set below its measured spread.

A trained model differs from one machine to another: edgeq pins the kernels that can be pinned
(converter/tf.py), but batch norm's rsqrt and softmax's reciprocal start from each CPU's own approximate
instructions, so an Intel and an AMD CPU train different models from the same seed (benchmarks/determinism.py).
Another seed stands in for another machine. ``python benchmarks/floors.py`` runs the tests that hold these floors
with five training seeds (``EDGEQ_TEST_SEED`` 0 to 4; CI runs 0) and writes every value they measured to
benchmarks/results/floors.json. Each bound sits below the lowest of the five (above the highest, for a ceiling) by
its margin: 1.5 standard deviations of the five, and at least the floor's own ``margin``. tests/test_floors.py
checks every bound against that file.

    from floors import check
    check("bayes.dense.digits_auroc_unfamiliarity", auroc["unfamiliarity"])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# the training seed of this run: every seeded training in a test that holds a floor adds it to its own seed
SEED = int(os.environ.get("EDGEQ_TEST_SEED", "0"))
# benchmarks/floors.py: record every value in this file (JSON lines) and fail none, so one low value does not hide
# the others measured after it
RECORD = os.environ.get("EDGEQ_FLOORS_RECORD")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "floors.json"
SPREAD_SIGMAS = 1.5  # a 6th draw falls under the lowest of five less the 1.5 sigma margin about 0.4% of the time


@dataclass(frozen=True)
class Floor:
    bound: float
    at_least: bool  # False: a ceiling (the value must stay at or under the bound)
    margin: float  # the least distance between the bound and the measured spread
    what: str


def _f(bound: float, margin: float, what: str) -> Floor:
    return Floor(bound, True, margin, what)


def _c(bound: float, margin: float, what: str) -> Floor:
    return Floor(bound, False, margin, what)


# name -> floor. Names: <test module>.<model>.<figure>. Rates are shares (0..1), AUROC 0.5 is chance.
FLOORS: dict[str, Floor] = {
    # tests/test_bayes.py: MobileNetV2 0.35/48, 4 Fashion-MNIST classes; val (convert --val, 200 images) and test
    # (scoring only, 1,000 images) are disjoint; 500 MNIST digits are the unknown inputs
    "bayes.head.val_accuracy": _f(0.6, 0.02, "the Bayesian head's accuracy on --val after edgeq train"),
    "bayes.bayes.weights_max_relative_error": _c(0.02, 0.002, "int8 head kernels vs their float samples"),
    "bayes.bayes.spread_steps": _f(4, 0.5, "int8 output steps the spread between samples spans"),
    "bayes.bayes.spread_kept_error": _c(0.1, 0.02, "|int8 / float spread - 1|"),
    "bayes.bayes.top1_gap": _c(0.05, 0.01, "|float - int8 top-1| on the test set"),
    "bayes.bayes.ece_gap": _c(0.03, 0.01, "|float - int8 ECE| (15 bins) on the test set"),
    "bayes.bayes.mi_correlation": _f(0.9, 0.01, "per-image MI, int8 vs float, convert --val"),
    "bayes.dense.digits_auroc_unfamiliarity": _f(0.83, 0.02, "digits vs clothing, int8"),
    "bayes.bayes.digits_auroc_unfamiliarity": _f(0.83, 0.02, "digits vs clothing, int8"),
    "bayes.dense.digits_auroc_gain_over_entropy": _f(-0.08, 0.02, "unfamiliarity's AUROC less the entropy's"),
    "bayes.bayes.digits_auroc_gain_over_entropy": _f(-0.02, 0.02, "unfamiliarity's AUROC less the entropy's"),
    "bayes.dense.digits_fpr95_gain_over_entropy": _f(-0.19, 0.02, "the entropy's FPR at 95% TPR less unfamiliarity's"),
    "bayes.bayes.digits_fpr95_gain_over_entropy": _f(-0.08, 0.02, "the entropy's FPR at 95% TPR less unfamiliarity's"),
    "bayes.dense.digits_flagged_unfamiliar": _f(0.06, 0.02, "digits flagged unfamiliar"),
    "bayes.bayes.digits_flagged_unfamiliar": _f(0.06, 0.02, "digits flagged unfamiliar"),
    "bayes.dense.test_flagged_unfamiliar": _c(0.15, 0.01, "test clothing flagged unfamiliar (the rule aims at 5%)"),
    "bayes.bayes.test_flagged_unfamiliar": _c(0.15, 0.01, "test clothing flagged unfamiliar (the rule aims at 5%)"),
    "bayes.dense.digits_flagged": _f(0.6, 0.02, "digits flagged for any reason"),
    "bayes.bayes.digits_flagged": _f(0.17, 0.02, "digits flagged for any reason"),
    "bayes.dense.test_flagged": _c(0.25, 0.01, "test clothing flagged for any reason"),
    "bayes.bayes.test_flagged": _c(0.21, 0.01, "test clothing flagged for any reason"),
    "bayes.dense.unflagged_accuracy_gain": _f(0.02, 0.01, "accuracy of unflagged less all test results"),
    "bayes.bayes.unflagged_accuracy_gain": _f(0.02, 0.01, "accuracy of unflagged less all test results"),
    "bayes.dense.density_int8_vs_float_correlation": _f(0.95, 0.005, "convert's unfamiliarity, int8 vs float"),
    "bayes.bayes.density_int8_vs_float_correlation": _f(0.95, 0.005, "convert's unfamiliarity, int8 vs float"),
    "bayes.bayes.float_vs_int8_mi_correlation": _f(0.9, 0.01, "per-image MI on test + digits, int8 vs float"),
    "bayes.bayes.float_vs_int8_mi_auroc_gap": _c(0.05, 0.01, "|MI's digits AUROC, float - int8|"),
    "bayes.stacked.mi_correlation": _f(0.9, 0.01, "per-image MI, int8 vs float, --bayes-layout stacked"),
    "bayes.centred.mi_correlation": _f(0.9, 0.01, "per-image MI, int8 vs float, --bayes-layout centred"),
    "bayes.stacked.top1_agreement": _f(0.9, 0.01, "int8 vs float top-1 agreement, stacked"),
    "bayes.centred.top1_agreement": _f(0.9, 0.01, "int8 vs float top-1 agreement, centred"),
    "bayes.clustered.mi_correlation": _f(0.8, 0.02, "per-image MI, int8 vs float, posterior VQ 16"),
    "bayes.clustered.relative_rmse_mu": _c(0.5, 0.02, "the posterior means' VQ error"),
    "bayes.clustered.top1_gap": _c(0.1, 0.01, "|top-1, clustered - unclustered| on the test set"),
    # tests/test_detect.py: a 128 px grid detector, 3 known classes, bags as the unknown objects; 100 val scenes
    # (convert --val) and 100 test scenes (scoring only)
    "detect.det.map50_int8": _f(0.15, 0.02, "int8 mAP@0.5 on the test scenes"),
    "detect.det.map50_gap": _c(0.05, 0.01, "|float - int8 mAP@0.5|"),
    "detect.det.label_accuracy_known": _f(1 / 3, 0.02, "label accuracy of matched known objects (chance 1/3)"),
    "detect.det.test_unknown_auroc_unfamiliarity": _f(0.19, 0.02, "bags vs known objects, int8, test scenes"),
    "detect.det.test_bag_found_rate": _f(0.23, 0.02, "test bags found at all (kept by class score or objectness)"),
    "detect.det.test_bag_auroc_unknown_score": _f(0.37, 0.02, "bags vs known objects by the unknown score, int8"),
    "detect.det.test_known_published_unknown": _c(0.2, 0.01, "known test objects published unknown (5% on --val)"),
    "detect.det.known_detections": _f(20, 2, "int8 detections matched to known objects (the percentile reference)"),
    "detect.det.spread_ratio_error": _c(0.33, 0.02, "int8 / float spread between class samples, distance from 1"),
    "detect.det.density_int8_vs_float_correlation": _f(0.86, 0.01, "convert's unfamiliarity, int8 vs float"),
    "detect.l2.density_int8_vs_float_correlation": _f(0.87, 0.01, "the same, --density-normalise l2"),
    # tests/test_accuracy.py: a small CNN (32 px) with one outlier channel, --val = the 200 val images
    "accuracy.hard.plain_drop": _f(0.2, 0.02, "top-1 drop of plain int8 (the model is broken on purpose)"),
    "accuracy.hard.repaired_drop": _c(0.03, 0.0, "top-1 drop after --max-drop 0.03 (the bound asked for)"),
    "accuracy.hard.equalized_drop": _c(0.02, 0.0, "top-1 drop with --equalize, full int8 (by hand, seeds 0-2: -0.01 "
                                       "to -0.005; plain 0.55 to 0.565)"),
    "accuracy.hard.equalized_qat_drop": _c(0.03, 0.0, "top-1 drop with --equalize and --qat (2 epochs)"),
    "accuracy.hard.compare_gain": _f(0.04, 0.01, "eval --compare: repaired less plain top-1"),
    "accuracy.hard.keep_float_drop": _c(0.02, 0.005, "top-1 drop with conv_b, conv_c kept in float"),
    # tests/arm/test_arm.py: the same small CNN, not broken, run by edgeq run on the emulated Pi and on x86 over 200
    # test images and 100 digits; both must publish the same figures
    "arm.small_cnn.top1": _f(0.67, 0.02, "top-1 of what the Pi published"),
    "arm.small_cnn.digits_auroc_unfamiliarity": _f(0.8, 0.02, "digits vs clothing, from what the Pi published"),
}


def check(name: str, value: float) -> None:
    """Hold ``value`` to the floor ``name`` (or record it, under benchmarks/floors.py)."""
    floor = FLOORS[name]
    value = float(value)
    if RECORD:
        with open(RECORD, "a") as fh:  # one short line per write: appends from two workers do not interleave
            fh.write(json.dumps({"name": name, "value": value, "seed": SEED}) + "\n")
        return
    ok = value >= floor.bound if floor.at_least else value <= floor.bound
    assert ok, (f"{name} = {value:.4f}, {'under its floor' if floor.at_least else 'over its ceiling'} "
                f"{floor.bound:g} ({floor.what}; {measured(name)})")


def measured(name: str) -> str:
    """The spread recorded for ``name``, for a failure message."""
    try:
        entry = json.loads(RESULTS.read_text())["floors"][name]
    except (OSError, KeyError, ValueError):
        return "no spread recorded: run python benchmarks/floors.py"
    return f"seeds {entry['seeds']} gave {entry['min']:.4f} to {entry['max']:.4f} in benchmarks/results/floors.json"


def seeded(base: int) -> str:
    """A training seed for the command line: the test's own ``base`` moved by this run's ``EDGEQ_TEST_SEED``."""
    return str(base + SEED)
