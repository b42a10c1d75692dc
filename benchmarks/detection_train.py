"""The detection benchmark's data and trained models (benchmarks/detection.py scores them), made once per workdir.

Splits, disjoint (converter/data/scenes.py):
- ``train``: 2,000 scenes of the known classes (Fashion-MNIST's training items, bags and sandals left out); the
  ``oe`` variant's training scenes are the same scenes with up to two outlier objects added to each (shapes,
  textures, halves of two known items: converter/data/objects.py), never a test kind;
- ``calib``: 300 scenes of known objects only, from the test split's even items: the only data ``edgeq convert
  --val`` sees (every threshold is calibrated on it);
- ``eval``: 300 scenes from the test split's odd items, with unknown objects of three kinds: held-out garments
  (bag, sandal: near), MNIST digits and photo crops (far); used only for scoring;
- ``empty``: 100 scenes of background and clutter with no object: what a detector reports where nothing is;
- ``select``: 300 scenes of the calibration split's items with outlier objects (shapes, textures, halves of two
  known items) as the unknowns: where the unknown score's default measures and combination were chosen
  (benchmarks/detection.py's ``rules``), never the eval scenes' kinds.

Per training seed: the starting backbone (a classifier of the known items, then trained on from there on the
training scenes' objects cut at their scene scale), then one detector per variant from it. Each step records its
seconds, epochs and seed in ``training.json`` beside the models. The schedule is shorter than the first
benchmark's (12 epochs on crops and 12 end to end, against 30 and 20): three seeds of two variants then take about
1.5 hours on two cores instead of about 2.5.

    python benchmarks/detection_train.py --workdir /tmp/det --seeds 0 1 2 --variants plain oe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import log, require_clean_tree

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

UNKNOWN_CLASSES = ("bag", "sandal")
FAR_KINDS = ("digits", "photos")
OUTLIER_KINDS = ("shapes", "textures", "mixed")
VARIANTS = {"plain": "the known classes only", "oe": "with outlier objects (outlier exposure)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="data and models are kept here and reused")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["plain", "oe"], choices=sorted(VARIANTS))
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--calib-scenes", type=int, default=300)
    p.add_argument("--eval-scenes", type=int, default=300)
    p.add_argument("--empty-scenes", type=int, default=100)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--pretrain-images", type=int, default=8000)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--crop-epochs", type=int, default=12)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--bayes-epochs", type=int, default=30)


def prepare_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The scene splits, generated once (data seeds fixed; the training seeds vary the models only)."""
    from edgeq.converter.data.scenes import generate_scenes

    data = work / "data"
    splits = {
        "train": dict(n=args.train_scenes, seed=0, exclude_classes=UNKNOWN_CLASSES),
        "train_oe": dict(n=args.train_scenes, seed=0, exclude_classes=UNKNOWN_CLASSES, outliers=OUTLIER_KINDS),
        "calib": dict(n=args.calib_scenes, seed=1, exclude_classes=UNKNOWN_CLASSES, split="calib"),
        "eval": dict(n=args.eval_scenes, seed=2, ood_classes=UNKNOWN_CLASSES, unknown_kinds=FAR_KINDS,
                     split="eval", extra_share=0.25),
        "empty": dict(n=args.empty_scenes, seed=3, objects=(0, 0), split="eval"),
        "select": dict(n=args.calib_scenes, seed=4, exclude_classes=UNKNOWN_CLASSES, split="calib",
                       outliers=OUTLIER_KINDS),
    }
    out = {}
    for name, kw in splits.items():
        out[name] = data / name
        if not (out[name] / "annotations.json").is_file():
            t0 = time.perf_counter()
            summary = generate_scenes(out[name], size=args.size, **kw)
            log(f"scenes {name}: {summary['objects']} objects ({summary['unknown']} unknown, {summary['outliers']} "
                f"outliers) in {time.perf_counter() - t0:.0f} s")
    return out


def _record(path: Path, key: str, entry: dict) -> None:
    """One trained model's provenance in ``training.json``: seconds, epochs, seed, history, and the commit."""
    from _common import _commit

    book = json.loads(path.read_text()) if path.is_file() else {}
    book[key] = {**entry, "commit": _commit()}
    path.write_text(json.dumps(book, indent=2))


def train_backbone(work: Path, data: dict[str, Path], seed: int, args: argparse.Namespace) -> Path:
    """A classifier of the known items (the stand-in for ImageNet weights), then trained on the training scenes'
    objects cut at their scene scale (``edgeq datasets crops``)."""
    from edgeq.converter.data.coco import read_coco, write_object_crops
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder
    from edgeq.converter.training.classifier import TrainOptions, train

    folder = work / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    book = folder / "training.json"
    items, tuned = folder / "backbone_items.keras", folder / "backbone.keras"
    quiet = lambda s: log("   " + s)  # noqa: E731
    if not items.is_file():
        x, y = fashion_mnist("train")
        known = [i for i, name in enumerate(FASHION_MNIST_LABELS) if name not in UNKNOWN_CLASSES]
        pick = np.random.default_rng(seed).choice(np.flatnonzero(np.isin(y, known)), args.pretrain_images, replace=False)
        remap = {c: i for i, c in enumerate(known)}
        if not (work / f"items{seed}").is_dir():
            write_class_folder(work / f"items{seed}", x[pick], np.array([remap[int(v)] for v in y[pick]]),
                               [FASHION_MNIST_LABELS[i] for i in known])
        r = train(TrainOptions(str(work / f"items{seed}"), items, alpha=args.alpha, input_size=96,
                               epochs=args.pretrain_epochs, seed=seed), log=quiet)
        _record(book, "backbone_items", {"seconds": round(r.seconds, 1), "epochs": args.pretrain_epochs, "seed": seed,
                                         "images": args.pretrain_images, "history": r.history})
    if not tuned.is_file():
        crops = work / "crops"
        if not crops.is_dir():
            write_object_crops(read_coco(data["train"]), crops)
        r = train(TrainOptions(str(crops), tuned, alpha=args.alpha, input_size=96, epochs=args.crop_epochs,
                               seed=seed, init=str(items)), log=quiet)
        _record(book, "backbone", {"seconds": round(r.seconds, 1), "epochs": args.crop_epochs, "seed": seed,
                                   "history": r.history})
    return tuned


def train_detector(work: Path, data: dict[str, Path], seed: int, variant: str, backbone: Path,
                   args: argparse.Namespace) -> Path:
    from edgeq.converter.training.detector import DetectTrainOptions
    from edgeq.converter.training.detector import train_detector as train

    folder = work / f"seed{seed}"
    out = folder / f"detector_{variant}.keras"
    if not out.is_file():
        scenes = data["train_oe" if variant == "oe" else "train"]
        r = train(DetectTrainOptions(str(scenes), out, alpha=args.alpha, input_size=args.size, epochs=args.epochs,
                                     bayes_epochs=args.bayes_epochs, seed=seed, init_backbone=str(backbone)),
                  log=lambda s: log("   " + s))
        _record(folder / "training.json", f"detector_{variant}", {
            "seconds": round(r.seconds, 1), "epochs": args.epochs, "bayes_epochs": args.bayes_epochs, "seed": seed,
            "scenes": str(scenes), "variant": VARIANTS[variant], "history": r.history})
    return out


def main(argv: list[str] | None = None) -> int:
    require_clean_tree()  # before the slow part: the results must name the commit that ran
    import contextlib

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    with contextlib.redirect_stdout(sys.stderr):
        data = prepare_data(work, args)
        for seed in args.seeds:
            backbone = train_backbone(work, data, seed, args)
            for variant in args.variants:
                t0 = time.perf_counter()
                train_detector(work, data, seed, variant, backbone, args)
                log(f"seed {seed} {variant}: ready ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
