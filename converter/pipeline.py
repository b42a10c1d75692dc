"""``edgeq convert``: one pipeline for every task, as a chain of stages (one module each in converter/stages/),
each a function from what it reads to a frozen product (converter/products.py):

    load -> calibrate -> cluster -> export head -> density (fit) -> quantise (float reference, then int8)
         -> bias-correct -> mixed precision -> verify -> density (calibrate) -> validate -> write

The task adapter (converter/tasks/) supplies what differs between a classifier and a detector, and its density
taps (stages/taps.py) where the unfamiliarity measure reads features.
"""

from __future__ import annotations

from typing import Callable

from edgeq.runtime import load_runtime

from .binding import Binding
from .context import ConvertContext
from .products import ConvertResult
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
    write,
)
from .tasks import task_for


def convert(recipe: ConvertRecipe, log: Callable[[str], None] = print) -> ConvertResult:
    loaded = load.run(recipe, log)
    task = task_for(loaded.source, loaded.info, loaded.detector)
    ctx = ConvertContext(recipe, log, loaded.source.origin, tuple(loaded.labels), loaded.spec)
    task.check(ctx, loaded.source)
    data = validate.read(recipe.validation, ctx, task, loaded.source)
    calibration = calibrate.run(recipe.quant, ctx)
    clustering = cluster.run(recipe.cluster, ctx, loaded.source, recipe.bayes.seed)
    head = export_head.run(recipe.bayes, ctx, task, clustering.source, calibration)
    taps = task.taps(ctx)
    fitted = density.fit(recipe.density, ctx, taps, head.source, head.head)
    binding = Binding(ctx, task, head.head, fitted.block, load_runtime())
    reference = quantise.reference(binding, fitted.source)
    quantised = quantise.run(recipe.quant, binding, fitted.source, calibration, reference)
    scoring = validate.Scoring(ctx, binding, data, reference)
    repairs = bias_correct.run(recipe.repair, recipe.quant, binding, fitted.source, calibration, quantised, scoring)
    repairs = mixed_precision.run(recipe.repair, recipe.quant, binding, repairs, calibration, reference, scoring)
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
    blocks = write.manifest_of(ctx, loaded.source.name, task.name, reference, repairs, checked, calibration,
                               checked.head.model_copy(update={"review": review}), detector, calibrated, validation,
                               clustered, unknown)
    report = {**repairs.report, **({"layers": list(checked.layers)} if checked.layers else {})}
    if clustering.record is not None:
        report["clustering"] = {**blocks["clustering"], "layers": list(clustering.layers)}
    return write.run(ctx, blocks, repairs.quantised, report, packed, repairs.accuracy_aware)
