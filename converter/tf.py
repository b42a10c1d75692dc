"""TensorFlow and Keras helpers for the host room: a quiet import, silenced native output, and walking a model.

Nothing here imports TensorFlow at module level; every function imports it when called.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Iterator

from edgeq.quiet import verbose


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Silence TensorFlow's and Keras's prints (not with ``edgeq -v``): C++ at the file-descriptor level, Python's
    also where ``sys.stdout`` / ``sys.stderr`` are not the process's own (edgeq called in-process, its output
    captured: Keras's progress bars would otherwise land in the caller's capture)."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# Kernels that give the same numbers for a seed on any x86-64 machine (benchmarks/determinism.py measures it):
# - TensorFlow turns its oneDNN ops on by default only on CPUs with AVX-512 VNNI or AMX, and they pick their
#   kernels by instruction set at run time, so they stay off;
# - its own matrix products call oneDNN's sgemm, which also picks by instruction set: capped at AVX2, which every
#   x86-64 CPU that trains here has;
# - the thread count decides how sums are split between threads, so it is fixed (more threads, another model).
# What stays machine-dependent: Eigen's rsqrt and reciprocal (batch norm, softmax) start from the CPU's own
# approximate instructions, which Intel, AMD and an emulator round differently in the last bit.
# Each is a default: a value already in the environment wins.
PORTABLE_NUMERICS = {
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "TF_NUM_INTRAOP_THREADS": "2",
    "TF_NUM_INTEROP_THREADS": "2",
}


def pin_numerics() -> bool:
    """Set :data:`PORTABLE_NUMERICS` (those not set already) before TensorFlow loads; False when it is loaded
    already, and the settings came too late for this process."""
    for key, value in PORTABLE_NUMERICS.items():
        os.environ.setdefault(key, value)
    return "tensorflow" not in sys.modules


def import_tensorflow() -> Any:
    """Import TensorFlow and Keras once, with portable numerics and without their start-up chatter."""
    if not verbose():  # edgeq -v shows TensorFlow's own lines
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pin_numerics()
    with quiet_output():
        import keras  # noqa: F401
        import tensorflow as tf
    return tf


def leaf_layers(model: Any) -> list[Any]:
    """Every layer of a Keras model, nested models opened up (a MobileNetV2 used as one layer included)."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out


def consumers(layer: Any) -> list[Any]:
    """The layers that read ``layer``'s output, in the functional graph that holds it."""
    return [node.operation for node in layer._outbound_nodes]


def relu_kind(layer: Any) -> str | None:
    """``"relu"`` or ``"relu6"`` for a ReLU layer without slope or threshold (max value none or 6) or an
    ``Activation`` of either: what TFLite fuses into the op before it, and what commutes with a positive scale
    (ReLU6 only below 6). None for anything else."""
    kind = type(layer).__name__
    if kind == "ReLU":
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        return "relu" if layer.max_value is None else "relu6" if float(layer.max_value) == 6.0 else None
    name = getattr(layer.activation, "__name__", None) if kind == "Activation" else None
    return name if name in ("relu", "relu6") else None


def batch_norm_weights(bn: Any) -> dict[str, Any]:
    """A BatchNormalization's arrays by name (``gamma`` and ``beta`` absent when it has no scale or centre)."""
    return dict(zip([v.name for v in bn.weights], bn.get_weights()))


def count_macs(model: Any) -> int:
    """Multiply-accumulates of the Conv2D, DepthwiseConv2D and Dense layers for one image."""
    import keras

    total = 0
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            _, h, w, c = layer.output.shape
            total += int(h) * int(w) * int(c) * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            _, h, w, c = layer.output.shape
            cin = int(layer.input.shape[-1])
            total += int(h) * int(w) * int(c) * kh * kw * cin // max(1, int(layer.groups))
        elif isinstance(layer, keras.layers.Dense):
            total += int(layer.input.shape[-1]) * int(layer.units)
    return total


def first_line(exc: BaseException) -> str:
    """An exception's first line, short enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
