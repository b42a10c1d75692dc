"""Stage: export head. A Bayesian head becomes K weight samples in plain layers that the TFLite converter
quantises like any other, so one integer invoke yields K logit vectors (docs/bayesian.md); a dense head is
exported as it is. The task adapter builds the layers; this stage picks the layout and records it.

``--bayes-layout auto`` (the default) takes ``stacked`` when its int8 output would resolve the spread between
samples in at least ``AUTO_MIN_STEPS`` steps (one output, a little cheaper), else ``centred`` (the posterior
mean plus per-sample residuals, each output with its own int8 scale).
"""

from __future__ import annotations

from edgeq import records
from edgeq.manifest import Head

from ..context import ConvertContext
from ..products import Calibration, HeadExport, SourceModel
from ..recipes import BayesRecipe
from ..tasks.base import Task

DEFAULT_SAMPLES = 32
# below about one step int8 distorts mutual information (shared/FINDINGS.md); auto keeps a margin
AUTO_MIN_STEPS = 4.0


def run(recipe: BayesRecipe, ctx: ConvertContext, task: Task, source: SourceModel,
        calibration: Calibration | None) -> HeadExport:
    """The source in its exportable form, with the manifest's head block."""
    if source.keras_model is None:  # a SavedModel: converted as it is, a dense head
        return HeadExport(source, Head(type="dense", samples=1, classes=len(ctx.labels), layout="single"))
    if not task.bayes_head(ctx, source):
        return task.export_dense(ctx, source)
    samples = recipe.samples if recipe.samples is not None else DEFAULT_SAMPLES
    layout, choice = recipe.layout, records.LayoutChoice(mode=recipe.layout)
    exported = None
    if layout == "auto":
        layout, choice, stacked = _choose(recipe, ctx, task, source, calibration, samples)
        exported = stacked if layout == "stacked" else None
    if exported is None:
        exported = task.export_bayes(ctx, source, samples, recipe.seed, layout)
    h = exported.head
    ctx.log(f"bayesian head: {h.samples} samples x {h.classes} classes in one pass ({h.layout}, seed "
            f"{recipe.seed}), head {h.head_macs / h.backbone_macs:.1%} of the backbone's multiply-accumulates")
    return HeadExport(exported.source, h.model_copy(update={"layout_choice": choice}), exported.detail)


def _choose(recipe: BayesRecipe, ctx: ConvertContext, task: Task, source: SourceModel,
            calibration: Calibration | None, samples: int) -> tuple[str, records.LayoutChoice, HeadExport | None]:
    """The auto layout, the manifest's record of the choice, and the stacked export when it was built to
    measure the spread (reused if chosen)."""
    if calibration is None:
        return "centred", records.LayoutChoice(
            mode="auto", reason="no calibration data to measure the spread: centred"), None
    stacked = task.export_bayes(ctx, source, samples, recipe.seed, "stacked")
    estimate = task.stacked_steps(stacked, calibration)
    layout = "stacked" if estimate.steps >= AUTO_MIN_STEPS else "centred"
    reason = (f"stacked output would resolve the spread in {estimate.steps} int8 steps "
              f"({'>=' if layout == 'stacked' else '<'} {AUTO_MIN_STEPS:g}): {layout}")
    ctx.log(f"bayes layout: {reason}")
    return layout, records.LayoutChoice(mode="auto", reason=reason, stacked_estimate=estimate,
                                        min_steps=AUTO_MIN_STEPS), stacked
