"""What every convert stage may read and nothing changes: the recipe, the log, the model's name and origin, its
class names and preprocessing; and the timings each stage adds its own to. What a stage makes is a product
(converter/products.py), which pipeline.py hands on; the task adapter is passed beside this context."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from edgeq.preprocess import PreprocessSpec

from .recipes import ConvertRecipe


@dataclass(frozen=True)
class ConvertContext:
    recipe: ConvertRecipe
    log: Callable[[str], None]
    origin: str  # where the source model came from (a path, or builtin:mobilenet_v2)
    labels: tuple[str, ...]
    spec: PreprocessSpec  # float32 preprocessing; the bundle records the model's own input dtype
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the bundle's report
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a stage into ``timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t0
