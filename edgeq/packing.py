"""Packed weights: how a clustered bundle ships at a fraction of its int8 size, and how the device rebuilds the
exact model. numpy only.

A clustered int8 kernel holds at most N values per quantisation channel, but each channel's values are spread over
the int8 alphabet by its own scale, so deflate finds little to share. Packing stores, per kernel, a codebook
``[channels, K]`` (each channel's distinct int8 values) and each weight's index into it, 4 bits when K <= 16. The
kernel's bytes in ``model.tflite`` are zeroed (deflate then stores them in almost nothing) and its byte offset is
recorded. At load time the device writes the kernels back into a bytearray; the manifest's sha256 is the full
model's, so a rebuilt model that is not bit-identical is refused.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

PACKED_NAME = "weights.npz"
MAX_CODEBOOK = 16  # 4-bit indices; wider codebooks would not pay


def pack_kernel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(codebook [C, K] int8, indices packed 4-bit uint8, K)``, or None when a channel has more than 16 values."""
    rows = np.moveaxis(np.asarray(w), axis, 0).reshape(w.shape[axis], -1)
    uniques = [np.unique(r) for r in rows]
    k = max(len(u) for u in uniques)
    if k > MAX_CODEBOOK:
        return None
    codebook = np.zeros((len(rows), k), dtype=w.dtype)
    indices = np.empty(rows.shape, dtype=np.uint8)
    for c, (r, u) in enumerate(zip(rows, uniques)):
        codebook[c, : len(u)] = u
        codebook[c, len(u):] = u[-1]
        indices[c] = np.searchsorted(u, r)
    flat = indices.reshape(-1)
    if len(flat) % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] << 4 | flat[1::2]).astype(np.uint8)
    return codebook, packed, k


def unpack_kernel(codebook: np.ndarray, packed: np.ndarray, shape: list[int], axis: int) -> np.ndarray:
    """Inverse of :func:`pack_kernel`: the exact int8 kernel."""
    channels = codebook.shape[0]
    moved = [shape[axis]] + [s for i, s in enumerate(shape) if i != axis]
    per_channel = int(np.prod(moved[1:]))
    flat = np.empty(len(packed) * 2, dtype=np.uint8)
    flat[0::2] = packed >> 4
    flat[1::2] = packed & 0x0F
    indices = flat[: channels * per_channel].reshape(channels, per_channel)
    rows = np.take_along_axis(codebook, indices.astype(np.int64), axis=1)
    return np.moveaxis(rows.reshape(moved), 0, axis)


def pack_model(model_bytes: bytes, kernels: list[tuple[str, np.ndarray, int]]) -> tuple[bytes, bytes, list[dict[str, Any]]]:
    """Pack every kernel (name, int8 array, quantised axis) whose bytes occur exactly once in the model.

    Returns the model with those bytes zeroed, the ``weights.npz`` bytes, and one entry per packed kernel.
    """
    stripped = bytearray(model_bytes)
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict[str, Any]] = []
    for name, w, axis in kernels:
        raw = np.ascontiguousarray(w).tobytes()
        offset = model_bytes.find(raw)
        if offset < 0 or model_bytes.find(raw, offset + 1) >= 0:
            continue  # not found, or ambiguous: leave it in place
        packed = pack_kernel(w, axis)
        if packed is None:
            continue
        codebook, indices, k = packed
        i = len(entries)
        arrays[f"codebook_{i}"], arrays[f"indices_{i}"] = codebook, indices
        stripped[offset: offset + len(raw)] = bytes(len(raw))
        entries.append({"name": name, "offset": offset, "bytes": len(raw), "shape": [int(s) for s in w.shape],
                        "axis": int(axis), "dtype": np.dtype(w.dtype).name, "values": int(k)})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return bytes(stripped), buf.getvalue(), entries


def unpack_model(stripped: bytes, npz_bytes: bytes, entries: list[dict[str, Any]]) -> bytes:
    """Write the packed kernels back at their offsets. Raises ValueError on anything inconsistent."""
    model = bytearray(stripped)
    with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as arrays:
        for i, e in enumerate(entries):
            w = unpack_kernel(arrays[f"codebook_{i}"], arrays[f"indices_{i}"], e["shape"], e["axis"])
            raw = w.astype(np.dtype(e["dtype"])).tobytes()
            if len(raw) != e["bytes"] or e["offset"] + len(raw) > len(model):
                raise ValueError(f"packed kernel {e['name']} does not fit the model")
            model[e["offset"]: e["offset"] + len(raw)] = raw
    return bytes(model)
