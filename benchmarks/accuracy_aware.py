"""Issue 9 figures: bias correction and accuracy-aware quantisation.

1. A model made hard on purpose: ``converter/hardmodels.py``'s small CNN trained on Fashion-MNIST (10 classes,
   32 px), then given one outlier channel (x300, compensated in the next layer: same float function). Plain int8
   vs bias-corrected vs cross-layer equalised (``--equalize``) vs accuracy-aware (``--max-drop`` with ``--equalize
   off``: float layers only): top-1 drop on held-out images (half of them; convert's
   --val, on which bias correction and the accuracy-aware loop decide, is the other half), layers kept in float,
   model size, and invoke latency measured interleaved in one run.
2. The normal MobileNetV2 of the other benchmarks (0.35/96, trained with ``edgeq train``) over 3 training seeds:
   int8 top-1 plain, with bias correction (``--bias-correction on``), with ``--equalize``, and after ``--qat`` (2
   epochs on the training images, ``--density off``); each model trained in the run (seconds recorded), and the
   time of a QAT epoch over a float training epoch.

    python benchmarks/accuracy_aware.py        # writes benchmarks/results/accuracy_aware.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


from _common import log, split_folder, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mnv2-train", type=int, default=4000)
    p.add_argument("--mnv2-epochs", type=int, default=3)
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--skip-mnv2", action="store_true")
    p.add_argument("--workdir", help="keep data, models and bundles here")
    args = p.parse_args(argv)

    from edgeq.converter.data.datasets import fashion_mnist_folders

    result: dict = {"benchmark": "accuracy_aware"}
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        train_dir, held_out, labels = fashion_mnist_folders(tmp, args.train, args.test, np.random.default_rng(0))
        # convert's --val (bias correction's choice, the accuracy-aware loop) sees one half, the figures the other
        val_dir, test_dir = split_folder(held_out, tmp / "held_out_val", tmp / "held_out_test")
        result["data"] = {"train": args.train, "val": args.test // 2, "test": args.test - args.test // 2,
                          "calibration": "convert --val: the val half; every top-1 is scored on the test half"}
        with contextlib.redirect_stdout(sys.stderr):
            result["hard_model"] = hard(tmp, train_dir, val_dir, test_dir, labels, args)
            if not args.skip_mnv2:
                result["mobilenet_v2_bias_correction"] = mnv2(tmp, train_dir, val_dir, test_dir, args)
    write_result("accuracy_aware", result)
    return 0


def _validation(path: Path, test_dir: Path, reference: Path) -> dict:
    """Float and int8 top-1 of a bundle on ``test_dir`` (never convert's --val), by edgeq eval's code."""
    from edgeq.bundle import read_bundle
    from edgeq.converter.evaluation.classify import evaluate_bundle

    b = read_bundle(path)
    report, _ = evaluate_bundle(b, test_dir, reference=str(reference), latency_runs=5)
    q, f = report["models"]["quantized"]["top1"], report["models"]["reference"]["top1"]
    m = b.manifest.to_json()
    return {"float_top1": round(f, 4), "int8_top1": round(q, 4), "drop_points": round(100 * (f - q), 2),
            "float_layers": m["quantization"].get("float_layers", []),
            "bias_correction": {k: v for k, v in m["quantization"].get("bias_correction", {}).items()},
            "qat": m["quantization"].get("qat")}


def hard(tmp: Path, train_dir: Path, val_dir: Path, test_dir: Path, labels: list[str], args) -> dict:
    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.models.outlier import add_outlier_channel, train_small
    from edgeq.converter.tf import quiet_output
    from edgeq.converter.training.classifier import load_folder_arrays
    from edgeq.preprocess import PreprocessSpec
    from edgeq.runtime import interleaved_latency

    spec = PreprocessSpec(32, 32, 3, "RGB", "stretch", (127.5,), (127.5,))
    x, y, _ = load_folder_arrays(train_dir, spec, labels)
    model = train_small(x, y, len(labels), epochs=8)
    add_outlier_channel(model, "conv_b", "conv_c", factor=300.0)
    path = tmp / "hard.keras"
    model.save(path)
    path.with_suffix(".labels.txt").write_text("\n".join(labels) + "\n")
    # density off: these figures compare accuracy repairs (the unfamiliarity measure's: benchmarks/unknowns.py)
    common = dict(calib=str(train_dir), calib_samples=200, val=str(val_dir), density="off")
    variants = {
        "plain": {"bias_correction": "off"},
        "bias_corrected": {"bias_correction": "on"},
        "equalized": {"bias_correction": "off", "equalize": "on"},
        # the float-island loop alone (with --equalize auto, the default, it would try equalisation first)
        "accuracy_aware": {"bias_correction": "off", "equalize": "off", "max_drop": args.max_drop, "best_effort": True},
    }
    out: dict = {"model": "small CNN (conv 16, conv 32/2, conv 32, GAP, dense) on 32 px Fashion-MNIST, "
                          "8 epochs; conv_b output channel 0 x300, conv_c input channel 0 / 300",
                 "max_drop": args.max_drop, "variants": {}}
    paths = {}
    for name, extra in variants.items():
        paths[name] = tmp / f"hard_{name}.edgeq"
        convert(recipe_from_flags(str(path), paths[name], **common, **extra), log=log)
        out["variants"][name] = _validation(paths[name], test_dir, path)
        m = read_bundle(paths[name]).manifest.to_json()
        out["variants"][name]["model_bytes"] = m["sizes"]["model_tflite"]
        if name == "equalized":
            eq = m["quantization"]["equalization"]
            out["variants"][name]["equalization"] = {k: v for k, v in eq.items() if k != "layers"}
            out["variants"][name]["equalized_pairs"] = [
                {k: p[k] for k in ("first", "second", "spread_before", "spread_after")} for p in eq["layers"]]
        if name == "accuracy_aware":
            aa = m["quantization"]["accuracy_aware"]
            out["variants"][name]["steps"] = aa["steps"]
            out["variants"][name]["met"] = aa["met"]
            out["variants"][name]["ranking_top5"] = aa["ranking"][:5]
    with quiet_output():
        models = [read_bundle(paths[n]).load_model(num_threads=1) for n in variants]
    xs = [np.zeros(m.input.shape, dtype=m.input.dtype) for m in models]
    times = interleaved_latency(models, xs, runs=args.runs, warmup=20)
    base = float(np.median(times[0]))
    for name, m, t in zip(variants, models, times):
        out["variants"][name]["latency_ms_median"] = round(float(np.median(t)), 4)
        out["variants"][name]["latency_vs_plain"] = round(float(np.median(t)) / base, 3)
        out["variants"][name]["size_vs_plain"] = round(out["variants"][name]["model_bytes"]
                                                       / out["variants"]["plain"]["model_bytes"], 3)
        out["variants"][name]["xnnpack"] = m.delegation.summary()
    return out


def mnv2(tmp: Path, train_dir: Path, val_dir: Path, test_dir: Path, args) -> dict:
    import shutil

    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.training.classifier import TrainOptions, train

    small = tmp / "train_small"
    if not small.exists():  # a subset for training speed; calibration uses the same images
        rng = np.random.default_rng(1)
        files = sorted(train_dir.rglob("*.png"))
        for f in rng.choice(files, min(args.mnv2_train, len(files)), replace=False):
            dst = small / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    out: dict = {"model": f"MobileNetV2 0.35/96, {args.mnv2_epochs} epochs on {args.mnv2_train} Fashion-MNIST images "
                          "(edgeq train, no augmentation)", "seeds": {}}
    for seed in range(args.seeds):
        model = tmp / f"mnv2_seed{seed}.keras"
        trained = train(TrainOptions(str(small), model, head="dense", epochs=args.mnv2_epochs, lr=2e-3, augment=False,
                                     batch_size=64, input_size=96, alpha=0.35, seed=seed), log=log)
        row = {}
        for mode, flags in {"off": {"bias_correction": "off"}, "on": {"bias_correction": "on"},
                            "equalized": {"bias_correction": "off", "equalize": "on"},
                            "qat": {"bias_correction": "off", "qat": str(small), "qat_epochs": args.qat_epochs}
                            }.items():
            b = tmp / f"mnv2_seed{seed}_{mode}.edgeq"
            convert(recipe_from_flags(str(model), b, calib=str(small), calib_samples=200, val=str(val_dir),
                                      density="off", **flags), log=log)
            row[mode] = _validation(b, test_dir, model)
        out["seeds"][seed] = {"float_top1": row["off"]["float_top1"], "int8_top1_without": row["off"]["int8_top1"],
                              "int8_top1_with": row["on"]["int8_top1"],
                              "gain_points": round(100 * (row["on"]["int8_top1"] - row["off"]["int8_top1"]), 2),
                              "corrected_layers": row["on"]["bias_correction"].get("corrected_layers"),
                              "int8_top1_equalized": row["equalized"]["int8_top1"],
                              "equalize_gain_points": round(100 * (row["equalized"]["int8_top1"]
                                                                   - row["off"]["int8_top1"]), 2),
                              "int8_top1_qat": row["qat"]["int8_top1"],
                              "qat_vs_float_points": round(100 * (row["qat"]["int8_top1"] - row["off"]["float_top1"]), 2),
                              "qat_vs_best_ptq_points": round(100 * (row["qat"]["int8_top1"] - max(
                                  row[m]["int8_top1"] for m in ("off", "on", "equalized"))), 2),
                              "training": {"seed": seed, "epochs": args.mnv2_epochs, "seconds": round(trained.seconds, 1),
                                           "qat_epochs": args.qat_epochs,
                                           "qat_seconds": row["qat"]["qat"]["seconds"],
                                           "qat_epoch_over_float_epoch": round(
                                               (row["qat"]["qat"]["seconds"] / args.qat_epochs)
                                               / (trained.seconds / args.mnv2_epochs), 2)}}
    for key in ("gain_points", "equalize_gain_points", "qat_vs_float_points", "qat_vs_best_ptq_points"):
        gains = [s[key] for s in out["seeds"].values()]
        out[key] = {"mean": round(float(np.mean(gains)), 2), "min": min(gains), "max": max(gains)}
    out["noise_note"] = ("one image of the test set is 100/{} points; a gain within a few images either way is "
                         "noise").format(args.test - args.test // 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
