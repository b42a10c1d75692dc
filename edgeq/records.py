"""What the converter measured, as closed, typed blocks of the manifest: the figures that ``edgeq inspect``, ``edgeq
eval``, the demo and the benchmarks read back by name.

Each block lists every key it holds (``extra="forbid"``); the converter builds them field by field, and readers
use attributes. A key that an earlier edgeq wrote under another name is read into the current one by a
``before`` validator, so every bundle edgeq has written still loads (tests/data/manifests_v1 holds one of each).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Block(BaseModel):
    """A manifest block: every key known, frozen once built."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """As ``manifest.json`` holds it: by alias, absent optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# -- the head ---------------------------------------------------------------------------------------------------

class Spread(Block):
    """The spread of the logits across a Bayesian head's K samples, float vs int8, on ``count`` calibration
    ``of`` (images for a classifier; for a detector the cells most likely to hold an object), and how many output
    quantisation steps it spans. Written before this shape as ``images: N`` or ``cells: N``."""

    of: Literal["images", "cells"]
    count: int = Field(ge=0)
    float_: float = Field(alias="float")
    quantized: float
    kept: float | None = None
    output_step: float
    steps: float | None = None
    mutual_information_correlation: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "of" not in data:
            for key in ("images", "cells"):
                if key in data:
                    return {"of": key, "count": data[key], **{k: v for k, v in data.items() if k != key}}
        return data


class StackedEstimate(Block):
    """Before converting: how many int8 steps a stacked output would give the spread between samples."""

    spread: float
    step: float
    steps: float


class LayoutChoice(Block):
    """How ``--bayes-layout`` was decided."""

    mode: Literal["auto", "stacked", "centred"]
    reason: str | None = None
    stacked_estimate: StackedEstimate | None = None
    min_steps: float | None = None


class HeadWeights(Block):
    """How closely the int8 stacked kernel reproduces each float weight sample (per output channel)."""

    per_channel: bool | None = None
    max_relative_error: float | None = None
    median_relative_error: float | None = None
    note: str | None = None


class ReviewRule(Block):
    """The calibrated ``needs_review`` rule. A result is *ambiguous* when ``measure > threshold``: the threshold that
    keeps ``target_accuracy`` on validation (``mode: target``), or, when no threshold reaches it, the one that flags
    the ``budget`` fraction of validation results (``mode: budget``). It is *unfamiliar* when its unfamiliarity
    exceeds ``unfamiliar_threshold``, set to flag ``ood_rate`` of held-out in-distribution data (the
    ``unfamiliar_percentile``-th percentile of their scores)."""

    measure: Literal["predictive_entropy", "aleatoric", "mutual_information", "density_disagreement"]
    threshold: float | None = None
    target_accuracy: float = Field(gt=0.0, le=1.0)
    coverage: float | None = None
    kept_accuracy: float | None = None
    reached: bool = True
    count: int | None = None
    mode: Literal["target", "budget", "always"] = "target"
    budget: float | None = Field(None, gt=0.0, lt=1.0)
    unfamiliar_threshold: float | None = None
    unfamiliar_percentile: float | None = Field(None, ge=0.0, le=100.0)
    ood_rate: float | None = Field(None, gt=0.0, lt=1.0)
    calibrated_on: str | None = None


# -- the detector -----------------------------------------------------------------------------------------------

class ScoreThresholdCalibration(Block):
    """How a detector's ``score_threshold`` was chosen on ``--val``."""

    rule: str
    threshold: float | None = None
    f1: float | None = None
    precision: float | None = None
    recall: float | None = None
    known_objects: int | None = None


# -- quantisation and its repairs -------------------------------------------------------------------------------

class BiasCorrection(Block):
    """What ``--bias-correction`` did: corrected layers, and top-1 on ``--val`` with and without."""

    mode: Literal["auto", "on", "off"]
    applied: bool
    reason: str | None = None
    corrected_layers: int | None = None
    kernel_layers: int | None = None
    mean_abs_shift: float | None = None
    top1_without: float | None = None
    top1_with: float | None = None


class EqualizedPair(Block):
    """One pair ``--equalize`` rescaled: the two layers, the activation between, how many channels moved and how
    many ReLU6 held back, and how unequal the first layer's channel ranges were before and after (the widest over
    the median)."""

    first: str
    second: str
    activation: Literal["relu", "relu6"]
    channels: int
    scaled: int
    held: int
    spread_before: float
    spread_after: float


class Equalization(Block):
    """What ``--equalize`` (cross-layer equalisation) did, and how much the float outputs moved (on what)."""

    pairs: int
    checked_on: str
    max_abs_output_change: float
    relative_output_change: float
    reason: str = "--equalize"  # or what --max-drop measured without and with it
    layers: tuple[EqualizedPair, ...] = ()


class QatEpoch(Block):
    loss: float
    accuracy: float


class Qat(Block):
    """What ``--qat`` (quantisation-aware fine-tuning) did: on what, how long, and each epoch's training figures."""

    data: str
    images: int
    epochs: int
    learning_rate: float
    seconds: float
    fake_quant_tensors: int
    ranges: str = "calibration min/max, then moving averages while training (momentum 0.99)"
    history: tuple[QatEpoch, ...] = ()


class RepairStep(Block):
    """One more op in float, and top-1 then."""

    float_: str = Field(alias="float")
    op: str
    top1: float
    drop: float


class RankedOp(Block):
    """An op's output error when it alone is quantised (the accuracy-aware loop's sensitivity ranking)."""

    node: str
    op: str
    output_error: float


class RepairCost(Block):
    """What keeping ops in float cost: the plain and the repaired model side by side."""

    model_bytes: tuple[int, int]
    latency_ms_median: tuple[float, float]
    latency_ratio: float
    xnnpack: dict[str, Any]  # the runtime's delegation report (edgeq/runtime.py), as it describes itself


class AccuracyAware(Block):
    """What the accuracy-aware loop (``--max-drop``) did."""

    bound: float
    drop_type: Literal["absolute", "relative"]
    max_reverts: int
    plain_drop: float
    final_drop: float
    met: bool
    float_layers: tuple[str, ...] = ()
    steps: tuple[RepairStep, ...] = ()
    ranking: tuple[RankedOp, ...] = ()
    cost: RepairCost | None = None


class Sizes(Block):
    """Bytes of the float32 reference ``.tflite`` and of the shipped model, and their ratio."""

    float32_tflite: int = Field(ge=1)
    model_tflite: int = Field(ge=1)
    ratio_to_float32: float


class ConverterInfo(Block):
    tensorflow: str


class Calibration(Block):
    """The calibration data PTQ read."""

    count: int = Field(ge=0)
    source: str | None = None
    kind: str | None = None
    skipped: int | None = None


# -- clustering -------------------------------------------------------------------------------------------------

class Shipped(Block):
    kernels_checked: int
    max_distinct_per_channel: int


class PosteriorVQ(Block):
    """A Bayesian head's (mu, sigma) pairs vector-quantised to ``codewords`` codewords (or why not)."""

    layer: str
    type: str | None = None
    weights: int | None = None
    codewords: int | None = None
    relative_rmse_mu: float | None = None
    relative_rmse_sigma: float | None = None
    codebook: tuple[tuple[float, float], ...] | None = None
    skipped: str | None = None


class Finetune(Block):
    data: str
    images: int
    epochs: int
    train_accuracy: float | None = None


class Clustering(Block):
    """What ``--clusters`` did: how many kernels, of how many weights, and what the shipped kernels hold."""

    clusters: int
    init: str
    per_channel: bool
    skip: str
    clustered: int
    skipped: int
    clustered_weights: int
    all_weights: int
    finetune: Finetune | None = None
    posterior: PosteriorVQ | None = None
    shipped: Shipped | None = None
    packed_kernels: int | None = None


# -- the unfamiliarity measure's fit ----------------------------------------------------------------------------

class DensityFit(Block):
    """Where the density was fitted and checked: its data, the taps it kept, the held-out scores its percentiles
    are read against, and how closely int8 keeps the float scores."""

    data: str
    samples: int
    per_class: tuple[int, ...]
    explained_variance: float
    held_out: str
    taps: tuple[str, ...] = ()
    dropped_taps: tuple[str, ...] = ()
    held_out_samples: int | None = None
    int8_vs_float_correlation: float | None = None
    reference: str | None = None
    reference_samples: int | None = None


# -- validation -------------------------------------------------------------------------------------------------

class FlagRates(Block):
    """How the ``needs_review`` rule flags a set of results: the share flagged and why, and with labels the accuracy
    of all results against the accuracy of those it leaves unflagged."""

    count: int
    flagged: float
    unfamiliar: float
    ambiguous: float
    accuracy_all: float | None = None
    accuracy_unflagged: float | None = None


class ClassifyValidation(Block):
    """A classifier's float reference and int8 model on ``--val``, side by side."""

    count: int
    float_top1: float
    quantized_top1: float
    top1_agreement: float
    mean_abs_logit_error: float | None = None
    float_ece: float
    quantized_ece: float
    float_mean_mutual_information: float | None = None
    quantized_mean_mutual_information: float | None = None
    mutual_information_correlation: float | None = None
    float_logit_spread: float | None = None
    quantized_logit_spread: float | None = None
    source: str | None = None
    review: FlagRates | None = None


class DetectionFlags(Block):
    """The rule's flags on detections of known and of unknown objects."""

    known: FlagRates | None = None
    unknown: FlagRates | None = None


class ObjectCounts(Block):
    """Objects of one kind, how many a kept detection found (IoU >= 0.5, any label), and how many of those
    detections are published as ``unknown``."""

    objects: int
    found: int
    found_rate: float | None = None
    detections: int | None = None
    published_unknown: float | None = None
    auroc: dict[str, float] | None = None


class DetectionFigures(Block):
    """One model's detection figures on ``--val``: mAP, then over detections at the score threshold the counts,
    D-ECE, each measure's known-vs-unknown AUROC and FPR at 95% TPR, and the rule's flags."""

    map50: float
    map: float
    images: int
    detections: int
    matched_known: int
    matched_unknown: int
    unknown_objects: int
    unmatched: int
    label_accuracy_known: float | None = None
    d_ece: float | None = None
    score_threshold: float
    unknown_auroc: dict[str, float] | None = None
    unknown_fpr_at_95_tpr: dict[str, float] | None = None
    flagged: DetectionFlags | None = None
    objectness_threshold: float | None = None
    known_objects: ObjectCounts | None = None
    unknown_kinds: dict[str, ObjectCounts] | None = None
    false_detections: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "review" in data:  # edgeq 0.1 wrote the flags as "review"
            data = {("flagged" if k == "review" else k): v for k, v in data.items()}
        return data


class DetectValidation(Block):
    """A detector's float reference and int8 model on ``--val``."""

    source: str | None = None
    images: int
    float_: DetectionFigures = Field(alias="float")
    quantized: DetectionFigures


Validation = ClassifyValidation | DetectValidation


def validation_of(task: str, data: Any) -> Validation | None:
    """The validation block of a ``task`` manifest, typed by its task."""
    if data is None or isinstance(data, (ClassifyValidation, DetectValidation)):
        return data
    return (DetectValidation if task == "detect" else ClassifyValidation).model_validate(data)
