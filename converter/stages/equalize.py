"""Stage: equalize. Cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization"), ``--equalize``.

Where a convolution's output channel ``i`` feeds, through an optional batch norm and a ReLU or ReLU6 and nothing
else, the matching input channel of the next convolution (Conv2D -> Conv2D, Conv2D -> depthwise, depthwise ->
Conv2D: MobileNetV2's expand -> depthwise -> project), the channel is divided by ``s_i`` in the first layer and
multiplied by ``s_i`` in the second. ReLU commutes with a positive scale, so the float function is the same; the
scale is chosen so that both layers' weight ranges for that channel become equal, ``s_i = sqrt(r1_i / r2_i)``, which
also brings an outlier channel's activations down to its neighbours' (TFLite quantises activations per tensor, so
one wide channel sets the int8 step of all the others: the failure converter/models/outlier.py builds). Pairs that
share a layer are equalised in turn until the scales settle.

ReLU6 commutes with a scale only where it does not clip: ``ReLU6(x / s) == ReLU6(x) / s`` for every ``x`` up to
``6 * min(1, s)``. The largest input each channel reaches on convert's calibration samples is measured first; a
channel that reaches 6 keeps ``s = 1``, and a channel that would be scaled up is scaled up only as far as keeps it
under 6 (``held`` in the record). The function is then the same on the calibration data, not provably everywhere:
the stage reports the largest change of any output on the samples it checks (``max_abs_output_change``).

The scaling is written into the Keras model's own weights: a batch norm's gamma and beta (TFLite folds them into
the convolution, so the shipped int8 kernel is the equalised one), else the kernel and bias. Layers it does not
touch: grouped convolutions, depthwise multipliers other than 1, a channel read by more than one layer (a
residual branch), any activation but ReLU and ReLU6 (leaky, swish: no positive homogeneity), and a layer's own
built-in ``relu6`` (the input it clips is not a tensor of the graph; a separate ``ReLU(6.0)`` layer is).

Not written by a library: AIMET and NNCF implement CLE for PyTorch and OpenVINO graphs; nothing maintained does it
for Keras 3 models (tfmot has no CLE, and needs tf_keras).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeq import records
from edgeq.errors import ModelError

from ..context import ConvertContext
from ..products import Calibration, SourceModel
from ..tf import batch_norm_weights, consumers, leaf_layers, relu_kind

ROUNDS = 20  # passes over all pairs at most; MobileNetV2's chains settle in a handful
SETTLED = 1e-3  # a pass whose largest |log s| is below this ends the iteration
CHECK_SAMPLES = 64  # samples the ReLU6 maxima are measured on, and as many for the float check
EPS = 1e-12


@dataclass
class _Pair:
    first: Any  # Conv2D or DepthwiseConv2D
    bn: Any | None  # its BatchNormalization, when there is one
    act: str  # "relu" or "relu6"
    act_layer: Any | None  # the layer the activation is (None: the first layer's own activation)
    second: Any  # Conv2D or DepthwiseConv2D
    maxima: np.ndarray | None = None  # per channel: the largest pre-activation on the samples (ReLU6 only)
    scale: np.ndarray | None = None  # the product of every s applied so far
    held: set[int] = field(default_factory=set)
    range_spread: tuple[float, float] = (0.0, 0.0)


def _kind(layer: Any) -> str | None:
    import keras

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise" if layer.depth_multiplier == 1 else None
    if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
        return "conv" if layer.groups == 1 else None
    return None


def _only_consumer(layer: Any) -> Any | None:
    out = consumers(layer)
    return out[0] if len(out) == 1 else None


def find_pairs(model: Any) -> list[_Pair]:
    """Every first layer -> [batch norm] -> ReLU/ReLU6 -> second layer chain the stage can equalise."""
    import keras

    pairs = []
    for layer in leaf_layers(model):
        if _kind(layer) is None:
            continue
        own = getattr(layer.activation, "__name__", None)
        nxt, bn = _only_consumer(layer), None
        if isinstance(nxt, keras.layers.BatchNormalization):
            # a batch norm without gamma (scale=False) cannot carry the channel's scale: left alone
            if own != "linear" or not nxt.scale or tuple(np.atleast_1d(nxt.axis)) not in ((-1,), (3,)):
                continue
            bn, nxt = nxt, _only_consumer(nxt)
        if own == "relu" and bn is None:  # a built-in relu6 hides the input the maxima need: left alone
            act, act_layer, second = own, None, nxt
        elif own == "linear" and nxt is not None and relu_kind(nxt):
            act, act_layer, second = relu_kind(nxt), nxt, _only_consumer(nxt)
        else:
            continue
        if second is None or _kind(second) is None:
            continue
        pairs.append(_Pair(layer, bn, act, act_layer, second))
    return pairs


def _out_range(p: _Pair) -> np.ndarray:
    """Per output channel of the first layer: the largest |weight| once its batch norm is folded in."""
    k = p.first.get_weights()[0]
    r = np.abs(k).max(axis=(0, 1, 2)) if _kind(p.first) == "conv" else np.abs(k[..., 0]).max(axis=(0, 1))
    if p.bn is not None:
        w = batch_norm_weights(p.bn)
        r = r * np.abs(w["gamma"]) / np.sqrt(w["moving_variance"] + p.bn.epsilon)
    return r


def _in_range(p: _Pair) -> np.ndarray:
    """Per input channel of the second layer: the largest |weight|."""
    k = p.second.get_weights()[0]
    return np.abs(k).max(axis=(0, 1, 3)) if _kind(p.second) == "conv" else np.abs(k[..., 0]).max(axis=(0, 1))


def _divide_output(p: _Pair, s: np.ndarray) -> None:
    """The first layer's output channels (after its batch norm) divided by ``s``."""
    if p.bn is not None:
        names = [v.name for v in p.bn.weights]
        w = p.bn.get_weights()
        for j, name in enumerate(names):
            if name in ("gamma", "beta"):
                w[j] = w[j] / s
        p.bn.set_weights(w)
        return
    w = p.first.get_weights()
    w[0] = w[0] / (s if _kind(p.first) == "conv" else s[:, None])
    if len(w) > 1:
        w[1] = w[1] / s
    p.first.set_weights(w)


def _multiply_input(p: _Pair, s: np.ndarray) -> None:
    """The second layer's input channels multiplied by ``s`` (axis 2 of a Conv2D's and of a depthwise kernel)."""
    w = p.second.get_weights()
    w[0] = w[0] * s[:, None]
    p.second.set_weights(w)


def _pre_activation_maxima(model: Any, pairs: list[_Pair], samples: np.ndarray) -> None:
    """Each ReLU6 pair's per-channel maximum input to its activation, on ``samples`` (the model run once)."""
    import keras

    need = [p for p in pairs if p.act == "relu6"]
    if not need:
        return
    by_owner: dict[int, tuple[list[Any], list[_Pair]]] = {}
    for p in need:
        chain = _models_to(model, p.first)
        by_owner.setdefault(id(chain[-1]), (chain, []))[1].append(p)
    for chain, group in by_owner.values():
        inputs = samples  # what the innermost model receives: each nested model's input, run from the top
        for parent, child in zip(chain, chain[1:]):
            inputs = keras.Model(parent.input, child._inbound_nodes[0].input_tensors[0])(inputs)
        tensors = [p.act_layer._inbound_nodes[0].input_tensors[0] for p in group]  # ReLU6 is always a layer here
        outs = keras.Model(chain[-1].input, tensors)(inputs)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for p, o in zip(group, outs):
            p.maxima = np.asarray(o).reshape(-1, np.asarray(o).shape[-1]).max(axis=0)


def _models_to(model: Any, layer: Any) -> list[Any]:
    """The chain of (nested) functional models from ``model`` down to the one whose graph holds ``layer``."""
    import keras

    if any(lay is layer for lay in model.layers):
        return [model]
    for lay in model.layers:
        if isinstance(lay, keras.Model) and any(x is layer for x in leaf_layers(lay)):
            return [model, *_models_to(lay, layer)]
    raise ModelError(f"--equalize: layer {layer.name} not found in the model")


def _spread(r: np.ndarray) -> float:
    """How unequal a layer's channel ranges are: the widest over the median (1: all alike)."""
    live = r[r > EPS]
    return float(live.max() / np.median(live)) if live.size else 1.0


def equalise(model: Any, samples: np.ndarray) -> list[_Pair]:
    """In place: every pair of ``model`` equalised (see the module's docstring); the pairs, with what was done."""
    pairs = find_pairs(model)
    _pre_activation_maxima(model, pairs, samples)
    for p in pairs:
        p.scale = np.ones_like(_out_range(p))
        p.range_spread = (_spread(_out_range(p)), 0.0)
    for _ in range(ROUNDS):
        moved = 0.0
        for p in pairs:
            r1, r2 = _out_range(p), _in_range(p)
            s = np.where((r1 > EPS) & (r2 > EPS), np.sqrt(np.maximum(r1, EPS) / np.maximum(r2, EPS)), 1.0)
            if p.maxima is not None:  # ReLU6: keep what it clips unchanged (the module's docstring)
                m = p.maxima / p.scale  # the maxima as the layer now gives them
                clips = m >= 6.0
                floor = m / 6.0
                p.held |= set(np.flatnonzero(clips | (s < floor)).tolist())
                s = np.where(clips, 1.0, np.maximum(s, floor))
            _divide_output(p, s)
            _multiply_input(p, s)
            p.scale = p.scale * s
            moved = max(moved, float(np.abs(np.log(s)).max(initial=0.0)))
        if moved < SETTLED:
            break
    for p in pairs:
        p.range_spread = (p.range_spread[0], _spread(_out_range(p)))
    return pairs


def applies(source: SourceModel) -> bool:
    """Whether ``source`` has a pair to equalise (a Keras model; a SavedModel has no layers to rescale)."""
    return source.keras_model is not None and bool(find_pairs(source.keras_model))


def run(enabled: bool, ctx: ConvertContext, source: SourceModel, calibration: Calibration | None,
        ) -> tuple[SourceModel, records.Equalization | None]:
    """``--equalize``: ``source`` with its Keras model equalised in place, and the manifest's record. The ReLU6
    maxima come from the calibration samples; the float check runs on ``--val`` (else on calibration samples the
    maxima did not see, when there are any)."""
    if not enabled:
        return source, None
    if source.keras_model is None:
        raise ModelError(f"--equalize: {source.origin} is a SavedModel; equalisation needs a Keras model (.keras)")
    if calibration is None or not len(calibration.samples):
        raise ModelError("--equalize needs calibration samples (--calib) to keep ReLU6 unchanged")
    if not find_pairs(source.keras_model):
        ctx.log(f"equalize: warning: {source.name} has no conv -> ReLU/ReLU6 -> conv pair to equalise; converting it "
                "as it is")
        return source, None
    samples = np.asarray(calibration.samples[:CHECK_SAMPLES], dtype=np.float32)
    if ctx.recipe.validation.val:
        from .calibrate import load_calibration

        check, where = load_calibration(ctx.recipe.validation.val, ctx.spec, CHECK_SAMPLES).samples, "--val"
    elif len(calibration.samples) > CHECK_SAMPLES:
        check, where = calibration.samples[CHECK_SAMPLES:2 * CHECK_SAMPLES], "calibration samples not used for the maxima"
    else:
        check, where = samples, "the calibration samples the maxima came from"
    check = np.asarray(check, dtype=np.float32)
    model = source.keras_model
    with ctx.timed("equalize_s"):
        before = _outputs(model, check)
        pairs = equalise(model, samples)
        after = _outputs(model, check)
    change = max(float(np.abs(a - b).max()) for a, b in zip(after, before))
    largest = max(float(np.abs(b).max()) for b in before)
    layers = [records.EqualizedPair(first=p.first.name, second=p.second.name, activation=p.act,
                                    channels=int(p.scale.size), scaled=int((np.abs(np.log(p.scale)) > 1e-6).sum()),
                                    held=len(p.held), spread_before=round(p.range_spread[0], 3),
                                    spread_after=round(p.range_spread[1], 3)) for p in pairs]
    record = records.Equalization(pairs=len(pairs), checked_on=f"{len(check)} {where}",
                                  max_abs_output_change=float(f"{change:.3g}"),
                                  relative_output_change=float(f"{change / max(largest, EPS):.3g}"), layers=layers)
    ctx.log(f"equalize: {len(pairs)} layer pairs, {sum(x.scaled for x in layers)} channels rescaled "
            f"({sum(x.held for x in layers)} held back by ReLU6); largest output change on {len(check)} {where}: "
            f"{change:.3g} ({record.relative_output_change:.3g} of the largest output)")
    return source, record


def _outputs(model: Any, samples: np.ndarray) -> list[np.ndarray]:
    out = model(samples, training=False)
    out = out if isinstance(out, (list, tuple)) else [out]
    return [np.asarray(o, dtype=np.float64) for o in out]
