"""Stage: verify. What was converted is checked before it is written:

- no op stayed float in an integer model (the converter silently keeps ops without an int8 kernel in float);
- the task's own checks (converter/tasks/): a Bayesian head's int8 weights against its float samples and the
  spread between samples before and after quantisation; a detector's output roles against the Keras model;
- clustered kernels hold at most N values per channel once quantised;
- with ``--layer-errors``, each layer's int8 error against float (TFLite's QuantizationDebugger).
"""

from __future__ import annotations

from edgeq.errors import QuantizationError

from ..binding import Binding
from ..products import Calibration, Clustering, Converted, HeadExport, Repairs, Verification
from ..tflite import describe_float_ops, float_ops, layer_errors

# below about 2 output steps of spread, int8 distorts mutual information (shared/FINDINGS.md)
MIN_SPREAD_STEPS = 2.0


def run(binding: Binding, export: HeadExport, clustering: Clustering, reference: Converted, repairs: Repairs,
        calibration: Calibration | None) -> Verification:
    ctx, quantised = binding.ctx, repairs.quantised
    quant = ctx.recipe.quant
    remaining = float_ops(quantised.model)
    if quant.mode.integer_only and remaining and not quant.allow_float_fallback and not repairs.float_layers:
        raise QuantizationError(
            f"{repairs.source.origin}: ops stay float in --quant {quant.mode.value}: {describe_float_ops(remaining)}; "
            "replace them, or pass --allow-float-fallback to keep them float")
    head = binding.task.verify(ctx, repairs.source, export, reference, quantised, calibration)
    steps = head.spread.steps if head.spread is not None else None
    if steps is not None and steps < MIN_SPREAD_STEPS:
        hint = " (try --bayes-layout centred)" if head.layout == "stacked" else ""
        ctx.log(f"warning: the spread between samples is only {steps:.1f} output quantisation steps; int8 distorts "
                f"mutual information below about {MIN_SPREAD_STEPS:g}{hint}")
    record = None
    if clustering.record is not None:
        from .cluster import check_shipped

        record = check_shipped(ctx, clustering, quantised)
    layers = None
    if ctx.recipe.repair.layer_errors and calibration is not None:
        with ctx.timed("layer_errors_s"):
            layers = tuple(layer_errors(repairs.source, calibration))
        if layers:
            worst = layers[0]
            ctx.log(f"layer errors: {len(layers)} layers; worst {worst['layer']} ({worst['op']}), "
                    f"RMSE {worst['rmse_over_scale']:.2f} quantisation steps")
    return Verification(tuple(sorted({op.name for op in remaining})), head, record, layers)
