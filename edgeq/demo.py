"""``edgeq demo``: the whole job end to end on embedded defaults, in a work folder.

Steps: generate labelled images -> train a small MobileNetV2 on them -> ``edgeq convert`` (full int8, with
--val) -> ``edgeq inspect``. Everything is made here; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edgeq.cli import main as edgeq_main


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="edgeq-demo", help="folder for the demo's files (default ./edgeq-demo)")
    p.add_argument("--input-size", type=int, default=96, help="model input size (default 96)")
    p.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width (default 0.35)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def train_demo_model(images: Path, out: Path, size: int, alpha: float, epochs: int) -> dict[str, float]:
    from edgeq.converter.models import build_mobilenet_v2
    from edgeq.converter.quantize import import_tensorflow
    from edgeq.converter.train import fit_classifier, load_folder_arrays
    from edgeq.preprocess import PreprocessSpec

    import_tensorflow()
    x, y, labels = load_folder_arrays(images, PreprocessSpec(size, size, 3))
    model = build_mobilenet_v2(size, alpha, len(labels), None, seed=0)
    summary = fit_classifier(model, x, y, epochs=epochs, seed=0)
    model.save(out)
    return summary


def run_demo(args: argparse.Namespace) -> int:
    from edgeq.synthetic import SHAPES, write_shape_folder

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = step(f"1. generating labelled images in {work}/images ({len(SHAPES)} shape classes)")
    write_shape_folder(work / "images", per_class=60, size=args.input_size, seed=0)
    print(f"   {60 * len(SHAPES)} images, {time.perf_counter() - t:.1f} s")

    t = step(f"2. training a MobileNetV2 {args.alpha:g}/{args.input_size} on them for {args.epochs} epochs")
    model_path = work / "shapes.keras"
    summary = train_demo_model(work / "images", model_path, args.input_size, args.alpha, args.epochs)
    print(f"   train accuracy {summary['accuracy']:.3f}, {time.perf_counter() - t:.1f} s -> {model_path}")

    bundle = work / "shapes.edgeq"
    step("3. edgeq convert: Keras model -> full-integer int8 bundle, float vs int8 checked on the images")
    argv = [
        "convert", str(model_path), "--calib", str(work / "images"), "--calib-samples", "100",
        "--val", str(work / "images"), "-o", str(bundle),
    ]
    print("   $ edgeq " + " ".join(argv))
    code = edgeq_main(argv)
    if code:
        return code

    step("4. edgeq inspect")
    print(f"   $ edgeq inspect {bundle}")
    return edgeq_main(["inspect", str(bundle)])
