"""Stage: write. The manifest assembled from the stages' typed blocks (validated as a whole as it is built), the
report, clustered kernels packed when they fit 4 bits, and the bundle written atomically, then read back."""

from __future__ import annotations

import time
from typing import Any

from edgeq import records
from edgeq.bundle import read_bundle, write_bundle
from edgeq.errors import QuantizationError
from edgeq.manifest import Density, Detector, Head, InputSpec, Quantization, Unknown
from edgeq.preprocess import input_spec_for

from ..context import ConvertContext
from ..products import Calibration, ConvertResult, Converted, Repairs, Validation, Verification


def quantization_block(ctx: ConvertContext, repairs: Repairs, verification: Verification,
                       equalization: records.Equalization | None = None, qat: records.Qat | None = None
                       ) -> Quantization:
    return Quantization(**ctx.recipe.quant.describe(), float_ops=verification.float_ops, equalization=equalization,
                        qat=qat,
                        bias_correction=repairs.bias_correction, float_layers=repairs.float_layers,
                        accuracy_aware=repairs.accuracy_aware)


def manifest_of(ctx: ConvertContext, name: str, task: str, reference: Converted, repairs: Repairs,
                verification: Verification, calibration: Calibration | None, head: Head,
                detector: Detector | None, density: Density | None, validation: Validation | None,
                clustering: records.Clustering | None, unknown: Unknown | None = None,
                equalization: records.Equalization | None = None, qat: records.Qat | None = None
                ) -> dict[str, Any]:
    """The manifest's blocks; :func:`edgeq.bundle.write_bundle` adds the schema, version, date and model file."""
    import tensorflow as tf

    quantised = repairs.quantised
    input_spec = InputSpec.model_validate({**input_spec_for(quantised.model, ctx.spec).to_dict(),
                                           "name": quantised.model.input.name})
    blocks: dict[str, Any] = {
        "name": name, "source": ctx.origin, "task": task, "labels": list(ctx.labels), "input": input_spec,
        "outputs": [o.model_dump(mode="json") for o in quantised.outputs], "head": head,
        "quantization": quantization_block(ctx, repairs, verification, equalization, qat),
        "calibration": calibration.summary() if calibration is not None else records.Calibration(count=0),
        "converter": records.ConverterInfo(tensorflow=str(tf.__version__)),
        "sizes": records.Sizes(float32_tflite=len(reference.data), model_tflite=len(quantised.data),
                               ratio_to_float32=round(len(quantised.data) / len(reference.data), 4)),
        "detector": detector, "validation": validation.block if validation is not None else None,
        "clustering": clustering, "density": density, "unknown": unknown,
    }
    return {k: (v.model_dump(mode="json", by_alias=True, exclude_none=True) if hasattr(v, "model_dump") else v)
            for k, v in blocks.items() if v is not None}


def run(ctx: ConvertContext, blocks: dict[str, Any], quantised: Converted, report_blocks: dict[str, Any],
        packed: Any, accuracy_aware: records.AccuracyAware | None) -> ConvertResult:
    """Write the bundle (atomically) and read it back; with ``--max-drop`` not reached (and not ``--best-effort``)
    the bundle is kept, and the run fails saying so."""
    model = quantised.model
    ctx.timings["total_s"] = time.perf_counter() - ctx.started
    report = {
        "ops": [{"index": op.index, "op": op.name, "operands": list(op.operand_types),
                 "results": list(op.result_types)} for op in model.ops],
        "runtime": model.describe(), "sizes": blocks["sizes"],
        "timings": {k: round(v, 3) for k, v in ctx.timings.items()}, "validation": blocks.get("validation"),
        **report_blocks,
    }
    output = ctx.recipe.output
    write_bundle(output, blocks, quantised.data, report, packed)
    written = read_bundle(output).manifest
    aa = accuracy_aware
    if aa is not None and not aa.met and not ctx.recipe.repair.best_effort:
        r = ctx.recipe.repair
        raise QuantizationError(
            f"--max-drop {r.max_drop:g}: not reached after trying {len(aa.steps)} layer(s) in float "
            f"(--max-reverts {r.max_reverts}); best {aa.drop_type} drop {aa.final_drop:.4f} "
            f"({len(aa.float_layers)} float), kept in {output}; raise --max-reverts, or accept it with --best-effort")
    return ConvertResult(output, written, report, ctx.timings)
