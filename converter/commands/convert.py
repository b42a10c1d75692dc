"""``edgeq convert``: quantise a model into a verified .edgeq bundle. Its flags come from converter/recipes.py."""

from __future__ import annotations

import argparse
import json
import os
import sys

from edgeq.quiet import verbose
from edgeq.records import ClassifyValidation, DetectionFigures, DetectValidation, ReviewRule

HELP = "quantise a model into a .edgeq bundle (host; needs edgeq[convert])"
DESCRIPTION = "Quantise a model into a verified .edgeq bundle (post-training, full integer by default)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..recipes import add_arguments as add_recipe_arguments

    p.add_argument("model", metavar="MODEL", help="a .keras/.h5 file, a SavedModel folder, or mobilenet_v2 (built in)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.edgeq", help="bundle to write (atomically)")
    add_recipe_arguments(p)
    p.add_argument("--threads", type=int, default=1, help="interpreter threads for verification (default 1)")
    p.add_argument("--sign", metavar="KEY", help="sign the bundle with this private key (edgeq keygen): devices with "
                                                 "trusted_keys accept only signed bundles")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if not verbose():  # edgeq -v shows TensorFlow's own lines
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ..pipeline import convert
    from ..recipes import recipe_from_flags

    flags = {k: v for k, v in vars(args).items() if k not in ("model", "output", "threads", "json", "handler",
                                                               "command", "sign")}
    key = None
    if args.sign:  # a bad key is refused before the conversion, not after it
        from edgeq.signing import load_private_key

        key = load_private_key(args.sign)
    recipe = recipe_from_flags(args.model, args.output, args.threads, **flags)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    result = convert(recipe, log=log)
    signer = None
    if key is not None:
        from edgeq.signing import sign_bundle

        signer = sign_bundle(result.output, key)
    m = result.manifest
    if args.json:
        print(json.dumps({"output": str(result.output), "manifest": m.to_json(), "timings": result.timings,
                          "signer": signer}, indent=2))
        return 0
    sizes = m.sizes
    print(f"wrote {result.output}: {m.quantization.scheme} {m.input.height}x{m.input.width}, {len(m.labels)} classes, "
          f"model {sizes.model_tflite / 1e6:.2f} MB ({sizes.ratio_to_float32:.2f}x float32), "
          f"{result.timings['total_s']:.1f} s")
    if signer:
        print(f"signed by key {signer}")
    if m.quantization.float_ops:
        print(f"float ops kept: {', '.join(m.quantization.float_ops)}")
    if isinstance(m.validation, DetectValidation):
        print(format_detect_validation(m.validation))
    elif m.validation is not None:
        print(format_validation(m.validation))
    head = m.head_or_dense
    if head.spread is not None:
        sp = head.spread
        print(f"bayesian head: {head.samples} samples, logit spread float {sp.float_:.4f} -> int8 "
              f"{sp.quantized:.4f} ({sp.steps} output steps), MI correlation {sp.mutual_information_correlation}")
    if head.review is not None:
        print(format_review(head.review))
    return 0


def format_review(r: ReviewRule) -> str:
    """The review rule in one line (edgeq inspect shows the same)."""
    parts = []
    if r.unfamiliar_threshold is not None:
        parts.append(f"unfamiliar when unfamiliarity > {r.unfamiliar_threshold:.4g} (percentile "
                     f"{r.unfamiliar_percentile:g}: {r.ood_rate:.0%} of in-distribution data)")
    if r.threshold is None:
        parts.append("never ambiguous (no threshold)")
    elif r.mode == "budget":
        parts.append(f"ambiguous when {r.measure} > {r.threshold:.6g} (the {r.budget:.0%} most ambiguous of "
                     f"--val; accuracy {r.target_accuracy} out of reach within that budget; the rest reach "
                     f"{r.kept_accuracy:.4f})")
    else:
        parts.append(f"ambiguous when {r.measure} > {r.threshold:.6g} (keeps {r.coverage:.1%} of --val at "
                     f"accuracy {r.kept_accuracy:.4f}, target {r.target_accuracy})")
    return "needs_review: " + "; or ".join(parts)


def format_detect_validation(v: DetectValidation) -> str:
    f, q = v.float_, v.quantized

    def auroc(m: DetectionFigures) -> str:
        a = (m.unknown_auroc or {}).get("mutual_information")
        return "-" if a is None else f"{a:.4f}"

    rows = [
        ("images", f"{v.images}"),
        ("float / int8 mAP@0.5", f"{f.map50:.4f} / {q.map50:.4f}"),
        ("float / int8 mAP@[.5:.95]", f"{f.map:.4f} / {q.map:.4f}"),
        ("float / int8 detections", f"{f.detections} / {q.detections}"),
        ("float / int8 AUROC unknown (MI)", f"{auroc(f)} / {auroc(q)}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "validation\n" + "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)


def format_validation(v: ClassifyValidation) -> str:
    rows = [
        ("images", f"{v.count}"),
        ("float top-1", f"{v.float_top1:.4f}"),
        ("quantized top-1", f"{v.quantized_top1:.4f}"),
        ("top-1 agreement", f"{v.top1_agreement:.4f}"),
        ("mean |logit error|", f"{v.mean_abs_logit_error:.4f}"),
        ("float / quantized ECE", f"{v.float_ece:.4f} / {v.quantized_ece:.4f}"),
    ]
    if v.float_mean_mutual_information is not None:
        rows.append(("float / quantized mean MI",
                     f"{v.float_mean_mutual_information:.4f} / {v.quantized_mean_mutual_information:.4f}"))
        corr = v.mutual_information_correlation
        rows.append(("MI correlation", "-" if corr is None else f"{corr:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "validation\n" + "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)
