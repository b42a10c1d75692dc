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
4. ``rules``: candidate unknown-score rules (which measures, which combination), each calibrated as convert does
   on the calib scenes, scored on the select scenes (outlier objects as the unknowns: the split the default was
   chosen on) and, for the record, on the eval scenes.
5. The device's cost (the first seed's model of the last variant given): decode (NMS, measures, unknown score) per frame with and
   without the unknown rule; invoke, interleaved, int8 vs float32, the K-sample class head vs the posterior-mean
   head, and with vs without the density's output (the unknown score adds no op to the graph).
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

from _common import log, require_clean_tree, require_disjoint, write_result
from detection_train import FAR_KINDS, UNKNOWN_CLASSES, VARIANTS

KINDS = {"bag": "near", "sandal": "near", "digit": "far", "photo": "far"}
# the kinds pooled as the targets read them
GROUPS = {"near": [k for k, d in KINDS.items() if d == "near"], "far": [k for k, d in KINDS.items() if d == "far"],
          "all": list(KINDS)}
BOOTSTRAP = 1000


def convert_seed(work: Path, seed: int, variant: str, quiet, without_density: bool = False) -> dict[str, Path]:
    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags

    from _common import _commit

    det = work / f"seed{seed}" / f"detector_{variant}.keras"
    folder = det.parent / f"bundles-{_commit()[:12]}"  # converted by this commit's code, reused only by it
    folder.mkdir(exist_ok=True)
    out = {"keras": det, "int8": folder / f"{variant}_int8.edgeq", "float32": folder / f"{variant}_float32.edgeq",
           "no_density": folder / f"{variant}_int8_no_density.edgeq"}
    common = dict(calib=str(work / "data" / "train"), val=str(work / "data" / "calib"), resize="letterbox")
    if not out["int8"].is_file():
        convert(recipe_from_flags(str(det), out["int8"], **common), log=quiet)
    layout = read_bundle(out["int8"]).manifest.head.layout
    if not out["float32"].is_file():
        convert(recipe_from_flags(str(det), out["float32"], quant="float32", bayes_layout=layout, **common), log=quiet)
    if without_density and not out["no_density"].is_file():  # the graph without the density's output (invoke cost)
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
    from edgeq.converter.evaluation.metrics import roc_auc

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
    groups = {}  # near and far kinds pooled, and every unknown object: the targets read these
    for group, names in GROUPS.items():
        sel = np.isin(m.kinds, names)
        found, total = (sum(m.objects.get(k, (0, 0))[i] for k in names) for i in (0, 1))
        entry = {"objects": total, "found": found, "found_rate": round(found / total, 4) if total else None,
                 "detections": int(sel.sum())}
        if sel.any() and m.known.any():
            u = m.measures["unknown_score"]
            entry["published_unknown"] = round(float(m.published_unknown[sel].mean()), 4)
            entry["auroc_unknown_score"] = round(float(roc_auc(u[m.known], u[sel])), 4)
            entry["auroc_unknown_score_ci95"] = bootstrap_auroc(u[m.known], u[sel], rng)
        groups[group] = entry
    manifest = b.manifest
    return {
        "groups": groups,
        "map50": {"int8": q["map50"], "float32": f["map50"]},
        "map": {"int8": q["map"], "float32": f["map"]},
        "d_ece": {"int8": q["d_ece"], "float32": f["d_ece"]},
        "detections": q["detections"], "false_detections": q["false_detections"],
        "label_accuracy_known": q["label_accuracy_known"],
        "known_objects": q["known_objects"],
        "kinds": kinds,
        "thresholds": {"score": manifest.detector.score_threshold,
                       "objectness": manifest.detector.objectness_threshold,
                       "unknown": manifest.unknown.threshold if manifest.unknown else None,
                       "unknown_measures": list(manifest.unknown.measures) if manifest.unknown else None,
                       "unknown_combine": manifest.unknown.combine if manifest.unknown else None},
        "empty_scenes": empty_detections(runs[1], work / "data" / "empty"),
        "rules": rule_selection(runs[1], m, work),
        "layout": manifest.head.layout,
    }


# candidate unknown-score rules: (measures, combination); the default (converter/recipes.py) is the one with the
# highest AUROC on the select scenes for the plain detectors, whose training never saw their outlier objects
RULES = {
    "class_doubt+unfamiliarity, max": (("class_doubt", "unfamiliarity"), "max"),
    "class_doubt+unfamiliarity, fisher": (("class_doubt", "unfamiliarity"), "fisher"),
    "class_doubt+unfamiliarity+objectness_doubt, max": (("class_doubt", "unfamiliarity", "objectness_doubt"), "max"),
    "class_doubt+unfamiliarity+objectness_doubt, fisher": (("class_doubt", "unfamiliarity", "objectness_doubt"),
                                                           "fisher"),
    "energy+unfamiliarity+objectness_doubt, fisher": (("energy", "unfamiliarity", "objectness_doubt"), "fisher"),
    "class_doubt+objectness_doubt, fisher": (("class_doubt", "objectness_doubt"), "fisher"),
    "all five, fisher": (("class_doubt", "energy", "mutual_information", "unfamiliarity", "objectness_doubt"),
                         "fisher"),
}


def rule_selection(run, evaluated, work: Path) -> dict:
    """Each candidate rule calibrated as convert calibrates (percentiles among the int8 detections of known objects
    of the calib scenes, the threshold flagging 5% of them), then scored on the select scenes (outlier objects as
    the unknowns) and on the eval scenes (per group of kinds): AUROC, and the share of unknown and known
    detections it flags. ``run``: the int8 bundle's run of ``edgeq eval``'s code, ``evaluated`` its eval scenes
    matched (:func:`score_seed` has both)."""
    from edgeq.converter.data.coco import read_coco
    from edgeq.converter.evaluation.detect import match_all, run_detector
    from edgeq.converter.evaluation.metrics import roc_auc
    from edgeq.unknown import UnknownRule

    spec = run.grid.spec

    def matched(split: str):
        coco = read_coco(str(work / "data" / split))
        return match_all(run_detector(run.model, run.grid, run.spec, coco, split), coco, list(spec.category_ids),
                         spec.score_threshold, spec.objectness_threshold)

    calib, splits = matched("calib"), {"select": matched("select"), "eval": evaluated}
    out = {}
    for name, (measures, how) in RULES.items():
        refs = tuple(np.sort(calib.measures[k][calib.known]) for k in measures)
        rule = UnknownRule(measures, refs, how, 0.0)
        threshold = float(np.quantile(rule.scores({k: calib.measures[k][calib.known] for k in measures}), 0.95))
        entry = {}
        for split, mm in splits.items():
            s = rule.scores({k: mm.measures[k] for k in measures})
            groups = {"all": mm.unknown} if split == "select" else {
                g: np.isin(mm.kinds, names) for g, names in GROUPS.items()}
            for g, sel in groups.items():
                key = split if split == "select" else f"eval_{g}"
                entry[key] = {"auroc": round(roc_auc(s[mm.known], s[sel]), 4),
                              "unknown_flagged": round(float(np.mean(s[sel] > threshold)), 4)}
            entry[f"{split}_known_flagged"] = round(float(np.mean(s[mm.known] > threshold)), 4)
        out[name] = entry
    return out


def empty_detections(run, folder: Path) -> dict:
    """What the device reports on scenes with no object at all: every detection there is a false one. ``run``: the
    int8 bundle's run of ``edgeq eval``'s code (its model and decoder, already loaded)."""
    from edgeq.preprocess import Preprocessor, input_spec_for, list_images, read_image

    model, grid = run.model, run.grid
    pre = Preprocessor(input_spec_for(model, run.spec))
    files = list_images(folder / "images")
    found = unknown = 0
    for f in files:
        x, _ = pre(read_image(f))
        model.set_input(x)
        model.invoke()
        d = grid.read(model, (run.spec.height, run.spec.width))
        found += len(d)
        unknown += int(d.unknown.sum()) if d.unknown is not None else 0
    return {"scenes": len(files), "detections": found, "published_unknown": unknown,
            "per_scene": round(found / max(len(files), 1), 4)}


def device_cost(bundles: dict[str, Path], work: Path, runs: int = 300) -> dict:
    """Decode per frame with and without the unknown rule (the same raw outputs); and invoke, interleaved in one
    run: int8 vs float32, the K-sample class head vs the posterior-mean head, and with vs without the density's
    output (the unknown score adds no op to the graph)."""
    import dataclasses

    from edgeq.bundle import read_bundle
    from edgeq.converter.models.detector import export_detector
    from edgeq.converter.recipes import QuantMode, QuantRecipe
    from edgeq.converter.stages.calibrate import load_calibration
    from edgeq.converter.stages.load import SourceModel, load_source_model
    from edgeq.converter.tflite import convert_model
    from edgeq.detection import GridSpec
    from edgeq.preprocess import Preprocessor, input_spec_for, list_images, read_image
    from edgeq.runtime import Model, interleaved_latency

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
    # the same backbone with the posterior-mean class head instead of the K samples (no density output either)
    source = load_source_model(str(bundles["keras"]))
    calib = load_calibration(str(work / "data" / "train"), b.preprocess_spec.with_dtype("float32"), 100)
    mean_model, _ = export_detector(source.keras_model, None, mean_only=True)
    mean_bytes = convert_model(SourceModel(mean_model, None, source.input_shape, 8, "mean", "mean"),
                               QuantRecipe(QuantMode.INT8), calib)
    models = {"int8": model, "float32": read_bundle(bundles["float32"]).load_model(),
              "int8_no_density": read_bundle(bundles["no_density"]).load_model(), "int8_mean_head": Model(mean_bytes)}
    inputs = [np.zeros(mm.input.shape, dtype=mm.input.dtype) for mm in models.values()]
    runs_ms = interleaved_latency(list(models.values()), inputs, runs=runs, warmup=30)
    med = {name: float(np.median(t)) for name, t in zip(models, runs_ms)}
    return {"runtime": model.describe(), "xnnpack": model.delegation.to_dict(),
            "decode_ms_median": {k: round(float(np.median(v)), 4) for k, v in times.items()},
            "decode_ms_p95": {k: round(float(np.percentile(v, 95)), 4) for k, v in times.items()},
            "decode_with_over_without": round(float(np.median(times["with_unknown"]) / np.median(times["without"])), 4),
            "invoke_ms_median": {k: round(v, 4) for k, v in med.items()},
            "invoke_ms_p95": {k: round(float(np.percentile(t, 95)), 4) for k, t in zip(models, runs_ms)},
            "float32_over_int8": round(med["float32"] / med["int8"], 4),
            "mc_head_over_mean_head": round(med["int8_no_density"] / med["int8_mean_head"], 4),
            "density_over_no_density": round(med["int8"] / med["int8_no_density"], 4),
            "sizes": {k: read_bundle(v).manifest.sizes.model_tflite for k, v in bundles.items() if k != "keras"}}


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
           "map_int8": stat([s["map"]["int8"] for s in seeds]),
           "map50_float_minus_int8": stat([s["map50"]["float32"] - s["map50"]["int8"] for s in seeds]),
           "label_accuracy_known": stat([s["label_accuracy_known"] for s in seeds]),
           "known_found_rate": stat([s["known_objects"]["found_rate"] for s in seeds]),
           "known_published_unknown": stat([s["known_objects"]["published_unknown"] for s in seeds]),
           "empty_per_scene": stat([s["empty_scenes"]["per_scene"] for s in seeds]), "kinds": {},
           "groups": {g: {k: stat([s["groups"][g].get(k) for s in seeds])
                          for k in ("found_rate", "published_unknown", "auroc_unknown_score")}
                      for g in ("near", "far", "all")}}
    out["rules"] = {name: {key: {k: stat([s["rules"][name][key][k] for s in seeds]) for k in ("auroc", "unknown_flagged")}
                           for key in ("select", "eval_near", "eval_far", "eval_all")} for name in RULES}
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
                                           "objectness_doubt", "one_minus_score")},
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
    require_disjoint(work / "data" / "calib", work / "data" / "eval")
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
        result["device_cost"] = {"model": f"seed {first}, {VARIANTS[args.variants[-1]]}", **device_cost(
            convert_seed(work, first, args.variants[-1], quiet, without_density=True), work)}
    write_result("detection", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
