"""``edgeq convert``: one pipeline for every task, as a chain of stages (one module each in converter/stages/),
each a function from what it reads to a frozen product (converter/products.py):

    load -> calibrate -> equalize -> cluster -> export head -> density (fit)
         -> quantise (float reference, then int8; with --qat: fine-tune, then int8 from the ranges it learned)
         -> bias-correct -> mixed precision -> verify -> density (calibrate) -> validate -> write

The task adapter (converter/tasks/) supplies what differs between a classifier and a detector, and its density
taps (stages/taps.py) where the unfamiliarity measure reads features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from edgeq import records
from edgeq.runtime import load_runtime

from .binding import Binding
from .context import ConvertContext
from .products import Calibration, Clustering, ConvertResult, Converted, DensityFit, HeadExport, Repairs
from .recipes import ConvertRecipe
from .stages import (
    bias_correct,
    calibrate,
    cluster,
    density,
    equalize,
    export_head,
    load,
    mixed_precision,
    qat,
    quantise,
    validate,
    verify,
    write,
)
from .tasks import task_for
from .tasks.base import Task


@dataclass(frozen=True)
class _Front:
    """Everything up to the int8 model that bias correction (or QAT) settled on: what the rest of the pipeline
    reads. ``--max-drop`` may make two, without and with equalisation, and keep one."""

    ctx: ConvertContext
    loaded: load.Loaded
    task: Task
    data: Any  # the task's --val data, or None
    calibration: Calibration | None
    equalization: records.Equalization | None
    clustering: Clustering
    head: HeadExport
    taps: Any  # the task's density taps
    fitted: DensityFit
    binding: Binding
    reference: Converted
    scoring: validate.Scoring
    repairs: Repairs
    qat: records.Qat | None = None

    def drop(self) -> float:
        """Top-1 drop on ``--val`` of the int8 model, as --max-drop measures it."""
        return mixed_precision.top1_drop(self.binding.task.top1(self.scoring.of_reference()),
                                         self.scoring.top1(self.repairs.quantised.data),
                                         self.ctx.recipe.repair.drop_type)


def _front(recipe: ConvertRecipe, log: Callable[[str], None], equalizing: bool, again: _Front | None = None
           ) -> _Front:
    """The pipeline up to the int8 model. ``again``: a front already made, whose --val data and calibration
    samples are reused (the model is loaded afresh: equalisation changes its weights in place)."""
    loaded = load.run(recipe, log)
    task = task_for(loaded.source, loaded.info, loaded.detector)
    ctx = ConvertContext(recipe, log, loaded.source.origin, tuple(loaded.labels), loaded.spec)
    if again is not None:
        data, calibration = again.data, again.calibration
    else:
        task.check(ctx, loaded.source)
        if recipe.repair.qat:
            qat.check(recipe.repair, recipe.quant, loaded.source, recipe.cluster.enabled,
                      recipe.density.density != "off", task.name == "detect")
        data = validate.read(recipe.validation, ctx, task, loaded.source)
        calibration = calibrate.run(recipe.quant, ctx)
    source, equalization = equalize.run(equalizing, ctx, loaded.source, calibration)
    clustering = cluster.run(recipe.cluster, ctx, source, recipe.bayes.seed)
    head = export_head.run(recipe.bayes, ctx, task, clustering.source, calibration)
    taps = task.taps(ctx)
    fitted = density.fit(recipe.density, ctx, taps, head.source, head.head)
    binding = Binding(ctx, task, head.head, fitted.block, load_runtime())
    reference = quantise.reference(binding, fitted.source)
    scoring = validate.Scoring(ctx, binding, data, reference)
    trained = None
    if recipe.repair.qat:  # the int8 model comes from fine-tuning, with its learned ranges; no PTQ, no bias correction
        with ctx.timed("qat_s"):
            tflite, trained = qat.run(recipe.repair, recipe.quant, ctx, fitted.source, head.head, calibration, log)
        repairs = Repairs(fitted.source, binding.load(tflite))
    else:
        quantised = quantise.run(recipe.quant, binding, fitted.source, calibration, reference)
        repairs = bias_correct.run(recipe.repair, recipe.quant, binding, fitted.source, calibration, quantised, scoring)
    return _Front(ctx, loaded, task, data, calibration, equalization, clustering, head, taps, fitted, binding,
                  reference, scoring, repairs, trained)


def convert(recipe: ConvertRecipe, log: Callable[[str], None] = print) -> ConvertResult:
    front = _front(recipe, log, recipe.repair.equalize == "on")
    if recipe.repair.equalize == "auto" and recipe.repair.max_drop is not None:
        # the accuracy-aware loop tries equalisation before it keeps any op in float: the same conversion with
        # --equalize, kept when its drop is lower
        plain = front.drop()
        if plain > recipe.repair.max_drop and equalize.applies(front.loaded.source):
            log(f"accuracy-aware: drop {plain:.4f} over the bound {recipe.repair.max_drop:g}: trying --equalize "
                "before any layer in float")
            equalised = _front(recipe, log, True, again=front)
            tried = equalised.drop()
            log(f"accuracy-aware: drop {plain:.4f} without equalisation, {tried:.4f} with: "
                + ("equalised model kept" if tried < plain else "equalisation not kept"))
            if tried < plain:
                front = dataclasses.replace(equalised, equalization=equalised.equalization.model_copy(update={
                    "reason": f"--max-drop: drop {plain:.4f} without, {tried:.4f} with"}))
    ctx, task, binding, reference, calibration = front.ctx, front.task, front.binding, front.reference, front.calibration
    scoring, head, clustering, taps, fitted = front.scoring, front.head, front.clustering, front.taps, front.fitted
    repairs = mixed_precision.run(recipe.repair, recipe.quant, binding, front.repairs, calibration, reference, scoring)
    checked = verify.run(binding, head, clustering, reference, repairs, calibration)
    calibrated = density.calibrate(ctx, taps, fitted, repairs.quantised, reference)
    detector = task.detector(ctx, list(repairs.quantised.outputs))
    validation = validate.run(recipe.validation, ctx, scoring, repairs.quantised, calibrated, detector)
    unknown = None
    if validation is not None:
        detector, calibrated = validation.detector or detector, validation.density or calibrated
        unknown = validation.unknown
    review = validation.review if validation is not None else None
    packed, clustered = cluster.pack(checked.clustering, repairs.quantised)
    blocks = write.manifest_of(ctx, front.loaded.source.name, task.name, reference, repairs, checked, calibration,
                               checked.head.model_copy(update={"review": review}), detector, calibrated, validation,
                               clustered, unknown, front.equalization, front.qat)
    report = {**repairs.report, **({"layers": list(checked.layers)} if checked.layers else {})}
    if clustering.record is not None:
        report["clustering"] = {**blocks["clustering"], "layers": list(clustering.layers)}
    return write.run(ctx, blocks, repairs.quantised, report, packed, repairs.accuracy_aware)
