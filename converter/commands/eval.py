"""``edgeq eval``: accuracy, calibration and uncertainty of a bundle, side by side with its float reference."""

from __future__ import annotations

import argparse
import html
import json
from typing import Any

HELP = "accuracy, calibration and uncertainty of a bundle, vs its float reference (host)"
DESCRIPTION = ("Run a bundle (and a reference through the same preprocessing) over a labelled folder: top-1, NLL, "
               "Brier, ECE, UCE, OOD AUROC, referral rate; for a detection bundle a COCO set: mAP, D-ECE, "
               "unknown-object AUROC; --report writes an HTML page with the plots.")


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    from edgeq.bundle import read_bundle

    from ..evaluation.classify import evaluate_bundle
    from ..evaluation.report import check_report_dir, summary_rows, write_report

    if args.report:
        check_report_dir(args.report)  # before the slow part
    bundle = read_bundle(args.bundle)
    if bundle.task == "detect":
        return _run_detection(args, bundle)
    report, runs = evaluate_bundle(bundle, args.data, args.ood, args.reference, args.target_accuracy, args.threads,
                                   compare=args.compare or ())
    if args.report:
        report["report"] = str(write_report(report, runs, args.report))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = summary_rows(report)
    variants = [html.unescape(v) for v in rows.pop(0)[1]]
    print_models(f"{report['name']}: {report['count']} images"
                 + (f", {report['ood_count']} OOD" if report["ood_count"] else ""), report, variants, rows)
    return 0


def print_models(title: str, report: dict[str, Any], variants: list[str], rows: list[tuple[str, list[str]]]) -> None:
    """An eval's figures as text: the title, how each model was made (long: one line each), then one row per
    figure with a column per model."""
    names = list(report["models"])
    width = max(len(label) for label, _ in rows)
    # each column as wide as its longest cell (a runtime's name is longer than a figure)
    cols = [max([len(n)] + [len(values[i]) for _, values in rows]) for i, n in enumerate(names)]
    print(title)
    for n, v in zip(names, variants):
        print(f"  {n}: {v}")
    print(f"  {'':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols)))
    for label, values in rows:
        print(f"  {label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols)))
    if "report" in report:
        print(f"report: {report['report']}")


def _run_detection(args: argparse.Namespace, bundle: Any) -> int:
    from edgeq.errors import DataError

    from ..evaluation.detect import detection_rows, evaluate_detection
    from ..evaluation.detect_report import write_detection_report

    if args.ood:
        raise DataError(f"--ood {args.ood}: a detection eval finds unknown objects in the COCO set itself (categories "
                        "with supercategory 'unknown'); drop --ood")
    report, runs, coco = evaluate_detection(bundle, args.data, args.reference, args.target_accuracy, args.threads,
                                            args.compare or ())
    if args.report:
        report["report"] = str(write_detection_report(report, runs, coco, args.report))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = detection_rows(report)
    print_models(f"{report['name']}: {report['count']} images, uncertainty measure {report['uncertainty_measure']}",
                 report, rows[0][1], rows[1:])
    return 0
