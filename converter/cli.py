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
    if "validation" in m:
        print(format_validation(m["validation"]))
    return 0


def format_validation(v: dict[str, Any]) -> str:
    rows = [
        ("images", f"{v['count']}"),
        ("float top-1", f"{v['float_top1']:.4f}"),
        ("quantized top-1", f"{v['quantized_top1']:.4f}"),
        ("top-1 agreement", f"{v['top1_agreement']:.4f}"),
        ("mean |logit error|", f"{v['mean_abs_logit_error']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "validation\n" + "\n".join(f"  {k:<{width}}  {val}" for k, val in rows)
