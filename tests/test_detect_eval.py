"""Pure logic of detection evaluation on hand-built detections: COCOeval's matching (greedy by score, IoU 0.5, any
category), mAP through pycocotools, D-ECE, the F1 score threshold and the known/unknown split of the AUROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeq.converter.evaluation import metrics
from edgeq.converter.evaluation.detect import (
    ImageDetections,
    best_f1_threshold,
    coco_map,
    detection_figures,
    match_all,
)
from edgeq.detection import Detections
from edgeq.converter.data.coco import CocoSet

KNOWN, UNKNOWN = 1, 2  # COCO category ids; class index 0 is category 1


def _coco(boxes: dict[int, list[tuple[float, float, float, float]]], cats: dict[int, list[int]]) -> CocoSet:
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in boxes]
    categories = [{"id": KNOWN, "name": "thing", "supercategory": "fashion"},
                  {"id": UNKNOWN, "name": "other", "supercategory": "unknown"}]
    return CocoSet(Path("annotations.json"), Path("."), images, categories,
                   {i: np.asarray(b, np.float32).reshape(-1, 4) for i, b in boxes.items()},
                   {i: np.asarray(c, np.int64) for i, c in cats.items()})


def _dets(image_id: int, boxes: list[tuple[float, ...]], scores: list[float], mi: list[float]) -> ImageDetections:
    n = len(scores)
    z = np.zeros(n, np.float32)
    d = Detections(np.zeros((n, 4), np.float32), np.zeros(n, np.int64), np.asarray(scores, np.float32),
                   np.asarray(scores, np.float32), np.ones((n, 1), np.float32), z, z, np.asarray(mi, np.float32), z, 4)
    return ImageDetections(image_id, np.asarray(boxes, np.float32).reshape(-1, 4), d)


def test_matching_is_cocoevals_greedy_by_score_with_iou_half_and_any_category():
    coco = _coco({1: [(0, 0, 10, 10), (20, 20, 30, 30)], 2: [(0, 0, 10, 10)]}, {1: [KNOWN, KNOWN], 2: [UNKNOWN]})
    boxes = [(0, 0, 10, 10), (1, 1, 10, 10), (20, 20, 26, 26), (50, 50, 60, 60)]
    # the second box overlaps the first ground truth too, but the higher-scored first one took it; the third has
    # IoU 0.36 < 0.5; the fourth overlaps nothing
    m = match_all([_dets(1, boxes, [0.9, 0.8, 0.7, 0.6], [0.0] * 4)], coco, [KNOWN])
    assert m.matched.tolist() == [True, False, False, False] and m.correct.tolist() == [True, False, False, False]
    m = match_all([_dets(1, boxes, [0.5, 0.9, 0.7, 0.6], [0.0] * 4)], coco, [KNOWN])
    assert m.matched.tolist() == [False, True, False, False]
    # a detection labelled with a known class on an unknown object's box: matched (any category), unknown
    m = match_all([_dets(2, [(0, 0, 10, 10)], [0.9], [0.3])], coco, [KNOWN])
    assert m.unknown.tolist() == [True] and m.known.tolist() == [False] and m.correct.tolist() == [False]
    assert m.measures["mutual_information"].tolist() == pytest.approx([0.3])


def test_coco_map_perfect_shifted_and_empty():
    coco = _coco({1: [(10, 10, 50, 50)], 2: [(20, 20, 60, 60)]}, {1: [KNOWN], 2: [KNOWN]})
    perfect = [_dets(1, [(10, 10, 50, 50)], [0.9], [0.0]), _dets(2, [(20, 20, 60, 60)], [0.8], [0.0])]
    assert coco_map(perfect, coco, [KNOWN]) == {"map": 1.0, "map50": 1.0}
    shifted = [_dets(1, [(14, 10, 54, 50)], [0.9], [0.0]), _dets(2, [(24, 20, 64, 60)], [0.8], [0.0])]  # IoU 0.82
    m = coco_map(shifted, coco, [KNOWN])
    assert m["map50"] == 1.0 and 0.3 < m["map"] < 0.9
    assert coco_map([_dets(1, [], [], []), _dets(2, [], [], [])], coco, [KNOWN]) == {"map": 0.0, "map50": 0.0}


def test_detection_calibration_error():
    scores = np.full(10, 0.8)
    assert metrics.detection_calibration_error(scores, np.array([1] * 8 + [0] * 2)) == pytest.approx(0.0)
    assert metrics.detection_calibration_error(scores, np.array([1] * 5 + [0] * 5)) == pytest.approx(0.3)


def test_f1_threshold_and_unknown_auroc():
    # image 1: a known object found at 0.9, a false detection at 0.4; image 2: an unknown object detected at 0.7
    coco = _coco({1: [(10, 10, 50, 50)], 2: [(10, 10, 50, 50)]}, {1: [KNOWN], 2: [UNKNOWN]})
    results = [_dets(1, [(10, 10, 50, 50), (60, 60, 90, 90)], [0.9, 0.4], [0.01, 0.2]),
               _dets(2, [(10, 10, 50, 50)], [0.7], [0.5])]
    best = best_f1_threshold(results, coco, [KNOWN])
    # keeping only the 0.9 detection: 1 TP, 0 FP, 0 FN of the one known object -> F1 1.0
    assert best["threshold"] == pytest.approx(0.9) and best["f1"] == 1.0 and best["known_objects"] == 1
    figs = detection_figures(results, coco, [KNOWN], 0.3)
    assert figs["matched_known"] == 1 and figs["matched_unknown"] == 1 and figs["unmatched"] == 1
    assert figs["label_accuracy_known"] == 1.0
    # the detection of the unknown object has the higher mutual information: perfectly told apart
    assert figs["unknown_auroc"]["mutual_information"] == 1.0
    assert figs["unknown_auroc"]["one_minus_score"] == 1.0  # its score (0.7) is lower too


def test_review_rule_on_detections_flags_the_unknown_and_says_why():
    """The rule calibrated on known detections (budget mode: the target is out of reach) and its flag rates: the
    unknown object's detection, far more unfamiliar than the known ones, is flagged as unfamiliar."""
    from edgeq.converter.evaluation.detect import calibrate_detection_rule

    boxes = {i: [(10, 10, 50, 50)] for i in range(1, 41)}
    cats = {i: [KNOWN] for i in range(1, 41)}
    boxes[41], cats[41] = [(10, 10, 50, 50)], [UNKNOWN]
    coco = _coco(boxes, cats)
    results = []
    for i in range(1, 42):
        d = _dets(i, [(10, 10, 50, 50)], [0.9], [0.01 * (i % 7)])
        from dataclasses import replace

        d = ImageDetections(i, d.boxes, replace(d.detections, unfamiliarity=np.array([100.0 if i == 41 else float(i)])))
        results.append(d)
    rule = calibrate_detection_rule(match_all(results, coco, [KNOWN], 0.3), "mutual_information", 0.995, 0.1, 35.0,
                                    0.05)
    assert rule["unfamiliar_threshold"] == 35.0 and rule["calibrated_on"].startswith("detections matched")
    figs = detection_figures(results, coco, [KNOWN], 0.3, rule)
    assert figs["flagged"]["unknown"]["unfamiliar"] == 1.0
    assert figs["unknown_auroc"]["unfamiliarity"] == 1.0
    assert 0 < figs["flagged"]["known"]["flagged"] < 0.5


def test_objects_found_and_said_per_kind():
    """Per kind of unknown object: how many a kept detection found, how many of those are published as unknown;
    the known objects' counts beside them; unmatched detections are false detections."""
    from dataclasses import replace

    from edgeq.converter.evaluation.detect import kind_figures

    coco = _coco({1: [(0, 0, 10, 10), (20, 20, 30, 30), (40, 40, 50, 50)], 2: [(0, 0, 10, 10)]},
                 {1: [KNOWN, UNKNOWN, UNKNOWN], 2: [KNOWN]})
    a = _dets(1, [(0, 0, 10, 10), (20, 20, 30, 30), (70, 70, 80, 80)], [0.9, 0.2, 0.8], [0.0] * 3)
    a = replace(a, detections=replace(a.detections, objectness=np.array([0.9, 0.95, 0.9], np.float32),
                                      unknown=np.array([False, True, True])))
    b = _dets(2, [(0, 0, 10, 10)], [0.7], [0.0])
    b = replace(b, detections=replace(b.detections, unknown=np.array([True])))
    # kept: class score >= 0.5, or objectness >= 0.9 (the unknown object with class score 0.2 is kept by it)
    m = match_all([a, b], coco, [KNOWN], 0.5, objectness_threshold=0.9)
    assert m.objects == {"thing": (2, 2), "other": (1, 2)}
    figs = kind_figures(m, coco, [KNOWN])
    assert figs["known_objects"] == {"objects": 2, "found": 2, "found_rate": 1.0, "published_unknown": 0.5}
    assert figs["unknown_kinds"]["other"]["found_rate"] == 0.5 and figs["unknown_kinds"]["other"]["published_unknown"] == 1.0
    assert figs["false_detections"] == 1
    # without the objectness rule the unknown object is not kept at all
    assert match_all([a, b], coco, [KNOWN], 0.5).objects["other"] == (0, 2)


def test_unknown_calibration_flags_its_rate_of_known_detections_and_refuses_too_few():
    from edgeq.converter.evaluation.unknown import MIN_KNOWN, calibrate_unknown
    from edgeq.errors import DataError
    from edgeq.unknown import UnknownRule

    rng = np.random.default_rng(0)
    values = {"class_doubt": rng.gamma(1.0, 0.2, 400), "unfamiliarity": rng.chisquare(20, 400)}
    block = calibrate_unknown(values, ("class_doubt", "unfamiliarity"), "max", 0.05, "val")
    rule = UnknownRule.from_block(block)
    flagged = rule.flags(rule.scores(values))
    assert abs(flagged.mean() - 0.05) <= 2 / 400 and block.count == 400 and block.combine == "max"
    fresh = {"class_doubt": rng.gamma(1.0, 0.2, 4000), "unfamiliarity": rng.chisquare(20, 4000)}
    assert abs(rule.flags(rule.scores(fresh)).mean() - 0.05) < 0.015  # the same rate on new known detections
    few = {k: v[:MIN_KNOWN - 1] for k, v in values.items()}
    with pytest.raises(DataError, match=f"it needs at least {MIN_KNOWN}.*--unknown off"):
        calibrate_unknown(few, ("class_doubt",), "max", 0.05, "val")
