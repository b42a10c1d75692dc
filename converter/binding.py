"""Converted bytes, loaded into the runtime the device uses, with the task's output roles bound: one binding per
head and density, so that every model a conversion makes (the float reference, int8, each repair) is read the
same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeq.manifest import Density, Head
from edgeq.runtime import Model

from .context import ConvertContext
from .products import Converted
from .tasks.base import Task


@dataclass(frozen=True)
class Binding:
    ctx: ConvertContext
    task: Task
    head: Head
    density: Density | None
    runtime: Any  # edgeq.runtime.RuntimeInfo, resolved once per conversion

    def load(self, data: bytes) -> Converted:
        from .tf import quiet_output

        with quiet_output():  # the runtime announces its delegate on stderr
            model = Model(data, num_threads=self.ctx.recipe.threads, runtime=self.runtime)
        outputs = self.task.describe_outputs(model, self.head, self.density)
        return Converted(data, model, tuple(outputs), self.task.bind(self.ctx, model, outputs, self.head, self.density))
