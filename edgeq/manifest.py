"""The bundle's contract, typed: frozen pydantic models of ``manifest.json``, parsed once by ``read_bundle``.

Everything the device needs to reproduce the converter's numerics is a typed field here; the device, ``edgeq
eval`` and ``edgeq inspect`` read fields, never dict keys. The blocks that record what the converter measured
(validation figures, the spread check, the layout choice, clustering statistics) are closed models too
(edgeq/records.py), which the converter builds field by field.

``edgeq/schemas/manifest.schema.json`` is generated from these models (``python -m edgeq.manifest``) and a test
keeps it equal to them.

Schema version 1 is the only one so far: bundles written by every earlier edgeq 0.1 validate here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeq.errors import BundleError
from edgeq.records import (
    AccuracyAware,
    BiasCorrection,
    Calibration,
    ClassifyValidation,
    Clustering,
    ConverterInfo,
    DensityFit,
    DetectValidation,
    Equalization,
    Qat,
    HeadWeights,
    LayoutChoice,
    ReviewRule,
    ScoreThresholdCalibration,
    Sizes,
    Spread,
)

SCHEMA = "edgeq.bundle"
# 2: closed measured blocks (edgeq/records.py), the detector's objectness threshold and the unknown block; every
# bundle of schema 1 reads as before
SCHEMA_VERSION = 2
READS = (1, 2)
TASKS = ("classify", "detect")
MEASURES = ("predictive_entropy", "aleatoric", "mutual_information")
# measures the density block adds (edgeq/density.py); a classifier's needs_review can rest on them too
DENSITY_MEASURES = ("density_disagreement",)
REVIEW_MEASURES = MEASURES + DENSITY_MEASURES
HEAD_LAYOUTS = ("single", "stacked", "centred")
# output roles each head layout reads (classification); a grid detector's are in edgeq.detection
LAYOUT_ROLES = {"single": ("logits",), "stacked": ("samples",), "centred": ("logits", "residuals")}


class Strict(BaseModel):
    """A contract block: every key is known, nothing can change after parsing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """As ``manifest.json`` holds it: by alias, absent optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class InputSpec(Strict):
    """How a frame becomes the input tensor: size, colour order, resize mode, ``(p - mean) / std`` normalisation,
    and the tensor's dtype and quantisation ``q = round(x / scale) + zero_point``."""

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1, 3] = 3
    color_order: Literal["RGB", "BGR"] = "RGB"
    resize: Literal["stretch", "letterbox"] = "stretch"
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    std: tuple[float, ...] = (127.5, 127.5, 127.5)
    dtype: Literal["int8", "uint8", "int16", "float32"]
    scale: float = Field(1.0, ge=0.0)
    zero_point: int = 0
    pad_value: int = Field(0, ge=0, le=255)
    # OpenCV's resize filter: linear (INTER_LINEAR) or linear_exact (INTER_LINEAR_EXACT: the same pixels on x86_64
    # and aarch64); absent (None) means linear, and is how linear is written, so other bundles stay as they were
    interpolation: Literal["linear", "linear_exact"] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, self.channels):
                raise ValueError(f"{key} needs 1 or {self.channels} values")
        if any(s == 0 for s in self.std):
            raise ValueError("std must be non-zero")
        if self.dtype != "float32" and not self.scale > 0:
            raise ValueError(f"scale must be positive for a {self.dtype} input")
        return self


class OutputSpec(Strict):
    """One output tensor and its role (what the device reads it as); found by name, then shape, never by index."""

    role: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0


class Head(Strict):
    """What the classifier (or a detector's class branch) computes per image (per cell): K sampled logit vectors
    of C classes. ``single``: K = 1 (a dense head); ``stacked``: one ``[K*C]`` output, sample-major; ``centred``:
    the posterior-mean logits ``[C]`` plus each sample's residual ``[K*C]``, each with its own int8 scale."""

    type: Literal["dense", "bayes"] = "dense"
    samples: int = Field(1, ge=1)
    classes: int | None = Field(None, ge=1)
    layout: Literal["single", "stacked", "centred"] = "single"
    seed: int | None = None
    features: int | None = None
    prior_sigma: float | None = None
    posterior_sigma_mean: float | None = None
    head_macs: int | None = None
    deterministic_head_macs: int | None = None
    backbone_macs: int | None = None
    layout_choice: LayoutChoice | None = None
    weights: HeadWeights | None = None
    spread: Spread | None = None
    review: ReviewRule | None = None

    @model_validator(mode="after")
    def _check(self) -> "Head":
        if (self.layout == "single") != (self.samples == 1):
            raise ValueError(f"layout {self.layout!r} does not fit {self.samples} sample(s): 'single' is for one")
        if self.type == "dense" and self.samples != 1:
            raise ValueError("a dense head has one sample")
        return self

    @property
    def roles(self) -> tuple[str, ...]:
        return LAYOUT_ROLES[self.layout]


class Detector(Strict):
    """A grid detector's decoding: ``stride`` pixels per cell, ``grid`` ``[G_h, G_w]``, the COCO category id of
    each class index, the score threshold and NMS IoU, and how many candidates and detections are kept."""

    type: Literal["grid"] = "grid"
    stride: int = Field(ge=1)
    grid: tuple[int, int]
    category_ids: tuple[int, ...] = ()
    score_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    max_candidates: int = Field(100, ge=1)
    max_detections: int = Field(50, ge=1)
    box_encoding: Literal["ltrb_cells"] = "ltrb_cells"
    architecture: str | None = None
    score_threshold_calibration: ScoreThresholdCalibration | None = None
    # unknown objects (edgeq/unknown.py): a cell whose objectness passes this is an object, known class or not;
    # absent: only cells whose class score passes score_threshold, as every bundle before it
    objectness_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    objectness_threshold_calibration: ScoreThresholdCalibration | None = None


class Array(Strict):
    """A numeric array carried inside the manifest: little-endian ``dtype`` values of ``shape``, base64-encoded
    (compact where a JSON list would put every number on a line of its own)."""

    dtype: Literal["float16"] = "float16"
    shape: tuple[int, ...] = Field(min_length=1)
    data: str

    @model_validator(mode="after")
    def _check(self) -> "Array":
        import base64
        import binascii
        import math

        if any(n < 1 for n in self.shape):
            raise ValueError(f"shape {list(self.shape)} needs positive sizes")
        try:
            size = len(base64.b64decode(self.data, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("data is not base64") from None
        if size != 2 * math.prod(self.shape):
            raise ValueError(f"data holds {size} bytes; shape {list(self.shape)} of {self.dtype} needs "
                             f"{2 * math.prod(self.shape)}")
        return self


class Density(Strict):
    """The unfamiliarity measure (edgeq/density.py), in the whitened coordinates of class-conditional Gaussians with
    one shared, shrunk covariance on the model's features (the covariance's top ``rank`` directions). The whitening
    is the graph's ``density_projection`` output. ``gda_shared_covariance``: the squared distance to the nearest
    class mean; ``knn_whitened``: the squared distance to the ``neighbours``-th nearest of ``references``, fitting
    samples in the same coordinates. ``normalise: l2``: the fit is on the features divided by their length; the graph
    outputs the features themselves (``density_features``) and the device projects them, divided by their length,
    with ``projection`` (the whitening, ``[features, rank]``). Absent: the features as they are, projected inside
    the graph, as every bundle before it was."""

    method: Literal["gda_shared_covariance", "knn_whitened"] = "gda_shared_covariance"
    normalise: Literal["l2"] | None = None
    projection: Array | None = None
    features: int = Field(ge=1)
    rank: int = Field(ge=1)
    eigenvalues: tuple[float, ...]
    class_means: tuple[tuple[float, ...], ...]
    shrinkage: float = Field(ge=0.0, le=1.0)
    reference: tuple[float, ...] = Field(min_length=2)
    neighbours: int | None = Field(default=None, ge=1)
    references: Array | None = None
    fit: DensityFit | None = None

    @model_validator(mode="after")
    def _check(self) -> "Density":
        if len(self.eigenvalues) != self.rank or any(not v > 0 for v in self.eigenvalues):
            raise ValueError(f"eigenvalues needs {self.rank} positive values")
        if any(len(m) != self.rank for m in self.class_means):
            raise ValueError(f"class_means needs rows of {self.rank} values")
        if self.rank > self.features:
            raise ValueError(f"rank {self.rank} exceeds the {self.features} features")
        if any(not a <= b for a, b in zip(self.reference, self.reference[1:])):
            raise ValueError("reference must be sorted")
        if self.method == "knn_whitened":
            if self.references is None or self.neighbours is None:
                raise ValueError("method knn_whitened needs references and neighbours")
            if len(self.references.shape) != 2 or self.references.shape[1] != self.rank:
                raise ValueError(f"references needs shape [N, {self.rank}]")
            if self.neighbours > self.references.shape[0]:
                raise ValueError(f"neighbours {self.neighbours} exceeds the {self.references.shape[0]} references")
        elif self.references is not None or self.neighbours is not None:
            raise ValueError(f"references and neighbours belong to method knn_whitened, not {self.method}")
        if (self.normalise is None) != (self.projection is None):
            raise ValueError("normalise l2 and projection go together")
        if self.projection is not None and tuple(self.projection.shape) != (self.features, self.rank):
            raise ValueError(f"projection needs shape [{self.features}, {self.rank}]")
        return self


class Unknown(Strict):
    """Unknown objects (edgeq/unknown.py): which ``measures`` judge a detection, each read as its percentile among
    the same measure on the known detections of ``--val`` (``references``, sorted), the percentiles combined
    (``combine``) into one score, and the ``threshold`` on it that flags ``ood_rate`` of those known detections.
    A detection above it is published as ``label: "unknown"`` with its nearest known class beside it."""

    measures: tuple[Literal["class_doubt", "energy", "mutual_information", "unfamiliarity", "objectness_doubt"],
                    ...] = Field(min_length=1)
    references: tuple[tuple[float, ...], ...]
    combine: Literal["max", "fisher"] = "max"
    threshold: float
    ood_rate: float = Field(gt=0.0, lt=1.0)
    count: int = Field(ge=1)
    calibrated_on: str

    @model_validator(mode="after")
    def _check(self) -> "Unknown":
        if len(self.references) != len(self.measures):
            raise ValueError(f"references needs one list per measure ({len(self.measures)})")
        for name, ref in zip(self.measures, self.references):
            if len(ref) < 2 or any(not a <= b for a, b in zip(ref, ref[1:])):
                raise ValueError(f"references of {name} must be at least two sorted values")
        return self


class Quantization(Strict):
    """The conversion scheme, float ops that stayed, and the accuracy repairs applied."""

    scheme: Literal["int8", "uint8", "int16x8", "dynamic", "float16", "float32"]
    weights: str
    activations: str
    full_integer: bool
    allow_float_fallback: bool = False
    float_ops: tuple[str, ...] = ()
    equalization: Equalization | None = None
    qat: Qat | None = None
    bias_correction: BiasCorrection | None = None
    float_layers: tuple[str, ...] | None = None
    accuracy_aware: AccuracyAware | None = None


class PackedKernel(Strict):
    name: str
    offset: int = Field(ge=0)
    bytes: int = Field(ge=1)
    shape: tuple[int, ...]
    axis: int = Field(ge=0)
    dtype: str
    values: int = Field(ge=1, le=16)


class Packed(Strict):
    file: str
    kernels: tuple[PackedKernel, ...]


class ModelFile(Strict):
    """``model.tflite``'s sha256 and size (of the full model, even when kernels ship packed)."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    packed: Packed | None = None


class Manifest(Strict):
    """``manifest.json`` of a ``.edgeq`` bundle, schema version 1."""

    schema_: Literal["edgeq.bundle"] = Field(SCHEMA, alias="schema")
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    edgeq_version: str
    created: str
    name: str | None = None
    source: str | None = None
    task: Literal["classify", "detect"]
    labels: tuple[str, ...] = Field(min_length=1)
    input: InputSpec
    outputs: tuple[OutputSpec, ...] = Field(min_length=1)
    head: Head | None = None
    detector: Detector | None = None
    quantization: Quantization
    calibration: Calibration
    converter: ConverterInfo | None = None
    sizes: Sizes | None = None
    validation: ClassifyValidation | DetectValidation | None = None
    clustering: Clustering | None = None
    density: Density | None = None
    unknown: Unknown | None = None
    model: ModelFile

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        if self.head is not None and self.head.classes is not None and self.head.classes != len(self.labels):
            raise ValueError(f"head.classes is {self.head.classes} but there are {len(self.labels)} labels")
        if self.detector is not None:
            if self.task != "detect":
                raise ValueError("a detector block needs task 'detect'")
            if self.detector.category_ids and len(self.detector.category_ids) != len(self.labels):
                raise ValueError(f"detector.category_ids has {len(self.detector.category_ids)} ids for "
                                 f"{len(self.labels)} labels")
        roles = [o.role for o in self.outputs]
        if len(set(roles)) != len(roles):
            raise ValueError(f"outputs repeat a role: {roles}")
        if self.density is not None and self.head is not None and len(self.density.class_means) != len(self.labels):
            raise ValueError(f"density has {len(self.density.class_means)} class means for {len(self.labels)} labels")
        if self.unknown is not None:
            if self.detector is None or self.detector.objectness_threshold is None:
                raise ValueError("unknown needs a detector block with its objectness_threshold")
            if "unfamiliarity" in self.unknown.measures and self.density is None:
                raise ValueError("unknown measures unfamiliarity, but the bundle has no density")
        return self

    @property
    def head_or_dense(self) -> Head:
        """The head, or the dense single-output head a bundle without one has."""
        return self.head if self.head is not None else Head(classes=len(self.labels))

    def output(self, role: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.role == role), None)

    def to_json(self) -> dict[str, Any]:
        """What ``manifest.json`` holds: absent optional fields are left out, as earlier edgeq wrote them."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def replace(self, **changes: Any) -> "Manifest":
        """A copy with top-level fields changed, validated again."""
        return parse_manifest({**self.to_json(), **{k: _plain(v) for k, v in changes.items()}})


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json", by_alias=True, exclude_none=True) if isinstance(value, BaseModel) else value


def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        elif str(p).startswith("function-") or str(p)[:1].isupper():  # validators, and a union's member models
            continue
        else:
            parts.append("schema" if p == "schema_" else str(p))
    return ".".join(parts) or "(top level)"


def parse_manifest(data: Any, source: str = "manifest.json") -> Manifest:
    """Validate a manifest: the schema and its version first (an unknown version says to upgrade or re-convert),
    then every field; the first broken field is named by its dotted path."""
    from edgeq._version import __version__

    if not isinstance(data, dict):
        raise BundleError(f"{source}: manifest is not a JSON object")
    version = data.get("schema_version")
    if data.get("schema") != SCHEMA or not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{source}: not an edgeq manifest (schema {data.get('schema')!r})")
    if version not in READS:
        raise BundleError(f"{source}: unknown schema version {version} (this edgeq {__version__} reads "
                          f"{' and '.join(map(str, READS))}); upgrade edgeq or re-convert the model")
    try:  # strictly, as JSON types: "96" is not a height and "yes" is not true
        return Manifest.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _dotted(tuple(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            raise BundleError(f"{source}: field '{where}' is missing; re-convert the model") from None
        raise BundleError(f"{source}: field '{where}': {message}; re-convert the model") from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json``, as shipped in ``edgeq/schemas/manifest.schema.json``."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$id"] = "https://edgeq.dev/schemas/manifest.schema.json"
    schema["title"] = "edgeq bundle manifest (schema_version 1)"
    return schema


def schema_path() -> Path:
    return Path(__file__).parent / "schemas" / "manifest.schema.json"


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeq.manifest [--check]``: write (or check) the shipped JSON Schema."""
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if argv and "--check" in argv:
        same = schema_path().read_text() == text
        print("manifest.schema.json is up to date" if same else "manifest.schema.json is stale: run "
              "python -m edgeq.manifest", file=sys.stderr)
        return 0 if same else 1
    schema_path().write_text(text)
    print(f"wrote {schema_path()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
