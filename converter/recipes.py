"""What ``edgeq convert`` takes, as small frozen recipes, one per concern, each checking itself.

Every field carries its command-line flag and help text, so the CLI adds its arguments from the recipes and
builds them back from the parsed flags (:func:`add_arguments`, :func:`recipe_from_flags`): no option is copied
by hand, and a script can write ``recipe_from_flags("model.keras", "out.edgeq", calib="images/", val="val/")``.

Cross-recipe rules (``--max-drop`` needs ``--val``, ...) live in :class:`ConvertRecipe`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edgeq.errors import ModelError, QuantizationError
from edgeq.manifest import DENSITY_MEASURES, REVIEW_MEASURES
from edgeq.preprocess import INTERPOLATIONS, NORMALIZATIONS

BAYES_LAYOUTS = ("centred", "stacked")
MAX_CLUSTERS = 256
CLUSTER_INITS = ("linear", "kmeans++")


def flag(default: Any, name: str, help: str, **argparse_kwargs: Any) -> Any:
    """A recipe field with its command-line flag (``dest`` is the flag's name with underscores)."""
    return field(default=default, metadata={"flag": name, "help": help, **argparse_kwargs})


class QuantMode(str, Enum):
    """What ``--quant`` selects.

    ``int8``     full integer: int8 weights (per channel) and activations, int8 input and output (default)
    ``uint8``    as int8 inside, with uint8 input and output for pipelines that want unsigned tensors
    ``int16x8``  int16 activations and int8 weights, int16 input and output; more exact, slower
    ``dynamic``  int8 weights, float activations computed on the fly; float input and output
    ``float16``  float16 weights, float compute
    ``float32``  no quantisation; the reference
    """

    INT8 = "int8"
    UINT8 = "uint8"
    INT16X8 = "int16x8"
    DYNAMIC = "dynamic"
    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def needs_calibration(self) -> bool:
        return self in (QuantMode.INT8, QuantMode.UINT8, QuantMode.INT16X8)

    @property
    def integer_only(self) -> bool:
        return self.needs_calibration


@dataclass(frozen=True)
class InputRecipe:
    """The source model and its preprocessing (stored in the bundle; the device applies the same)."""

    normalization: str = flag("mobilenet", "--normalize", "mobilenet: [-1, 1] (default); unit: [0, 1]; raw: [0, 255]",
                              choices=sorted(NORMALIZATIONS))
    color_order: str = flag("RGB", "--color-order", "channel order of the model (default RGB)", choices=("RGB", "BGR"))
    resize: str = flag("stretch", "--resize", "resize mode (default stretch)", choices=("stretch", "letterbox"))
    interpolation: str = flag("linear", "--interpolation", "resize filter, here and on the device: linear (default, "
                              "fastest) or linear_exact (the same pixels on x86 and ARM; slower)",
                              choices=INTERPOLATIONS)
    labels_file: str | None = flag(None, "--labels", "class names, one per line (default: the names edgeq train "
                                   "stored in the model; else the --val folder names)", metavar="FILE")
    input_size: int = flag(224, "--input-size", "built-in mobilenet_v2: input height and width (default 224)",
                           type=int, metavar="S")
    alpha: float = flag(1.0, "--alpha", "built-in mobilenet_v2: width multiplier (default 1.0)", type=float)
    classes: int = flag(1000, "--classes", "built-in mobilenet_v2: output classes (default 1000)", type=int,
                        metavar="C")
    weights: str | None = flag("none", "--weights", "built-in mobilenet_v2: initial weights (default none: random)",
                               metavar="PATH|none|imagenet")

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ModelError(f"--normalize {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
        if self.classes < 1:
            raise ModelError(f"--classes {self.classes}: give at least 1")
        if self.input_size < 1:
            raise ModelError(f"--input-size {self.input_size}: give a positive size")


@dataclass(frozen=True)
class QuantRecipe:
    """How to convert: the mode, whether float ops may remain in an integer model, and the calibration data."""

    mode: QuantMode = flag(QuantMode.INT8, "--quant", "quantisation mode (default int8, full integer)",
                           choices=[m.value for m in QuantMode])
    allow_float_fallback: bool = flag(False, "--allow-float-fallback", "keep ops that cannot be integer in float",
                                      action="store_true")
    calib: str | None = flag(None, "--calib", "calibration data: image folder (recursive), video file, or .npy/.npz",
                             metavar="PATH")
    calib_samples: int = flag(200, "--calib-samples", "calibration samples to use (default 200)", type=int,
                              metavar="N")

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", QuantMode(self.mode))
        if self.allow_float_fallback and not self.mode.integer_only:
            raise QuantizationError(f"--allow-float-fallback applies to integer modes only, not --quant {self.mode.value}")

    def describe(self) -> dict[str, Any]:
        """The manifest's ``quantization`` block (before the repairs add theirs)."""
        weights = "float16" if self.mode is QuantMode.FLOAT16 else (
            "float32" if self.mode is QuantMode.FLOAT32 else "int8 per-channel")
        activations = {QuantMode.INT8: "int8", QuantMode.UINT8: "int8", QuantMode.INT16X8: "int16"}.get(self.mode,
                                                                                                    "float32")
        return {"scheme": self.mode.value, "weights": weights, "activations": activations,
                "full_integer": self.mode.integer_only, "allow_float_fallback": self.allow_float_fallback}


@dataclass(frozen=True)
class BayesRecipe:
    """How a Bayesian head's K posterior samples are fused into the integer pass (docs/bayesian.md)."""

    samples: int | None = flag(None, "--bayes-samples", "posterior samples fused into the int8 head (default 32 when "
                               "the model has a BayesDense head)", type=int, metavar="K")
    seed: int = flag(0, "--bayes-seed", "seed of the weight samples (default 0)", type=int, metavar="N")
    layout: str = flag("auto", "--bayes-layout", "stacked: one [K, C] output; centred: mean + per-sample residual "
                       "outputs, each with its own int8 scale; auto (default): stacked when its output resolves the "
                       "spread between samples in at least 4 int8 steps, else centred",
                       choices=("auto", *BAYES_LAYOUTS))

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *BAYES_LAYOUTS):
            raise ModelError(f"--bayes-layout {self.layout!r}: choose auto or one of {', '.join(BAYES_LAYOUTS)}")
        if self.samples is not None and self.samples < 2:
            raise ModelError(f"--bayes-samples {self.samples}: a Monte-Carlo head needs at least 2 samples (default 32)")


@dataclass(frozen=True)
class ClusterRecipe:
    """k-means weight sharing before PTQ (docs/clustering.md); off unless ``clusters`` is given."""

    clusters: int | None = flag(None, "--clusters", "share N values per kernel (16: 4-bit indices)", type=int,
                                metavar="N")
    init: str = flag("linear", "--cluster-init", "centroid initialisation (default linear)", choices=CLUSTER_INITS)
    per_channel: bool = flag(False, "--cluster-per-channel", "N values per output channel, not per tensor",
                             action="store_true")
    skip: str | None = flag(None, "--cluster-skip", "layers whose names match are not clustered (default: the first "
                            "conv; tiny kernels always)", metavar="REGEX")
    finetune: str | None = flag(None, "--finetune", "fine-tune the clustered model on this class folder, keeping "
                                "every weight on its cluster", metavar="DATA_DIR")
    finetune_epochs: int = flag(1, "--finetune-epochs", "fine-tuning epochs (default 1)", type=int, metavar="E")

    def __post_init__(self) -> None:
        if self.finetune is not None and self.clusters is None:
            raise ModelError("--finetune applies to clustered models: give --clusters N too")
        if self.finetune_epochs < 1:
            raise ModelError(f"--finetune-epochs {self.finetune_epochs}: give at least 1")
        if self.clusters is not None and not 2 <= self.clusters <= MAX_CLUSTERS:
            raise ModelError(f"--clusters {self.clusters}: give 2 to {MAX_CLUSTERS} (16 is usual: 4-bit indices)")
        if self.init not in CLUSTER_INITS:
            raise ModelError(f"--cluster-init {self.init!r}: choose one of {', '.join(CLUSTER_INITS)}")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as exc:
                raise ModelError(f"--cluster-skip {self.skip!r}: not a regular expression ({exc})") from None

    @property
    def enabled(self) -> bool:
        return self.clusters is not None


@dataclass(frozen=True)
class RepairRecipe:
    """Accuracy repair after PTQ (docs/accuracy.md): bias correction and float islands."""

    equalize: str = flag("auto", "--equalize", "cross-layer equalisation before quantising: rescale the channels of "
                         "conv -> ReLU/ReLU6 -> conv pairs so that no channel dominates a tensor's int8 range, the "
                         "float function unchanged (docs/accuracy.md). --equalize alone: on; default auto: tried "
                         "by --max-drop before any layer is kept in float; off: never",
                         nargs="?", const="on", choices=("auto", "on", "off"))
    qat: str | None = flag(None, "--qat", "quantisation-aware fine-tuning on this class folder (labelled like "
                           "--val) before the int8 conversion, which then uses the ranges training learned "
                           "(docs/accuracy.md; classifiers, a Bayesian head's samples frozen, --density off, for now)", metavar="DIR")
    qat_epochs: int = flag(1, "--qat-epochs", "epochs of --qat (default 1)", type=int, metavar="N")
    bias_correction: str = flag("auto", "--bias-correction", "empirical bias correction of int8 weight rounding "
                                "(default auto: kept when --val shows it does not lower top-1; without --val, off)",
                                choices=("auto", "on", "off"))
    max_drop: float | None = flag(None, "--max-drop", "accuracy-aware mode: keep the most sensitive layers in float "
                                  "until the top-1 drop on --val is at most D (0.01 = one point)", type=float,
                                  metavar="D")
    drop_type: str = flag("absolute", "--drop-type", "--max-drop as points of accuracy (default) or relative to "
                          "float accuracy", choices=("absolute", "relative"))
    max_reverts: int = flag(10, "--max-reverts", "at most N layers in float (default 10)", type=int, metavar="N")
    best_effort: bool = flag(False, "--best-effort", "when --max-drop is not reached, keep the best model found and "
                             "exit 0", action="store_true")
    keep_float: str | None = flag(None, "--keep-float", "ops whose names match stay float (mixed precision)",
                                  metavar="REGEX")
    int16: str | None = flag(None, "--int16", "per-layer 16x8: refused, the TFLite converter cannot do it",
                             metavar="REGEX")
    layer_errors: bool = flag(False, "--layer-errors", "measure each layer's quantisation error (TFLite "
                              "QuantizationDebugger) into the bundle's report; edgeq eval --report plots it",
                              action="store_true")

    def __post_init__(self) -> None:
        if self.bias_correction not in ("auto", "on", "off"):
            raise ModelError(f"--bias-correction {self.bias_correction!r}: choose auto, on or off")
        if self.qat_epochs < 1:
            raise ModelError(f"--qat-epochs {self.qat_epochs}: give at least 1")
        if self.equalize not in ("auto", "on", "off"):
            raise ModelError(f"--equalize {self.equalize!r}: choose auto, on or off")
        if self.int16 is not None:
            raise QuantizationError(
                f"--int16 {self.int16!r}: the TFLite converter quantises 16x8 only for a whole model (--quant int16x8), "
                "not per layer; keep those layers in float with --keep-float REGEX")
        if self.max_drop is not None and not 0.0 <= self.max_drop < 1.0:
            raise ModelError(f"--max-drop {self.max_drop}: give a fraction of accuracy, e.g. 0.01 for one point")
        if self.drop_type not in ("absolute", "relative"):
            raise ModelError(f"--drop-type {self.drop_type!r}: choose absolute or relative")
        if self.max_reverts < 1:
            raise ModelError(f"--max-reverts {self.max_reverts}: give at least 1")

    @property
    def mixed(self) -> bool:
        return self.keep_float is not None or self.max_drop is not None


@dataclass(frozen=True)
class DensityRecipe:
    """The unfamiliarity measure (edgeq/density.py): a feature density fitted on labelled data, its linear part
    fused into the int8 graph. On whenever convert has labelled data."""

    density: str = flag("auto", "--density", "auto (default): fit the unfamiliarity measure when there is labelled "
                        "data (--density-data, a labelled --calib, or --val); off: leave it out",
                        choices=("auto", "off"))
    data: str | None = flag(None, "--density-data", "labelled data to fit it on (a class folder, for a detector a "
                            "COCO set); default: --calib when it is labelled, else --val", metavar="DIR")
    rank: int = flag(192, "--density-rank", "principal directions of the feature covariance the measure keeps "
                     "(default 192)", type=int, metavar="D")
    max_samples: int = flag(4000, "--density-samples", "at most this many fitting samples (default 4000)", type=int,
                            metavar="N")
    method: str = flag("auto", "--density-method", "gda: distance to the nearest class mean; knn: distance to the "
                       "K-th nearest of up to 1000 fitting samples, in the same whitened coordinates; auto (default): "
                       "knn for a detector, gda for a classifier", choices=("auto", "gda", "knn"))
    neighbours: int = flag(10, "--density-neighbours", "K of --density-method knn (default 10)", type=int,
                           metavar="K")
    normalise: str = flag("auto", "--density-normalise", "l2: divide the features by their length before the fit "
                          "(a detector only); none: as they are; auto (default): none", choices=("auto", "none", "l2"))

    def __post_init__(self) -> None:
        if self.density not in ("auto", "off"):
            raise ModelError(f"--density {self.density!r}: choose auto or off")
        if self.rank < 1:
            raise ModelError(f"--density-rank {self.rank}: give at least 1")
        if self.max_samples < 20:
            raise ModelError(f"--density-samples {self.max_samples}: give at least 20")
        if self.density == "off" and self.data is not None:
            raise ModelError("--density-data with --density off: drop one of them")
        if self.method not in ("auto", "gda", "knn"):
            raise ModelError(f"--density-method {self.method!r}: choose auto, gda or knn")
        if self.neighbours < 1:
            raise ModelError(f"--density-neighbours {self.neighbours}: give at least 1")
        if self.normalise not in ("auto", "none", "l2"):
            raise ModelError(f"--density-normalise {self.normalise!r}: choose auto, none or l2")


DEFAULT_COMBINE = "fisher"  # chosen with the measures on a selection split (docs/detection.md)


@dataclass(frozen=True)
class UnknownRecipe:
    """Unknown objects (a detector with --val; edgeq/unknown.py): keep a cell by its objectness alone, and publish a
    detection whose evidence says it is none of the known classes as label ``unknown``."""

    unknown: str = flag("auto", "--unknown", "auto (default): a detector converted with --val detects unknown objects "
                        "(objectness threshold and unknown score calibrated on its known objects); off: only what it "
                        "scores as a known class, as before", choices=("auto", "off"))
    measures: str = flag("auto", "--unknown-measures", "comma-separated evidence of an unknown object: class_doubt, "
                         "energy, mutual_information, unfamiliarity, objectness_doubt; auto (default): energy, "
                         "unfamiliarity and objectness_doubt (unfamiliarity when the bundle has a density)",
                         metavar="A,B")
    combine: str = flag(DEFAULT_COMBINE, "--unknown-combine", "how the measures' percentiles make one score: fisher "
                        "(default: -sum log(1 - percentile)) or max", choices=("max", "fisher"))

    def __post_init__(self) -> None:
        from edgeq.unknown import COMBINES, MEASURES

        if self.unknown not in ("auto", "off"):
            raise ModelError(f"--unknown {self.unknown!r}: choose auto or off")
        if self.combine not in COMBINES:
            raise ModelError(f"--unknown-combine {self.combine!r}: choose one of {', '.join(COMBINES)}")
        if self.measures != "auto":
            names = [m.strip() for m in self.measures.split(",") if m.strip()]
            bad = [m for m in names if m not in MEASURES]
            if bad or not names:
                raise ModelError(f"--unknown-measures {self.measures!r}: choose from {', '.join(MEASURES)}")

    def measures_for(self, density: bool, samples: int) -> tuple[str, ...]:
        """The measures, ``auto`` resolved; a measure the model cannot give is refused."""
        if self.measures == "auto":  # chosen on a selection split of the detection benchmark (docs/detection.md)
            return ("energy", "unfamiliarity", "objectness_doubt") if density else ("energy", "objectness_doubt")
        names = tuple(dict.fromkeys(m.strip() for m in self.measures.split(",") if m.strip()))
        if "unfamiliarity" in names and not density:
            raise ModelError("--unknown-measures unfamiliarity: the bundle has no density (--density off, or no "
                             "labelled data); drop it")
        if "mutual_information" in names and samples < 2:
            raise ModelError("--unknown-measures mutual_information: the class head is deterministic; drop it")
        return names


@dataclass(frozen=True)
class ValidationRecipe:
    """Labelled data that checks the quantised model against float and calibrates ``needs_review``."""

    val: str | None = flag(None, "--val", "validation data: a class folder (one subfolder per class), for a detector "
                           "a COCO set: float vs quantised report, needs_review calibrated on it", metavar="DIR")
    review_measure: str = flag("auto", "--review-measure", "uncertainty that flags ambiguous results (default auto: "
                               "density_disagreement for a classifier with a density, else predictive_entropy)",
                               choices=("auto", *REVIEW_MEASURES))
    target_accuracy: float = flag(0.995, "--target-accuracy", "with --val: flag ambiguous results so that the "
                                  "results kept reach this accuracy (default 0.995)", type=float, metavar="A")
    review_budget: float = flag(0.10, "--review-budget", "when --val shows --target-accuracy cannot be reached, flag "
                                "this fraction of the most ambiguous results instead (default 0.10)", type=float,
                                metavar="F")
    review_ood_rate: float = flag(0.05, "--review-ood-rate", "flag results as unfamiliar at this false-flag rate on "
                                  "in-distribution data (default 0.05)", type=float, metavar="F")

    def __post_init__(self) -> None:
        if self.review_measure not in ("auto", *REVIEW_MEASURES):
            raise ModelError(f"--review-measure {self.review_measure!r}: choose auto or one of "
                             f"{', '.join(REVIEW_MEASURES)}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ModelError(f"--target-accuracy {self.target_accuracy}: give a fraction in (0, 1], e.g. 0.995")
        if not 0.0 < self.review_budget < 1.0:
            raise ModelError(f"--review-budget {self.review_budget}: give a fraction in (0, 1), e.g. 0.1")
        if not 0.0 < self.review_ood_rate < 1.0:
            raise ModelError(f"--review-ood-rate {self.review_ood_rate}: give a fraction in (0, 1), e.g. 0.05")

    def measure_for(self, task: str, density: bool) -> str:
        """The ambiguity measure ``--review-measure`` names for a ``task`` model with or without a density.
        ``auto`` is the density's disagreement for a classifier that has one: on benchmarks/unknowns.py it ranks
        wrong results above right ones better than the predictive entropy, so the results left unflagged are more
        accurate at the same review budget."""
        if self.review_measure == "auto":
            return "density_disagreement" if task == "classify" and density else "predictive_entropy"
        if self.review_measure in DENSITY_MEASURES and (task != "classify" or not density):
            what = "a detector" if task != "classify" else "a model converted without a density (--density off)"
            raise ModelError(f"--review-measure {self.review_measure}: only a classifier with a density has it, not "
                             f"{what}; choose auto or predictive_entropy")
        return self.review_measure


GROUPS: dict[str, tuple[type, str]] = {
    "input": (InputRecipe, "model and preprocessing (stored in the bundle; the device applies the same)"),
    "quant": (QuantRecipe, "quantisation"),
    "bayes": (BayesRecipe, "uncertainty (see docs/bayesian.md)"),
    "cluster": (ClusterRecipe, "weight clustering (k-means weight sharing before PTQ)"),
    "repair": (RepairRecipe, "accuracy repair (see docs/accuracy.md)"),
    "density": (DensityRecipe, "unfamiliarity (see docs/uncertainty.md)"),
    "unknown": (UnknownRecipe, "unknown objects (detectors; see docs/detection.md)"),
    "validation": (ValidationRecipe, "validation and needs_review"),
}


@dataclass(frozen=True)
class ConvertRecipe:
    """Everything one ``edgeq convert`` does: the model, the bundle to write, and one recipe per concern."""

    model: str
    output: Path
    quant: QuantRecipe
    input: InputRecipe = InputRecipe()
    bayes: BayesRecipe = BayesRecipe()
    cluster: ClusterRecipe = ClusterRecipe()
    repair: RepairRecipe = RepairRecipe()
    density: DensityRecipe = DensityRecipe()
    unknown: UnknownRecipe = UnknownRecipe()
    validation: ValidationRecipe = ValidationRecipe()
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        if self.threads < 1:
            raise ModelError(f"--threads {self.threads}: give at least 1")
        integer = self.quant.mode in (QuantMode.INT8, QuantMode.UINT8)
        if self.repair.layer_errors and not integer:
            raise QuantizationError(f"--layer-errors measures int8 layers; it does not apply to --quant "
                                    f"{self.quant.mode.value}")
        if self.repair.mixed and not integer:
            raise QuantizationError(f"--keep-float and --max-drop apply to --quant int8 or uint8, not "
                                    f"{self.quant.mode.value}")
        if self.repair.equalize == "on" and not self.quant.mode.needs_calibration:
            raise QuantizationError(f"--equalize helps integer quantisation (it needs --calib); --quant "
                                    f"{self.quant.mode.value} does not quantise activations")
        if self.repair.max_drop is not None and not self.validation.val:
            raise ModelError("--max-drop needs --val DIR: the accuracy drop is measured on it")
        if self.quant.mode.needs_calibration and not self.quant.calib:  # last: the other flags' errors come first
            raise QuantizationError(f"--quant {self.quant.mode.value} needs --calib (an image folder, video or "
                                    ".npy/.npz)")


def _dest(f: dataclasses.Field) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``edgeq convert``'s flags, one argument group per recipe, from the recipes' fields."""
    for recipe_class, title in GROUPS.values():
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(recipe_class):
            meta = dict(f.metadata)
            name, text = meta.pop("flag"), meta.pop("help")
            default = f.default.value if isinstance(f.default, Enum) else f.default
            group.add_argument(name, dest=_dest(f), default=default, help=text, **meta)


def recipe_from_flags(model: str, output: str | Path, threads: int = 1, **flags: Any) -> ConvertRecipe:
    """A :class:`ConvertRecipe` from flag values keyed by their ``dest`` (``calib_samples=100``, ``val="val/"``);
    flags not given keep their defaults, unknown ones are refused."""
    known = {_dest(f) for cls, _ in GROUPS.values() for f in dataclasses.fields(cls)}
    unknown = set(flags) - known
    if unknown:
        raise TypeError(f"unknown convert flag(s): {', '.join(sorted(unknown))}")
    parts = {}
    for key, (recipe_class, _) in GROUPS.items():
        values = {f.name: flags[_dest(f)] for f in dataclasses.fields(recipe_class) if _dest(f) in flags}
        parts[key] = recipe_class(**values)
    return ConvertRecipe(model, Path(output), threads=threads, **parts)
