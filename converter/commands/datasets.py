"""``edgeq datasets``: generate synthetic detection scenes (COCO JSON), cut a COCO set's objects into a class folder,
or check a COCO instances file."""

from __future__ import annotations

import argparse
import json

from edgeq.errors import DataError

HELP = "generate or check detection data (COCO JSON)"
DESCRIPTION = "Detection data in COCO format: generate synthetic scenes, or check a file."


def add_arguments(p: argparse.ArgumentParser) -> None:
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    d = dsub.add_parser("scenes", help="synthetic detection scenes: Fashion-MNIST items on textured backgrounds",
                        description="Paste Fashion-MNIST items (their own silhouettes) at random positions, scales, "
                                    "rotations and tints onto textured backgrounds with clutter; write OUT/images/*.png "
                                    "and OUT/annotations.json (COCO). --ood-classes are pasted but marked unknown.")
    d.add_argument("out", metavar="OUT")
    d.add_argument("--n", type=int, default=200, help="scenes (default 200)")
    d.add_argument("--size", type=int, default=192, help="scene width and height in pixels (default 192)")
    d.add_argument("--ood-classes", metavar="A,B", help="Fashion-MNIST classes to hold out as unknown objects")
    d.add_argument("--exclude-classes", metavar="A,B", help="classes never pasted (a training set without the "
                   "classes a test set holds out; still listed, as unknown)")
    d.add_argument("--min-objects", type=int, default=1, help="objects per scene, at least (default 1)")
    d.add_argument("--max-objects", type=int, default=4, help="objects per scene, at most (default 4)")
    d.add_argument("--min-size", type=int, default=28, help="object size in pixels, at least (default 28)")
    d.add_argument("--max-size", type=int, default=72, help="object size in pixels, at most (default 72)")
    d.add_argument("--clutter", type=int, default=3, help="unannotated distractor shapes per scene, at most (default 3)")
    d.add_argument("--unknown-kinds", metavar="A,B", help="objects of other kinds, marked unknown: digits (MNIST, "
                   "tinted like the items), photos (skimage photo crops in their own colours)")
    d.add_argument("--outliers", metavar="A,B", help="outlier objects for outlier exposure in training (category "
                   "'outlier'), up to 2 a scene on top of the items: shapes, textures, mixed (halves of two known items)")
    d.add_argument("--extra-share", type=float, default=0.3, help="share of the objects drawn from --unknown-kinds "
                   "(default 0.3)")
    d.add_argument("--split", choices=("train", "test", "calib", "eval"), default="train",
                   help="items to draw from: Fashion-MNIST's train or test split; calib and eval are the test split's "
                        "even and odd items (calibration and scoring scenes that share no item)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(action=_scenes)
    d = dsub.add_parser("crops", help="cut the known objects of a COCO set into a class folder, for edgeq train",
                        description="Cut every object of a known category out of a COCO set's images: a SIZE x SIZE "
                                    "window centred on it, at the scale it has there (larger objects scaled down to "
                                    "fit), written to OUT/<category>/*.png. Train a detector's starting backbone on "
                                    "them (edgeq train OUT) so that it learns the objects as the detector sees "
                                    "them. Unknown categories are left out.")
    d.add_argument("scenes", metavar="SCENES", help="annotations.json, or the folder holding it")
    d.add_argument("out", metavar="OUT", help="a new folder")
    d.add_argument("--size", type=int, default=96, help="crop width and height in pixels (default 96)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(action=_crops)
    d = dsub.add_parser("check", help="check a COCO instances file and its images",
                        description="Load a COCO instances file and check images, boxes and category ids.")
    d.add_argument("annotations", metavar="FILE", help="annotations.json, or the folder holding it")
    d.add_argument("--images", metavar="DIR", help="image folder (default: images/ next to the file, else its folder)")
    d.set_defaults(action=_check)


def run(args: argparse.Namespace) -> int:
    return args.action(args)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(c.strip() for c in (text or "").split(",") if c.strip())


def _scenes(args: argparse.Namespace) -> int:
    from ..data.scenes import generate_scenes

    if not 0.0 <= args.extra_share <= 1.0:
        raise DataError(f"--extra-share {args.extra_share}: give a share from 0 to 1")
    if args.min_objects < 0 or args.max_objects < args.min_objects:
        raise DataError(f"--min-objects {args.min_objects} --max-objects {args.max_objects}: give 0 <= min <= max")
    summary = generate_scenes(args.out, args.n, args.size, args.seed, _names(args.ood_classes),
                              (args.min_objects, args.max_objects), args.min_size, args.max_size, args.clutter,
                              args.split, _names(args.exclude_classes), _names(args.unknown_kinds),
                              _names(args.outliers), args.extra_share)
    print(json.dumps(summary) if args.json else
          f"wrote {summary['images']} scenes, {summary['objects']} objects ({summary['unknown']} unknown, "
          f"{summary['outliers']} outliers) to {summary['path']}")
    return 0


def _crops(args: argparse.Namespace) -> int:
    from ..data.coco import read_coco, write_object_crops

    summary = write_object_crops(read_coco(args.scenes, flag="SCENES"), args.out, args.size)
    print(json.dumps(summary) if args.json else
          f"wrote {summary['objects']} crops of {len(summary['per_category'])} categories to {summary['path']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..data.coco import read_coco

    coco = read_coco(args.annotations, args.images, flag="FILE")
    n = sum(len(b) for b in coco.boxes.values())
    unknown = coco.unknown_category_ids
    n_unknown = sum(1 for ids in coco.category_ids.values() for c in ids.tolist() if c in unknown)
    print(f"{coco.path}: ok ({len(coco.images)} images, {n} boxes, {len(coco.known_categories)} known categories"
          + (f", {n_unknown} boxes of {len(unknown)} unknown categories" if unknown else "") + ")")
    return 0
