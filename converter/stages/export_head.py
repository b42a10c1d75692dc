"""Stage: export head. A Bayesian head becomes K weight samples in plain layers that the TFLite converter
quantises like any other, so one integer invoke yields K logit vectors (docs/bayesian.md); a dense head is
exported as it is. The task adapter builds the layers; this stage picks the layout and records it.

``--bayes-layout auto`` (the default) takes ``stacked`` when its int8 output would resolve the spread between
samples in at least ``AUTO_MIN_STEPS`` steps (one output, a little cheaper), else ``centred`` (the posterior
mean plus per-sample residuals, each output with its own int8 scale).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..recipes import BayesRecipe

if TYPE_CHECKING:
    from ..context import ConvertContext
    from ..tasks.base import HeadExport

DEFAULT_SAMPLES = 32
# below about one step int8 distorts mutual information (shared/FINDINGS.md); auto keeps a margin
AUTO_MIN_STEPS = 4.0


def run(recipe: BayesRecipe, ctx: "ConvertContext") -> None:
    """Replace ``ctx.source``'s model by its exportable form; fill ``ctx.head`` and ``ctx.export``."""
    task = ctx.task
    if ctx.source.keras_model is None or not task.bayes_head(ctx):
        exported = task.export_dense(ctx) if ctx.source.keras_model is not None else None
        ctx.head = dict(exported.head) if exported else {"type": "dense", "samples": 1, "classes": len(ctx.labels),
                                                         "layout": "single"}
        if exported is not None:
            _replace_model(ctx, exported)
        return
    samples = recipe.samples if recipe.samples is not None else DEFAULT_SAMPLES
    layout, choice = recipe.layout, {"mode": recipe.layout}
    exported = None
    if layout == "auto":
        layout, choice, stacked = _choose(recipe, ctx, samples)
        exported = stacked if layout == "stacked" else None
    if exported is None:
        exported = task.export_bayes(ctx, samples, recipe.seed, layout)
    ctx.head = {**exported.head, "layout_choice": choice}
    ctx.export = exported.detail
    h = exported.head
    ctx.log(f"bayesian head: {h['samples']} samples x {h['classes']} classes in one pass ({h['layout']}, seed "
            f"{recipe.seed}), head {h['head_macs'] / h['backbone_macs']:.1%} of the backbone's multiply-accumulates")
    _replace_model(ctx, exported)


def _choose(recipe: BayesRecipe, ctx: "ConvertContext", samples: int) -> tuple[str, dict[str, Any], Any]:
    """The auto layout, the manifest's record of the choice, and the stacked export when it was built to
    measure the spread (reused if chosen)."""
    if ctx.calibration is None:
        return "centred", {"mode": "auto", "reason": "no calibration data to measure the spread: centred"}, None
    stacked = ctx.task.export_bayes(ctx, samples, recipe.seed, "stacked")
    estimate = ctx.task.stacked_steps(ctx, stacked)
    layout = "stacked" if estimate["steps"] >= AUTO_MIN_STEPS else "centred"
    reason = (f"stacked output would resolve the spread in {estimate['steps']} int8 steps "
              f"({'>=' if layout == 'stacked' else '<'} {AUTO_MIN_STEPS:g}): {layout}")
    ctx.log(f"bayes layout: {reason}")
    return layout, {"mode": "auto", "reason": reason, "stacked_estimate": estimate, "min_steps": AUTO_MIN_STEPS}, stacked


def _replace_model(ctx: "ConvertContext", exported: "HeadExport") -> None:
    ctx.source = dataclasses.replace(ctx.source, keras_model=exported.keras_model)
