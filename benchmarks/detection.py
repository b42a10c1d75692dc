"""Unknown objects in detection, measured on splits that cannot flatter: benchmarks/results/detection.json.

    python benchmarks/detection_train.py --workdir /tmp/det            # data and models (hours: run it first)
    python benchmarks/detection.py --workdir /tmp/det                   # convert, score, aggregate over seeds

The splits and the training are benchmarks/detection_train.py's. Per training seed and variant (``plain``, ``oe``):
1. ``edgeq convert`` to int8 with ``--calib`` the training scenes and ``--val`` the calibration scenes (known objects
   only: the score threshold, the objectness threshold, the unknown score's references and threshold and the
   density's percentiles all come from them), and to float32 with the same layout and weight samples.
2. ``edgeq eval``'s code on the eval scenes, int8 beside float32: mAP@0.5 of the known classes, and per kind of
   unknown object (near: bag, sandal; far: digits, photos) how many are found at all (a kept detection at IoU >=
   0.5, any label), how many of those detections are published as ``unknown``, and the AUROC of the unknown score
   (and of each measure) against the detections of known objects, with a bootstrap 95% interval; how many known
   detections are published as unknown.
3. The empty scenes: detections where there is no object.
4. The device's cost: decode (NMS, measures, unknown score) per frame with and without the unknown rule, and
   invoke with the density's output against without it (interleaved; the unknown score adds no op to the graph).
Figures are then reported as the mean over the seeds with their range.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import log, require_clean_tree, write_result
from detection_train import FAR_KINDS, UNKNOWN_CLASSES, VARIANTS

KINDS = {"bag": "near", "sandal": "near", "digit": "far", "photo": "far"}
BOOTSTRAP = 1000


def convert_seed(work: Path, seed: int, variant: str, quiet) -> dict[str, Path]:
    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags

    folder = work / f"seed{seed}"
    det = folder / f"detector_{variant}.keras"
    out = {"int8": folder / f"{variant}_int8.edgeq", "float32": folder / f"{variant}_float32.edgeq",
           "no_density": folder / f"{variant}_int8_no_density.edgeq"}
    common = dict(calib=str(work / "data" / "train"), val=str(work / "data" / "calib"), resize="letterbox")
    if not out["int8"].is_file():
        convert(recipe_from_flags(str(det), out["int8"], **common), log=quiet)
    layout = read_bundle(out["int8"]).manifest.head.layout
    if not out["float32"].is_file():
        convert(recipe_from_flags(str(det), out["float32"], quant="float32", bayes_layout=layout, **common), log=quiet)
    if not out["no_density"].is_file():  # the graph without the density's output, for the invoke cost
        convert(recipe_from_flags(str(det), out["no_density"], calib=common["calib"], bayes_layout=layout,
                                  density="off", resize="letterbox"), log=quiet)
    return out


def bootstrap_auroc(known: np.ndarray, unknown: np.ndarray, rng: np.random.Generator) -> list[float]:
    from sklearn.metrics import roc_auc_score

    values = []
    for _ in range(BOOTSTRAP):
        k, u = rng.choice(known, len(known)), rng.choice(unknown, len(unknown))
        values.append(roc_auc_score(np.r_[np.zeros(len(k)), np.ones(len(u))], np.r_[k, u]))
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def score_seed(work: Path, bundles: dict[str, Path], seed: int) -> dict:
    """The int8 bundle on the eval scenes beside the float32 one, per kind; the empty scenes; the device's cost."""
    from edgeq.bundle import read_bundle
    from edgeq.converter.evaluation.detect import evaluate_detection, match_all

    b = read_bundle(bundles["int8"])
    report, runs, coco = evaluate_detection(b, str(work / "data" / "eval"), str(bundles["float32"]))
    q, f = report["models"]["quantized"], report["models"]["reference"]
    spec = runs[1].grid.spec
    m = match_all(runs[1].results, coco, list(spec.category_ids), spec.score_threshold, spec.objectness_threshold)
    rng = np.random.default_rng(seed)
    kinds = {}
    for name, entry in (q.get("unknown_kinds") or {}).items():
        sel = m.kinds == name
        entry = dict(entry)
        if sel.any() and m.known.any():
            entry["auroc_unknown_score_ci95"] = bootstrap_auroc(m.measures["unknown_score"][m.known],
                                                                m.measures["unknown_score"][sel], rng)
        entry["float_auroc_unknown_score"] = ((f.get("unknown_kinds") or {}).get(name) or {}).get("auroc", {}).get(
            "unknown_score")
        kinds[name] = entry
    manifest = b.manifest
    return {
        "map50": {"int8": q["map50"], "float32": f["map50"]},
        "label_accuracy_known": q["label_accuracy_known"],
        "known_objects": q["known_objects"],
        "kinds": kinds,
        "thresholds": {"score": manifest.detector.score_threshold,
                       "objectness": manifest.detector.objectness_threshold,
                       "unknown": manifest.unknown.threshold if manifest.unknown else None,
                       "unknown_measures": list(manifest.unknown.measures) if manifest.unknown else None},
        "empty_scenes": empty_detections(b, work / "data" / "empty"),
        "layout": manifest.head.layout,
    }


def empty_detections(bundle, folder: Path) -> dict:
    """What the device reports on scenes with no object at all: every detection there is a false one."""
    from edgeq.detection import GridSpec
    from edgeq.preprocess import Preprocessor, input_spec_for, list_images, read_image

    model = bundle.load_model()
    m = bundle.manifest
    grid = GridSpec.from_manifest(m, bundle.where).bind(model, m.outputs, bundle.where, m.density, m.unknown)
    pre = Preprocessor(input_spec_for(model, bundle.preprocess_spec))
    files = list_images(folder / "images")
    found = unknown = 0
    for f in files:
        x, _ = pre(read_image(f))
        model.set_input(x)
        model.invoke()
        d = grid.read(model, (m.input.height, m.input.width))
        found += len(d)
        unknown += int(d.unknown.sum()) if d.unknown is not None else 0
    return {"scenes": len(files), "detections": found, "published_unknown": unknown,
            "per_scene": round(found / max(len(files), 1), 4)}


def device_cost(bundles: dict[str, Path], work: Path, runs: int = 300) -> dict:
    """Decode per frame with and without the unknown rule (the same raw outputs), and invoke with and without the
    density's output, interleaved."""
    import dataclasses

    from edgeq.bundle import read_bundle
    from edgeq.detection import GridSpec
    from edgeq.preprocess import Preprocessor, input_spec_for, list_images, read_image
    from edgeq.runtime import interleaved_latency

    b = read_bundle(bundles["int8"])
    m = b.manifest
    model = b.load_model()
    spec = GridSpec.from_manifest(m, b.where)
    with_rule = spec.bind(model, m.outputs, b.where, m.density, m.unknown)
    before = dataclasses.replace(spec, objectness_threshold=None).bind(model, m.outputs, b.where, m.density)
    pre = Preprocessor(input_spec_for(model, b.preprocess_spec))
    raws = []
    for f in list_images(work / "data" / "eval" / "images")[:50]:
        x, _ = pre(read_image(f))
        model.set_input(x)
        model.invoke()
        raws.append(with_rule.raw(model))
    size = (m.input.height, m.input.width)
    times: dict[str, list[float]] = {"with_unknown": [], "without": []}
    for _ in range(3):
        for name, grid in (("with_unknown", with_rule), ("without", before)):
            for raw in raws:
                t0 = time.perf_counter()
                grid.decode(raw, size)
                times[name].append((time.perf_counter() - t0) * 1e3)
    plain = read_bundle(bundles["no_density"]).load_model()
    inputs = [np.zeros(mm.input.shape, dtype=mm.input.dtype) for mm in (model, plain)]
    t_with, t_plain = interleaved_latency([model, plain], inputs, runs=runs, warmup=30)
    return {"decode_ms_median": {k: round(float(np.median(v)), 4) for k, v in times.items()},
            "decode_ms_p95": {k: round(float(np.percentile(v, 95)), 4) for k, v in times.items()},
            "invoke_ms_median": {"with_density_output": round(float(np.median(t_with)), 4),
                                 "without": round(float(np.median(t_plain)), 4)},
            "invoke_ratio": round(float(np.median(t_with) / np.median(t_plain)), 4)}


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean over seeds, with min and max, of every figure the headline table reads."""
    def stat(values: list[float]) -> dict:
        v = [x for x in values if x is not None]
        if not v:
            return {"mean": None}
        return {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4),
                "max": round(float(np.max(v)), 4), "values": [round(float(x), 4) for x in v]}

    seeds = list(per_seed.values())
    out = {"map50_int8": stat([s["map50"]["int8"] for s in seeds]),
           "map50_float32": stat([s["map50"]["float32"] for s in seeds]),
           "label_accuracy_known": stat([s["label_accuracy_known"] for s in seeds]),
           "known_found_rate": stat([s["known_objects"]["found_rate"] for s in seeds]),
           "known_published_unknown": stat([s["known_objects"]["published_unknown"] for s in seeds]),
           "empty_per_scene": stat([s["empty_scenes"]["per_scene"] for s in seeds]), "kinds": {}}
    for kind in KINDS:
        entries = [s["kinds"].get(kind) for s in seeds if s["kinds"].get(kind)]
        if not entries:
            continue
        out["kinds"][kind] = {
            "distance": KINDS[kind],
            "found_rate": stat([e["found_rate"] for e in entries]),
            "published_unknown": stat([e.get("published_unknown") for e in entries]),
            "auroc_unknown_score": stat([(e.get("auroc") or {}).get("unknown_score") for e in entries]),
            "auroc_float_minus_int8": stat([None if e.get("float_auroc_unknown_score") is None else
                                            e["float_auroc_unknown_score"] - e["auroc"]["unknown_score"]
                                            for e in entries]),
            "auroc_by_measure": {k: stat([(e.get("auroc") or {}).get(k) for e in entries])
                                 for k in ("class_doubt", "energy", "mutual_information", "unfamiliarity",
                                           "one_minus_score", "objectness")},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    require_clean_tree()  # before the slow part: the results must name the commit that ran
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["plain", "oe"], choices=sorted(VARIANTS))
    args = p.parse_args(argv)
    work = Path(args.workdir)
    quiet = lambda s: log("   " + s)  # noqa: E731
    result: dict = {"benchmark": "detection (unknown objects)", "unknown_classes": list(UNKNOWN_CLASSES),
                    "far_kinds": list(FAR_KINDS), "variants": {}}
    with contextlib.redirect_stdout(sys.stderr):
        for variant in args.variants:
            per_seed = {}
            for seed in args.seeds:
                bundles = convert_seed(work, seed, variant, quiet)
                per_seed[seed] = score_seed(work, bundles, seed)
                log(f"{variant} seed {seed}: " + json.dumps({k: per_seed[seed]["kinds"].get(k, {}).get("auroc", {})
                                                             .get("unknown_score") for k in KINDS}))
            training = {seed: json.loads((work / f"seed{seed}" / "training.json").read_text()) for seed in args.seeds}
            result["variants"][variant] = {"description": VARIANTS[variant], "seeds": per_seed, "training": training,
                                           "mean": aggregate(per_seed)}
        first = args.seeds[0]
        result["device_cost"] = device_cost(convert_seed(work, first, args.variants[-1], quiet), work)
    write_result("detection", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
