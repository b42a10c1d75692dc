"""Stage: quantise. The float32 reference from the unmodified weights, then the model in ``--quant``'s mode
(converter/tflite.py runs the TFLite converter), each loaded into the runtime with its roles bound."""

from __future__ import annotations

from ..binding import Binding
from ..products import Calibration, Converted, SourceModel
from ..recipes import QuantMode, QuantRecipe
from ..tflite import convert_model


def reference(binding: Binding, source: SourceModel) -> Converted:
    """The float32 model from the unmodified weights: the size reference and, with ``--val``, the float model run
    through the same preprocessing and runtime. Made first, so that repairs never change it."""
    with binding.ctx.timed("convert_float_reference_s"):
        data = convert_model(source, QuantRecipe(QuantMode.FLOAT32), None)
    return binding.load(data)


def run(recipe: QuantRecipe, binding: Binding, source: SourceModel, calibration: Calibration | None,
        reference: Converted) -> Converted:
    """The model in ``--quant``'s mode (the float reference itself for float32)."""
    if recipe.mode is QuantMode.FLOAT32:
        return reference
    with binding.ctx.timed("convert_s"):
        data = convert_model(source, recipe, calibration)
    return binding.load(data)
