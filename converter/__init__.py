"""edgeq's host side (installed as ``edgeq.converter``): model loading, calibration, PTQ, bundles.

Importing this package is cheap; TensorFlow is imported only by the functions that convert.

>>> from edgeq.converter import ConvertOptions, convert
>>> convert(ConvertOptions("mobilenet_v2", "model.edgeq", calib="images/", classes=10, weights="none"))
"""

from .pipeline import ConvertOptions, ConvertResult, convert
from .quantize import QuantMode, QuantRecipe

__all__ = ["ConvertOptions", "ConvertResult", "QuantMode", "QuantRecipe", "convert"]
