"""Issue 8 figure: device decode + NMS time per frame for the anchor-free detector's outputs (edgeq/detection.py).

A 12x12 grid (192 px input, stride 16) with K=32 posterior samples x 8 classes per cell; objectness set so that
exactly ``candidates`` cells pass the score threshold, boxes overlapping enough for NMS to work. Median and p95 of
``decode`` over many frames, one thread, numpy + OpenCV (``cv2.dnn.NMSBoxesBatched``).

    python benchmarks/detection_decode.py        # writes benchmarks/results/detection_decode.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)


def frame(rng: np.random.Generator, grid: int, k: int, c: int, candidates: int) -> tuple[np.ndarray, ...]:
    obj = np.full((grid, grid, 1), -6.0, np.float32)
    cells = rng.choice(grid * grid, candidates, replace=False)
    obj.reshape(-1)[cells] = rng.uniform(2.0, 6.0, candidates)
    boxes = rng.uniform(0.5, 2.5, (grid, grid, 4)).astype(np.float32)
    logits = rng.normal(0.0, 1.0, (grid, grid, k, c)).astype(np.float32)
    logits[..., 0] += 4.0  # a dominant class, so scores pass the threshold
    return obj, boxes, logits


def main(argv: list[str] | None = None) -> int:
    import cv2

    from edgeq.detection import decode

    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--classes", type=int, default=8)
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    out: dict = {"benchmark": "detection_decode", "samples": args.samples, "classes": args.classes, "target_ms": 2.0, "cases": {}}
    for grid, candidates in ((12, 25), (12, 100), (12, 144), (24, 100)):
        frames = [frame(rng, grid, args.samples, args.classes, candidates) for _ in range(50)]
        for f in frames[:20]:
            decode(*f, 16, (grid * 16, grid * 16), score_threshold=0.3)
        times, kept = [], []
        for i in range(args.frames):
            f = frames[i % len(frames)]
            t0 = time.perf_counter()
            d = decode(*f, 16, (grid * 16, grid * 16), score_threshold=0.3, max_candidates=100)
            times.append((time.perf_counter() - t0) * 1e3)
            kept.append(len(d))
        out["cases"][f"grid{grid}_cand{candidates}"] = {
            "grid": grid, "cells_above_threshold": candidates, "median_ms": round(float(np.median(times)), 4),
            "p95_ms": round(float(np.percentile(times, 95)), 4), "mean_detections_after_nms": round(float(np.mean(kept)), 1),
        }
    write_result("detection_decode", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
