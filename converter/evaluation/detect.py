"""Detector evaluation on a COCO set: one implementation for ``convert --val`` and ``edgeq eval``.

- mAP@0.5 and mAP@[.5:.95] come from pycocotools (the reference implementation, not re-implemented here), over
  the known categories (the bundle's ``category_ids``). Objects of unknown categories are not in the label space:
  a detection on one counts as a false positive of the class it claims, which is the real cost of a confident
  wrong label.
- Every detection is matched by pycocotools' COCOeval too (category-agnostic, ``useCats = 0``, IoU 0.5): highest
  score first, to the unmatched ground-truth box of highest IoU, so mAP and the figures below rest on one
  matching. A detection is *correct* when its box is of a known category and the label agrees.
- Per-detection ECE is the detection calibration error (D-ECE, Kueppers et al. 2020) in its plain form: the
  score as confidence against correctness, over all kept detections, 15 bins.
- Known vs unknown: detections matched to a known-category box are negatives, those matched to an unknown-category
  box positives; the AUROC of each uncertainty measure says how well it tells them apart (1.0: perfectly, 0.5:
  chance). ``1 - score`` is reported as the baseline every detector has.
- ``needs_review`` is calibrated on the detections matched to known objects: the highest threshold on the chosen
  measure at which the kept detections reach the target label accuracy.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.bundle import Bundle, read_bundle
from edgeq.detection import BoundGrid, Detections, GridSpec
from edgeq.errors import DataError, SourceError
from edgeq.preprocess import Preprocessor, PreprocessSpec, input_spec_for, read_image
from edgeq.runtime import Model
from edgeq.uncertainty import MEASURES

from ..data.coco import CocoSet, is_coco_path, read_coco
from ..data.datasets import progress
from . import metrics

MATCH_IOU = 0.5
EVAL_SCORE_THRESHOLD = 0.05  # mAP needs the low-score tail; the device's own threshold applies elsewhere


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections with boxes in image pixels ``[N, 4]`` (x0, y0, x1, y1)."""

    image_id: int
    boxes: np.ndarray
    detections: Detections


def run_detector(model: Model, grid: BoundGrid, spec: PreprocessSpec, coco: CocoSet, desc: str = "detect",
                 score_threshold: float = EVAL_SCORE_THRESHOLD) -> list[ImageDetections]:
    """Every image of ``coco`` through the core preprocessor, the model and the decoder."""
    pre = Preprocessor(input_spec_for(model, spec))
    out = []
    size = (spec.height, spec.width)
    for im in progress(coco.images, len(coco.images), desc):
        try:
            frame = read_image(coco.image_path(im))
        except SourceError as exc:
            raise DataError(str(exc) + "; remove or replace it") from None
        tensor, transform = pre(frame)
        model.set_input(tensor)
        model.invoke()
        dets = grid.read(model, size, score_threshold)
        h, w = frame.shape[:2]
        dets, frame_boxes = dets.on_frame(transform)  # what the device publishes
        frame_boxes = frame_boxes * np.array([h, w, h, w], np.float32)
        out.append(ImageDetections(int(im["id"]), frame_boxes[:, [1, 0, 3, 2]], dets))
    return out


@dataclass(frozen=True)
class Matched:
    """All kept detections of a set, flattened: scores, uncertainty measures, and what they matched."""

    scores: np.ndarray
    measures: dict[str, np.ndarray]
    matched: np.ndarray  # bool: matched any ground-truth box
    known: np.ndarray  # bool: matched a known-category box
    unknown: np.ndarray  # bool: matched an unknown-category box
    correct: np.ndarray  # bool: matched a known box and the label agrees
    kinds: np.ndarray | None = None  # str: the matched box's category name ("" unmatched)
    published_unknown: np.ndarray | None = None  # bool: the device publishes it as label "unknown"
    objects: dict[str, tuple[int, int]] | None = None  # per category name: objects found by a kept detection, of all


def kept(d: Detections, min_score: float, objectness_threshold: float | None = None) -> np.ndarray:
    """Which detections the device keeps: class score at or above ``min_score``, or (a bundle that detects unknown
    objects) objectness at or above ``objectness_threshold``."""
    keep = d.scores >= min_score
    if objectness_threshold is not None:
        keep |= d.objectness >= objectness_threshold
    return keep


def _coco_api() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DataError("detection figures need pycocotools: pip install 'edgeq[convert]'") from None
    return COCO, COCOeval


def _ground_truth(coco: CocoSet) -> Any:
    """The set's boxes (known and unknown categories) as a pycocotools COCO object."""
    COCO, _ = _coco_api()
    gt = COCO()
    anns = []
    for im in coco.images:
        for b, c in zip(coco.boxes[im["id"]], coco.category_ids[im["id"]]):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(c), "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
    gt.dataset = {"images": coco.images, "annotations": anns, "categories": coco.categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _coco_detections(results: list[ImageDetections], category_ids: list[int], min_score: float = 0.0,
                     objectness_threshold: float | None = None) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """Detections in COCO's result format, and (image index, detection index) of each, in the same order (which
    is the order of the ids ``loadRes`` gives them: 1, 2, ...)."""
    dets, where = [], []
    for i, r in enumerate(results):
        for j in np.flatnonzero(kept(r.detections, min_score, objectness_threshold)):
            box = r.boxes[j]
            dets.append({"image_id": r.image_id, "category_id": int(category_ids[int(r.detections.classes[j])]),
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                         "score": float(r.detections.scores[j])})
            where.append((i, int(j)))
    return dets, where


def match_all(results: list[ImageDetections], coco: CocoSet, category_ids: list[int],
              min_score: float = 0.0, objectness_threshold: float | None = None) -> Matched:
    """Every detection the device keeps (:func:`kept`), matched by COCOeval itself to a box of any category at IoU
    0.5; and per category, how many of its objects a kept detection found."""
    _, COCOeval = _coco_api()
    dets, where = _coco_detections(results, category_ids, min_score, objectness_threshold)
    names_of = {int(c["id"]): str(c["name"]) for c in coco.categories}
    totals: dict[str, int] = {}
    for cats in coco.category_ids.values():
        for c in cats.tolist():
            totals[names_of[int(c)]] = totals.get(names_of[int(c)], 0) + 1
    if not dets:
        empty = np.zeros(0)
        return Matched(empty, {k: empty for k in (*MEASURES, "objectness", "energy", "class_doubt", "objectness_doubt")},
                       *(np.zeros(0, bool) for _ in range(4)),
                       np.zeros(0, str), np.zeros(0, bool), {k: (0, n) for k, n in totals.items()})
    gt = _ground_truth(coco)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.useCats = 0
        ev.params.iouThrs = np.array([MATCH_IOU])
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        ev.params.maxDets = [max(len(r.detections) for r in results)]
        ev.evaluate()
    names = [*MEASURES, "objectness", "class_doubt", "objectness_doubt",
             *(["energy"] if all(r.detections.energy is not None for r in results) else []),
             *(["unfamiliarity"] if all(r.detections.unfamiliarity is not None for r in results) else []),
             *(["unknown_score"] if all(r.detections.unknown_score is not None for r in results) else [])]
    gt_of = np.zeros(len(dets), np.int64)  # 0: unmatched, else the ground-truth annotation id
    found: dict[str, int] = {}
    annotations = gt.dataset["annotations"]
    for e in ev.evalImgs:
        if e is not None:
            for det_id, gt_id in zip(e["dtIds"], e["dtMatches"][0]):
                gt_of[int(det_id) - 1] = int(gt_id)
            for gt_id, det_id in zip(e["gtIds"], e["gtMatches"][0]):
                if det_id:
                    name = names_of[int(annotations[int(gt_id) - 1]["category_id"])]
                    found[name] = found.get(name, 0) + 1
    gt_cat = np.array([0] + [a["category_id"] for a in annotations], np.int64)[gt_of]
    matched = gt_of > 0
    unknown = matched & np.isin(gt_cat, list(coco.unknown_category_ids))
    known = matched & ~unknown
    predicted = np.array([d["category_id"] for d in dets], np.int64)
    measures = {k: np.array([results[i].detections.measure(k)[j] for i, j in where], np.float64) for k in names}
    flagged = np.array([bool(results[i].detections.unknown[j]) if results[i].detections.unknown is not None
                        else False for i, j in where], bool)
    kinds = np.array([names_of.get(int(c), "") if m else "" for c, m in zip(gt_cat, matched)], object)
    return Matched(np.array([d["score"] for d in dets], np.float64), measures, matched, known, unknown,
                   known & (predicted == gt_cat), kinds, flagged,
                   {k: (found.get(k, 0), n) for k, n in totals.items()})


def coco_map(results: list[ImageDetections], coco: CocoSet, category_ids: list[int]) -> dict[str, float]:
    """mAP@0.5 and mAP@[.5:.95] by pycocotools' COCOeval over ``category_ids``."""
    _, COCOeval = _coco_api()
    dets, _ = _coco_detections(results, category_ids)
    if not dets:
        return {"map50": 0.0, "map": 0.0}
    gt = _ground_truth(coco)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.catIds = [int(c) for c in category_ids]
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": round(float(max(ev.stats[0], 0.0)), 6), "map50": round(float(max(ev.stats[1], 0.0)), 6)}


def detection_figures(results: list[ImageDetections], coco: CocoSet, category_ids: list[int],
                      score_threshold: float, rule: dict[str, Any] | None = None,
                      objectness_threshold: float | None = None) -> dict[str, Any]:
    """mAP (all detections down to the eval threshold), then, over the detections the device keeps (class score at
    or above ``score_threshold``, or objectness at or above ``objectness_threshold``): counts, D-ECE,
    known-vs-unknown AUROC (and FPR at 95% TPR) of each measure, with a review ``rule`` how many detections of
    known and of unknown objects it flags, and per kind of unknown object what is found and said about it."""
    figures: dict[str, Any] = dict(coco_map(results, coco, category_ids))
    m = match_all(results, coco, category_ids, score_threshold, objectness_threshold)
    n_unknown_gt = sum(int(np.isin(c, list(coco.unknown_category_ids)).sum()) for c in coco.category_ids.values())
    figures.update({
        "images": len(results), "detections": int(len(m.scores)), "matched_known": int(m.known.sum()),
        "matched_unknown": int(m.unknown.sum()), "unknown_objects": n_unknown_gt,
        "unmatched": int((~m.matched).sum()),
        "label_accuracy_known": round(float(m.correct[m.known].mean()), 6) if m.known.any() else None,
        "d_ece": round(metrics.detection_calibration_error(m.scores, m.correct), 6) if len(m.scores) else None,
        "score_threshold": score_threshold,
    })
    if objectness_threshold is not None:
        figures["objectness_threshold"] = objectness_threshold
    auroc: dict[str, float | None] = {}
    fpr: dict[str, float | None] = {}
    if m.known.any() and m.unknown.any():
        for name, values in {**m.measures, "one_minus_score": 1.0 - m.scores}.items():
            auroc[name] = round(metrics.roc_auc(values[m.known], values[m.unknown]), 6)
            fpr[name] = round(metrics.fpr_at_tpr(values[m.known], values[m.unknown]), 6)
    figures["unknown_auroc"] = auroc or None
    figures["unknown_fpr_at_95_tpr"] = fpr or None
    if rule is not None and rule.get("measure") in m.measures:
        from .review import flag_rates

        unf = m.measures.get("unfamiliarity")
        figures["flagged"] = {
            name: flag_rates(m.measures[rule["measure"]][sel], None if unf is None else unf[sel], rule,
                             m.correct[sel] if name == "known" else None)
            for name, sel in (("known", m.known), ("unknown", m.unknown)) if sel.any()}
    figures.update(kind_figures(m, coco, category_ids))
    return figures


def kind_figures(m: Matched, coco: CocoSet, category_ids: list[int]) -> dict[str, Any]:
    """Per kind of unknown object (each unknown category): how many of its objects a kept detection found (IoU >= 0.5,
    any label), how many of those detections are published as ``unknown``, and the AUROC of each measure against
    the detections of known objects; the same counts for known objects, as one kind."""
    names = {int(c["id"]): str(c["name"]) for c in coco.categories}
    known_names = {names[int(c)] for c in category_ids}
    objects = m.objects or {}
    found_known = sum(objects.get(k, (0, 0))[0] for k in known_names)
    all_known = sum(objects.get(k, (0, 0))[1] for k in known_names)
    out: dict[str, Any] = {"known_objects": {
        "objects": all_known, "found": found_known, "found_rate": round(found_known / all_known, 6) if all_known else None,
        "published_unknown": round(float(m.published_unknown[m.known].mean()), 6)
        if m.published_unknown is not None and m.known.any() else None}}
    kinds = {}
    for cid in sorted(coco.unknown_category_ids):
        name = names[cid]
        found, total = objects.get(name, (0, 0))
        if not total:
            continue
        sel = m.kinds == name if m.kinds is not None else np.zeros(len(m.scores), bool)
        entry: dict[str, Any] = {"objects": total, "found": found, "found_rate": round(found / total, 6),
                                 "detections": int(sel.sum())}
        if m.published_unknown is not None and sel.any():
            entry["published_unknown"] = round(float(m.published_unknown[sel].mean()), 6)
        if sel.any() and m.known.any():
            entry["auroc"] = {k: round(metrics.roc_auc(v[m.known], v[sel]), 6)
                              for k, v in {**m.measures, "one_minus_score": 1.0 - m.scores}.items()}
        kinds[name] = entry
    out["unknown_kinds"] = kinds or None
    out["false_detections"] = int((~m.matched).sum())
    return out


def calibrate_detection_rule(m: Matched, measure: str, target_accuracy: float, budget: float,
                             unfamiliar_threshold: float | None, ood_rate: float | None,
                             log: Any = lambda s: None) -> dict[str, Any] | None:
    """The needs_review rule on the detections matched to known objects (converter/evaluation/review.py), from
    ``match_all`` at the score threshold."""
    from .review import calibrate_rule

    if not m.known.any():
        return None
    rule = calibrate_rule(m.measures[measure][m.known], m.correct[m.known], measure, target_accuracy, budget,
                          unfamiliar_threshold, ood_rate, log)
    rule["calibrated_on"] = "detections matched to known objects"
    return rule


def best_f1_threshold(results: list[ImageDetections], coco: CocoSet, category_ids: list[int],
                      floor: float = EVAL_SCORE_THRESHOLD, ceiling: float = 0.9) -> dict[str, Any]:
    """The score threshold with the highest F1 on the known objects (a detection is a true positive when it is
    correct, see the module docstring; a detection of an unknown object is a false positive), within
    ``[floor, ceiling]``: what ``convert --val`` records as the device's ``score_threshold``."""
    m = match_all(results, coco, category_ids, floor)
    unknown = coco.unknown_category_ids
    known_objects = sum(int((~np.isin(c, list(unknown))).sum()) for c in coco.category_ids.values())
    if not len(m.scores) or not known_objects:
        return {"threshold": None, "f1": None, "known_objects": known_objects}
    order = np.argsort(-m.scores, kind="stable")
    s, c = m.scores[order], m.correct[order]
    tp = np.cumsum(c)
    fp = np.cumsum(~c)
    f1 = 2 * tp / (2 * tp + fp + (known_objects - tp))
    last_of_tie = np.append(s[1:] != s[:-1], True)  # a threshold keeps every detection of equal score
    ok = last_of_tie & (s <= ceiling)
    if not ok.any():
        return {"threshold": None, "f1": None, "known_objects": known_objects}
    i = int(np.flatnonzero(ok)[np.argmax(f1[ok])])
    return {"threshold": round(float(s[i]), 6), "f1": round(float(f1[i]), 6), "precision":
            round(float(tp[i] / (i + 1)), 6), "recall": round(float(tp[i] / known_objects), 6),
            "known_objects": known_objects}


@dataclass
class DetectionRun:
    """One model of a detection eval: its figures, latency and per-image detections."""

    name: str
    model: Model
    grid: BoundGrid
    spec: PreprocessSpec
    info: dict[str, Any]
    results: list[ImageDetections] | None = None
    figures: dict[str, Any] | None = None


def evaluate_detection(bundle: Bundle, data: str, reference: str | None = None, target_accuracy: float = 0.995,
                       threads: int = 1, compare: Any = (), latency_runs: int = 50
                       ) -> tuple[dict[str, Any], list[DetectionRun], CocoSet]:
    """``edgeq eval`` of a detection bundle: it, its float reference and ``compare`` bundles side by side."""
    from edgeq.runtime import interleaved_latency

    from .classify import compare_bundles, variant

    if not is_coco_path(data):
        raise DataError(f"--data {data}: {bundle.path} is a detection bundle; give a COCO set (annotations.json or "
                        "the folder holding it), not a class folder")
    coco = read_coco(data, flag="--data")
    spec = GridSpec.from_manifest(bundle.manifest, bundle.where)
    coco.require_categories(spec.category_ids, "--data", bundle.where)

    def bundle_run(name: str, b: Bundle) -> DetectionRun:
        m = b.load_model(num_threads=threads)
        g = GridSpec.from_manifest(b.manifest, b.where).bind(m, b.manifest.outputs, b.where, b.manifest.density,
                                                             b.manifest.unknown)
        return DetectionRun(name, m, g, b.preprocess_spec, {"bundle": b.where, "bundle_bytes": b.file_size,
                                                            "variant": variant(b.manifest)})

    runs = [bundle_run("quantized", bundle)] + [bundle_run(name, other) for name, other in compare_bundles(compare, bundle)]
    if reference:
        p = Path(reference)
        if not p.exists():
            raise DataError(f"--reference {reference}: not found; give the source .keras detector or a float .edgeq")
        if p.suffix == ".edgeq":
            ref = read_bundle(p)
            if ref.task != "detect" or ref.labels != bundle.labels:
                raise DataError(f"--reference {reference}: its labels or task differ from {bundle.path}'s")
            runs.insert(0, bundle_run("reference", ref))
        else:
            from ..reference import detector_reference

            m, g = detector_reference(str(p), bundle.manifest, threads)
            runs.insert(0, DetectionRun("reference", m, g, bundle.preprocess_spec, {"variant": "float32 (from Keras)"}))
    review = bundle.manifest.head_or_dense.review
    measure = review.measure if review is not None else (
        "mutual_information" if spec.samples > 1 else "predictive_entropy")
    rule = review.model_dump() if review is not None and review.threshold is not None else None
    for run in runs:
        run.results = run_detector(run.model, run.grid, run.spec, coco, f"detect {run.name}")
        run.figures = detection_figures(run.results, coco, list(spec.category_ids), spec.score_threshold, rule,
                                        spec.objectness_threshold)
    inputs = [np.zeros(r.model.input.shape, dtype=r.model.input.dtype) for r in runs]
    times = interleaved_latency([r.model for r in runs], inputs, runs=latency_runs, warmup=5)
    report: dict[str, Any] = {
        "task": "detect", "bundle": bundle.where, "name": bundle.name, "labels": bundle.labels,
        "data": str(coco.path), "count": len(coco.images), "uncertainty_measure": measure,
        "score_threshold": spec.score_threshold, "objectness_threshold": spec.objectness_threshold,
        "review_rule": rule, "models": {},
    }
    for run, t in zip(runs, times):
        report["models"][run.name] = {"size_bytes": run.model.size, "latency_ms_median": float(np.median(t)),
                                      "runtime": run.model.describe(), "samples": run.grid.spec.samples,
                                      **run.info, **(run.figures or {})}
    return report, runs, coco


def detection_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The summary table of a detection eval: one row per figure, one column per model."""
    models = list(report["models"].values())

    def fmt(v: Any, digits: int = 4) -> str:
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    def auroc(m: dict[str, Any], k: str) -> str:
        a = m.get("unknown_auroc") or {}
        return fmt(a.get(k))

    rows = [
        ("variant", [str(m.get("variant", "")) for m in models]),
        ("mAP@0.5", [fmt(m["map50"]) for m in models]),
        ("mAP@[.5:.95]", [fmt(m["map"]) for m in models]),
        (f"detections (score >= {report['score_threshold']:g})", [str(m["detections"]) for m in models]),
        ("on known / unknown objects", [f"{m['matched_known']} / {m['matched_unknown']}" for m in models]),
        ("label accuracy (known)", [fmt(m["label_accuracy_known"]) for m in models]),
        ("D-ECE", [fmt(m["d_ece"]) for m in models]),
        ("AUROC unknown: unknown score", [auroc(m, "unknown_score") for m in models]),
        ("AUROC unknown: unfamiliarity", [auroc(m, "unfamiliarity") for m in models]),
        ("AUROC unknown: mutual information", [auroc(m, "mutual_information") for m in models]),
        ("AUROC unknown: predictive entropy", [auroc(m, "predictive_entropy") for m in models]),
        ("AUROC unknown: 1 - score", [auroc(m, "one_minus_score") for m in models]),
        ("needs_review flags, known objects", [fmt(((m.get("flagged") or {}).get("known") or {}).get("flagged"))
                                               for m in models]),
        ("needs_review flags, unknown objects", [fmt(((m.get("flagged") or {}).get("unknown") or {}).get("flagged"))
                                                 for m in models]),
        ("latency ms (median)", [fmt(m["latency_ms_median"], 3) for m in models]),
        ("model bytes", [str(m["size_bytes"]) for m in models]),
    ]
    return rows
