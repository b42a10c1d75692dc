"""edgeq: quantized, uncertainty-aware vision models for Raspberry Pi-class devices.

The core package needs numpy only. It holds the bundle contract (:mod:`edgeq.bundle`), the single
preprocessing implementation (:mod:`edgeq.preprocess`), the runtime loader (:mod:`edgeq.runtime`) and the
``edgeq`` CLI. The host side lives in :mod:`edgeq.converter` (TensorFlow) and the Pi side in
:mod:`edgeq.device` (LiteRT, OpenCV, paho-mqtt); neither is imported from here.
"""

from edgeq._version import __version__
from edgeq.errors import (
    BundleError,
    CalibrationError,
    ConfigError,
    DataError,
    EdgeqError,
    ModelError,
    QuantizationError,
    RuntimeLoadError,
    SourceError,
)

__all__ = [
    "__version__",
    "EdgeqError",
    "BundleError",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "ModelError",
    "QuantizationError",
    "RuntimeLoadError",
    "SourceError",
]
