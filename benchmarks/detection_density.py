"""Issue 16 figures: the detector's unfamiliarity score, nearest class mean (gda) vs k-th nearest fitting sample
(knn), side by side on the same int8 detections.

Reads the int8 bundle ``benchmarks/detection.py`` wrote in its workdir (a knn bundle, which also keeps the class
means). For each test scene: one invoke, the detections at the bundle's score threshold, the projection's whitened
coordinates at their cells. Every score below comes from those same coordinates, so the rows differ only by the
score: the nearest class mean (``gda``, a classifier's default), and the distance to the k-th nearest of the
bundle's references for several k (the bundle's own k is the shipped row). Detections are matched to known and
unknown objects by ``edgeq eval``'s code (COCOeval, IoU 0.5); AUROC of unknown vs known, and the share of unknown
detections above the score that flags 5% of the known ones (the ``--review-ood-rate`` default). Also the numpy
time of each score per detection (median of repeated runs over all test detections, 1 thread), and of the step
before it, the whitened coordinates of each detection (``whitened_us_per_detection``; for a ``normalise: l2``
bundle, the device's numpy projection of the unit-length features).

``score_rules``: which detections there are to score depends on the detection score. The shipped score,
objectness times the top class probability, is low where the classes disagree, which an unknown object's often
do; the other row keeps a cell by its objectness alone (class-agnostic NMS; the label is still the top class).
Each rule at its own best-F1 threshold on these scenes (``edgeq convert --val``'s rule): how many known and unknown
objects it detects, and the shipped unfamiliarity's AUROC and 5%-rule flags on them.

    python benchmarks/detection_density.py --workdir /tmp/det-bench   # writes results/detection_density.json

The same rows for the workdir's ``--density-normalise l2`` bundle, when ``benchmarks/detection.py`` made one, go
under ``l2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True, help="benchmarks/detection.py's workdir")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    result = measure(work)
    if (work / "detector_int8_l2.edgeq").is_file():  # the same detector, --density-normalise l2 (detection.py)
        l2 = measure(work, "detector_int8_l2.edgeq", rules=False)
        result["l2"] = {k: l2[k] for k in ("bundle", "normalise", "detections", "whitened_us_per_detection", "scores")}
    write_result("detection_density", result)
    return 0


def measure(work: Path, name: str = "detector_int8.edgeq", rules: bool = True) -> dict:
    from edgeq.bundle import read_bundle
    from edgeq.converter.data.coco import read_coco
    from edgeq.converter.evaluation.detect import ImageDetections, input_spec_for, match_all
    from edgeq.converter.evaluation.metrics import roc_auc
    from edgeq.density import DensityModel
    from edgeq.detection import GridSpec
    from edgeq.preprocess import Preprocessor, read_image

    b = read_bundle(work / name)
    block = b.manifest.density
    if block is None or block.references is None:
        raise SystemExit(f"{b.where}: not a knn_whitened bundle; run benchmarks/detection.py first")
    model = b.load_model(num_threads=1)
    grid = GridSpec.from_manifest(b.manifest, b.where).bind(model, b.manifest.outputs, b.where, block)
    density = DensityModel.from_block(block)
    pre = Preprocessor(input_spec_for(model, b.preprocess_spec))
    size = (b.preprocess_spec.height, b.preprocess_spec.width)
    ids, threshold = b.manifest.detector.category_ids, b.manifest.detector.score_threshold
    coco = read_coco(str(work / "test"))
    results, coords, frames, cells = [], [], [], []
    for im in coco.images:
        frame = read_image(coco.image_path(im))
        x, tf = pre(frame)
        model.set_input(x)
        model.invoke()
        raw = grid.raw(model)
        frames.append((int(im["id"]), raw, tf, frame.shape[:2]))
        dets, boxes = grid.decode(raw, size, threshold).on_frame(tf)  # what the device publishes
        cells.append(dets.cells)
        y = grid.density.whitened(raw, dets.cells)
        # the unfamiliarity slot carries each detection's row in `coords`, so that match_all's order maps back
        index = np.arange(len(coords), len(coords) + len(dets), dtype=np.float64)
        coords.extend(y)
        h, w = frame.shape[:2]
        boxes = boxes * np.array([h, w, h, w], np.float32)
        results.append(ImageDetections(int(im["id"]), boxes[:, [1, 0, 3, 2]],
                                       dataclasses.replace(dets, unfamiliarity=index)))
    # the device's step before any score: the whitened coordinates of each detection's cell (with normalise l2, the
    # numpy projection of its unit-length features), timed over every test frame's detections
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for (_, raw, _, _), c in zip(frames, cells):
            grid.density.whitened(raw, c)
        times.append((time.perf_counter() - t0) / max(1, sum(len(c) for c in cells)))
    whitening_us = round(1e6 * float(np.median(times)), 2)
    matched = match_all(results, coco, ids, threshold)
    rows = matched.measures["unfamiliarity"].astype(np.int64)
    y_all = np.asarray(coords, np.float64)
    known, unknown = y_all[rows[matched.known]], y_all[rows[matched.unknown]]
    gda = dataclasses.replace(density, references=None)
    scores = {"gda_nearest_class_mean": gda.scores}
    for k in sorted({1, 5, 10, 20, 50, density.neighbours}):
        name = f"knn_k{k}" + ("_shipped" if k == density.neighbours else "")
        scores[name] = dataclasses.replace(density, neighbours=k).scores  # the device's score with this K
    out: dict = {}
    for name, fn in scores.items():
        sk, su = fn(known), fn(unknown)
        cut = float(np.quantile(sk, 0.95))
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn(y_all)
            times.append((time.perf_counter() - t0) / max(1, len(y_all)))
        out[name] = {"auroc": round(roc_auc(sk, su), 4), "unknown_flagged_at_5pct_known": round(float(np.mean(su > cut)), 4),
                     "us_per_detection": round(1e6 * float(np.median(times)), 2)}
        print(name, out[name], file=sys.stderr)
    return {"benchmark": "detection_density", "bundle": str(b.path), "rank": block.rank,
            "references": int(block.references.shape[0]), "neighbours": density.neighbours,
            "detections": {"known": int(len(known)), "unknown": int(len(unknown)), "all": int(len(y_all))},
            "normalise": block.normalise, "whitened_us_per_detection": whitening_us,
            "scores": out, "score_rules": score_rules(grid, frames, size, coco, ids) if rules else None}


def score_rules(grid, frames: list, size: tuple[int, int], coco, ids: list[int]) -> dict:
    """The shipped detection score vs objectness alone, each at its own best-F1 threshold (module docstring)."""
    from edgeq.converter.evaluation.detect import EVAL_SCORE_THRESHOLD, ImageDetections, best_f1_threshold, match_all
    from edgeq.converter.evaluation.metrics import roc_auc
    from edgeq.detection import Detections, decode
    from edgeq.uncertainty import summarize

    spec = grid.spec
    gh, gw = spec.grid

    def by_objectness(raw: dict) -> Detections:
        # decode with one class whose probability is 1: its score is the objectness and its NMS class-agnostic;
        # then the label and the uncertainty come from the cells' real class samples
        obj, box = (t.dequantize(raw[t.index]) for t in grid.tensors[:2])
        d = decode(obj.reshape(gh, gw), box.reshape(gh, gw, 4), np.zeros((gh, gw, 1, 1), np.float32), spec.stride,
                   size, EVAL_SCORE_THRESHOLD, spec.nms_iou, spec.max_candidates, spec.max_detections)
        s = summarize(grid.class_samples(raw)[d.cells])
        cls = s.mean.argmax(axis=1)
        return dataclasses.replace(d, classes=cls, probabilities=s.mean, predictive_entropy=s.predictive_entropy,
                                   aleatoric=s.aleatoric, mutual_information=s.mutual_information,
                                   std=s.std[np.arange(len(cls)), cls], samples=spec.samples,
                                   unfamiliarity=grid.density.scores(raw, d.cells))

    rules = {"objectness_x_top_class_probability_shipped": lambda raw: grid.decode(raw, size, EVAL_SCORE_THRESHOLD),
             "objectness_alone": by_objectness}
    n_unknown = sum(int(np.isin(c, list(coco.unknown_category_ids)).sum()) for c in coco.category_ids.values())
    out = {}
    for name, read in rules.items():
        results = []
        for image_id, raw, tf, (h, w) in frames:
            dets, boxes = read(raw).on_frame(tf)
            boxes = boxes * np.array([h, w, h, w], np.float32)
            results.append(ImageDetections(image_id, boxes[:, [1, 0, 3, 2]], dets))
        f1 = best_f1_threshold(results, coco, ids)
        m = match_all(results, coco, ids, f1["threshold"])
        u = m.measures["unfamiliarity"]
        cut = float(np.quantile(u[m.known], 0.95))
        out[name] = {"threshold": f1["threshold"], "f1": f1["f1"], "known_detected": int(m.known.sum()),
                     "known_correct": int(m.correct.sum()), "unknown_detected": int(m.unknown.sum()),
                     "unknown_objects": n_unknown, "unmatched": int((~m.matched).sum()),
                     "unfamiliarity_auroc": round(roc_auc(u[m.known], u[m.unknown]), 4),
                     "unknown_flagged_at_5pct_known": round(float(np.mean(u[m.unknown] > cut)), 4)}
        print(name, out[name], file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
