"""MobileNetV2 1.0/224, 10 classes: int8 size vs float32, conversion time with 200 calibration images, and int8 vs
float32 invoke latency measured interleaved in one run; the same latency pair for MobileNetV2 0.35/96.

    python benchmarks/ptq_mobilenet_v2.py        # writes benchmarks/results/ptq_mobilenet_v2.json
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def int8_vs_float32(int8_bytes: bytes, alpha: float, size: int) -> dict:
    """Invoke latency of an int8 model and its float32 counterpart, interleaved, at 1 and 2 threads."""
    from edgeq.converter.recipes import QuantMode, QuantRecipe
    from edgeq.converter.stages.load import load_source_model
    from edgeq.converter.tflite import convert_model
    from edgeq.converter.tf import quiet_output
    from edgeq.runtime import Model, interleaved_latency

    float_bytes = convert_model(load_source_model("mobilenet_v2", size, alpha, 10), QuantRecipe(QuantMode.FLOAT32),
                                None)
    latency = {}
    for threads in (1, 2):
        with quiet_output():
            q = Model(int8_bytes, num_threads=threads)
            f = Model(float_bytes, num_threads=threads)
        xq = np.random.default_rng(0).integers(-128, 128, q.input.shape, dtype=np.int8)
        xf = np.random.default_rng(0).uniform(-1, 1, f.input.shape).astype(np.float32)
        tq, tf_ = interleaved_latency([q, f], [xq, xf], runs=300, warmup=30)
        latency[f"{threads}_thread"] = {
            "int8_median_ms": round(float(np.median(tq)), 3),
            "float32_median_ms": round(float(np.median(tf_)), 3),
            "int8_p95_ms": round(float(np.percentile(tq, 95)), 3),
            "float32_p95_ms": round(float(np.percentile(tf_, 95)), 3),
            "float32_over_int8": round(float(np.median(tf_) / np.median(tq)), 3),
            "runtime": q.runtime.name + " " + q.runtime.version,
            "xnnpack_whole_graph_int8": q.delegation.whole_graph,
        }
    return latency


def main() -> int:
    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.data.shapes import write_shape_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shape_folder(tmp / "calib", per_class=40, size=224, seed=3)  # 5 x 40 = 200 images
        out = tmp / "m.edgeq"
        t0 = time.perf_counter()
        result = convert(
            recipe_from_flags("mobilenet_v2", out, calib=str(tmp / "calib"), calib_samples=200, classes=10, alpha=1.0,
                           input_size=224),
            log=lambda s: None,
        )
        wall = time.perf_counter() - t0
        bundle = read_bundle(out)
        sizes = bundle.manifest.sizes.to_json()

        latency = int8_vs_float32(bundle.model_bytes, 1.0, 224)
        # the edgeq train default (0.35/96): small enough that x86's float path can beat int8 (README, Runtimes)
        small = tmp / "small.edgeq"
        write_shape_folder(tmp / "calib96", per_class=20, size=96, seed=4)
        convert(recipe_from_flags("mobilenet_v2", small, calib=str(tmp / "calib96"), calib_samples=100, classes=10,
                                  alpha=0.35, input_size=96), log=lambda s: None)
        small_latency = int8_vs_float32(read_bundle(small).model_bytes, 0.35, 96)
    write_result("ptq_mobilenet_v2", {
        "benchmark": "ptq_mobilenet_v2",
        "model": "MobileNetV2 1.0/224, 10 classes, random weights",
        "int8_tflite_bytes": sizes["model_tflite"],
        "float32_tflite_bytes": sizes["float32_tflite"],
        "int8_over_float32_size": sizes["ratio_to_float32"],
        "target_size_ratio": 0.31,
        "calibration_images": 200,
        "convert_seconds_total": round(wall, 2),
        "convert_timings": {k: round(v, 2) for k, v in result.timings.items()},
        "target_convert_seconds": 60,
        "latency": latency,
        "small_model": {"model": "MobileNetV2 0.35/96, 10 classes, random weights", "latency": small_latency},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
