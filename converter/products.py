"""What the convert stages make and hand each other: frozen products, one per stage (pipeline.py shows the flow).

    load -> SourceModel, labels, spec          calibrate -> Calibration        cluster -> Clustering
    export head -> HeadExport                  density (fit) -> DensityFit     quantise -> Converted (float, int8)
    bias-correct, mixed precision -> Repairs   verify -> Verification          density (calibrate) -> Density
    validate -> Validation                     write -> ConvertResult

A product holds typed manifest blocks (edgeq/manifest.py, edgeq/records.py) for what the bundle records, and
plain fields for what later stages need (the Keras model, the calibration samples, the weight samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeq import records
from edgeq.manifest import Density, Detector, Head, Manifest, OutputSpec, Unknown
from edgeq.runtime import Model


@dataclass(frozen=True)
class SourceModel:
    """A float model ready for conversion.

    keras_model: the Keras model, or None for a SavedModel folder (then ``saved_model_dir`` is set).
    input_shape: (H, W, C) of the single image input.
    num_classes: size of the last axis of the output.
    name: what the manifest calls the model.
    origin: where it came from (path or ``builtin:mobilenet_v2``).
    """

    keras_model: Any
    saved_model_dir: Path | None
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str
    origin: str

    def with_model(self, keras_model: Any) -> "SourceModel":
        """The same source with another Keras model (an exported head, the density's outputs added)."""
        return SourceModel(keras_model, self.saved_model_dir, self.input_shape, self.num_classes, self.name,
                           self.origin)


@dataclass(frozen=True)
class Calibration:
    """Preprocessed float samples ``(N, H, W, C)`` for PTQ, and where they came from."""

    samples: np.ndarray
    source: str
    kind: str
    skipped: int

    def summary(self) -> records.Calibration:
        return records.Calibration(count=int(len(self.samples)), source=self.source, kind=self.kind,
                                   skipped=self.skipped)

    def representative_dataset(self) -> Iterator[list[np.ndarray]]:
        for sample in self.samples:
            yield [sample[None, ...]]


@dataclass(frozen=True)
class Clustering:
    """The source model with its kernels clustered (in place), the manifest's record of it, and per layer what was
    done (report.json); ``record`` None when ``--clusters`` was not given."""

    source: SourceModel
    record: records.Clustering | None = None
    layers: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class HeadExport:
    """A model whose head the TFLite converter can quantise (K weight samples as plain layers), the manifest's
    head block, and what the checks need afterwards (the Bayesian weight samples)."""

    source: SourceModel
    head: Head
    detail: Any = None


@dataclass(frozen=True)
class DensityData:
    """The density's labelled data as a task's taps read it: fitting inputs and their class indices, held-out
    inputs, and where they came from (for the manifest)."""

    fit: Any
    targets: np.ndarray
    held_out: Any
    source: str
    held_out_source: str


@dataclass(frozen=True)
class DensityFit:
    """The source model with the density's output added, the density block (its reference a placeholder until
    it is calibrated) and the held-out data; ``block`` None when the density is off."""

    source: SourceModel
    block: Density | None = None
    data: DensityData | None = None


@dataclass(frozen=True)
class Converted:
    """One converted model: its bytes, loaded into the runtime, its outputs with their roles, and the task's
    reader bound to them (a :class:`edgeq.heads.BoundHead` or :class:`edgeq.detection.BoundGrid`)."""

    data: bytes
    model: Model
    outputs: tuple[OutputSpec, ...]
    bound: Any


@dataclass(frozen=True)
class Repairs:
    """The model the repairs settled on, the (possibly bias-corrected) source it was converted from, and the
    manifest's records of each repair; ``report`` holds report.json's per-layer detail."""

    source: SourceModel
    quantised: Converted
    bias_correction: records.BiasCorrection | None = None
    float_layers: tuple[str, ...] | None = None
    accuracy_aware: records.AccuracyAware | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verification:
    """What the checks of the converted model found: float ops left, the head with its weight and spread checks,
    the clustering record with what the shipped kernels hold, and per-layer errors (report.json)."""

    float_ops: tuple[str, ...]
    head: Head
    clustering: records.Clustering | None = None
    layers: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class Validation:
    """The float reference and the int8 model on ``--val``: the manifest's validation block, the calibrated review
    rule, and the blocks validation refines (a detector's score threshold, where a density's percentiles are read
    against)."""

    block: records.ClassifyValidation | records.DetectValidation
    review: records.ReviewRule | None
    detector: Detector | None = None
    density: Density | None = None
    unknown: Unknown | None = None  # a detector's unknown objects (edgeq/unknown.py)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    manifest: Manifest
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
