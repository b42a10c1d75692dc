"""The ``edgeq`` command. Each subcommand imports its side lazily: ``edgeq --help`` and the device commands
never import TensorFlow."""

from __future__ import annotations

import argparse
import html
import json
import sys
from typing import Callable, Sequence

from edgeq._version import __version__
from edgeq.errors import EdgeqError

Handler = Callable[[argparse.Namespace], int]


def _cmd_convert(args: argparse.Namespace) -> int:
    from edgeq.converter.cli import run_convert

    return run_convert(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from edgeq.converter.cli import run_train

    return run_train(args)


def _cmd_scenes(args: argparse.Namespace) -> int:
    from edgeq.scenes import generate_scenes

    def names(text: str | None) -> tuple[str, ...]:
        return tuple(c.strip() for c in (text or "").split(",") if c.strip())

    summary = generate_scenes(args.out, args.n, args.size, args.seed, names(args.ood_classes),
                              (args.min_objects, args.max_objects), args.min_size, args.max_size, args.clutter,
                              args.split, names(args.exclude_classes))
    print(json.dumps(summary) if args.json else
          f"wrote {summary['images']} scenes, {summary['objects']} objects ({summary['unknown']} of held-out classes) "
          f"to {summary['path']}")
    return 0


def _cmd_coco_check(args: argparse.Namespace) -> int:
    from edgeq.scenes import read_coco

    coco = read_coco(args.annotations, args.images, flag="FILE")
    n = sum(len(b) for b in coco.boxes.values())
    unknown = coco.unknown_category_ids
    n_unknown = sum(1 for ids in coco.category_ids.values() for c in ids.tolist() if c in unknown)
    print(f"{coco.path}: ok ({len(coco.images)} images, {n} boxes, {len(coco.known_categories)} known categories"
          + (f", {n_unknown} boxes of {len(unknown)} unknown categories" if unknown else "") + ")")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edgeq.inspect import format_inspect, inspect_bundle

    info = inspect_bundle(args.bundle)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from edgeq.bundle import read_bundle
    from edgeq.evaluate import evaluate_bundle

    if args.report:
        from edgeq.report import check_report_dir

        check_report_dir(args.report)  # before the slow part
    bundle = read_bundle(args.bundle)
    if bundle.task == "detect":
        return _eval_detection(args, bundle)
    keras_reference = None  # without TensorFlow, evaluate_bundle says what to install
    if args.reference and not args.reference.endswith((".edgeq", ".tflite")):
        try:
            from edgeq.converter.pipeline import float_reference as keras_reference
        except ImportError:
            pass
    report, runs = evaluate_bundle(bundle, args.data, args.ood, args.reference, args.target_accuracy,
                                   args.threads, keras_reference=keras_reference, compare=args.compare or ())
    if args.report:
        from edgeq.report import write_report

        report["report"] = str(write_report(report, runs, args.report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from edgeq.report import summary_rows

        rows = summary_rows(report)
        variants = [html.unescape(v) for v in rows.pop(0)[1]]
        _print_models(f"{report['name']}: {report['count']} images"
                      + (f", {report['ood_count']} OOD" if report["ood_count"] else ""), report, variants, rows)
    return 0


def _print_models(title: str, report: dict, variants: list[str], rows: list[tuple[str, list[str]]]) -> None:
    """An eval's figures as text: the title, how each model was made (long: one line each), then one row per
    figure with a column per model."""
    names = list(report["models"])
    width = max(len(label) for label, _ in rows)
    print(title)
    for n, v in zip(names, variants):
        print(f"  {n}: {v}")
    print(f"  {'':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for label, values in rows:
        print(f"  {label:<{width}}  " + "  ".join(f"{v:>12}" for v in values))
    if "report" in report:
        print(f"report: {report['report']}")


def _eval_detection(args: argparse.Namespace, bundle: object) -> int:
    from edgeq.detect_eval import detection_rows, evaluate_detection
    from edgeq.errors import DataError

    if args.ood:
        raise DataError(f"--ood {args.ood}: a detection eval finds unknown objects in the COCO set itself (categories "
                        "with supercategory 'unknown'); drop --ood")
    keras_reference = None
    if args.reference and not args.reference.endswith(".edgeq"):
        try:
            from edgeq.converter.detect_convert import float_reference_detector as keras_reference
        except ImportError:
            pass
    report, runs, coco = evaluate_detection(bundle, args.data, args.reference, args.target_accuracy, args.threads,
                                            args.compare or (), keras_reference)
    if args.report:
        from edgeq.detect_report import write_detection_report

        report["report"] = str(write_detection_report(report, runs, coco, args.report))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = detection_rows(report)
    _print_models(f"{report['name']}: {report['count']} images, uncertainty measure {report['uncertainty_measure']}",
                  report, rows[0][1], rows[1:])
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgeq.bench import bench, format_bench

    result = bench(args.bundle, args.baseline, args.threads, args.runs, args.warmup, args.pipeline)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgeq.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeq",
        description="Quantized, uncertainty-aware vision models for Raspberry Pi-class devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgeq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from edgeq.converter.cli import add_convert_arguments, add_train_arguments

    p = sub.add_parser("datasets", help="generate or check detection data (COCO JSON)",
                       description="Detection data in COCO format: generate synthetic scenes, or check a file.")
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
    d.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split to draw from")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(handler=_cmd_scenes)
    d = dsub.add_parser("check", help="check a COCO instances file and its images",
                        description="Load a COCO instances file and check images, boxes and category ids.")
    d.add_argument("annotations", metavar="FILE", help="annotations.json, or the folder holding it")
    d.add_argument("--images", metavar="DIR", help="image folder (default: images/ next to the file, else its folder)")
    d.set_defaults(handler=_cmd_coco_check)

    p = sub.add_parser("train", help="train a MobileNetV2 with a dense or Bayesian head (host; needs edgeq[convert])",
                       description="Train a MobileNetV2 classifier on a class folder, with a deterministic or a "
                                   "Bayesian (mean-field Gaussian) head, into a .keras file for edgeq convert.")
    add_train_arguments(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("convert", help="quantise a model into a .edgeq bundle (host; needs edgeq[convert])",
                       description="Quantise a model into a verified .edgeq bundle (post-training, full integer by default).")
    add_convert_arguments(p)
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("inspect", help="show a bundle's manifest, ops and sizes",
                       description="Verify a bundle and show its manifest summary, ops with tensor dtypes, and sizes.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("eval", help="accuracy, calibration and uncertainty of a bundle, vs its float reference",
                       description="Run a bundle (and a reference through the same preprocessing) over a labelled "
                                   "folder: top-1, NLL, Brier, ECE, UCE, OOD AUROC, referral rate; --report writes "
                                   "an HTML page with the plots.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled images, one subfolder per class; for a "
                   "detection bundle a COCO set (annotations.json or its folder)")
    p.add_argument("--ood", metavar="DIR", help="out-of-distribution images (any layout): AUROC of each uncertainty")
    p.add_argument("--reference", metavar="MODEL", help="float reference: the source .keras model, a float .edgeq "
                   "bundle or a .tflite file")
    p.add_argument("--compare", action="append", metavar="BUNDLE", help="another .edgeq bundle of the same classes "
                   "to show side by side (e.g. unclustered vs clustered); repeat for more")
    p.add_argument("--report", metavar="OUT_DIR", help="write OUT_DIR/report.html (self-contained, with plots)")
    p.add_argument("--target-accuracy", type=float, default=0.995, metavar="A",
                   help="accuracy the referral rate is computed for (default 0.995)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("bench", help="invoke latency, memory and runtime of a bundle, vs a baseline",
                       description="Interleaved A/B invoke timing (median, p95, throughput), peak memory, runtime "
                                   "and XNNPACK use; --pipeline VIDEO times the whole edgeq run pipeline.")
    p.add_argument("bundle", metavar="BUNDLE", help="a .edgeq bundle (or a .tflite file)")
    p.add_argument("--baseline", metavar="MODEL", help="a float .edgeq bundle or .tflite file to compare with")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--runs", type=int, default=200, help="interleaved rounds (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up invokes per model (default 20)")
    p.add_argument("--pipeline", metavar="VIDEO", help="also run edgeq run on VIDEO: pipeline fps vs raw invoke fps")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=_cmd_bench)

    from edgeq.demo import add_demo_arguments

    p = sub.add_parser("demo", help="run the whole job end to end on generated data",
                       description="Generate data, build and convert a model, and inspect the bundle, in --workdir.")
    add_demo_arguments(p)
    p.set_defaults(handler=_cmd_demo)

    _add_device_commands(sub)
    return parser


def _add_device_commands(sub: argparse._SubParsersAction) -> None:
    """Device subcommands; their modules import neither TensorFlow nor the converter."""
    try:
        from edgeq.device.cli import add_device_commands
    except ModuleNotFoundError as exc:  # a copy of edgeq without the device side
        if exc.name not in ("edgeq.device", "edgeq.device.cli"):
            raise
        return
    add_device_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except EdgeqError as exc:
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
