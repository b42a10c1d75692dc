"""Evaluating a grid detector on a COCO set: one implementation for ``convert --val`` and ``edgeq eval``.

- mAP@0.5 and mAP@[.5:.95] come from pycocotools (the reference implementation, not re-implemented here), over
  the known categories (the bundle's ``category_ids``). Objects of unknown categories are not in the label space:
  a detection on one counts as a false positive of the class it claims, which is the real cost of a confident
  wrong label.
- Every detection is matched greedily, highest score first, to the unmatched ground-truth box of highest IoU
  (>= 0.5, any category). It is *correct* when that box is of a known category and the label agrees.
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

from edgeq import metrics
from edgeq.datasets import progress
from edgeq.detection import BoundGrid, Detections
from edgeq.errors import DataError, SourceError
from edgeq.preprocess import Preprocessor, PreprocessSpec, read_image
from edgeq.runtime import Model
from edgeq.scenes import CocoSet
from edgeq.uncertainty import MEASURES, pick_review_threshold

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
    from edgeq.evaluate import model_input_spec

    pre = Preprocessor(model_input_spec(model, spec))
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
        frame_boxes = transform.boxes_to_frame(dets.boxes) * np.array([h, w, h, w], np.float32)
        out.append(ImageDetections(int(im["id"]), frame_boxes[:, [1, 0, 3, 2]], dets))
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` ``[N, 4]`` with every box in ``b`` ``[M, 4]`` (x0, y0, x1, y1)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def match(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float = MATCH_IOU) -> np.ndarray:
    """Greedy matching by score: per detection the index of its ground-truth box, or -1."""
    out = np.full(len(boxes), -1, np.int64)
    if not len(boxes) or not len(gt):
        return out
    ious = iou_matrix(boxes, gt)
    taken = np.zeros(len(gt), bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        row = np.where(taken, -1.0, ious[i])
        j = int(row.argmax())
        if row[j] >= iou:
            out[i] = j
            taken[j] = True
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


def match_all(results: list[ImageDetections], coco: CocoSet, category_ids: list[int],
              min_score: float = 0.0) -> Matched:
    unknown_ids = coco.unknown_category_ids
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("scores", "matched", "known", "unknown", "correct", *MEASURES)}
    for r in results:
        d = r.detections
        keep = d.scores >= min_score
        gt, gt_cat = coco.boxes[r.image_id], coco.category_ids[r.image_id]
        m = match(r.boxes[keep], d.scores[keep], gt)
        cat = np.where(m >= 0, gt_cat[np.maximum(m, 0)] if len(gt_cat) else -1, -1)
        is_unknown = np.isin(cat, list(unknown_ids)) & (m >= 0)
        is_known = (m >= 0) & ~is_unknown
        predicted = np.asarray(category_ids)[d.classes[keep]] if keep.any() else np.zeros(0, np.int64)
        cols["scores"].append(d.scores[keep])
        cols["matched"].append(m >= 0)
        cols["known"].append(is_known)
        cols["unknown"].append(is_unknown)
        cols["correct"].append(is_known & (predicted == cat))
        for name in MEASURES:
            cols[name].append(d.measure(name)[keep])
    cat_ = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return Matched(cat_["scores"].astype(np.float64), {k: cat_[k].astype(np.float64) for k in MEASURES},
                   cat_["matched"].astype(bool), cat_["known"].astype(bool), cat_["unknown"].astype(bool),
                   cat_["correct"].astype(bool))


def coco_map(results: list[ImageDetections], coco: CocoSet, category_ids: list[int]) -> dict[str, float]:
    """mAP@0.5 and mAP@[.5:.95] by pycocotools' COCOeval over ``category_ids``."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DataError("detection mAP needs pycocotools: pip install 'edgeq[convert]' (or pip install pycocotools)") from None
    dets = []
    for r in results:
        for box, c, s in zip(r.boxes, r.detections.classes, r.detections.scores):
            dets.append({"image_id": r.image_id, "category_id": int(category_ids[int(c)]),
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                         "score": float(s)})
    gt = COCO()
    anns = []
    for im in coco.images:
        for j, (b, c) in enumerate(zip(coco.boxes[im["id"]], coco.category_ids[im["id"]])):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(c), "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
    gt.dataset = {"images": coco.images, "annotations": anns, "categories": coco.categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not dets:
            return {"map50": 0.0, "map": 0.0}
        res = gt.loadRes(dets)
        ev = COCOeval(gt, res, "bbox")
        ev.params.catIds = [int(c) for c in category_ids]
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": round(float(max(ev.stats[0], 0.0)), 6), "map50": round(float(max(ev.stats[1], 0.0)), 6)}


def detection_figures(results: list[ImageDetections], coco: CocoSet, category_ids: list[int],
                      score_threshold: float, target_accuracy: float = 0.995,
                      review_measure: str = "mutual_information") -> dict[str, Any]:
    """mAP (all detections down to the eval threshold), then, over detections at or above the device's
    ``score_threshold``: counts, D-ECE, known-vs-unknown AUROC of each measure, and the needs_review rule."""
    figures: dict[str, Any] = dict(coco_map(results, coco, category_ids))
    m = match_all(results, coco, category_ids, score_threshold)
    n_unknown_gt = sum(int(np.isin(c, list(coco.unknown_category_ids)).sum()) for c in coco.category_ids.values())
    figures.update({
        "images": len(results), "detections": int(len(m.scores)), "matched_known": int(m.known.sum()),
        "matched_unknown": int(m.unknown.sum()), "unknown_objects": n_unknown_gt,
        "unmatched": int((~m.matched).sum()),
        "label_accuracy_known": round(float(m.correct[m.known].mean()), 6) if m.known.any() else None,
        "d_ece": round(metrics.detection_calibration_error(m.scores, m.correct), 6) if len(m.scores) else None,
        "score_threshold": score_threshold,
    })
    auroc: dict[str, float | None] = {}
    if m.known.any() and m.unknown.any():
        for name, values in {**m.measures, "one_minus_score": 1.0 - m.scores}.items():
            auroc[name] = round(metrics.roc_auc(values[m.known], values[m.unknown]), 6)
    figures["unknown_auroc"] = auroc or None
    figures["review"] = review_rule(m, review_measure, target_accuracy)
    return figures


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


def review_rule(m: Matched, measure: str, target_accuracy: float) -> dict[str, Any] | None:
    """The needs_review threshold on ``measure`` over detections matched to known objects."""
    if measure not in MEASURES:
        raise DataError(f"--review-measure {measure!r}: choose one of {', '.join(MEASURES)}")
    if not m.known.any():
        return None
    rule = pick_review_threshold(m.measures[measure][m.known], m.correct[m.known], target_accuracy, measure)
    out = rule.to_dict()
    out["calibrated_on"] = "detections matched to known objects"
    return out


def is_coco_path(path: str | Path) -> bool:
    """A COCO instances file, or a folder holding ``annotations.json``: what a detection eval takes."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".json") or (p.is_dir() and (p / "annotations.json").is_file())


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


GridReference = Any  # (model_path, manifest, threads) -> (Model, BoundGrid): the converter's float reference


def evaluate_detection(bundle: Any, data: str, reference: str | None = None, target_accuracy: float = 0.995,
                       threads: int = 1, compare: Any = (), keras_reference: GridReference | None = None,
                       latency_runs: int = 50) -> tuple[dict[str, Any], list[DetectionRun], CocoSet]:
    """``edgeq eval`` of a detection bundle: it, its float reference and ``compare`` bundles side by side."""
    from edgeq.bundle import read_bundle
    from edgeq.detection import GridSpec
    from edgeq.errors import ModelError
    from edgeq.evaluate import compare_bundles, variant
    from edgeq.runtime import interleaved_latency
    from edgeq.scenes import read_coco

    if not is_coco_path(data):
        raise DataError(f"--data {data}: {bundle.path} is a detection bundle; give a COCO set (annotations.json or "
                        "the folder holding it), not a class folder")
    coco = read_coco(data, flag="--data")
    spec = GridSpec.from_manifest(bundle.manifest, str(bundle.path))
    coco.require_categories(spec.category_ids, "--data", str(bundle.path))

    def bundle_run(name: str, b: Any) -> DetectionRun:
        m = b.load_model(num_threads=threads)
        g = GridSpec.from_manifest(b.manifest, str(b.path)).bind(m, b.manifest["outputs"], str(b.path))
        return DetectionRun(name, m, g, b.preprocess_spec, {"bundle": str(b.path), "bundle_bytes": b.file_size,
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
            if keras_reference is None:
                raise ModelError(f"--reference {reference}: a Keras model needs TensorFlow: pip install 'edgeq[convert]'")
            m, g = keras_reference(str(p), bundle.manifest, threads)
            runs.insert(0, DetectionRun("reference", m, g, bundle.preprocess_spec, {"variant": "float32 (from Keras)"}))
    review = (bundle.manifest.get("head") or {}).get("review") or {}
    measure = review.get("measure") or ("mutual_information" if spec.samples > 1 else "predictive_entropy")
    for run in runs:
        run.results = run_detector(run.model, run.grid, run.spec, coco, f"detect {run.name}")
        run.figures = detection_figures(run.results, coco, list(spec.category_ids), spec.score_threshold,
                                        target_accuracy, measure)
    inputs = [np.zeros(r.model.input.shape, dtype=r.model.input.dtype) for r in runs]
    times = interleaved_latency([r.model for r in runs], inputs, runs=latency_runs, warmup=5)
    report: dict[str, Any] = {
        "task": "detect", "bundle": str(bundle.path), "name": bundle.name, "labels": bundle.labels,
        "data": str(coco.path), "count": len(coco.images), "uncertainty_measure": measure,
        "score_threshold": spec.score_threshold, "models": {},
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
        ("AUROC unknown: mutual information", [auroc(m, "mutual_information") for m in models]),
        ("AUROC unknown: predictive entropy", [auroc(m, "predictive_entropy") for m in models]),
        ("AUROC unknown: 1 - score", [auroc(m, "one_minus_score") for m in models]),
        ("needs_review coverage", [fmt((m.get("review") or {}).get("coverage")) for m in models]),
        ("latency ms (median)", [fmt(m["latency_ms_median"], 3) for m in models]),
        ("model bytes", [str(m["size_bytes"]) for m in models]),
    ]
    return rows
