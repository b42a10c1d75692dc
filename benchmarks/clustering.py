"""Issue 6 figures so far: bundle size of MobileNetV2 1.0/224 (10 classes, random weights) as plain int8, and
clustered to 16 values per tensor and per channel (packed 4-bit storage), against the float32 .tflite; with
--model/--val, the top-1 cost of clustering a trained model.

    python benchmarks/clustering.py        # writes benchmarks/results/clustering.json
    python benchmarks/clustering.py --model det.keras --calib train/ --val test/
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilenet_v2", help="a .keras model, or mobilenet_v2 (1.0/224, random)")
    p.add_argument("--calib", help="calibration folder (default: generated shapes)")
    p.add_argument("--val", help="validation folder: adds float and int8 top-1 to each variant")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--name", default="clustering", help="results file name (default clustering: the random-weight "
                   "size run README quotes)")
    args = p.parse_args(argv)

    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.data.shapes import write_shape_folder

    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    result: dict = {"benchmark": "clustering", "model": args.model, "clusters": args.clusters, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = args.calib
        if calib is None:
            write_shape_folder(tmp / "calib", per_class=20, size=224, seed=3)
            calib = str(tmp / "calib")
        variants = {
            "int8": {},
            "clustered_per_tensor": {"clusters": args.clusters},
            "clustered_per_channel": {"clusters": args.clusters, "cluster_per_channel": True},
        }
        for name, extra in variants.items():
            out = tmp / f"{name}.edgeq"
            convert(recipe_from_flags(args.model, out, calib=calib, calib_samples=100, classes=10, val=args.val,
                                      density="off", **extra),  # sizes of the model alone
                    log=log)
            b = read_bundle(out)
            sizes = b.manifest.sizes
            entry = {
                "model_tflite_bytes": sizes.model_tflite,
                "float32_tflite_bytes": sizes.float32_tflite,
                "bundle_bytes": b.file_size,
                "bundle_over_float32": round(b.file_size / sizes.float32_tflite, 4),
            }
            c = b.manifest.clustering
            if c is not None:
                entry.update(clustered_kernels=c.clustered, packed_kernels=c.packed_kernels,
                             max_distinct_per_channel=c.shipped.max_distinct_per_channel)
            v = b.manifest.validation
            if v is not None:
                entry.update(float_top1=v.float_top1, int8_top1=v.quantized_top1)
            result["variants"][name] = entry
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
