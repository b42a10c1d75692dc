"""Decoding the anchor-free detector's grid outputs (numpy + OpenCV NMS): hand-built grids with known answers,
and the uncertainty of each detection from its cell's K class distributions."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.detection import decode

G, STRIDE, SIZE, C = 12, 16, 192, 3


def _grid(k: int = 1):
    obj = np.full((G, G, 1), -8.0, np.float32)  # sigmoid ~ 0.0003: background
    boxes = np.zeros((G, G, 4), np.float32)
    logits = np.zeros((G, G, k, C), np.float32)
    return obj, boxes, logits


def _put(obj, boxes, logits, row, col, ltrb, cls, strength=6.0, logit=8.0):
    obj[row, col, 0] = strength
    boxes[row, col] = ltrb
    logits[row, col, :, cls] = logit


def test_one_object_decodes_to_its_box_label_and_score():
    obj, boxes, logits = _grid()
    _put(obj, boxes, logits, 5, 7, (1.0, 2.0, 1.5, 0.5), 2)  # cell centre (x, y) = (120, 88) px
    d = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.3)
    assert len(d) == 1 and d.classes.tolist() == [2] and d.samples == 1
    x0, y0, x1, y1 = 120 - 16, 88 - 32, 120 + 24, 88 + 8
    assert d.boxes[0] == pytest.approx([y0 / SIZE, x0 / SIZE, y1 / SIZE, x1 / SIZE], abs=1e-6)
    p = np.exp(8.0) / (np.exp(8.0) + 2)
    assert d.scores[0] == pytest.approx(p / (1 + np.exp(-6.0)), rel=1e-5)
    assert d.mutual_information[0] == pytest.approx(0.0, abs=1e-9)  # one sample: no epistemic part


def test_nms_is_per_class_and_keeps_the_best():
    obj, boxes, logits = _grid()
    # two neighbouring cells predicting nearly the same box of class 0: one survives, the stronger
    _put(obj, boxes, logits, 4, 4, (1.5, 1.5, 1.5, 1.5), 0, strength=5.0)
    _put(obj, boxes, logits, 4, 5, (2.5, 1.5, 0.5, 1.5), 0, strength=3.0)
    # the same place, another class: NMS is per class, so it stays
    _put(obj, boxes, logits, 5, 4, (1.5, 2.5, 1.5, 0.5), 1, strength=4.0)
    d = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.3, nms_iou=0.5)
    assert sorted(d.classes.tolist()) == [0, 1]
    assert d.objectness[d.classes == 0][0] == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-6)
    assert d.scores.tolist() == sorted(d.scores.tolist(), reverse=True)


def test_disagreeing_samples_give_mutual_information():
    obj, boxes, logits = _grid(k=4)
    _put(obj, boxes, logits, 2, 2, (1, 1, 1, 1), 0)
    _put(obj, boxes, logits, 8, 8, (1, 1, 1, 1), 0)
    logits[8, 8] = 0.0
    for s, c in enumerate((0, 1, 2, 0)):  # the samples disagree at this cell
        logits[8, 8, s, c] = 8.0
    d = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.2)
    by_row = {round(float(b[0]) * SIZE): i for i, b in enumerate(d.boxes)}
    agree, disagree = by_row[2 * 16 + 8 - 16], by_row[8 * 16 + 8 - 16]
    assert d.mutual_information[disagree] > 0.5 > 0.01 > d.mutual_information[agree]
    assert d.predictive_entropy[disagree] == pytest.approx(d.aleatoric[disagree] + d.mutual_information[disagree])


def test_thresholds_and_caps():
    obj, boxes, logits = _grid()
    rng = np.random.default_rng(0)
    for r in range(G):
        for c in range(G):
            _put(obj, boxes, logits, r, c, (0.4, 0.4, 0.4, 0.4), int(rng.integers(0, C)), strength=float(rng.uniform(0, 6)))
    all_ = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.0, max_candidates=200, max_detections=500)
    assert len(all_) == G * G  # small boxes, one per cell, no overlap: NMS keeps all
    capped = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.0, max_candidates=100, max_detections=30)
    assert len(capped) == 30 and capped.scores.min() >= np.sort(all_.scores)[::-1][99] - 1e-7
    high = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.9, max_detections=500)
    assert (high.scores >= 0.9).all() and len(high) == int((all_.scores >= 0.9).sum())
    empty = decode(*_grid(), STRIDE, (SIZE, SIZE))
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


def test_objectness_threshold_keeps_an_object_of_no_known_class_and_nms_is_class_agnostic():
    """An object whose classes disagree has a high objectness but a low class score: with an objectness threshold
    it is kept all the same; its cells need not agree on a class, so NMS then ignores classes."""
    obj, boxes, logits = _grid()
    _put(obj, boxes, logits, 3, 3, (1.5, 1.5, 1.5, 1.5), 0)  # a known object
    obj[8, 8, 0] = 4.0  # an unknown one: objectness 0.98, the classes flat (every logit 0: p = 1/3 each)
    boxes[8, 8] = (1.5, 1.5, 1.5, 1.5)
    obj[8, 9, 0] = 3.0  # its neighbour cell, nearly the same box, leaning to another class
    boxes[8, 9] = (2.5, 1.5, 0.5, 1.5)
    logits[8, 9, 0, 2] = 0.2  # p = 0.38: its class score 0.36 is under 0.4 too
    closed = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.4)
    assert len(closed) == 1 and closed.classes.tolist() == [0]  # the old rule: objectness x 1/3 < 0.4
    opened = decode(obj, boxes, logits, STRIDE, (SIZE, SIZE), score_threshold=0.4, objectness_threshold=0.9)
    assert len(opened) == 2  # the unknown object once: its two cells merged whatever their classes
    unknown = int(np.argmin(opened.scores))
    assert opened.objectness[unknown] == pytest.approx(1 / (1 + np.exp(-4.0)), rel=1e-6)
    assert opened.class_doubt[unknown] == pytest.approx(np.log(3.0), rel=1e-5)
    assert opened.energy[unknown] == pytest.approx(-np.log(3.0), rel=1e-5)  # -logsumexp(0, 0, 0)
    assert opened.objectness_doubt[unknown] == pytest.approx(np.log1p(np.exp(-4.0)), rel=1e-5)  # -log sigmoid(4)
    from edgeq.detection import unknown_measures

    assert set(unknown_measures(opened)) == {"class_doubt", "energy", "mutual_information", "objectness_doubt"}
    assert opened.objectness.tolist() == sorted(opened.objectness.tolist(), reverse=True)  # ranked by objectness


def test_the_default_unknown_rule_is_the_one_the_select_scenes_chose():
    """energy, unfamiliarity (with a density) and objectness doubt, combined by Fisher's sum (docs/detection.md)."""
    from edgeq.converter.recipes import UnknownRecipe

    r = UnknownRecipe()
    assert r.combine == "fisher"
    assert r.measures_for(True, 32) == ("energy", "unfamiliarity", "objectness_doubt")
    assert r.measures_for(False, 1) == ("energy", "objectness_doubt")


def test_unknown_rule_reads_percentiles_and_combines_them():
    from edgeq.unknown import UnknownRule, combine

    rule = UnknownRule(("class_doubt", "unfamiliarity"), (np.linspace(0, 1, 11), np.linspace(0, 100, 11)), "max", 0.9)
    values = {"class_doubt": np.array([0.05, 0.95, 0.5, np.nan]), "unfamiliarity": np.array([10.0, 20.0, 95.0, 5.0])}
    p = rule.percentiles(values)
    assert p[0].tolist() == pytest.approx([0.05, 0.95, 0.5, 1.0])  # a missing value counts as the most extreme
    assert p[1].tolist() == pytest.approx([0.1, 0.2, 0.95, 0.05])
    assert rule.scores(values).tolist() == pytest.approx([0.1, 0.95, 0.95, 1.0])
    assert rule.flags(rule.scores(values)).tolist() == [False, True, True, True]
    fisher = combine(p, "fisher")
    assert fisher[0] == pytest.approx(-np.log(0.95) - np.log(0.9))
    assert fisher[3] == pytest.approx(-np.log(1e-3) - np.log(0.95))  # clipped: finite however extreme


def test_an_unknown_object_is_published_as_unknown_with_its_nearest_class():
    """Schema 4: label 'unknown', nearest_label beside it, class_id kept (a schema-3 subscriber still gets a class),
    flagged for review as unknown; a known detection carries its unknown score and stays as it was."""
    import jsonschema

    from edgeq.bundle import message_schema
    from edgeq.device.decoders import mark_unknown

    def item(label: str) -> dict:
        return {"label": label, "class_id": 1, "score": 0.3, "objectness": 0.97, "bbox": {"x_min": 0.1, "y_min": 0.1,
                "x_max": 0.4, "y_max": 0.5}, "uncertainty": {"method": "softmax", "predictive_entropy": 1.05},
                "needs_review": False, "review_reason": None}

    unknown = mark_unknown(item("trouser"), 0.991, True)
    assert unknown["label"] == "unknown" and unknown["nearest_label"] == "trouser" and unknown["class_id"] == 1
    assert unknown["needs_review"] is True and unknown["review_reason"] == "unknown"
    assert unknown["uncertainty"]["unknown_score"] == pytest.approx(0.991)
    known = mark_unknown(item("trouser"), 0.4, False)
    assert known["label"] == "trouser" and "nearest_label" not in known and known["needs_review"] is False
    assert mark_unknown(item("trouser"), float("nan"), False)["label"] == "unknown"  # no score: never trusted
    message = {"schema": "edgeq.detections", "schema_version": 4, "device_id": "cam", "task": "detect", "seq": 1,
               "model": {"name": "det", "sha256": "0" * 64}, "timestamp": "2026-12-07T12:00:00Z",
               "frame": {"id": "1", "width": 192, "height": 192}, "latency_ms": {"preprocess": 1, "invoke": 1,
                                                                                 "decode": 1},
               "detections": [unknown, known]}
    jsonschema.validate(message, message_schema("detections"))
