"""``edgeq train``: a MobileNetV2 classifier (dense or Bayesian head) or the grid detector, into a .keras file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgeq.preprocess import NORMALIZATIONS
from edgeq.quiet import verbose

HELP = "train a MobileNetV2 with a dense or Bayesian head (host; needs edgeq[convert])"
DESCRIPTION = ("Train a MobileNetV2 classifier on a class folder, with a deterministic or a Bayesian (mean-field "
               "Gaussian) head, or with --task detect a grid detector on a COCO set, into a .keras file for "
               "edgeq convert.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="training images: a class folder (one subfolder per class), or with "
                   "--task detect a COCO annotations.json (or the folder holding it)")
    p.add_argument("--task", choices=("classify", "detect"), default="classify",
                   help="classify (default) or detect: an anchor-free MobileNetV2 detector (docs/detection.md)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.keras", help="model to write (its class names "
                   "are stored inside it)")
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
    p.add_argument("--outliers", metavar="DIR", help="detect: images of objects of no known class, pasted into "
                   "training images as outlier exposure (objects whose classes should disagree)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    # over 60 lines: every flag of both trainers mapped to its option, one per line
    import os

    if not verbose():  # edgeq -v shows TensorFlow's own lines

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import contextlib

    from ..training.classifier import TrainOptions, train

    def given(value: Any, default: Any) -> Any:  # 0 is a value to refuse, not a missing one
        return default if value is None else value

    if args.task == "detect":
        from edgeq.errors import ModelError

        from ..training.detector import DetectTrainOptions, train_detector

        if args.freeze_backbone or args.init:
            raise ModelError("--freeze-backbone and --init apply to classifiers; a detector trains its Bayesian class "
                             "head on frozen features by itself")
        opts = DetectTrainOptions(
            data=args.data, output=args.output, val=args.val, head=args.head or "bayes", alpha=args.alpha,
            input_size=given(args.input_size, 192), epochs=given(args.epochs, 20), bayes_epochs=args.bayes_epochs,
            batch_size=args.batch_size, lr=given(args.lr, 2e-3), seed=args.seed, prior_sigma=args.prior_sigma,
            augment=args.augment, augment_copies=args.augment_copies, normalization=args.normalize,
            init_backbone=args.init_backbone, outliers=args.outliers,
        )
        run: Any = train_detector
    else:
        if args.init_backbone or args.outliers:
            from edgeq.errors import ModelError

            flag = "--init-backbone" if args.init_backbone else "--outliers"
            raise ModelError(f"{flag} applies to --task detect" + ("; a classifier starts from --init MODEL.keras"
                                                                   if args.init_backbone else ""))
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
