"""Stage: mixed precision (accuracy repair). int8 everywhere except named layers, which stay float, and the accuracy-aware loop that picks
those layers (after OpenVINO's accuracy-aware quantisation; NNCF's accuracy control supports only OpenVINO and
ONNX models, and for TFLite the QuantizationDebugger leaves it to hand work).

The model is calibrated once; TFLite's ``QuantizationDebugger`` then re-quantises it with a node denylist in well
under a second for small models (its ``options`` setter, no recalibration). A denylisted op runs in float between
a DEQUANTIZE of its input and a QUANTIZE of its output; the model's input and output stay int8, and XNNPACK takes
the float ops and the glue as well.

Per-layer int16 (16x8) is not offered: the TFLite converter quantises 16x8 only for a whole model (``--quant
int16x8``), so a layer that needs more than int8 stays float.

Sensitivity (to rank layers): each quantisable op is quantised *alone* (every other op denylisted) and the
model's output error against float is measured on calibration images. Quantising one layer at a time exposes a
tensor whose range one outlier channel dominates, both at the op that produces it and at the op that reads it;
the QuantizationDebugger's own per-layer statistics cannot, because it feeds each float op the same dequantised
input as the quantised one.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgeq import records
from edgeq.errors import QuantizationError
from edgeq.runtime import Model

from ..binding import Binding
from ..products import Calibration, Converted, Repairs, SourceModel
from ..recipes import QuantMode, QuantRecipe, RepairRecipe
from ..tf import import_tensorflow, quiet_output
from ..tflite import configure, layer_statistics
from .validate import Scoring

DEBUG_SAMPLES = 8


class MixedQuantizer:
    """A calibrated model that can be re-quantised with any set of float (denylisted) nodes."""

    def __init__(self, source: SourceModel, recipe: QuantRecipe, calibration: Calibration) -> None:
        tf = import_tensorflow()
        if source.keras_model is None:
            raise QuantizationError(f"{source.origin}: mixed precision needs a Keras model, not a SavedModel")
        if recipe.mode not in (QuantMode.INT8, QuantMode.UINT8):
            raise QuantizationError(f"mixed precision applies to --quant int8 or uint8, not {recipe.mode.value}")
        self._tf = tf
        data = calibration.samples[:DEBUG_SAMPLES]
        with quiet_output():
            converter = tf.lite.TFLiteConverter.from_keras_model(source.keras_model)
            configure(converter, QuantRecipe(recipe.mode, allow_float_fallback=True), calibration)
            self.debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([x[None, ...]] for x in data),
                debug_options=tf.lite.experimental.QuantizationDebugOptions(fully_quantize=True))
        self.ops = {row["tensor_name"]: row["op_name"] for row in layer_statistics(self.debugger)}
        self.nodes = list(self.ops)  # graph order

    def quantize(self, float_nodes: list[str]) -> bytes:
        with quiet_output():
            self.debugger.options = self._tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=list(float_nodes) or None, fully_quantize=True)
            return bytes(self.debugger.get_nondebug_quantized_model())

    def match(self, pattern: str, flag: str = "--keep-float") -> list[str]:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise QuantizationError(f"{flag} {pattern!r}: not a regular expression ({exc})") from None
        found = [n for n in self.nodes if rx.search(n)]
        if not found:
            sample = ", ".join(short_name(n) for n in self.nodes[:4])
            raise QuantizationError(f"{flag} {pattern!r} matches none of the model's {len(self.nodes)} quantised ops "
                                    f"(names look like: {sample}, ...)")
        return found


def short_name(node: str) -> str:
    """The first of a fused op's names (``a/conv;a/relu`` -> ``a/conv``)."""
    return node.split(";")[0]


def output_error(model: Model, reference: Model, samples: np.ndarray) -> float:
    """Mean |y - y_float| over every output, relative to mean |y_float|, on preprocessed float samples."""
    err = ref = 0.0
    for x in samples:
        outs = model.run(model.input.quantize(x[None, ...]))
        refs = reference.run(x[None, ...].astype(np.float32))
        for name, y in outs.items():
            r = refs[name] if name in refs else next(v for v in refs.values() if v.size == y.size)
            err += float(np.abs(y.reshape(-1) - r.reshape(-1)).mean())
            ref += float(np.abs(r).mean())
    return err / max(ref, 1e-12)


def sensitivity(mq: MixedQuantizer, reference: Model, samples: np.ndarray, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each op quantised alone: its output error, worst first."""
    t0 = time.perf_counter()
    rows = []
    for node in mq.nodes:
        b = mq.quantize([n for n in mq.nodes if n != node])
        with quiet_output():
            m = Model(b)
        rows.append({"node": node, "op": mq.ops[node], "output_error": round(output_error(m, reference, samples), 6)})
    rows.sort(key=lambda r: -r["output_error"])
    log(f"sensitivity: {len(rows)} ops quantised one at a time in {time.perf_counter() - t0:.1f} s; worst "
        f"{short_name(rows[0]['node'])} ({rows[0]['op']}, relative output error {rows[0]['output_error']:.3f})")
    return rows


def top1_drop(float_top1: float, quant_top1: float, drop_type: str) -> float:
    """What ``--max-drop`` bounds: points of top-1 lost (``absolute``), or that as a share of float top-1."""
    d = float_top1 - quant_top1
    return d / float_top1 if drop_type == "relative" and float_top1 > 0 else d


@dataclass
class AccuracyAware:
    """What the accuracy-aware loop did."""

    bound: float
    drop_type: str
    max_reverts: int
    plain_drop: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    best: int = -1  # index into steps; -1: the plain model

    def drop_of(self, float_top1: float, quant_top1: float) -> float:
        return top1_drop(float_top1, quant_top1, self.drop_type)

    @property
    def final_drop(self) -> float:
        return self.plain_drop if self.best < 0 else self.steps[self.best]["drop"]

    @property
    def met(self) -> bool:
        return self.final_drop <= self.bound

    @property
    def float_nodes(self) -> list[str]:
        return [] if self.best < 0 else self.steps[self.best]["float_nodes"]

    def describe(self) -> dict[str, Any]:
        return {
            "bound": self.bound, "drop_type": self.drop_type, "max_reverts": self.max_reverts,
            "plain_drop": round(self.plain_drop, 5), "final_drop": round(self.final_drop, 5), "met": self.met,
            "float_layers": [short_name(n) for n in self.float_nodes],
            "steps": [{k: v for k, v in s.items() if k != "float_nodes"} for s in self.steps],
            "ranking": self.ranking[:20],
        }


def accuracy_aware(mq: MixedQuantizer, reference: Model, samples: np.ndarray, top1_of: Callable[[bytes], float],
                   float_top1: float, plain_top1: float, bound: float, drop_type: str, max_reverts: int,
                   start: list[str], log: Callable[[str], None]) -> tuple[AccuracyAware, bytes | None]:
    """Keep the most sensitive ops in float, one more at a time, until the top-1 drop is within ``bound`` or
    ``max_reverts`` ops are float. Returns the record and the best model's bytes (None: the plain one was best)."""
    aa = AccuracyAware(bound, drop_type, max_reverts, 0.0)
    aa.plain_drop = aa.drop_of(float_top1, plain_top1)
    log(f"accuracy-aware: {drop_type} drop {aa.plain_drop:.4f} vs bound {bound:g}")
    if aa.plain_drop <= bound:
        return aa, None
    aa.ranking = sensitivity(mq, reference, samples, log)
    float_nodes = list(start)
    best_bytes = None
    best_drop = aa.plain_drop
    for row in aa.ranking:
        if len(aa.steps) >= max_reverts:
            break
        if row["node"] in float_nodes:
            continue
        float_nodes.append(row["node"])
        b = mq.quantize(float_nodes)
        top1 = top1_of(b)
        drop = aa.drop_of(float_top1, top1)
        aa.steps.append({"float": short_name(row["node"]), "op": row["op"], "top1": round(top1, 5),
                         "drop": round(drop, 5), "float_nodes": list(float_nodes)})
        log(f"  + {short_name(row['node'])} ({row['op']}) in float: top-1 {top1:.4f}, drop {drop:.4f}")
        if drop < best_drop:
            best_drop, best_bytes, aa.best = drop, b, len(aa.steps) - 1
        if drop <= bound:
            break
    return aa, best_bytes


def run(recipe: RepairRecipe, quant: QuantRecipe, binding: Binding, repairs: Repairs,
        calibration: Calibration | None, reference: Converted, scoring: Scoring) -> Repairs:
    """``--keep-float`` and the accuracy-aware loop (``--max-drop``), from the model bias correction settled on."""
    if not recipe.mixed:
        return repairs
    ctx = binding.ctx
    with ctx.timed("mixed_precision_s"):
        mq = MixedQuantizer(repairs.source, quant, calibration)
        float_nodes = mq.match(recipe.keep_float) if recipe.keep_float is not None else []
        quantised = repairs.quantised
        if float_nodes:
            quantised = binding.load(mq.quantize(float_nodes))
            ctx.log(f"--keep-float: {len(float_nodes)} op(s) in float: {', '.join(short_name(n) for n in float_nodes)}")
        layers = tuple(short_name(n) for n in float_nodes)
        if recipe.max_drop is None:
            return dataclasses.replace(repairs, quantised=quantised, float_layers=layers)
        float_top1 = binding.task.top1(scoring.of_reference())
        aa, best = accuracy_aware(mq, reference.model, calibration.samples[:32], scoring.top1, float_top1,
                                  scoring.top1(quantised.data), recipe.max_drop, recipe.drop_type,
                                  recipe.max_reverts, float_nodes, ctx.log)
        record = aa.describe()
        if best is not None:
            record["cost"] = _cost(quantised.data, best)
            quantised = binding.load(best)
            layers = tuple(record["float_layers"])
    ctx.log(f"accuracy-aware: bound {'reached' if aa.met else 'NOT reached'}: {recipe.drop_type} drop "
            f"{aa.plain_drop:.4f} -> {aa.final_drop:.4f} with {len(layers)} layer(s) in float"
            + (f": {', '.join(layers)}" if layers else ""))
    return dataclasses.replace(repairs, quantised=quantised, float_layers=layers,
                               accuracy_aware=records.AccuracyAware.model_validate(record))


def _cost(plain: bytes, best: bytes) -> dict[str, Any]:
    """Size and latency of the repaired model next to the plain one (interleaved, median)."""
    from edgeq.runtime import interleaved_latency

    with quiet_output():
        plain_m, best_m = Model(plain), Model(best)
    x = [np.zeros(m.input.shape, dtype=m.input.dtype) for m in (plain_m, best_m)]
    t_plain, t_best = interleaved_latency([plain_m, best_m], x, runs=100, warmup=10)
    return {
        "model_bytes": [len(plain), len(best)],
        "latency_ms_median": [round(float(np.median(t_plain)), 4), round(float(np.median(t_best)), 4)],
        "latency_ratio": round(float(np.median(t_best) / np.median(t_plain)), 4),
        "xnnpack": best_m.delegation.to_dict(),
    }
