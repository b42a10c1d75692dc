"""What `edgeq convert --interpolation linear_exact` costs the device: the whole preprocessing of one frame
(resize, colour order, the normalise-and-quantise lookup) with OpenCV's INTER_LINEAR vs INTER_LINEAR_EXACT.

linear_exact exists because OpenCV's x86_64 and aarch64 builds round INTER_LINEAR differently, so the same frame
can reach the model a level apart in places on a Pi and on a workstation (tests/arm compares both, byte for byte).
Frames of a camera's usual sizes, random pixels (numpy, fixed seed), into int8 inputs of the sizes edgeq's models
use; OpenCV held to 1 thread (a device's inference thread shares the cores); the two filters interleaved, median
of ``REPEATS`` runs of ``N`` calls each.

    python benchmarks/resize.py        # writes benchmarks/results/resize.json
"""

from __future__ import annotations

import sys
import time

import numpy as np

from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)

CASES = [  # (frame height, width), model input size, resize mode
    ((480, 640), 224, "stretch"),
    ((480, 640), 192, "letterbox"),
    ((720, 1280), 300, "letterbox"),
    ((120, 160), 64, "stretch"),
]
N, REPEATS = 300, 7


def main() -> int:
    import cv2

    from edgeq.preprocess import Preprocessor, PreprocessSpec

    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    cases = []
    for (h, w), size, resize in CASES:
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pre = {name: Preprocessor(PreprocessSpec(size, size, 3, resize=resize, dtype="int8", scale=2 / 255,
                                                 zero_point=-1, interpolation=name))
               for name in ("linear", "linear_exact")}
        runs: dict[str, list[float]] = {name: [] for name in pre}
        for _ in range(REPEATS):
            for name, p in pre.items():
                p(frame)  # warm
                t = time.perf_counter()
                for _ in range(N):
                    p(frame)
                runs[name].append((time.perf_counter() - t) / N * 1e3)
        med = {name: float(np.median(v)) for name, v in runs.items()}
        cases.append({"frame": f"{w}x{h}", "input": size, "resize": resize,
                      "ms": {name: [round(v, 4) for v in values] for name, values in runs.items()},
                      "ms_median": {name: round(v, 4) for name, v in med.items()},
                      "exact_over_linear": round(med["linear_exact"] / med["linear"], 3)})
    write_result("resize", {"benchmark": "resize", "opencv_threads": 1, "calls": N, "repeats": REPEATS,
                            "cases": cases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
