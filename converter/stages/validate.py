"""Stage: validate. The float reference and the quantised model over ``--val`` through the same preprocessing
and runtime, side by side (the manifest's ``validation`` block), and the ``needs_review`` rule calibrated on the
quantised results. The task adapter supplies the pass and the figures (top-1 and calibration for a classifier,
mAP and unknown-object AUROC for a detector).

Each distinct model is run over ``--val`` once: bias correction, the accuracy-aware loop and the final
validation ask for the same models again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..recipes import ValidationRecipe

if TYPE_CHECKING:
    from ..context import ConvertContext, Converted


def read(recipe: ValidationRecipe, ctx: "ConvertContext") -> Any:
    """The validation data, read and checked before the slow part (None without ``--val``)."""
    return ctx.task.read_validation(ctx) if recipe.val else None


def scores(ctx: "ConvertContext", converted: "Converted") -> Any:
    """The task's pass of a quantised model over ``--val``, once per distinct model."""
    if converted.data not in ctx.scored:
        ctx.scored[converted.data] = ctx.task.score(ctx, converted, "quantized")
    return ctx.scored[converted.data]


def top1(ctx: "ConvertContext", data: bytes) -> float:
    """Top-1 accuracy on ``--val`` of converted bytes (NaN without ``--val``)."""
    if ctx.data is None:
        return float("nan")
    converted = ctx.quantised if ctx.quantised is not None and ctx.quantised.data == data else ctx.load(data)
    return ctx.task.top1(scores(ctx, converted))


def reference_scores(ctx: "ConvertContext") -> Any:
    if ctx.reference_scored is None:
        ctx.reference_scored = ctx.task.score(ctx, ctx.reference, "float")
    return ctx.reference_scored


def run(recipe: ValidationRecipe, ctx: "ConvertContext") -> dict[str, Any] | None:
    if ctx.data is None:
        return None
    with ctx.timed("validation_s"):
        return ctx.task.validate(ctx, reference_scores(ctx), scores(ctx, ctx.quantised))
