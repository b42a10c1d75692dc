"""Run a model over labelled files through the core preprocessor and runtime; compare float and quantised."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq import metrics
from edgeq.datasets import LabelledFiles, progress
from edgeq.errors import DataError, SourceError
from edgeq.heads import BoundHead, HeadSpec
from edgeq.preprocess import Preprocessor, PreprocessSpec, read_image
from edgeq.runtime import Model, TensorInfo
from edgeq.uncertainty import MEASURES, Summary, pick_review_threshold, summarize


def model_input_spec(model: Model, spec: PreprocessSpec) -> PreprocessSpec:
    """The preprocessing spec with the dtype and quantisation of ``model``'s own input tensor."""
    t = model.input
    dtype = np.dtype(t.dtype).name
    return spec.with_dtype(dtype, t.scale if t.quantized else 1.0, t.zero_point if t.quantized else 0)


def single_head(model: Model, output: TensorInfo | None = None) -> BoundHead:
    """A deterministic head reading one logits output (the first, unless given)."""
    output = output or model.outputs[0]
    return BoundHead(HeadSpec("dense", 1, int(np.prod(output.shape[1:])), "single"), [output])


def head_logits(
    model: Model, spec: PreprocessSpec, files: list[Path], head: BoundHead | None = None, desc: str = ""
) -> np.ndarray:
    """``[N, K, C]`` dequantised sample logits, one row per file, through the one preprocessor.

    Unreadable files are an error: an evaluation that skips images would report on a different set.
    """
    pre = Preprocessor(model_input_spec(model, spec))
    head = head or single_head(model)
    rows = []
    for path in progress(files, len(files), desc or "evaluate"):
        try:
            frame = read_image(path)
        except SourceError as exc:
            raise DataError(str(exc) + "; remove or replace it") from None
        tensor, _ = pre(frame)
        model.set_input(tensor)
        model.invoke()
        rows.append(head.read(model).copy())
    return np.stack(rows)


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

    @property
    def predictions(self) -> np.ndarray:
        return self.summary.mean.argmax(axis=-1)

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.targets

    def figures(self) -> dict[str, float]:
        s = self.summary
        out = {
            "top1": metrics.top1_accuracy(s.mean, self.targets),
            "ece": metrics.expected_calibration_error(s.mean, self.targets),
            "mean_predictive_entropy": float(np.mean(s.predictive_entropy)),
        }
        if s.samples > 1:
            out["mean_mutual_information"] = float(np.mean(s.mutual_information))
            out["mean_logit_spread"] = logit_spread(self.logits)
        return out


def logit_spread(logits: np.ndarray) -> float:
    """Mean over images and classes of the standard deviation of the logits across samples: ``[N, K, C]`` ->
    scalar. It is what mutual information is made of; int8 must not round it away."""
    return float(np.mean(np.std(np.asarray(logits, dtype=np.float64), axis=-2)))


def score(model: Model, head: BoundHead, spec: PreprocessSpec, data: LabelledFiles, desc: str) -> Scored:
    logits = head_logits(model, spec, data.files, head, desc)
    return Scored(logits, summarize(logits), data.targets)


def compare_scored(reference: Scored, quantized: Scored) -> dict[str, Any]:
    """Float vs quantised figures on the same files (the ``validation`` block of a manifest)."""
    ref, q = reference.figures(), quantized.figures()
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
        out["mutual_information_correlation"] = _correlation(
            reference.summary.mutual_information, quantized.summary.mutual_information
        )
        out["float_logit_spread"] = ref["mean_logit_spread"]
        out["quantized_logit_spread"] = q["mean_logit_spread"]
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def calibrate_review(scored: Scored, measure: str, target_accuracy: float) -> dict[str, Any]:
    """The ``needs_review`` rule for a bundle, picked on its own (quantised) results."""
    if measure not in MEASURES:
        raise DataError(f"--review-measure {measure!r}: choose one of {', '.join(MEASURES)}")
    return pick_review_threshold(scored.summary.measure(measure), scored.correct, target_accuracy, measure).to_dict()


def compare_classifiers(
    float_model: Model, quant_model: Model, spec: PreprocessSpec, data: LabelledFiles,
    float_head: BoundHead | None = None, quant_head: BoundHead | None = None,
) -> dict[str, Any]:
    """Float vs quantised figures of two models on the same files (deterministic heads unless given)."""
    if not data.files:
        raise DataError("no validation images")
    ref = score(float_model, float_head or single_head(float_model), spec, data, "float")
    q = score(quant_model, quant_head or single_head(quant_model), spec, data, "quantized")
    return compare_scored(ref, q)
