"""The runtime loader: one factory for the TFLite interpreter, shared by the converter and the device.

Runtimes are tried in this order, and which one loaded is always reported:

``ai-edge-litert``  (``ai_edge_litert.interpreter``; LiteRT, preferred: its XNNPACK runs int8 graphs)
``tflite-runtime``  (``tflite_runtime.interpreter``; last release 2.14, the fallback where LiteRT has no wheel)
``tensorflow``      (``tensorflow.lite``; host only, never on a device)

Set ``EDGEQ_RUNTIME`` to one of those names to force a runtime.

Tensors are quantised and dequantised with each tensor's own scale and zero point (int8, uint8, int16), and
outputs are found by name, then by shape, never by their index order.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgeq.errors import RuntimeLoadError
from edgeq.quiet import runtime_lines

RUNTIMES: tuple[tuple[str, str], ...] = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow"),
)


@dataclass(frozen=True)
class RuntimeInfo:
    """Which TFLite runtime was imported: ``name`` (see RUNTIMES), its ``version`` and the interpreter class."""

    name: str
    version: str
    interpreter_class: Any = field(repr=False, compare=False)
    op_resolver_type: Any = field(repr=False, compare=False, default=None)


def load_runtime(prefer: str | None = None) -> RuntimeInfo:
    """Import the first available runtime, or ``prefer`` (or ``$EDGEQ_RUNTIME``) if given."""
    prefer = prefer or os.environ.get("EDGEQ_RUNTIME") or None
    names = [n for n, _ in RUNTIMES]
    if prefer is not None and prefer not in names:
        raise RuntimeLoadError(f"unknown runtime {prefer!r}; choose one of {', '.join(names)}")
    candidates = [r for r in RUNTIMES if prefer is None or r[0] == prefer]
    errors = []
    for name, module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or a broken wheel raising at import
            errors.append(f"{name}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if name == "tensorflow":
            interpreter_class = module.lite.Interpreter
            resolver = getattr(module.lite.experimental, "OpResolverType", None)
            version = module.__version__
        else:
            interpreter_class = module.Interpreter
            resolver = getattr(module, "OpResolverType", None)
            version = _distribution_version(name, module_name.split(".")[0])
        return RuntimeInfo(name, version, interpreter_class, resolver)
    raise RuntimeLoadError(
        "no TFLite runtime found (" + "; ".join(errors) + "); install one with: pip install 'edgeq[device]'"
    )


def _distribution_version(dist: str, package: str) -> str:
    module = importlib.import_module(package)
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version(dist)
    except Exception:
        return "unknown"


def quantize_values(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype | str) -> np.ndarray:
    """``q = round(x / scale) + zero_point`` saturated to ``dtype``, rounding half away from zero as TFLite's
    QUANTIZE kernel does."""
    info = np.iinfo(np.dtype(dtype))
    scaled = np.asarray(x, dtype=np.float64) / scale
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor: name, index, shape, numpy dtype and affine quantisation (scale 0 = float)."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale > 0 and np.issubdtype(self.dtype, np.integer)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Real values -> this tensor's dtype: ``q = round(x / scale) + zero_point``, saturated."""
        x = np.asarray(x, dtype=np.float32)
        if not self.quantized:
            return x.astype(self.dtype)
        return quantize_values(x, self.scale, self.zero_point, self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """This tensor's values -> real values: ``x = scale * (q - zero_point)``."""
        q = np.asarray(q)
        if not self.quantized:
            return q.astype(np.float32)
        return (self.scale * (q.astype(np.float32) - self.zero_point)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": np.dtype(self.dtype).name,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


@dataclass(frozen=True)
class OpInfo:
    """One operator of the graph, with the dtypes of its operands and results, and who runs it."""

    index: int
    name: str
    operand_types: tuple[str, ...]
    result_types: tuple[str, ...]
    delegated: bool
    output_names: tuple[str, ...] = ()

    @property
    def is_float(self) -> bool:
        """True when the op computes in float (float operands or results), i.e. it is not integer."""
        return any(t.startswith("float") for t in self.operand_types + self.result_types)


@dataclass(frozen=True)
class Delegation:
    """Whether XNNPACK took the graph: ``cpu_ops`` lists the op names left to the runtime's own kernels."""

    delegate_nodes: int
    total_ops: int
    delegated_ops: int
    cpu_ops: tuple[str, ...]

    @property
    def xnnpack_applied(self) -> bool:
        return self.delegated_ops > 0

    @property
    def whole_graph(self) -> bool:
        return self.total_ops > 0 and self.delegated_ops == self.total_ops

    def to_dict(self) -> dict[str, Any]:
        return {
            "xnnpack_applied": self.xnnpack_applied,
            "whole_graph": self.whole_graph,
            "delegated_ops": self.delegated_ops,
            "total_ops": self.total_ops,
            "cpu_ops": sorted(set(self.cpu_ops)),
        }

    def summary(self) -> str:
        if not self.xnnpack_applied:
            return f"XNNPACK not applied: all {self.total_ops} ops on the reference kernels"
        if self.whole_graph:
            return f"XNNPACK took the whole graph ({self.total_ops} ops)"
        left = ", ".join(sorted(set(self.cpu_ops)))
        return f"XNNPACK took {self.delegated_ops}/{self.total_ops} ops; left to CPU kernels: {left}"


class Model:
    """A loaded ``.tflite`` model ready to invoke, with its tensors, ops and delegation report.

    model_content: the flatbuffer bytes.
    num_threads: interpreter threads (>= 1).
    runtime: a RuntimeInfo from :func:`load_runtime`; loaded if omitted.
    xnnpack: False disables the default delegate, to compare against the reference kernels.
    """

    def __init__(
        self,
        model_content: bytes,
        num_threads: int = 1,
        runtime: RuntimeInfo | None = None,
        xnnpack: bool = True,
    ) -> None:
        if num_threads < 1:
            raise RuntimeLoadError(f"num_threads must be >= 1, got {num_threads}")
        self.runtime = runtime or load_runtime()
        self.num_threads = num_threads
        self.size = len(model_content)
        kwargs: dict[str, Any] = {"model_content": bytes(model_content), "num_threads": num_threads}
        if not xnnpack:
            if self.runtime.op_resolver_type is None:
                raise RuntimeLoadError(f"{self.runtime.name} cannot disable its default delegate")
            kwargs["experimental_op_resolver_type"] = self.runtime.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        started = time.perf_counter()
        try:
            with runtime_lines():  # without LiteRT's "INFO: Created ... XNNPACK delegate" line (edgeq -v shows it)
                self.interpreter = self.runtime.interpreter_class(**kwargs)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
            raise RuntimeLoadError(f"{self.runtime.name} could not load the model: {message}") from None
        self.load_seconds = time.perf_counter() - started
        self.inputs = [_tensor_info(d) for d in self.interpreter.get_input_details()]
        self.outputs = [_tensor_info(d) for d in self.interpreter.get_output_details()]
        self.ops, self.delegation = _analyse_ops(self.interpreter)

    # -- tensors ---------------------------------------------------------------------------------------
    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    def find_output(self, name: str | None = None, shape: Sequence[int] | None = None) -> TensorInfo:
        """The output called ``name``; failing that, the only output of ``shape``. Never by index order."""
        if name is not None:
            for t in self.outputs:
                if t.name == name:
                    return t
        if shape is not None:
            matches = [t for t in self.outputs if _shape_matches(t.shape, shape)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RuntimeLoadError(
                    f"output {name!r}: {len(matches)} outputs have shape {list(shape)}; the model's names changed, "
                    "re-export the bundle"
                )
        have = ", ".join(f"{t.name} {list(t.shape)}" for t in self.outputs)
        raise RuntimeLoadError(f"output {name!r} with shape {shape} not in model (outputs: {have})")

    # -- running ---------------------------------------------------------------------------------------
    def set_input(self, array: np.ndarray) -> None:
        """Copy an already-typed input (e.g. from the Preprocessor) into the input tensor."""
        self.interpreter.set_tensor(self.input.index, array)

    def invoke(self) -> None:
        self.interpreter.invoke()

    def get(self, tensor: TensorInfo) -> np.ndarray:
        """The raw (still quantised) values of an output tensor, copied."""
        return self.interpreter.get_tensor(tensor.index)

    def get_float(self, tensor: TensorInfo) -> np.ndarray:
        return tensor.dequantize(self.interpreter.get_tensor(tensor.index))

    def run(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """Set the input (typed already), invoke, and return every output dequantised, keyed by name."""
        self.set_input(array)
        self.invoke()
        return {t.name: self.get_float(t) for t in self.outputs}

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.name,
            "runtime_version": self.runtime.version,
            "threads": self.num_threads,
            **self.delegation.to_dict(),
        }


def _shape_matches(actual: Sequence[int], wanted: Sequence[int]) -> bool:
    return len(actual) == len(wanted) and all(w in (-1, None, a) for a, w in zip(actual, wanted))


def _tensor_info(d: dict[str, Any]) -> TensorInfo:
    scale, zero_point = d.get("quantization", (0.0, 0))
    return TensorInfo(
        name=d["name"],
        index=int(d["index"]),
        shape=tuple(int(x) for x in d["shape"]),
        dtype=np.dtype(d["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _type_name(t: Any) -> str:
    try:
        return np.dtype(t).name
    except TypeError:
        return str(t)


def _analyse_ops(interpreter: Any) -> tuple[list[OpInfo], Delegation]:
    """List the graph's ops and find which ones a delegate (XNNPACK) replaced.

    The interpreter lists the original nodes plus one ``DELEGATE`` node per delegated partition. A
    partition is everything between the delegate node's inputs and its outputs, so walking back from its
    outputs through producers, stopping at its inputs, yields exactly the ops it took.
    """
    try:
        details = interpreter._get_ops_details()
    except Exception:  # very old runtimes; report nothing rather than guess
        return [], Delegation(0, 0, 0, ())
    originals = [d for d in details if d["op_name"] != "DELEGATE"]
    delegates = [d for d in details if d["op_name"] == "DELEGATE"]
    by_index = {int(d["index"]): d for d in originals}
    producer = {int(t): int(d["index"]) for d in originals for t in d["outputs"]}
    delegated: set[int] = set()
    for node in delegates:
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        seen: set[int] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in boundary:
                continue
            seen.add(tensor)
            op = producer.get(tensor)
            if op is None or op in delegated:
                continue
            delegated.add(op)
            stack.extend(int(t) for t in by_index[op]["inputs"] if int(t) >= 0)
    names = _tensor_names(interpreter)
    ops = [
        OpInfo(
            index=int(d["index"]),
            name=d["op_name"],
            operand_types=tuple(_type_name(t) for t in d.get("operand_types", ())),
            result_types=tuple(_type_name(t) for t in d.get("result_types", ())),
            delegated=int(d["index"]) in delegated,
            output_names=tuple(names.get(int(t), "") for t in d["outputs"]),
        )
        for d in originals
    ]
    cpu_ops = tuple(op.name for op in ops if not op.delegated)
    return ops, Delegation(len(delegates), len(ops), len(delegated), cpu_ops)


def _tensor_names(interpreter: Any) -> dict[int, str]:
    try:
        return {int(d["index"]): str(d["name"]) for d in interpreter.get_tensor_details()}
    except Exception:  # some runtimes refuse details of delegated intermediates
        return {}


def interleaved_latency(
    models: Sequence[Model], inputs: Sequence[np.ndarray], runs: int = 50, warmup: int = 10
) -> list[np.ndarray]:
    """Invoke latency in ms for several models, measured interleaved (A, B, A, B, ...) so drift hits all alike."""
    for model, x in zip(models, inputs):
        model.set_input(x)
        for _ in range(warmup):
            model.invoke()
    times = [np.empty(runs) for _ in models]
    for r in range(runs):
        for i, model in enumerate(models):
            model.set_input(inputs[i])
            t0 = time.perf_counter()
            model.invoke()
            times[i][r] = (time.perf_counter() - t0) * 1000.0
    return times


WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def weight_kernels(model: Model) -> list[tuple[str, str, np.ndarray, int, bool]]:
    """The integer kernels of conv and fully-connected ops: (op, name, values, quantised axis, per-channel)."""
    interp = model.interpreter
    try:
        details = interp._get_ops_details()
    except Exception:
        return []
    tensors = {int(d["index"]): d for d in interp.get_tensor_details()}
    out = []
    for op in details:
        if op["op_name"] not in WEIGHT_OPS or len(op["inputs"]) < 2:
            continue
        d = tensors.get(int(op["inputs"][1]))
        if d is None or np.dtype(d["dtype"]).kind not in "iu":
            continue
        try:
            w = interp.get_tensor(int(d["index"]))
        except ValueError:
            continue
        q = d["quantization_parameters"]
        out.append((op["op_name"], d["name"].split(";")[0], w, int(q.get("quantized_dimension", 0)),
                    len(q["scales"]) > 1))
    return out


def weight_stats(model: Model) -> list[dict[str, Any]]:
    """Per kernel: the number of quantisation channels and the most distinct values any channel holds (what
    weight clustering bounds)."""
    out = []
    for op, name, w, axis, per_channel in weight_kernels(model):
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
        out.append({"op": op, "name": name, "shape": [int(s) for s in w.shape], "channels": int(rows.shape[0]),
                    "max_distinct_per_channel": int(max(len(np.unique(r)) for r in rows))})
    return out
