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

from typing import Any

import numpy as np

from edgeq import records
from edgeq.density import PROJECTION_ROLE, ordinal, unit_length
from edgeq.errors import DataError, ModelError
from edgeq.manifest import Density, Head

from ..context import ConvertContext
from ..products import Converted, DensityData, DensityFit, SourceModel
from ..recipes import DensityRecipe
from .taps import Taps

MIN_PER_CLASS = 5
REFERENCE_POINTS = 201  # quantiles kept in the manifest: a percentile resolution of 0.5
# fitting samples a knn_whitened density keeps: on the detection benchmark 500 to 3,800 of them gave the same AUROC
# (within 0.01), and each costs rank multiply-adds per detection on the device
KNN_REFERENCES = 1000
# the reference a density carries until calibrate() reads the held-out scores (Density needs two sorted values)
UNCALIBRATED = (0.0, 1.0)


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


def fit(recipe: DensityRecipe, ctx: ConvertContext, taps: Taps, source: SourceModel, head: Head) -> DensityFit:
    """Fit the density on the taps' features and add its output to the source model; the block's reference is a
    placeholder until :func:`calibrate`. Off (``block`` None) when ``--density off`` or without labelled data."""
    if recipe.density == "off":
        return DensityFit(source)
    if source.keras_model is None:
        ctx.log("unfamiliarity: off (a SavedModel cannot take the density's outputs; give the .keras model)")
        return DensityFit(source)
    normalise = _normalise(recipe, taps)
    data = taps.data(recipe)
    if data is None:
        ctx.log("unfamiliarity: off (no labelled data to fit it on: give --val or --density-data)")
        return DensityFit(source)
    model = source.keras_model
    with ctx.timed("density_fit_s"):
        features = taps.features(model, data.fit)
        if normalise == "l2":
            features = unit_length(features)
        where = f"--density-data {data.source}"
        fitted = fit_gaussians(features, data.targets, list(ctx.labels), _rank(recipe.rank, ctx, head), where)
        names = taps.names(model)
        keep = taps_to_keep(features, fitted["W"], taps.widths(model))
        W = fitted["W"] * np.repeat(keep, taps.widths(model))[:, None].astype(np.float32)
        fields = dict(fitted["block"])
        if normalise is not None:  # the device projects with the manifest's float16 whitening: fit with the same
            W = W.astype(np.float16).astype(np.float32)
            if not np.all(np.isfinite(W)):
                raise DataError(f"{where}: the whitening of the features overflows float16; check the model, or "
                                "pass --density-normalise none")
            fields.update(normalise=normalise, projection=float16_array(W))
        method = taps.method if recipe.method == "auto" else recipe.method
        if method == "knn":
            fields.update(knn_references(features, W, recipe.neighbours, where))
        exported = source.with_model(taps.add_outputs(model, W, keep, normalise))
    if not keep.all() or normalise is not None:
        # the class means in the coordinates the device gets: without the dropped taps, with the rounded whitening
        means = np.stack([features[data.targets == c].mean(axis=0) for c in range(len(ctx.labels))])
        fields["class_means"] = (means @ W.astype(np.float64)).tolist()
    if not keep.all():
        ctx.log(f"unfamiliarity: left out tap(s) {', '.join(n for n, k in zip(names, keep) if not k)}: their part of "
                "the projection is under one int8 step of the whole")
    fields["fit"] = records.DensityFit(
        data=data.source, samples=int(len(data.targets)),
        per_class=np.bincount(data.targets, minlength=len(ctx.labels)).tolist(),
        explained_variance=round(fitted["explained"], 4), held_out=data.held_out_source,
        taps=[n for n, k in zip(names, keep) if k], dropped_taps=[n for n, k in zip(names, keep) if not k])
    block = Density.model_validate({**fields, "reference": list(UNCALIBRATED)})
    _log_fit(ctx, block, data, fitted["explained"])
    return DensityFit(exported, block, data)


def _normalise(recipe: DensityRecipe, taps: Taps) -> str | None:
    """``--density-normalise``, resolved for these taps (refused where they cannot)."""
    if recipe.normalise == "auto":
        normalise = taps.normalise
    else:
        normalise = None if recipe.normalise == "none" else recipe.normalise
    if normalise is not None and normalise not in taps.normalisations:
        raise ModelError(f"--density-normalise {normalise}: a {taps.task_name} model's density cannot normalise its "
                         "features yet (only a detector's can); drop it or pass --density-normalise none")
    return normalise


def _log_fit(ctx: ConvertContext, block: Density, data: DensityData, explained: float) -> None:
    score = (f"distance to the {ordinal(block.neighbours)} nearest of {block.references.shape[0]} fitting samples"
             if block.references is not None else "distance to the nearest class mean")
    ctx.log(f"unfamiliarity: class Gaussians on {block.features} features of {len(data.targets)} samples from "
            f"{data.source} (shared covariance, Ledoit-Wolf shrinkage {block.shrinkage:.3f}), whitened onto its top "
            f"{block.rank} directions ({explained:.0%} of the variance), "
            + ("the features divided by their length, an output the device projects; " if block.normalise else
               "fused as one more output; ") + f"score: {score}")


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


def _rank(wanted: int, ctx: ConvertContext, head: Head) -> int:
    """The rank, nudged so that the projection output's size cannot be taken for a head output's."""
    c, k = len(ctx.labels), head.samples
    taken = {1, c, k * c, 4}
    rank = wanted
    while rank in taken:
        rank += 1
    return rank


def calibrate(ctx: ConvertContext, taps: Taps, fitted: DensityFit, quantised: Converted,
              reference: Converted) -> Density | None:
    """Score the held-out data with the quantised model (and the float reference, to compare): the reference
    quantiles, and how closely int8 keeps the float scores."""
    if fitted.block is None or fitted.data is None:
        return None
    held = fitted.data
    with ctx.timed("density_calibration_s"):
        scores = taps.scores(quantised, held.held_out)
        float_scores = taps.scores(reference, held.held_out)
    finite = scores[np.isfinite(scores)]
    if len(finite) < 2:
        raise DataError(f"{held.held_out_source}: too few held-out samples to calibrate the unfamiliarity "
                        "percentiles; give a larger --val")
    corr = float(np.corrcoef(scores, float_scores)[0, 1]) if len(scores) > 2 else None
    fit = fitted.block.fit.model_copy(update={
        "held_out_samples": int(len(scores)), "int8_vs_float_correlation": None if corr is None else round(corr, 4)})
    if corr is not None:
        ctx.log(f"unfamiliarity: percentiles from {len(scores)} held-out samples ({held.held_out_source}); int8 vs "
                f"float score correlation {corr:.4f}")
    return fitted.block.model_copy(update={"reference": tuple(reference_quantiles(finite)), "fit": fit})


def reference_quantiles(scores: np.ndarray) -> list[float]:
    """The ``REFERENCE_POINTS`` quantiles of in-distribution scores that a published percentile is read against."""
    return np.quantile(scores, np.linspace(0.0, 1.0, REFERENCE_POINTS)).tolist()


def unfamiliar_threshold(density: Density | None, ood_rate: float) -> float | None:
    """The score above which ``ood_rate`` of the held-out in-distribution scores lie."""
    if density is None:
        return None
    return float(np.quantile(np.asarray(density.reference), 1.0 - ood_rate))


__all__ = ["PROJECTION_ROLE", "DensityData", "calibrate", "fit", "fit_gaussians", "reference_quantiles",
           "unfamiliar_threshold"]
