"""Issue 8 figures: the int8 MobileNetV2 grid detector with a K=32 Bayesian class head.

1. Data: ``edgeq datasets scenes`` (Fashion-MNIST silhouettes on textured backgrounds). Training scenes leave two
   classes out (``bag``, ``sandal``); the test scenes (Fashion-MNIST's test split) hold them as unknown objects.
2. Training through the real commands' code: a MobileNetV2 classifier on Fashion-MNIST items (``edgeq train``,
   the stand-in for ImageNet weights, which cannot be downloaded here), then ``edgeq train --task detect
   --init-backbone`` (deterministic class head, then the Bayesian class head initialised from it).
3. ``edgeq convert`` to int8 (32 samples, --val on the test scenes) and to float32 (same weight samples).
4. Quality, float vs int8, on the test scenes (``edgeq eval``'s code): mAP@0.5 and mAP@[.5:.95] (pycocotools),
   D-ECE, AUROC of each uncertainty for detections of unknown vs known objects.
5. Latency, interleaved in one run (LiteRT, XNNPACK, 1 thread): int8 vs float32; the K=32 class head vs a
   deterministic class head (the posterior mean) on the same int8 backbone.

    python benchmarks/detection.py --workdir /tmp/det-bench        # writes benchmarks/results/detection.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from _common import log, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")



def main(argv: list[str] | None = None) -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Keras's progress lines; stdout carries only the JSON
        result = measure(argv)
    write_result("detection", result)
    return 0


def measure(argv: list[str] | None) -> dict:
    p = argparse.ArgumentParser()
    add_data_arguments(p)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--bayes-epochs", type=int, default=30)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--layout", default="auto", choices=("auto", "stacked", "centred"), help="--bayes-layout")
    p.add_argument("--workdir", help="keep data and models here; reuse what is found there")
    args = p.parse_args(argv)

    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.training.detector import DetectTrainOptions, train_detector
    from edgeq.converter.models.detector import export_detector
    from edgeq.converter.stages.load import load_source_model
    from edgeq.converter.stages.calibrate import load_calibration
    from edgeq.converter.stages.load import SourceModel
    from edgeq.converter.recipes import QuantMode, QuantRecipe
    from edgeq.converter.tflite import convert_model
    from edgeq.converter.evaluation.detect import evaluate_detection
    from edgeq.runtime import Model, interleaved_latency

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgeq-det-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    quiet = lambda s: log("   " + s)  # noqa: E731
    cls_path = prepare(work, args, timings, quiet)
    det_path = work / "detector.keras"
    if not det_path.is_file():
        t0 = time.perf_counter()
        train_detector(DetectTrainOptions(str(work / "train"), det_path, alpha=args.alpha, input_size=args.size,
                                          epochs=args.epochs, bayes_epochs=args.bayes_epochs, seed=args.seed,
                                          init_backbone=str(cls_path)), log=quiet)
        timings["train_detector_s"] = time.perf_counter() - t0
    bundles = {}
    for quant in ("int8", "float32"):
        out = work / f"detector_{quant}.edgeq"
        if not out.is_file():
            t0 = time.perf_counter()
            # float32 with the int8 bundle's layout, the same weight samples and the same density fit (both take
            # --val: the fit uses the training scenes, --val the held-out scores): they differ only by quantisation
            layout = bundles["int8"].manifest.head.layout if quant == "float32" else args.layout
            convert(recipe_from_flags(str(det_path), out, calib=str(work / "train"), quant=quant,
                                   bayes_samples=args.samples, bayes_layout=layout, val=str(work / "test")), log=quiet)
            timings[f"convert_{quant}_s"] = time.perf_counter() - t0
        bundles[quant] = read_bundle(out)
    plain = work / "detector_int8_no_density.edgeq"  # the same int8 bundle without the unfamiliarity outputs
    if not plain.is_file():
        convert(recipe_from_flags(str(det_path), plain, calib=str(work / "train"), bayes_samples=args.samples,
                                  bayes_layout=bundles["int8"].manifest.head.layout, density="off"),
                log=quiet)
    # edgeq eval's code, the float32 bundle as the reference: both scored at the int8 bundle's score threshold
    report, _, _ = evaluate_detection(bundles["int8"], str(work / "test"), str(work / "detector_float32.edgeq"))
    quality = {"int8": report["models"]["quantized"], "float32": report["models"]["reference"]}
    # the same int8 bundle with the density fitted on the features divided by their length (--density-normalise l2):
    # the same detections, scored on unit-length features that the device projects itself
    l2_path = work / "detector_int8_l2.edgeq"
    if not l2_path.is_file():
        convert(recipe_from_flags(str(det_path), l2_path, calib=str(work / "train"), bayes_samples=args.samples,
                                  bayes_layout=bundles["int8"].manifest.head.layout,
                                  val=str(work / "test"), density_normalise="l2"), log=quiet)
    l2_bundle = read_bundle(l2_path)
    l2_report, _, _ = evaluate_detection(l2_bundle, str(work / "test"))
    u = l2_report["models"]["quantized"]
    l2_figures = {"detections": u["detections"], "matched_known": u["matched_known"],
                  "matched_unknown": u["matched_unknown"], "unfamiliarity_auroc": u["unknown_auroc"]["unfamiliarity"],
                  "unfamiliarity_fpr_at_95_tpr": u["unknown_fpr_at_95_tpr"]["unfamiliarity"], "flagged": u["flagged"],
                  "int8_vs_float_correlation": l2_bundle.manifest.density.fit.int8_vs_float_correlation}
    for quant, figs in quality.items():
        log(f"{quant}: mAP@0.5 {figs['map50']:.4f}, mAP {figs['map']:.4f}, AUROC {figs['unknown_auroc']}")

    # latency: int8 vs float32, and the K-sample class head vs the posterior-mean head, all interleaved
    source = load_source_model(str(det_path))
    spec = bundles["int8"].preprocess_spec.with_dtype("float32")
    calib = load_calibration(str(work / "train"), spec, 100)
    mean_model, _ = export_detector(source.keras_model, None, mean_only=True)
    mean_bytes = convert_model(SourceModel(mean_model, None, source.input_shape, 8, "mean", "mean"),
                               QuantRecipe(QuantMode.INT8), calib)
    models = {"int8_mc": bundles["int8"].load_model(), "float32_mc": bundles["float32"].load_model(),
              "int8_mc_no_density": read_bundle(plain).load_model(), "int8_mean_head": Model(mean_bytes),
              "int8_mc_l2": l2_bundle.load_model()}
    inputs = [np.zeros(m.input.shape, dtype=m.input.dtype) for m in models.values()]
    times = interleaved_latency(list(models.values()), inputs, runs=args.runs, warmup=30)
    med = {name: float(np.median(t)) for name, t in zip(models, times)}
    head = bundles["int8"].manifest.head.to_json()
    q, f = quality["int8"], quality["float32"]
    result = {
        "benchmark": "detection",
        "runtime": models["int8_mc"].describe(),
        "xnnpack": models["int8_mc"].delegation.to_dict(),
        "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
        "input": f"{args.size}x{args.size}", "grid": list(bundles["int8"].manifest.detector.grid),
        "head": {k: head.get(k) for k in ("samples", "classes", "layout", "layout_choice", "head_macs",
                                         "deterministic_head_macs", "backbone_macs", "spread", "review")},
        "detector": bundles["int8"].manifest.detector.model_dump(mode="json", include={"score_threshold", "score_threshold_calibration"}),
        "quality": quality,
        "map50_drop_points": round(100 * (f["map50"] - q["map50"]), 3),
        "auroc_mi_float_minus_int8": None if not (q["unknown_auroc"] and f["unknown_auroc"]) else
        round(f["unknown_auroc"]["mutual_information"] - q["unknown_auroc"]["mutual_information"], 6),
        "latency_ms_median": {k: round(v, 4) for k, v in med.items()},
        "latency_ms_p95": {name: round(float(np.percentile(t, 95)), 4) for name, t in zip(models, times)},
        "float32_over_int8": round(med["float32_mc"] / med["int8_mc"], 4),
        "mc_head_over_mean_head": round(med["int8_mc_no_density"] / med["int8_mean_head"], 4),
        "density_over_no_density": round(med["int8_mc"] / med["int8_mc_no_density"], 4),
        "l2_over_no_density": round(med["int8_mc_l2"] / med["int8_mc_no_density"], 4),
        # convert's check of the density: int8 vs float scores of the held-out cells (converter/stages/density.py)
        "density_int8_vs_float_correlation": bundles["int8"].manifest.density.fit.int8_vs_float_correlation,
        "int8_density_l2": l2_figures,
        "unknown_object_features": feature_probe(det_path, bundles["int8"], work, cls_path),
        "sizes": {k: b.manifest.sizes.model_tflite for k, b in bundles.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    return result


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``prepare`` reads: the scenes, the starting backbone, the input size and width, the seed."""
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--test-scenes", type=int, default=300)
    p.add_argument("--pretrain-images", type=int, default=8000)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--crop-epochs", type=int, default=30, help="the backbone's second stage, on the training scenes' "
                   "objects (edgeq datasets crops); 0 leaves it out")
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ood-classes", default="bag,sandal")


def prepare(work: Path, args: argparse.Namespace, timings: dict[str, float], quiet) -> Path:
    """The scenes (``work/train`` without the unknown classes, ``work/test`` with them) and the starting backbone,
    made once per workdir; returns the backbone's path. The backbone is a classifier of the known classes' items
    (``work/backbone.keras``), then, with ``--crop-epochs``, trained on from there on the training scenes' objects
    cut out at their scene scale (``edgeq datasets crops``; ``work/backbone_crops.keras``), so that it knows the
    objects as the detector sees them. benchmarks/detection_outliers.py shares them."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder
    from edgeq.converter.data.scenes import generate_scenes
    from edgeq.converter.training.classifier import TrainOptions, train

    ood = tuple(args.ood_classes.split(","))
    if not (work / "test" / "annotations.json").is_file():
        t0 = time.perf_counter()
        generate_scenes(work / "train", args.train_scenes, args.size, args.seed, exclude_classes=ood)
        generate_scenes(work / "test", args.test_scenes, args.size, args.seed + 1, ood_classes=ood, split="test")
        timings["scenes_s"] = time.perf_counter() - t0
    cls_path = work / "backbone.keras"
    if not cls_path.is_file():
        t0 = time.perf_counter()
        x, y = fashion_mnist("train")
        known = [i for i, name in enumerate(FASHION_MNIST_LABELS) if name not in ood]
        rng = np.random.default_rng(args.seed)
        pick = rng.choice(np.flatnonzero(np.isin(y, known)), args.pretrain_images, replace=False)
        labels = [FASHION_MNIST_LABELS[i] for i in known]
        remap = {c: i for i, c in enumerate(known)}
        write_class_folder(work / "items", x[pick], np.array([remap[int(v)] for v in y[pick]]), labels)
        train(TrainOptions(str(work / "items"), cls_path, alpha=args.alpha, input_size=96,
                           epochs=args.pretrain_epochs, seed=args.seed), log=quiet)
        timings["pretrain_s"] = time.perf_counter() - t0
    if not args.crop_epochs:
        return cls_path
    tuned = work / "backbone_crops.keras"
    if not tuned.is_file():
        from edgeq.converter.data.coco import read_coco, write_object_crops

        t0 = time.perf_counter()
        if not (work / "crops").is_dir():
            write_object_crops(read_coco(work / "train"), work / "crops")
        train(TrainOptions(str(work / "crops"), tuned, alpha=args.alpha, input_size=96, epochs=args.crop_epochs,
                           seed=args.seed, init=str(cls_path)), log=quiet)
        timings["pretrain_crops_s"] = time.perf_counter() - t0
    return tuned


PROBE_LAYERS = ("block_1_project_BN", "block_3_project_BN", "block_6_project_BN", "block_10_project_BN",
                "block_12_project_BN", "neck_pw_bn", "neck", "class_features")


def feature_probe(det_path: Path, bundle, work: Path, backbone: Path, train_images: int = 1000,
                  test_images: int = 300) -> dict:
    """Could any of the detector's features tell unknown objects from known ones? Per ground-truth object (no
    detection step, so misses do not matter): each layer's feature map averaged over the object's box, and the
    neck at the box centre's cell, as it is and L2-normalised before the fit (``--density-normalise l2``); and
    the detector's starting ``backbone``, the classifier, on each object's 96-pixel window as ``edgeq datasets
    crops`` cuts it (its pooled features): what the detector started from. Each fitted
    as the shipped nearest-mean score (converter/stages/density.py, top 256 directions) on the training scenes'
    objects; AUROC of the distance for the test scenes' unknown vs known objects. Float features (int8 tracks
    them: the quality table)."""
    import dataclasses

    import keras

    from edgeq.converter.data.coco import object_window, read_coco
    from edgeq.converter.evaluation import metrics
    from edgeq.converter.models import bayes
    from edgeq.converter.stages.density import fit_gaussians
    from edgeq.density import DensityModel, unit_length
    from edgeq.preprocess import Preprocessor, read_image

    bayes.register()
    model = keras.models.load_model(det_path, compile=False)
    names = [n for n in PROBE_LAYERS if any(layer.name == n for layer in model.layers)]
    extractor = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    index = {c: i for i, c in enumerate(bundle.manifest.detector.category_ids)}
    pre = Preprocessor(bundle.preprocess_spec.with_dtype("float32"))
    size = bundle.preprocess_spec.height
    classifier = keras.models.load_model(backbone, compile=False)
    # edgeq train's classifier pools MobileNetV2's last features (pooling="avg") before its dropout and logits
    pool = next(layer for layer in classifier.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    pooled = keras.Model(classifier.inputs, pool.output)
    window = classifier.inputs[0].shape[1]
    # the same normalisation as the detector's input, at the window's size (no resize: the window is that size)
    pre_window = Preprocessor(dataclasses.replace(bundle.preprocess_spec.with_dtype("float32"), height=window,
                                                  width=window))

    def objects(split: str, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        coco = read_coco(str(work / split))
        feats: dict[str, list] = {k: [] for k in (*names, "neck_centre_cell", "backbone_window")}
        targets: list[int] = []
        images = coco.images[:n]
        for start in range(0, len(images), 64):
            batch, meta, windows = [], [], []
            for im in images[start:start + 64]:
                image = read_image(coco.image_path(im))
                for box in coco.boxes[im["id"]]:
                    windows.append(pre_window(object_window(image, box, window))[0][0].copy())
                x, tf = pre(image)
                scale = np.array([tf.scale_x, tf.scale_y] * 2, np.float32)
                pad = np.array([tf.pad_x, tf.pad_y] * 2, np.float32)
                batch.append(x[0].copy())  # x is the preprocessor's own buffer, overwritten by the next call
                meta.append((coco.boxes[im["id"]] * scale + pad, coco.category_ids[im["id"]].tolist()))
            outs = extractor.predict(np.stack(batch), verbose=0)
            feats["backbone_window"].extend(pooled.predict(np.stack(windows), verbose=0))
            for i, (boxes, cats) in enumerate(meta):
                for box, cat in zip(boxes, cats):
                    for name, out in zip(names, outs):
                        fmap = out[i]
                        k = size / fmap.shape[0]
                        x0, y0 = int(box[0] // k), int(box[1] // k)
                        x1, y1 = max(int(np.ceil(box[2] / k)), x0 + 1), max(int(np.ceil(box[3] / k)), y0 + 1)
                        feats[name].append(fmap[y0:y1, x0:x1].reshape(-1, fmap.shape[-1]).mean(0))
                        if name == "neck":
                            cy, cx = int((box[1] + box[3]) / 2 // k), int((box[0] + box[2]) / 2 // k)
                            feats["neck_centre_cell"].append(fmap[min(cy, fmap.shape[0] - 1), min(cx, fmap.shape[1] - 1)])
                    targets.append(index.get(cat, -1))
        return {k: np.asarray(v, np.float64) for k, v in feats.items()}, np.asarray(targets)

    fit, y = objects("train", train_images)
    test, ty = objects("test", test_images)
    classes = int(y.max()) + 1

    def auroc(train_x: np.ndarray, test_x: np.ndarray) -> float:
        fitted = fit_gaussians(train_x, y, [str(c) for c in range(classes)], 256, "feature probe")
        density = DensityModel(fitted["block"]["rank"], np.asarray(fitted["block"]["class_means"]), np.zeros(2))
        score = density.scores(test_x @ fitted["W"].astype(np.float64))
        return round(metrics.roc_auc(score[ty >= 0], score[ty < 0]), 4)

    out = {"objects": {"train": int(len(y)), "test_known": int((ty >= 0).sum()), "test_unknown": int((ty < 0).sum())},
           "auroc": {f"{n}_box_mean": auroc(fit[n], test[n]) for n in names}}
    out["auroc"]["neck_centre_cell"] = auroc(fit["neck_centre_cell"], test["neck_centre_cell"])
    out["auroc"]["neck_centre_cell_l2"] = auroc(unit_length(fit["neck_centre_cell"]),
                                                unit_length(test["neck_centre_cell"]))
    out["auroc"]["starting_backbone_window_pooled"] = auroc(fit["backbone_window"], test["backbone_window"])
    early = [n for n in names if n.startswith("block_")]
    out["auroc"]["early_blocks_box_mean"] = auroc(np.concatenate([fit[n] for n in early], 1),
                                                  np.concatenate([test[n] for n in early], 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
