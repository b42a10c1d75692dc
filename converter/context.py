"""What the convert stages hand each other: one mutable context, filled stage by stage (see pipeline.py)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from edgeq.manifest import OutputSpec
from edgeq.preprocess import PreprocessSpec
from edgeq.runtime import Model, RuntimeInfo

from .recipes import ConvertRecipe

if TYPE_CHECKING:
    from .stages.calibrate import CalibrationSet
    from .stages.load import SourceModel
    from .tasks.base import Task


@dataclass
class Converted:
    """One converted model: its bytes, loaded into the runtime, its outputs with their roles, and the task's
    reader bound to them (a :class:`edgeq.heads.BoundHead` or :class:`edgeq.detection.BoundGrid`)."""

    data: bytes
    model: Model
    outputs: list[OutputSpec]
    bound: Any


@dataclass
class ConvertContext:
    recipe: ConvertRecipe
    log: Callable[[str], None]
    task: "Task"
    source: "SourceModel"
    labels: list[str]
    spec: PreprocessSpec  # float32 preprocessing; the bundle records the model's own input dtype
    runtime: RuntimeInfo | None = None
    calibration: "CalibrationSet | None" = None
    head: dict[str, Any] = field(default_factory=dict)  # the manifest's head block, stage by stage
    export: Any = None  # what the head export keeps for the checks (the Bayesian weight samples)
    clustering: dict[str, Any] | None = None
    reference: Converted | None = None  # float32 from the same weights, before any repair
    quantised: Converted | None = None
    data: Any = None  # the task's validation data, read before the slow part
    scored: dict[bytes, Any] = field(default_factory=dict)  # the task's validation pass, once per distinct model
    reference_scored: Any = None
    precision: dict[str, Any] = field(default_factory=dict)  # repairs, for the manifest's quantization block
    report: dict[str, Any] = field(default_factory=dict)  # extra report.json blocks
    extras: dict[str, Any] = field(default_factory=dict)  # extra manifest blocks (detector)
    validation: dict[str, Any] | None = None
    density: dict[str, Any] | None = None  # the manifest's density block (stages/density.py)
    density_data: Any = None  # its fitting and held-out data
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a stage into ``timings[name]`` (seconds, in the bundle's report)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t0

    def load(self, data: bytes) -> Converted:
        """Load converted bytes into the runtime the device uses, with the task's roles bound."""
        from .tf import quiet_output

        with quiet_output():  # the runtime announces its delegate on stderr
            model = Model(data, num_threads=self.recipe.threads, runtime=self.runtime)
        outputs = self.task.describe_outputs(self, model)
        return Converted(data, model, outputs, self.task.bind(self, model, outputs))
