"""Stage: verify. What was converted is checked before it is written:

- no op stayed float in an integer model (the converter silently keeps ops without an int8 kernel in float);
- the task's own checks (converter/tasks/): a Bayesian head's int8 weights against its float samples and the
  spread between samples before and after quantisation; a detector's output roles against the Keras model;
- clustered kernels hold at most N values per channel once quantised;
- with ``--layer-errors``, each layer's int8 error against float (TFLite's QuantizationDebugger).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeq.errors import QuantizationError

from .quantise import describe_float_ops, float_ops, layer_errors

if TYPE_CHECKING:
    from ..context import ConvertContext

# below about 2 output steps of spread, int8 distorts mutual information (shared/FINDINGS.md)
MIN_SPREAD_STEPS = 2.0


def run(ctx: "ConvertContext") -> None:
    quant = ctx.recipe.quant
    remaining = float_ops(ctx.quantised.model)
    ctx.precision["float_ops"] = sorted({op.name for op in remaining})
    if quant.mode.integer_only and remaining and not quant.allow_float_fallback and not ctx.precision.get("float_layers"):
        raise QuantizationError(
            f"{ctx.source.origin}: ops stay float in --quant {quant.mode.value}: {describe_float_ops(remaining)}; "
            "replace them, or pass --allow-float-fallback to keep them float")
    ctx.task.verify(ctx)
    steps = (ctx.head.get("spread") or {}).get("steps")
    if steps is not None and steps < MIN_SPREAD_STEPS:
        hint = " (try --bayes-layout centred)" if ctx.head.get("layout") == "stacked" else ""
        ctx.log(f"warning: the spread between samples is only {steps:.1f} output quantisation steps; int8 distorts "
                f"mutual information below about {MIN_SPREAD_STEPS:g}{hint}")
    if ctx.clustering is not None:
        from .cluster import check_shipped

        check_shipped(ctx)
    if ctx.recipe.repair.layer_errors and ctx.calibration is not None:
        with ctx.timed("layer_errors_s"):
            layers = layer_errors(ctx.source, ctx.calibration)
        ctx.report["layers"] = layers
        if layers:
            worst = layers[0]
            ctx.log(f"layer errors: {len(layers)} layers; worst {worst['layer']} ({worst['op']}), "
                    f"RMSE {worst['rmse_over_scale']:.2f} quantisation steps")
