"""Stage: density. The unfamiliarity measure (edgeq/density.py): class-conditional Gaussians with one shared
covariance, shrunk by Ledoit-Wolf (scikit-learn), fitted on the model's features of labelled data, and its linear
part fused into the graph as two more outputs before quantisation.

- **fit** (before quantising): the task adapter reads the fitting data and taps the features (a classifier: the
  pooled penultimate features and the means of MobileNetV2's block outputs; a detector: the neck features of the
  cells that hold known objects). The whitening onto the covariance's top ``--density-rank`` directions becomes
  one Dense (or 1x1 conv) without bias: the graph's ``density_projection`` output. The score the device finishes
  with (``--density-method``): the distance to the nearest class mean (``gda``, a classifier's default), or to
  the K-th nearest of up to ``KNN_REFERENCES`` fitting samples kept in the manifest (``knn``, a detector's).
  With ``--density-normalise l2`` (a detector's option) the fit is on the features divided by their length, which
  no int8 op computes well: the graph outputs the features themselves (``density_features``) and the device
  projects them with the manifest's whitening (``projection``), in integers (edgeq/density.py).
- **calibrate** (after quantising): the int8 model scores held-out in-distribution data; the sorted scores are
  the reference a published percentile is read against, and the threshold for ``--review-ood-rate`` comes from
  them.

Held-out data: ``--val`` when the fit used other data, else the half of the fitting data the fit did not see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.density import PROJECTION_ROLE, ordinal, unit_length
from edgeq.errors import DataError, ModelError
from edgeq.manifest import Density

from ..recipes import DensityRecipe

if TYPE_CHECKING:
    from ..context import ConvertContext

MIN_PER_CLASS = 5
REFERENCE_POINTS = 201  # quantiles kept in the manifest: a percentile resolution of 0.5
# fitting samples a knn_whitened density keeps: on the detection benchmark 500 to 3,800 of them gave the same AUROC
# (within 0.01), and each costs rank multiply-adds per detection on the device
KNN_REFERENCES = 1000


@dataclass
class DensityData:
    """What the task adapter hands the stage: fitting inputs and their class indices, held-out inputs, and where
    they came from (for the manifest)."""

    fit: Any
    targets: np.ndarray
    held_out: Any
    source: str
    held_out_source: str


def fit_gaussians(features: np.ndarray, targets: np.ndarray, labels: list[str], rank: int, where: str
                  ) -> dict[str, Any]:
    """Class means and the Ledoit-Wolf shared covariance of the within-class residuals; the whitening ``W``
    ``[F, rank]`` onto its top ``rank`` directions, and the manifest's density fields."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, np.float64)
    counts = np.bincount(targets, minlength=len(labels))
    for c, n in enumerate(counts):
        if n < MIN_PER_CLASS:
            raise DataError(f"{where}: class {labels[c]!r} has {n} usable sample(s); the unfamiliarity fit needs at "
                            f"least {MIN_PER_CLASS} per class: add images of it, or pass --density off")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: the model's features hold NaN or infinite values; check the model, or pass "
                        "--density off")
    means = np.stack([x[targets == c].mean(axis=0) for c in range(len(labels))])
    lw = LedoitWolf(assume_centered=True).fit(x - means[targets])  # shrinkage keeps it invertible when F > N
    values, vectors = np.linalg.eigh(lw.covariance_)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    rank = min(rank, x.shape[1])
    W = vectors[:, :rank] / np.sqrt(np.maximum(values[:rank], 1e-12))
    return {
        "W": W.astype(np.float32),
        "block": {
            "method": "gda_shared_covariance", "features": int(x.shape[1]), "rank": int(rank),
            "eigenvalues": [float(v) for v in np.maximum(values[:rank], 1e-12)],
            "class_means": (means @ W).tolist(), "shrinkage": float(lw.shrinkage_),
        },
        "explained": float(values[:rank].sum() / values.sum()),
    }


def run(recipe: DensityRecipe, ctx: "ConvertContext") -> None:
    """Fit the density and add its outputs to ``ctx.source``'s model (no-op when off or without labelled data)."""
    if recipe.density == "off":
        return
    if ctx.source.keras_model is None:
        ctx.log("unfamiliarity: off (a SavedModel cannot take the density's outputs; give the .keras model)")
        return
    if recipe.normalise == "auto":
        normalise = ctx.task.density_normalise
    else:
        normalise = None if recipe.normalise == "none" else recipe.normalise
    if normalise is not None and normalise not in ctx.task.density_normalisations:
        raise ModelError(f"--density-normalise {normalise}: a {ctx.task.name} model's density cannot normalise its "
                         "features yet (only a detector's can); drop it or pass --density-normalise none")
    data = ctx.task.density_data(ctx, recipe)
    if data is None:
        ctx.log("unfamiliarity: off (no labelled data to fit it on: give --val or --density-data)")
        return
    with ctx.timed("density_fit_s"):
        features, targets = ctx.task.density_features(ctx, data)
        if normalise == "l2":
            features = unit_length(features)
        fitted = fit_gaussians(features, targets, ctx.labels, _rank(recipe.rank, ctx), f"--density-data {data.source}")
        names, widths = ctx.task.density_tap_names(ctx), ctx.task.density_tap_widths(ctx)
        keep = taps_to_keep(features, fitted["W"], widths)
        W = fitted["W"] * np.repeat(keep, widths)[:, None].astype(np.float32)
        block = fitted["block"]
        method = ctx.task.density_method if recipe.method == "auto" else recipe.method
        if normalise is not None:  # the device projects with the manifest's float16 whitening: fit with the same
            W = W.astype(np.float16).astype(np.float32)
            if not np.all(np.isfinite(W)):
                raise DataError(f"--density-data {data.source}: the whitening of the features overflows float16; "
                                "check the model, or pass --density-normalise none")
            block.update(normalise=normalise, projection=float16_array(W))
        if method == "knn":
            block.update(knn_references(features, W, recipe.neighbours, f"--density-data {data.source}"))
        ctx.task.add_density_outputs(ctx, W, keep, normalise)
    if not keep.all() or normalise is not None:
        # the class means in the coordinates the device gets: without the dropped taps, with the rounded whitening
        means = np.stack([features[targets == c].mean(axis=0) for c in range(len(ctx.labels))])
        block["class_means"] = (means @ W.astype(np.float64)).tolist()
    if not keep.all():
        dropped = [n for n, k in zip(names, keep) if not k]
        ctx.log(f"unfamiliarity: left out tap(s) {', '.join(dropped)}: their part of the projection is under one int8 "
                "step of the whole")
    block["fit"] = {"data": data.source, "samples": int(len(targets)), "per_class": np.bincount(
        targets, minlength=len(ctx.labels)).tolist(), "explained_variance": round(fitted["explained"], 4),
        "held_out": data.held_out_source, "taps": [n for n, k in zip(names, keep) if k],
        "dropped_taps": [n for n, k in zip(names, keep) if not k]}
    ctx.density, ctx.density_data = block, data
    ctx.log(f"unfamiliarity: class Gaussians on {block['features']} features of {len(targets)} samples from "
            f"{data.source} (shared covariance, Ledoit-Wolf shrinkage {block['shrinkage']:.3f}), whitened onto its top "
            f"{block['rank']} directions ({fitted['explained']:.0%} of the variance), "
            + ("the features divided by their length, an output the device projects; " if normalise else
               "fused as one more output; ")
            + (f"score: distance to the {ordinal(block['neighbours'])} nearest of {block['references']['shape'][0]} "
               "fitting samples" if method == "knn" else "score: distance to the nearest class mean"))


def float16_array(values: np.ndarray) -> dict[str, Any]:
    """A manifest ``Array`` (edgeq/manifest.py) of ``values`` as little-endian float16."""
    import base64

    v = np.asarray(values, "<f2")
    return {"dtype": "float16", "shape": list(v.shape), "data": base64.b64encode(v.tobytes()).decode("ascii")}


def knn_references(features: np.ndarray, W: np.ndarray, neighbours: int, where: str) -> dict[str, Any]:
    """The manifest fields of ``knn_whitened``: up to ``KNN_REFERENCES`` fitting samples (a seeded random draw) in
    whitened coordinates, as float16."""
    n = min(len(features), KNN_REFERENCES)
    if neighbours > n:
        raise DataError(f"{where}: --density-neighbours {neighbours} exceeds the {n} reference samples the fit keeps; "
                        "give a smaller K or more data")
    pick = np.sort(np.random.default_rng(0).permutation(len(features))[:n])
    refs = (np.asarray(features, np.float64)[pick] @ np.asarray(W, np.float64)).astype("<f2")
    if not np.all(np.isfinite(refs)):
        raise DataError(f"{where}: the fitting samples' whitened coordinates overflow float16; check the model, or "
                        "pass --density-method gda")
    return {"method": "knn_whitened", "neighbours": int(neighbours), "references": float16_array(refs)}


def taps_to_keep(features: np.ndarray, W: np.ndarray, widths: list[int]) -> np.ndarray:
    """Which feature taps the projection keeps: those whose part of ``features @ W`` reaches one int8 step of the
    whole (1/127 of its range on the fitting data). A smaller part is rounded away in the int8 output anyway, and
    the int8 ADD that would sum it in has an input-to-output scale ratio XNNPACK refuses (the op would fall back
    to the CPU, slower and not bit-identical across architectures)."""
    x = np.asarray(features, np.float64)
    w = np.asarray(W, np.float64)
    total = float(np.max(np.abs(x @ w))) or 1.0
    parts, row = [], 0
    for width in widths:
        parts.append(float(np.max(np.abs(x[:, row:row + width] @ w[row:row + width]))))
        row += width
    keep = np.array([p >= total / 127.0 for p in parts])
    keep[int(np.argmax(parts))] = True
    return keep


def _rank(wanted: int, ctx: "ConvertContext") -> int:
    """The rank, nudged so that the projection output's size cannot be taken for a head output's."""
    c, k = len(ctx.labels), int(ctx.head.get("samples", 1))
    taken = {1, c, k * c, 4}
    rank = wanted
    while rank in taken:
        rank += 1
    return rank


def typed(ctx: "ConvertContext") -> Density | None:
    """The density block as the core reads it (with a placeholder reference until :func:`calibrate` ran)."""
    if ctx.density is None:
        return None
    return Density.model_validate({"reference": [0.0, 1.0], **ctx.density})


def calibrate(ctx: "ConvertContext") -> None:
    """Score the held-out data with the quantised model (and the float reference, to compare): the reference
    quantiles, and how closely int8 keeps the float scores."""
    if ctx.density is None:
        return
    with ctx.timed("density_calibration_s"):
        scores = ctx.task.density_scores(ctx, ctx.quantised, ctx.density_data.held_out)
        float_scores = ctx.task.density_scores(ctx, ctx.reference, ctx.density_data.held_out)
    finite = scores[np.isfinite(scores)]
    if len(finite) < 2:
        raise DataError(f"{ctx.density_data.held_out_source}: too few held-out samples to calibrate the unfamiliarity "
                        "percentiles; give a larger --val")
    ctx.density["reference"] = reference_quantiles(finite)
    corr = float(np.corrcoef(scores, float_scores)[0, 1]) if len(scores) > 2 else None
    ctx.density["fit"]["held_out_samples"] = int(len(scores))
    ctx.density["fit"]["int8_vs_float_correlation"] = None if corr is None else round(corr, 4)
    ctx.log(f"unfamiliarity: percentiles from {len(scores)} held-out samples ({ctx.density_data.held_out_source}); "
            f"int8 vs float score correlation {corr:.4f}" if corr is not None else "")


def reference_quantiles(scores: np.ndarray) -> list[float]:
    """The ``REFERENCE_POINTS`` quantiles of in-distribution scores that a published percentile is read against."""
    return np.quantile(scores, np.linspace(0.0, 1.0, REFERENCE_POINTS)).tolist()


def unfamiliar_threshold(ctx: "ConvertContext", ood_rate: float) -> float | None:
    """The score above which ``ood_rate`` of the held-out in-distribution scores lie."""
    if ctx.density is None:
        return None
    return float(np.quantile(np.asarray(ctx.density["reference"]), 1.0 - ood_rate))


__all__ = ["PROJECTION_ROLE", "DensityData", "calibrate", "fit_gaussians", "reference_quantiles", "run", "typed",
           "unfamiliar_threshold"]
