"""Issue 16 figures: the detector's unfamiliarity score, nearest class mean (gda) vs k-th nearest fitting sample
(knn), side by side on the same int8 detections.

Reads the int8 bundle ``benchmarks/detection.py`` wrote in its workdir (a knn bundle, which also keeps the class
means). For each test scene: one invoke, the detections at the bundle's score threshold, the projection's whitened
coordinates at their cells. Every score below comes from those same coordinates, so the rows differ only by the
score: the nearest class mean (``gda``, a classifier's default), and the distance to the k-th nearest of the
bundle's references for several k (the bundle's own k is the shipped row). Detections are matched to known and
unknown objects by ``edgeq eval``'s code (COCOeval, IoU 0.5); AUROC of unknown vs known, and the share of unknown
detections above the score that flags 5% of the known ones (the ``--review-ood-rate`` default). Also the numpy
time of each score per detection (median of repeated runs over all test detections, 1 thread).

    python benchmarks/detection_density.py --workdir /tmp/det-bench   # writes results/detection_density.json
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
    write_result("detection_density", measure(Path(args.workdir)))
    return 0


def measure(work: Path) -> dict:
    from edgeq.bundle import read_bundle
    from edgeq.converter.data.coco import read_coco
    from edgeq.converter.evaluation.detect import ImageDetections, input_spec_for, match_all
    from edgeq.converter.evaluation.metrics import roc_auc
    from edgeq.density import DensityModel
    from edgeq.detection import GridSpec
    from edgeq.preprocess import Preprocessor, read_image

    b = read_bundle(work / "detector_int8.edgeq")
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
    results, coords = [], []
    for im in coco.images:
        frame = read_image(coco.image_path(im))
        x, tf = pre(frame)
        model.set_input(x)
        model.invoke()
        dets = grid.read(model, size, threshold)
        dets, boxes = dets.on_frame(tf)  # what the device publishes
        y = grid.density.whitened(grid.raw(model), dets.cells)
        # the unfamiliarity slot carries each detection's row in `coords`, so that match_all's order maps back
        index = np.arange(len(coords), len(coords) + len(dets), dtype=np.float64)
        coords.extend(y)
        h, w = frame.shape[:2]
        boxes = boxes * np.array([h, w, h, w], np.float32)
        results.append(ImageDetections(int(im["id"]), boxes[:, [1, 0, 3, 2]],
                                       dataclasses.replace(dets, unfamiliarity=index)))
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
            "scores": out}


if __name__ == "__main__":
    sys.exit(main())
