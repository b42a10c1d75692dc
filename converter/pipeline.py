"""``edgeq convert``: one pipeline for every task, as a list of stages (one module each in converter/stages/).

    load -> calibrate -> cluster -> export head -> density (fit) -> quantise (float reference, then int8)
         -> bias-correct -> mixed precision -> verify -> density (calibrate) -> validate -> write

Each stage takes its recipe (converter/recipes.py) and the context (converter/context.py) and returns what it
made; the task adapter (converter/tasks/) supplies what differs between a classifier and a detector.
"""

from __future__ import annotations

from typing import Callable

from .context import ConvertContext
from .recipes import ConvertRecipe
from .stages import (
    bias_correct,
    calibrate,
    cluster,
    density,
    export_head,
    load,
    mixed_precision,
    quantise,
    validate,
    verify,
)
from .stages.write import ConvertResult
from .stages.write import run as write
from .tasks import task_for


def convert(recipe: ConvertRecipe, log: Callable[[str], None] = print) -> ConvertResult:
    ctx = start(recipe, log)
    ctx.data = validate.read(recipe.validation, ctx)
    ctx.calibration = calibrate.run(recipe.quant, ctx)
    ctx.clustering = cluster.run(recipe.cluster, ctx)
    export_head.run(recipe.bayes, ctx)
    density.run(recipe.density, ctx)
    ctx.reference = quantise.reference(ctx)
    ctx.quantised = quantise.run(recipe.quant, ctx)
    bias_correct.run(recipe.repair, ctx)
    mixed_precision.run(recipe.repair, ctx)
    verify.run(ctx)
    density.calibrate(ctx)
    ctx.validation = validate.run(recipe.validation, ctx)
    return write(ctx)


def start(recipe: ConvertRecipe, log: Callable[[str], None]) -> ConvertContext:
    """The load stage, then the task adapter for what was loaded, which refuses what it cannot do yet."""
    loaded = load.run(recipe, log)
    task = task_for(loaded.source, loaded.info, loaded.detector)
    ctx = ConvertContext(recipe, log, task, loaded.source, loaded.labels, loaded.spec)
    task.check(ctx)
    return ctx
