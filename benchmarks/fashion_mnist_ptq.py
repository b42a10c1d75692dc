"""Issue 2 accuracy figure: a small MobileNetV2 trained a few epochs on real data (Fashion-MNIST from Debian's
dataset-fashion-mnist, grey 28x28 resized to RGB), float vs full-int8 top-1 through `edgeq convert --val`.

    python benchmarks/fashion_mnist_ptq.py [--train 12000] [--test 2000] [--epochs 3]        # writes benchmarks/results/fashion_mnist_ptq.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from _common import require_disjoint, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from edgeq.converter.tf import import_tensorflow

    import_tensorflow()
    import keras

    from edgeq.bundle import read_bundle
    from edgeq.converter.evaluation.classify import evaluate_bundle
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.stages.load import build_mobilenet_v2
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder
    from edgeq.preprocess import Preprocessor, PreprocessSpec

    rng = np.random.default_rng(args.seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    tr = rng.choice(len(x_train), args.train, replace=False)
    te = rng.choice(len(x_test), args.test, replace=False)
    spec = PreprocessSpec(args.size, args.size, 3)  # the same preprocessing the bundle will record
    pre = Preprocessor(spec)
    xs = pre.batch(list(x_train[tr]))
    ys = y_train[tr]

    model = build_mobilenet_v2(args.size, args.alpha, 10, None, seed=args.seed)
    for layer in model.layers:  # 0.999 does not settle in a few hundred steps (shared/FINDINGS.md)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    t0 = time.perf_counter()
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        model.fit(xs, ys, batch_size=64, epochs=args.epochs, verbose=2)
    train_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = tmp / "fmnist.keras"
        model.save(model_path)
        # convert's --val (bias correction decides on it) is one half of the test images, the figures the other
        half = len(te) // 2
        val_dir = write_class_folder(tmp / "val", x_test[te[:half]], y_test[te[:half]], FASHION_MNIST_LABELS)
        test_dir = write_class_folder(tmp / "test", x_test[te[half:]], y_test[te[half:]], FASHION_MNIST_LABELS)
        require_disjoint(val_dir, test_dir)
        calib_dir = write_class_folder(tmp / "calib", x_train[tr[:200]], y_train[tr[:200]], FASHION_MNIST_LABELS)
        out = tmp / "fmnist.edgeq"
        labels = tmp / "labels.txt"  # the model's class order, not the folders' alphabetical one
        labels.write_text("\n".join(FASHION_MNIST_LABELS) + "\n")
        convert(recipe_from_flags(str(model_path), out, calib=str(calib_dir), calib_samples=200, val=str(val_dir),
                               labels=str(labels), density="off"),  # PTQ alone (unfamiliarity: unknowns.py)
                log=lambda s: print(s, file=sys.stderr))
        report, _ = evaluate_bundle(read_bundle(out), test_dir, reference=str(model_path), latency_runs=5)
        q, f = report["models"]["quantized"], report["models"]["reference"]
        v = read_bundle(out).manifest.validation.to_json()  # on --val: the logit error and agreement
    write_result("fashion_mnist_ptq", {
        "benchmark": "fashion_mnist_ptq",
        "model": f"MobileNetV2 {args.alpha}/{args.size}, trained {args.epochs} epochs on {args.train} Fashion-MNIST images",
        "train_seconds": round(train_s, 1),
        "test_images": report["count"],
        "val_images": v["count"],
        "calibration": "convert --val: the val half of the sampled test images; top-1 is scored on the other half",
        "float_top1": round(f["top1"], 4),
        "int8_top1": round(q["top1"], 4),
        "drop_points": round(100 * (f["top1"] - q["top1"]), 2),
        "target_drop_points": 1.0,
        "top1_agreement_on_val": round(v["top1_agreement"], 4),
        "mean_abs_logit_error_on_val": round(v["mean_abs_logit_error"], 4),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
