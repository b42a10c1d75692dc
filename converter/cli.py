"""Arguments of ``edgeq convert``. Importing this module does not import TensorFlow."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgeq.preprocess import NORMALIZATIONS

QUANT_MODES = ("int8", "uint8", "int16x8", "dynamic", "float16", "float32")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .keras/.h5 file, a SavedModel folder, or mobilenet_v2 (built in)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.edgeq", help="bundle to write (atomically)")
    p.add_argument("--calib", metavar="PATH", help="calibration data: image folder (recursive), video file, or .npy/.npz")
    p.add_argument("--calib-samples", type=int, default=200, metavar="N", help="calibration samples to use (default 200)")
    p.add_argument("--quant", choices=QUANT_MODES, default="int8", help="quantisation mode (default int8, full integer)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (default: --val folder names or class_N)")
    p.add_argument("--val", metavar="DIR", help="validation folder, one subfolder per class: float vs quantised report")
    p.add_argument("--allow-float-fallback", action="store_true", help="keep ops that cannot be integer in float")
    p.add_argument("--layer-errors", action="store_true",
                   help="measure each layer's quantisation error (TFLite QuantizationDebugger) into the bundle's "
                        "report; edgeq eval --report plots it")
    g = p.add_argument_group("weight clustering (k-means weight sharing before PTQ)")
    g.add_argument("--clusters", type=int, metavar="N", help="share N values per kernel (16: 4-bit indices)")
    g.add_argument("--cluster-init", choices=("linear", "kmeans++"), default="linear",
                   help="centroid initialisation (default linear)")
    g.add_argument("--cluster-per-channel", action="store_true", help="N values per output channel, not per tensor")
    g.add_argument("--cluster-skip", metavar="REGEX",
                   help="layers whose names match are not clustered (default: the first conv; tiny kernels always)")
    g.add_argument("--finetune", metavar="DATA_DIR", help="fine-tune the clustered model on this class folder, "
                   "keeping every weight on its cluster")
    g.add_argument("--finetune-epochs", type=int, default=1, metavar="E", help="fine-tuning epochs (default 1)")
    g = p.add_argument_group("accuracy repair (see docs/accuracy.md)")
    g.add_argument("--bias-correction", choices=("auto", "on", "off"), default="auto",
                   help="empirical bias correction of int8 weight rounding (default auto: kept when --val shows it "
                        "does not lower top-1; without --val, off)")
    g.add_argument("--max-drop", type=float, metavar="D", help="accuracy-aware mode: keep the most sensitive layers "
                   "in float until the top-1 drop on --val is at most D (0.01 = one point)")
    g.add_argument("--drop-type", choices=("absolute", "relative"), default="absolute",
                   help="--max-drop as points of accuracy (default) or relative to float accuracy")
    g.add_argument("--max-reverts", type=int, default=10, metavar="N", help="at most N layers in float (default 10)")
    g.add_argument("--best-effort", action="store_true",
                   help="when --max-drop is not reached, keep the best model found and exit 0")
    g.add_argument("--keep-float", metavar="REGEX", help="ops whose names match stay float (mixed precision)")
    g.add_argument("--int16", metavar="REGEX", help="per-layer 16x8: refused, the TFLite converter cannot do it")
    g = p.add_argument_group("uncertainty (see docs/bayesian.md)")
    g.add_argument("--bayes-samples", type=int, metavar="K",
                   help="posterior samples fused into the int8 head (default 32 when the model has a BayesDense head)")
    g.add_argument("--bayes-seed", type=int, default=0, metavar="N", help="seed of the weight samples (default 0)")
    g.add_argument("--bayes-layout", choices=("auto", "centred", "stacked"), default="auto",
                   help="stacked: one [K, C] output; centred: mean + per-sample residual outputs, each with its own "
                        "int8 scale; auto (default): stacked when its output resolves the spread between samples "
                        "in at least 4 int8 steps, else centred")
    g.add_argument("--review-measure", choices=("predictive_entropy", "aleatoric", "mutual_information"),
                   default="predictive_entropy", help="uncertainty that sets needs_review (default predictive_entropy)")
    g.add_argument("--target-accuracy", type=float, default=0.995, metavar="A",
                   help="with --val: needs_review threshold so that the results kept reach this accuracy (default 0.995)")
    g = p.add_argument_group("built-in mobilenet_v2")
    g.add_argument("--alpha", type=float, default=1.0, help="width multiplier (default 1.0)")
    g.add_argument("--input-size", type=int, default=224, metavar="S", help="input height and width (default 224)")
    g.add_argument("--classes", type=int, default=1000, metavar="C", help="output classes (default 1000)")
    g.add_argument("--weights", default="none", metavar="PATH|none|imagenet", help="initial weights (default none: random)")
    g = p.add_argument_group("preprocessing (stored in the bundle; the device applies the same)")
    g.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="mobilenet",
                   help="mobilenet: [-1, 1] (default); unit: [0, 1]; raw: [0, 255]")
    g.add_argument("--color-order", choices=("RGB", "BGR"), default="RGB", help="channel order of the model (default RGB)")
    g.add_argument("--resize", choices=("stretch", "letterbox"), default="stretch", help="resize mode (default stretch)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads for verification (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_convert(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from .pipeline import ConvertOptions, convert

    opts = ConvertOptions(
        model=args.model,
        output=args.output,
        calib=args.calib,
        calib_samples=args.calib_samples,
        quant=args.quant,
        labels_file=args.labels,
        val=args.val,
        allow_float_fallback=args.allow_float_fallback,
        input_size=args.input_size,
        alpha=args.alpha,
        classes=args.classes,
        weights=args.weights,
        normalization=args.normalize,
        color_order=args.color_order,
        resize=args.resize,
        threads=args.threads,
        bayes_samples=args.bayes_samples,
        bayes_seed=args.bayes_seed,
        bayes_layout=args.bayes_layout,
        review_measure=args.review_measure,
        target_accuracy=args.target_accuracy,
        layer_errors=args.layer_errors,
        clusters=args.clusters,
        cluster_init=args.cluster_init,
        cluster_per_channel=args.cluster_per_channel,
        cluster_skip=args.cluster_skip,
        finetune=args.finetune,
        finetune_epochs=args.finetune_epochs,
        bias_correction=args.bias_correction,
        keep_float=args.keep_float,
        int16=args.int16,
        max_drop=args.max_drop,
        drop_type=args.drop_type,
        max_reverts=args.max_reverts,
        best_effort=args.best_effort,
    )
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    result = convert(opts, log=log)
    if args.json:
        print(json.dumps({"output": str(result.output), "manifest": result.manifest, "timings": result.timings}, indent=2))
        return 0
    m = result.manifest
    sizes = m["sizes"]
    print(f"wrote {result.output}: {m['quantization']['scheme']} {m['input']['height']}x{m['input']['width']}, "
          f"{len(m['labels'])} classes, model {sizes['model_tflite'] / 1e6:.2f} MB "
          f"({sizes['ratio_to_float32']:.2f}x float32), {result.timings['total_s']:.1f} s")
    if m["quantization"]["float_ops"]:
        print(f"float ops kept: {', '.join(m['quantization']['float_ops'])}")
    if "validation" in m and m["task"] == "detect":
        print(format_detect_validation(m["validation"]))
    elif "validation" in m:
        print(format_validation(m["validation"]))
    head = m["head"]
    if head.get("spread"):
        sp = head["spread"]
        print(f"bayesian head: {head['samples']} samples, logit spread float {sp['float']:.4f} -> int8 "
              f"{sp['quantized']:.4f} ({sp['steps']} output steps), MI correlation {sp['mutual_information_correlation']}")
    if head.get("review"):
        print(format_review(head["review"]))
    return 0


def format_review(r: dict[str, Any]) -> str:
    if not r["reached"]:
        return (f"needs_review: no {r['measure']} threshold reaches accuracy {r['target_accuracy']} on --val; "
                "every result will be flagged")
    return (f"needs_review when {r['measure']} > {r['threshold']:.6g}: keeps {r['coverage']:.1%} of --val at "
            f"accuracy {r['kept_accuracy']:.4f} (target {r['target_accuracy']})")


def format_detect_validation(v: dict[str, Any]) -> str:
    f, q = v["float"], v["quantized"]

    def auroc(m: dict[str, Any]) -> str:
        a = (m.get("unknown_auroc") or {}).get("mutual_information")
        return "-" if a is None else f"{a:.4f}"

    rows = [
        ("images", f"{v['images']}"),
        ("float / int8 mAP@0.5", f"{f['map50']:.4f} / {q['map50']:.4f}"),
        ("float / int8 mAP@[.5:.95]", f"{f['map']:.4f} / {q['map']:.4f}"),
        ("float / int8 detections", f"{f['detections']} / {q['detections']}"),
        ("float / int8 AUROC unknown (MI)", f"{auroc(f)} / {auroc(q)}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "validation\n" + "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)


def format_validation(v: dict[str, Any]) -> str:
    rows = [
        ("images", f"{v['count']}"),
        ("float top-1", f"{v['float_top1']:.4f}"),
        ("quantized top-1", f"{v['quantized_top1']:.4f}"),
        ("top-1 agreement", f"{v['top1_agreement']:.4f}"),
        ("mean |logit error|", f"{v['mean_abs_logit_error']:.4f}"),
        ("float / quantized ECE", f"{v['float_ece']:.4f} / {v['quantized_ece']:.4f}"),
    ]
    if "mutual_information_correlation" in v:
        rows.append(("float / quantized mean MI",
                     f"{v['float_mean_mutual_information']:.4f} / {v['quantized_mean_mutual_information']:.4f}"))
        corr = v["mutual_information_correlation"]
        rows.append(("MI correlation", "-" if corr is None else f"{corr:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "validation\n" + "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="training images: a class folder (one subfolder per class), or with "
                   "--task detect a COCO annotations.json (or the folder holding it)")
    p.add_argument("--task", choices=("classify", "detect"), default="classify",
                   help="classify (default) or detect: an anchor-free MobileNetV2 detector (docs/detection.md)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.keras", help="model to write (class names go "
                   "to MODEL.labels.txt beside it)")
    p.add_argument("--arch", choices=("mobilenet_v2",), default="mobilenet_v2", help="backbone (default mobilenet_v2)")
    p.add_argument("--alpha", type=float, default=0.35, help="width multiplier (default 0.35)")
    p.add_argument("--input-size", type=int, metavar="S", help="input height and width (default 96; detect: 192)")
    p.add_argument("--head", choices=("dense", "bayes"),
                   help="dense: deterministic; bayes: mean-field Gaussian variational head (default dense; detect: "
                        "bayes, trained after the deterministic one and initialised from it)")
    p.add_argument("--epochs", type=int, metavar="E", help="epochs (default 10; detect: 20)")
    p.add_argument("--bayes-epochs", type=int, default=30, metavar="E",
                   help="detect: epochs of the Bayesian class head on cached features (default 30)")
    p.add_argument("--val", metavar="DIR", help="validation data, same classes (detect: a COCO set)")
    p.add_argument("--init-backbone", metavar="MODEL.keras",
                   help="detect: start the MobileNetV2 backbone from this classifier (edgeq train, same --alpha)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train the head only, on backbone features computed once and cached")
    p.add_argument("--init", metavar="MODEL.keras",
                   help="start from this trained model: backbone and head weights (bayes: prior and posterior means)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed; same seed, same weights (default 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="batch size (default 32)")
    p.add_argument("--lr", type=float, metavar="LR", help="Adam learning rate (default 1e-3; 1e-2 with --freeze-backbone)")
    p.add_argument("--prior-sigma", type=float, default=0.1, metavar="S",
                   help="bayes: standard deviation of the Gaussian weight prior (default 0.1)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentations")
    p.add_argument("--augment-copies", type=int, default=2, metavar="N",
                   help="with --freeze-backbone: augmented copies whose features are cached too (default 2)")
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="mobilenet",
                   help="input normalisation; give the same to edgeq convert (default mobilenet: [-1, 1])")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_train(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import contextlib

    from .train import TrainOptions, train

    def given(value: Any, default: Any) -> Any:  # 0 is a value to refuse, not a missing one
        return default if value is None else value

    if args.task == "detect":
        from edgeq.errors import ModelError

        from .detect import DetectTrainOptions, train_detector

        if args.freeze_backbone or args.init:
            raise ModelError("--freeze-backbone and --init apply to classifiers; a detector trains its Bayesian class "
                             "head on frozen features by itself")
        opts = DetectTrainOptions(
            data=args.data, output=args.output, val=args.val, head=args.head or "bayes", alpha=args.alpha,
            input_size=given(args.input_size, 192), epochs=given(args.epochs, 20), bayes_epochs=args.bayes_epochs,
            batch_size=args.batch_size, lr=given(args.lr, 2e-3), seed=args.seed, prior_sigma=args.prior_sigma,
            augment=args.augment, augment_copies=args.augment_copies, normalization=args.normalize,
            init_backbone=args.init_backbone,
        )
        run: Any = train_detector
    else:
        if args.init_backbone:
            from edgeq.errors import ModelError

            raise ModelError("--init-backbone applies to --task detect; a classifier starts from --init MODEL.keras")
        opts = TrainOptions(
            data=args.data, output=args.output, arch=args.arch, alpha=args.alpha, input_size=given(args.input_size, 96),
            head=args.head or "dense", epochs=given(args.epochs, 10), val=args.val, freeze_backbone=args.freeze_backbone,
            init=args.init, seed=args.seed, batch_size=args.batch_size, lr=args.lr, prior_sigma=args.prior_sigma,
            augment=args.augment, augment_copies=args.augment_copies, normalization=args.normalize,
        )
        run = train

    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    # with --json, stdout carries only the JSON: Keras's progress bars go to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = run(opts, log=log)
    summary = {"output": str(result.output), "labels": result.labels, "history": result.history,
               "seconds": round(result.seconds, 2), "head": result.head}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    h = result.history
    if result.head.get("task") == "detect":
        line = f"wrote {result.output}: detector, {result.head['type']} class head, {len(result.labels)} classes, " \
               f"train loss {h.get('loss', float('nan')):.4f}"
        if "val_loss" in h:
            line += f", val loss {h['val_loss']:.4f}"
        if "bayes_accuracy" in h:
            line += f", class head accuracy on positive cells {h['bayes_accuracy']:.4f}"
        print(line + f", {result.seconds:.1f} s")
        return 0
    line = f"wrote {result.output}: {result.head['type']} head, {len(result.labels)} classes, " \
           f"train accuracy {h.get('accuracy', float('nan')):.4f}"
    if "val_accuracy" in h:
        line += f", val accuracy {h['val_accuracy']:.4f}"
    if result.head["type"] == "bayes":
        line += f", mean posterior sigma {result.head['posterior_sigma_mean']:.4f}"
    print(line + f", {result.seconds:.1f} s")
    return 0
