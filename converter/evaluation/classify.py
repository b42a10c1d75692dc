"""Classifier evaluation: a model over labelled files through the core preprocessor and runtime, float and
quantised compared (``convert --val``), and ``edgeq eval`` of a classification bundle side by side with its float
reference and other bundles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeq.bundle import Bundle, read_bundle
from edgeq.errors import DataError, SourceError
from edgeq.heads import BoundHead, HeadSpec
from edgeq.manifest import DENSITY_MEASURES, REVIEW_MEASURES, Manifest
from edgeq.preprocess import Preprocessor, PreprocessSpec, input_spec_for, read_image
from edgeq.runtime import Model, TensorInfo
from edgeq.uncertainty import MEASURES, Summary, pick_review_threshold, summarize

from ..data.datasets import LabelledFiles, progress
from . import metrics


def single_head(model: Model, output: TensorInfo | None = None) -> BoundHead:
    """A deterministic head reading one logits output (the first, unless given)."""
    output = output or model.outputs[0]
    return BoundHead(HeadSpec("dense", 1, int(np.prod(output.shape[1:])), "single"), [output])


def run_files(
    model: Model, spec: PreprocessSpec, files: list[Path], head: BoundHead | None = None, desc: str = ""
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``[N, K, C]`` dequantised sample logits, one row per file, through the one preprocessor, and ``[N]``
    unfamiliarity and density disagreement (with the top label) when the head has a density.

    Unreadable files are an error: an evaluation that skips images would report on a different set.
    """
    pre = Preprocessor(input_spec_for(model, spec))
    head = head or single_head(model)
    rows, unfamiliar, disagree = [], [], []
    for path in progress(files, len(files), desc or "evaluate"):
        try:
            frame = read_image(path)
        except SourceError as exc:
            raise DataError(str(exc) + "; remove or replace it") from None
        tensor, _ = pre(frame)
        model.set_input(tensor)
        model.invoke()
        raw = head.raw(model)
        logits = head.sample_logits(raw).copy()
        rows.append(logits)
        # the device's top label: the mean probability's (first) largest
        u, d = head.density_measures(raw, int(summarize(logits[None]).mean[0].argmax()))
        unfamiliar.append(u)
        disagree.append(d)
    if head.density is None:
        return np.stack(rows), None, None
    return np.stack(rows), np.asarray(unfamiliar, np.float64), np.asarray(disagree, np.float64)


def head_logits(
    model: Model, spec: PreprocessSpec, files: list[Path], head: BoundHead | None = None, desc: str = ""
) -> np.ndarray:
    """``[N, K, C]`` dequantised sample logits (see :func:`run_files`)."""
    return run_files(model, spec, files, head, desc)[0]


def score_files(
    model: Model, spec: PreprocessSpec, files: list[Path], output: TensorInfo | None = None, desc: str = ""
) -> np.ndarray:
    """``[N, C]`` logits of a single-output model (the deterministic case of :func:`head_logits`)."""
    return head_logits(model, spec, files, single_head(model, output), desc)[:, 0, :]


@dataclass(frozen=True)
class Scored:
    """One model's results on a labelled set."""

    logits: np.ndarray  # [N, K, C]
    summary: Summary
    targets: np.ndarray
    unfamiliarity: np.ndarray | None = None  # [N], when the model has a density
    disagreement: np.ndarray | None = None  # [N] density_disagreement, when the model has a density

    def measure(self, name: str) -> np.ndarray:
        """``[N]`` values of an ambiguity measure: one of the head's, or the density's disagreement."""
        if name in DENSITY_MEASURES:
            if self.disagreement is None:
                raise DataError(f"--review-measure {name}: the model has no density; convert it with labelled data "
                                "(--val or --density-data) or choose predictive_entropy")
            return self.disagreement
        return self.summary.measure(name)

    @property
    def predictions(self) -> np.ndarray:
        return self.summary.mean.argmax(axis=-1)

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.targets


def logit_spread(logits: np.ndarray) -> float:
    """Mean over images and classes of the standard deviation of the logits across samples: ``[N, K, C]`` ->
    scalar. It is what mutual information is made of; int8 must not round it away."""
    return float(np.mean(np.std(np.asarray(logits, dtype=np.float64), axis=-2)))


def score(model: Model, head: BoundHead, spec: PreprocessSpec, data: LabelledFiles, desc: str) -> Scored:
    logits, unfamiliarity, disagreement = run_files(model, spec, data.files, head, desc)
    return Scored(logits, summarize(logits), data.targets, unfamiliarity, disagreement)


def compare_scored(reference: Scored, quantized: Scored) -> dict[str, Any]:
    """Float vs quantised figures on the same files (the ``validation`` block of a manifest)."""
    ref, q = core_figures(reference), core_figures(quantized)
    out: dict[str, Any] = {
        "count": int(len(reference.targets)),
        "float_top1": ref["top1"],
        "quantized_top1": q["top1"],
        "top1_agreement": metrics.top1_agreement(reference.summary.mean, quantized.summary.mean),
        "mean_abs_logit_error": metrics.mean_abs_error(reference.logits, quantized.logits),
        "float_ece": ref["ece"],
        "quantized_ece": q["ece"],
    }
    if quantized.summary.samples > 1:
        out["float_mean_mutual_information"] = ref["mean_mutual_information"]
        out["quantized_mean_mutual_information"] = q["mean_mutual_information"]
        out["mutual_information_correlation"] = correlation(
            reference.summary.mutual_information, quantized.summary.mutual_information
        )
        out["float_logit_spread"] = logit_spread(reference.logits)
        out["quantized_logit_spread"] = logit_spread(quantized.logits)
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two per-image series; None when either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def calibrate_review(scored: Scored, measure: str, target_accuracy: float) -> dict[str, Any]:
    """The ``needs_review`` rule for a bundle, picked on its own (quantised) results."""
    if measure not in REVIEW_MEASURES:
        raise DataError(f"--review-measure {measure!r}: choose one of {', '.join(REVIEW_MEASURES)}")
    return pick_review_threshold(scored.measure(measure), scored.correct, target_accuracy, measure).to_dict()


# -- edgeq eval ------------------------------------------------------------------------------------------------

def core_figures(scored: Scored) -> dict[str, Any]:
    """The figures of one model on labelled data that ``convert --val`` and ``edgeq eval`` both report.
    Uncertainty for UCE is the predictive entropy divided by log C (in [0, 1])."""
    s = scored.summary
    classes = s.mean.shape[-1]
    out: dict[str, Any] = {
        "top1": metrics.top1_accuracy(s.mean, scored.targets),
        "nll": metrics.negative_log_likelihood(s.mean, scored.targets),
        "brier": metrics.brier_score(s.mean, scored.targets),
        "ece": metrics.expected_calibration_error(s.mean, scored.targets),
        "uce": metrics.uncertainty_calibration_error(
            np.clip(s.predictive_entropy / np.log(classes), 0.0, 1.0), scored.correct),
        "mean_predictive_entropy": float(np.mean(s.predictive_entropy)),
    }
    if s.samples > 1:
        out["mean_mutual_information"] = float(np.mean(s.mutual_information))
    return out


def measures_of(scored: Scored) -> dict[str, np.ndarray]:
    """Every per-result uncertainty a model publishes (higher: less certain), by name."""
    s = scored.summary
    out = {m: s.measure(m) for m in (MEASURES if s.samples > 1 else ("predictive_entropy",))}
    if scored.disagreement is not None:
        out["density_disagreement"] = scored.disagreement
    if scored.unfamiliarity is not None:
        out["unfamiliarity"] = scored.unfamiliarity
    return out


def figures(scored: Scored, ood: Scored | None, target_accuracy: float, measure: str = "predictive_entropy",
            rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure ``edgeq eval`` reports for one model: :func:`core_figures`, plus selective prediction and the
    referral rate (by ``measure``), the reliability bins; with ``ood``, each measure's AUROC, FPR at 95% TPR and
    ROC; with the bundle's review ``rule``, how many in-distribution and OOD results it flags."""
    from .review import flag_rates

    s = scored.summary
    correct = scored.correct
    if measure in DENSITY_MEASURES and scored.disagreement is None:
        # a run without the density (a --reference .keras model): its referral curve uses the head's own measure,
        # and the bundle's rule, which rests on the density, is not applied to it (no "flagged" figures)
        measure, rule = "predictive_entropy", None
    review = pick_review_threshold(scored.measure(measure), correct, target_accuracy, measure)
    out = core_figures(scored)
    out.update({
        "referral_at_target": 1.0 - review.coverage,
        "review_threshold": review.threshold if review.reached else None,
        "target_accuracy": target_accuracy,
        "selective": metrics.selective_accuracy_curve(scored.measure(measure), correct),
        "reliability": metrics.reliability_bins(s.mean, scored.targets),
    })
    if rule is not None:
        out["flagged"] = {"in_distribution": flag_rates(scored.measure(rule["measure"]), scored.unfamiliarity, rule,
                                                        correct)}
    if ood is not None:
        ind, far = measures_of(scored), measures_of(ood)
        names = [m for m in ind if m in far]
        out["ood_auroc"] = {m: metrics.roc_auc(ind[m], far[m]) for m in names}
        out["ood_fpr_at_95_tpr"] = {m: metrics.fpr_at_tpr(ind[m], far[m]) for m in names}
        out["ood_roc"] = {m: metrics.roc_curve(ind[m], far[m]) for m in names}
        if rule is not None:
            out["flagged"]["ood"] = flag_rates(ood.measure(rule["measure"]), ood.unfamiliarity, rule)
    return out


@dataclass
class EvalRun:
    """One model's pass over the evaluation data."""

    name: str
    model: Model
    head: BoundHead
    spec: PreprocessSpec
    scored: Scored | None = None
    ood: Scored | None = None  # targets unused: OOD images have no class
    figures: dict[str, Any] | None = None
    info: dict[str, Any] | None = None  # what a bundle's manifest says it is (variant, file size)
    files: list[Path] | None = None  # the images behind ``scored`` and ``ood``, in their order (the report's samples)
    ood_files: list[Path] | None = None


def variant(manifest: Manifest) -> str:
    """One line on how a bundle was made: precision, repairs, clustering, Bayesian head."""
    q = manifest.quantization
    parts = [q.scheme]
    if q.equalization is not None:
        parts.append(f"equalised ({q.equalization.pairs} pairs)")
    if q.qat is not None:
        parts.append(f"QAT {q.qat.epochs} epoch(s)")
    if q.bias_correction is not None and q.bias_correction.applied:
        parts.append("bias-corrected")
    if q.float_layers:
        parts.append(f"{len(q.float_layers)} layer(s) float")
    c = manifest.clustering
    if c is not None:
        tuned = f", fine-tuned {c.finetune.epochs} epoch(s)" if c.finetune is not None else ""
        parts.append(f"{c.clusters} clusters {'per channel' if c.per_channel else 'per tensor'} "
                     f"({c.clustered} layers{tuned})")
        if c.posterior is not None and c.posterior.codewords:
            parts.append(f"posterior VQ {c.posterior.codewords} codewords")
    head = manifest.head_or_dense
    if head.type == "bayes":
        parts.append(f"Bayesian K={head.samples} {head.layout}")
    return ", ".join(parts)


def _bundle_run(name: str, b: Bundle, threads: int) -> EvalRun:
    model = b.load_model(threads)
    head = HeadSpec.from_manifest(b.manifest).bind(model, b.manifest.outputs, b.where, b.manifest.density)
    return EvalRun(name, model, head, b.preprocess_spec,
                   info={"bundle": b.where, "bundle_bytes": b.file_size, "variant": variant(b.manifest)})


def _reference_run(path: str, bundle: Bundle, threads: int) -> EvalRun:
    """A float ``.edgeq`` or ``.tflite`` loads here; a Keras model is converted with the bundle's weight samples
    (converter/tasks/classify.py), which needs TensorFlow."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--reference {path}: not found; give a .keras model, a float .edgeq bundle or a .tflite file")
    if p.suffix == ".edgeq":
        ref = read_bundle(p)
        if ref.labels != bundle.labels:
            raise DataError(f"--reference {path}: its labels differ from {bundle.path}'s; compare models of one task")
        return _bundle_run("reference", ref, threads)
    if p.suffix == ".tflite":
        model = Model(p.read_bytes(), num_threads=threads)
        head = single_head(model)
        if head.spec.classes != len(bundle.labels):
            raise DataError(f"--reference {path}: {head.spec.classes} outputs but {bundle.path} has "
                            f"{len(bundle.labels)} labels")
        return EvalRun("reference", model, head, bundle.preprocess_spec, info={"variant": "float32 (from .tflite)"})
    from ..reference import classifier_reference

    model, head = classifier_reference(path, bundle.manifest, threads)
    return EvalRun("reference", model, head, bundle.preprocess_spec, info={"variant": "float32 (from Keras)"})


def compare_bundles(paths: Sequence[str | Path], bundle: Bundle, taken: Sequence[str] = ("reference", "quantized")
                    ) -> list[tuple[str, Bundle]]:
    """The ``--compare`` bundles: each must exist and share ``bundle``'s task and labels. Each is named by its file
    stem, primed (``'``) while the name is taken by another column."""
    names, out = list(taken), []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"--compare {path}: not found; give another .edgeq bundle of the same classes")
        other = read_bundle(path)
        if other.task != bundle.task or other.labels != bundle.labels:
            raise DataError(f"--compare {path}: its labels or task differ from {bundle.path}'s; compare models of one task")
        name = Path(path).stem
        while name in names:
            name += "'"
        names.append(name)
        out.append((name, other))
    return out


def evaluate_bundle(
    bundle: Bundle, data_dir: str | Path, ood_dir: str | Path | None = None, reference: str | None = None,
    target_accuracy: float = 0.995, threads: int = 1, latency_runs: int = 50, compare: Sequence[str | Path] = (),
) -> tuple[dict[str, Any], list[EvalRun]]:
    """Run the bundle (and the reference, and any ``compare`` bundles, e.g. the unclustered model next to the
    clustered one, all through the same preprocessing) over a class folder and an optional out-of-distribution
    folder; return every figure as a JSON-ready dict, and the runs for the report's plots."""
    # over 60 lines: eval's run order, each model through the same passes
    from edgeq.preprocess import list_images
    from edgeq.runtime import interleaved_latency

    from ..data.coco import is_coco_path
    from ..data.datasets import class_folder

    if not 0.0 < target_accuracy <= 1.0:
        raise DataError(f"--target-accuracy {target_accuracy}: give a fraction in (0, 1], e.g. 0.995")
    if bundle.task != "classify":
        raise DataError(f"{bundle.where}: a {bundle.task!r} bundle; give --data a COCO set (annotations.json), "
                        "edgeq eval scores it as a detector")
    if is_coco_path(data_dir):
        raise DataError(f"--data {data_dir}: a COCO detection set, but {bundle.where} is a classification bundle; "
                        "give a class folder (one subfolder per class)")
    data = class_folder(data_dir, bundle.labels, flag="--data")
    ood_files: list[Path] = []
    if ood_dir is not None:
        if not Path(ood_dir).is_dir():
            raise DataError(f"--ood {ood_dir}: not a folder; give a folder of out-of-distribution images")
        ood_files = list_images(ood_dir)
        if not ood_files:
            raise DataError(f"--ood {ood_dir}: no jpg/png/bmp images in it; add some or drop --ood")
    runs = [_bundle_run("quantized", bundle, threads)]
    runs += [_bundle_run(name, other, threads) for name, other in compare_bundles(compare, bundle)]
    if reference:
        runs.insert(0, _reference_run(reference, bundle, threads))
    review = bundle.manifest.head_or_dense.review
    measure = review.measure if review is not None else "predictive_entropy"
    rule = review.model_dump() if review is not None and review.threshold is not None else None
    for run in runs:
        run.files, run.ood_files = list(data.files), list(ood_files)
        run.scored = score(run.model, run.head, run.spec, data, run.name)
        if ood_files:
            logits, unfamiliarity, disagreement = run_files(run.model, run.spec, ood_files, run.head,
                                                            f"{run.name} ood")
            run.ood = Scored(logits, summarize(logits), np.full(len(logits), -1), unfamiliarity, disagreement)
        run.figures = figures(run.scored, run.ood, target_accuracy, measure, rule)
    inputs = [np.zeros(r.model.input.shape, dtype=r.model.input.dtype) for r in runs]
    times = interleaved_latency([r.model for r in runs], inputs, runs=latency_runs, warmup=5)
    report: dict[str, Any] = {
        "bundle": bundle.where, "name": bundle.name, "labels": bundle.labels, "data": str(data_dir),
        "count": len(data.files), "ood": str(ood_dir) if ood_dir else None, "ood_count": len(ood_files),
        "uncertainty_measure": measure, "review_rule": rule, "models": {},
    }
    for run, t in zip(runs, times):
        info = {"size_bytes": run.model.size, "latency_ms_median": float(np.median(t)),
                "runtime": run.model.describe(), "samples": run.head.spec.samples, **(run.info or {})}
        report["models"][run.name] = {**info, **run.figures}
    layers = (bundle.report or {}).get("layers")
    if layers:
        report["layers"] = layers
    if reference:
        ref, q = runs[0].scored, runs[1].scored
        report["agreement"] = {
            "top1_agreement": metrics.top1_agreement(ref.summary.mean, q.summary.mean),
            "mean_abs_logit_error": metrics.mean_abs_error(ref.logits, q.logits)
            if ref.logits.shape == q.logits.shape else None,
        }
    return report, runs
