"""Stage: write. The manifest (validated against edgeq/manifest.py as it is written), the report, clustered
kernels packed when they fit 4 bits, and the bundle written atomically, then read back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeq.bundle import read_bundle, write_bundle
from edgeq.errors import QuantizationError
from edgeq.manifest import Manifest
from edgeq.preprocess import input_spec_for

if TYPE_CHECKING:
    from ..context import ConvertContext


@dataclass
class ConvertResult:
    output: Path
    manifest: Manifest
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def manifest_of(ctx: "ConvertContext") -> dict[str, Any]:
    import tensorflow as tf

    model, source, reference = ctx.quantised.model, ctx.source, ctx.reference
    input_spec = input_spec_for(model, ctx.spec).to_dict()
    input_spec["name"] = model.input.name
    calibration = ctx.calibration.summary() if ctx.calibration is not None else {"count": 0, "source": None}
    manifest = {
        "name": source.name, "source": source.origin, "task": ctx.task.name, "labels": ctx.labels,
        "input": input_spec, "outputs": [o.model_dump() for o in ctx.quantised.outputs], "head": ctx.head,
        "quantization": {**ctx.recipe.quant.describe(), **ctx.precision}, "calibration": calibration,
        "converter": {"tensorflow": str(tf.__version__)},
        "sizes": {"float32_tflite": len(reference.data), "model_tflite": len(ctx.quantised.data),
                  "ratio_to_float32": round(len(ctx.quantised.data) / len(reference.data), 4)},
        **ctx.extras,
    }
    if ctx.validation is not None:
        manifest["validation"] = ctx.validation
    if ctx.clustering is not None:
        manifest["clustering"] = {k: v for k, v in ctx.clustering.items() if k != "layers"}
    if ctx.density is not None:
        manifest["density"] = ctx.density
    return manifest


def run(ctx: "ConvertContext") -> ConvertResult:
    from .cluster import pack

    manifest = manifest_of(ctx)
    model = ctx.quantised.model
    packed = pack(ctx)
    ctx.timings["total_s"] = time.perf_counter() - ctx.started
    report = {
        "ops": [{"index": op.index, "op": op.name, "operands": list(op.operand_types),
                 "results": list(op.result_types)} for op in model.ops],
        "runtime": model.describe(), "sizes": manifest["sizes"],
        "timings": {k: round(v, 3) for k, v in ctx.timings.items()}, "validation": ctx.validation, **ctx.report,
    }
    if ctx.clustering is not None:
        report["clustering"] = ctx.clustering
    output = ctx.recipe.output
    write_bundle(output, manifest, ctx.quantised.data, report, packed)
    written = read_bundle(output).manifest
    aa = ctx.precision.get("accuracy_aware")
    if aa is not None and not aa["met"] and not ctx.recipe.repair.best_effort:
        r = ctx.recipe.repair
        raise QuantizationError(
            f"--max-drop {r.max_drop:g}: not reached after trying {len(aa['steps'])} layer(s) in float "
            f"(--max-reverts {r.max_reverts}); best {aa['drop_type']} drop {aa['final_drop']:.4f} "
            f"({len(aa['float_layers'])} float), kept in {output}; raise --max-reverts, or accept it with --best-effort")
    return ConvertResult(output, written, report, ctx.timings)
