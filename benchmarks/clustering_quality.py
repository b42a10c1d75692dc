"""Issue 6 quality figures: what 16-cluster weight sharing costs a small model trained on real data.

On the Fashion-MNIST models of ``benchmarks/bayes_head.py`` (MobileNetV2 0.35/96, deterministic and Bayesian head),
every variant goes through the real ``edgeq convert`` and is scored by one ``edgeq eval`` call (the same files, the
same preprocessing, interleaved invoke timing): top-1, ECE (15 bins), OOD AUROC against MNIST digits, bundle size.

- deterministic: int8 vs clustered per tensor / per channel, each without and with fine-tuning (weights re-projected
  onto their clusters after every step); OOD AUROC of predictive entropy;
- Bayesian (K samples): int8 vs posterior VQ only (the backbone unclustered) vs backbone clustered + posterior VQ,
  and the same with fine-tuning; OOD AUROC of mutual information and predictive entropy, MI correlation with the
  unclustered bundle;
- the fine-tuned variants are also compared with ``int8_ft``: the unclustered model trained the same extra epoch the
  same way (``delta_vs_int8_ft``), since fine-tuning is more training of the model as well as repair;
- load time on the device: ``read_bundle`` + interpreter creation, packed vs plain (median of repeated loads).

    python benchmarks/bayes_head.py --workdir /tmp/bhw > /dev/null   # trains the two models once
    python benchmarks/clustering_quality.py --workdir /tmp/bhw        # writes benchmarks/results/clustering_quality.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


from _common import log, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True, help="the --workdir of benchmarks/bayes_head.py (det.keras, bayes.keras, "
                                                    "train/, test/, ood/)")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--calib-samples", type=int, default=200)
    p.add_argument("--runs", type=int, default=300, help="interleaved latency rounds")
    p.add_argument("--loads", type=int, default=20, help="repeated bundle loads for the load time")
    p.add_argument("--only", choices=("deterministic", "bayes"), help="run one family (and skip the load time)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    for need in ("det.keras", "bayes.keras", "train", "val", "scored", "ood"):
        if not (work / need).exists():
            log(f"{work / need}: missing; run benchmarks/bayes_head.py --workdir {work} first")
            return 2

    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.models.bayes import find_bayes_heads
    from edgeq.converter.stages.cluster import vq_posterior
    from edgeq.converter.models.info import read_model_info
    from edgeq.converter.stages.load import load_source_model
    from edgeq.converter.training.common import save_model

    out_dir = work / "clustering_quality"
    out_dir.mkdir(exist_ok=True)
    n, ft = args.clusters, {"finetune": str(work / "train"), "finetune_epochs": args.finetune_epochs}
    # density off: these figures compare quantisation and clustering (the unfamiliarity measure's own figures and
    # cost: benchmarks/unknowns.py)
    # bayes_head.py's halves of its held-out images: convert's --val on one, every figure scored on the other
    common = dict(calib=str(work / "train"), calib_samples=args.calib_samples, val=str(work / "val"), density="off")

    # posterior VQ alone: quantise the head's posterior in a copy of the model, backbone untouched
    post_only = out_dir / "bayes_posterior_vq.keras"
    src = load_source_model(str(work / "bayes.keras"))
    head = find_bayes_heads(src.keras_model)[0]
    post_info = vq_posterior(head, n)
    save_model(src.keras_model, post_only, read_model_info(work / "bayes.keras"))

    # the fair baseline for fine-tuning: the unclustered model trained the same extra epoch(s), no projection
    ft_models = {name: finetuned_copy(work, name, args.finetune_epochs, out_dir) for name in ("det", "bayes")}

    families = {
        "deterministic": (str(work / "det.keras"), {
            "int8": {},
            "int8_ft": {"model": str(ft_models["det"])},
            f"c{n}_tensor": {"clusters": n},
            f"c{n}_tensor_ft": {"clusters": n, **ft},
            f"c{n}_channel": {"clusters": n, "cluster_per_channel": True},
            f"c{n}_channel_ft": {"clusters": n, "cluster_per_channel": True, **ft},
        }),
        "bayes": (str(work / "bayes.keras"), {
            "int8": {},
            "int8_ft": {"model": str(ft_models["bayes"])},
            "posterior_vq": {"model": str(post_only)},
            f"c{n}_channel_vq": {"clusters": n, "cluster_per_channel": True},
            f"c{n}_channel_vq_ft": {"clusters": n, "cluster_per_channel": True, **ft},
        }),
    }
    result: dict = {"benchmark": "clustering_quality", "clusters": n, "samples": args.samples,
                    "finetune_epochs": args.finetune_epochs, "posterior_vq_only": post_info, "families": {}}
    for family, (model, variants) in families.items():
        if args.only and family != args.only:
            continue
        paths = {}
        for name, extra in variants.items():
            out = out_dir / f"{family}_{name}.edgeq"
            extra = dict(extra)
            t0 = time.perf_counter()
            bayes = {"bayes_samples": args.samples, "bayes_layout": "stacked"} if family == "bayes" else {}
            convert(recipe_from_flags(extra.pop("model", model), out, **common, **bayes, **extra), log=log)
            log(f"{family}/{name}: converted in {time.perf_counter() - t0:.0f} s")
            paths[name] = out
        result["families"][family] = evaluate(paths, work, args.runs, family == "bayes")
    if not args.only:
        result["load_ms"] = load_times(out_dir / "deterministic_int8.edgeq", out_dir / f"deterministic_c{n}_channel.edgeq",
                                       args.loads)
    result["targets"] = {"top1_points_with_finetune": 1.0, "ece": 0.01, "ood_auroc": 0.01, "latency": 0.05}
    write_result("clustering_quality", result)
    return 0


def evaluate(paths: dict[str, Path], work: Path, runs: int, bayes: bool) -> dict:
    """One edgeq eval over every variant; deltas against the unclustered int8 bundle."""
    from edgeq.bundle import read_bundle
    from edgeq.converter.evaluation.classify import evaluate_bundle

    names = list(paths)
    report, eval_runs = evaluate_bundle(read_bundle(paths[names[0]]), work / "scored", work / "ood",
                                        compare=[paths[k] for k in names[1:]], latency_runs=runs)
    models = list(report["models"].values())
    measure = "mutual_information" if bayes else "predictive_entropy"
    out: dict = {"images": report["count"], "ood_images": report["ood_count"], "ood_measure": measure, "variants": {}}
    base = models[0]
    base_run = eval_runs[0]
    by_name = dict(zip(names, models))
    runs_by_name = dict(zip(names, eval_runs))
    for name, m, run in zip(names, models, eval_runs):
        b = read_bundle(paths[name])
        entry = {
            "variant": m["variant"],
            "bundle_bytes": m["bundle_bytes"],
            "bundle_over_float32": round(m["bundle_bytes"] / b.manifest.sizes.float32_tflite, 4),
            "top1": round(m["top1"], 4),
            "ece": round(m["ece"], 4),
            "ood_auroc": {k: round(v, 4) for k, v in m["ood_auroc"].items()},
            "latency_ms_median": round(m["latency_ms_median"], 4),
        }
        if name.endswith("_ft") and name != "int8_ft" and "int8_ft" in by_name:
            ft, ft_run = by_name["int8_ft"], runs_by_name["int8_ft"]
            entry["delta_vs_int8_ft"] = {
                "top1_points": round(100 * (m["top1"] - ft["top1"]), 2),
                "ece": round(m["ece"] - ft["ece"], 4),
                "ood_auroc": round(m["ood_auroc"][measure] - ft["ood_auroc"][measure], 4),
            }
            if bayes:
                mi = np.r_[run.scored.summary.mutual_information, run.ood.summary.mutual_information]
                mi0 = np.r_[ft_run.scored.summary.mutual_information, ft_run.ood.summary.mutual_information]
                entry["delta_vs_int8_ft"]["mi_correlation"] = round(float(np.corrcoef(mi, mi0)[0, 1]), 4)
        if name != names[0]:
            entry["delta_vs_int8"] = {
                "top1_points": round(100 * (m["top1"] - base["top1"]), 2),
                "ece": round(m["ece"] - base["ece"], 4),
                "ood_auroc": round(m["ood_auroc"][measure] - base["ood_auroc"][measure], 4),
                "latency_ratio": round(m["latency_ms_median"] / base["latency_ms_median"], 4),
            }
            if bayes:
                mi = np.r_[run.scored.summary.mutual_information, run.ood.summary.mutual_information]
                mi0 = np.r_[base_run.scored.summary.mutual_information, base_run.ood.summary.mutual_information]
                entry["delta_vs_int8"]["mi_correlation"] = round(float(np.corrcoef(mi, mi0)[0, 1]), 4)
        c = b.manifest.clustering
        if c is not None:
            entry["clustered_layers"] = c.clustered
            if c.finetune is not None:
                entry["finetune_train_accuracy"] = c.finetune.train_accuracy
            if c.posterior is not None and c.posterior.codewords:
                entry["posterior"] = c.posterior.model_dump(include={"codewords", "relative_rmse_mu",
                                                                     "relative_rmse_sigma"})
        out["variants"][name] = entry
    return out


def finetuned_copy(work: Path, name: str, epochs: int, out_dir: Path) -> Path:
    """``work/NAME.keras`` trained ``epochs`` more epoch(s) on ``work/train`` exactly as --finetune trains a
    clustered model (same optimiser, rate, batches and seed), but with nothing to re-project."""

    from edgeq.converter.stages.cluster import finetune
    from edgeq.converter.stages.load import load_source_model
    from edgeq.converter.tf import quiet_output
    from edgeq.converter.models.info import read_model_info
    from edgeq.converter.training.classifier import load_folder_arrays
    from edgeq.converter.training.common import save_model
    from edgeq.preprocess import NORMALIZATIONS, PreprocessSpec

    out = out_dir / f"{name}_ft.keras"
    if out.is_file():
        return out
    source = load_source_model(str(work / f"{name}.keras"))
    h, w, c = source.input_shape
    mean, std = NORMALIZATIONS["mobilenet"]
    info = read_model_info(work / f"{name}.keras")
    labels = info["labels"]
    x, y, _ = load_folder_arrays(work / "train", PreprocessSpec(h, w, c, "RGB", "stretch", (mean,), (std,)), labels)
    with quiet_output():
        finetune(source.keras_model, x, y, {}, False, epochs)
    save_model(source.keras_model, out, info)
    return out


def load_times(plain: Path, packed: Path, loads: int) -> dict:
    """Median time to read, verify (and for packed, rebuild) a bundle and create its interpreter."""
    from edgeq.bundle import read_bundle
    from edgeq.converter.tf import quiet_output

    times: dict[str, list[float]] = {"plain": [], "packed": []}
    with quiet_output():
        for _ in range(loads):
            for name, path in (("plain", plain), ("packed", packed)):
                t0 = time.perf_counter()
                read_bundle(path).load_model(num_threads=1)
                times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: round(float(np.median(v)), 2) for k, v in times.items()}
    return {**med, "added_ms": round(med["packed"] - med["plain"], 2), "loads": loads,
            "note": "x86 host; the Pi's figure scales with its memory bandwidth (emulation cannot time it)"}


if __name__ == "__main__":
    sys.exit(main())
