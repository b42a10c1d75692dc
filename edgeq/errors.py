"""One exception tree for everything edgeq reports to a user.

Every message is a single line that names the file or field at fault and says what to do next;
the CLI prints it as ``edgeq: error: <message>`` and exits non-zero without a traceback.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base of every error edgeq raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ModelError(EdgeqError):
    """The source model is missing, unreadable, or has a shape edgeq cannot use."""


class QuantizationError(EdgeqError):
    """Conversion failed, or ops stayed float where full-integer was asked for."""


class CalibrationError(EdgeqError):
    """The calibration data is missing, empty, or does not match the model's input."""


class BundleError(EdgeqError):
    """A ``.edgeq`` bundle is truncated, tampered with, of an unknown schema, or cannot be written."""


class RuntimeLoadError(EdgeqError):
    """No TFLite runtime could be imported, or the model could not be loaded into it."""


class DataError(EdgeqError):
    """An evaluation or validation data folder is empty or does not match the bundle's labels."""


class ConfigError(EdgeqError):
    """A device configuration file or flag is invalid."""

    exit_code = 2


class DiskFullError(ConfigError):
    """No room on the spool's disk to start. A service unit does not restart on its exit status (3, systemd's
    RestartPreventExitStatus): restarting every few seconds frees no space; edgeq doctor and the journal say why."""

    exit_code = 3


class SourceError(EdgeqError):
    """A camera, stream, video file or image folder cannot be opened or read."""
