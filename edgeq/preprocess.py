"""The one preprocessing implementation: calibration, evaluation and the device all call it.

A frame goes BGR uint8 (OpenCV's convention, what cameras and ``cv2.imread`` give) -> resize (stretch or
letterbox) -> colour order of the model -> normalisation -> quantisation into the input tensor's dtype.
Normalisation and quantisation are fused into one 256-entry lookup table per channel, so the per-pixel work is
a single ``np.take`` into a preallocated buffer, and the float path used for calibration yields exactly the
values the int8 path quantises.

OpenCV is imported lazily: the core imports with numpy alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.errors import CalibrationError, SourceError

if TYPE_CHECKING:
    from edgeq.runtime import Model


class ColorOrder(str, Enum):
    """Channel order the model expects. ``RGB`` for Keras applications, ``BGR`` for Caffe-style models."""

    RGB = "RGB"
    BGR = "BGR"


# OpenCV's resize filter for each ``interpolation``: ``linear`` (INTER_LINEAR) is the fastest, but OpenCV's x86_64
# and aarch64 builds round some pixels a level apart (42 resizes compared by hand: 32 differed), so a Pi and a
# workstation can feed the model different inputs from the same frame; ``linear_exact`` (INTER_LINEAR_EXACT,
# fixed-point) gave the same pixels on both in all 42, at 1.4-1.7x the whole preprocessing's time
# (benchmarks/resize.py)
INTERPOLATIONS = ("linear", "linear_exact")


class ResizeMode(str, Enum):
    """``stretch`` resizes to the model size ignoring aspect; ``letterbox`` keeps aspect and pads."""

    STRETCH = "stretch"
    LETTERBOX = "letterbox"


# Named normalisations: pixel p in [0, 255] becomes (p - mean) / std.
NORMALIZATIONS: dict[str, tuple[float, float]] = {
    "mobilenet": (127.5, 127.5),  # [-1, 1], MobileNetV2's own preprocess_input
    "unit": (0.0, 255.0),  # [0, 1]
    "raw": (0.0, 1.0),  # [0, 255], for models with a Rescaling layer inside
}

INPUT_DTYPES = ("int8", "uint8", "int16", "float32")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# what calibration and the device's sources read as a video file
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".h264", ".mjpeg")


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a frame into the model's input tensor; stored in the bundle manifest.

    height, width, channels: the model input size (channels 1 or 3).
    color_order: ``RGB`` or ``BGR``.
    resize: ``stretch`` or ``letterbox``.
    mean, std: per-channel normalisation, ``(p - mean) / std`` with p in [0, 255].
    dtype: ``int8``, ``uint8``, ``int16`` or ``float32``, the input tensor's type.
    scale, zero_point: the input tensor's quantisation, ``q = round(x / scale) + zero_point``; ignored for float32.
    pad_value: pixel value (0-255) of letterbox padding.
    interpolation: ``linear`` or ``linear_exact`` (see ``INTERPOLATIONS``); a manifest without it means linear.
    """

    height: int
    width: int
    channels: int = 3
    color_order: ColorOrder = ColorOrder.RGB
    resize: ResizeMode = ResizeMode.STRETCH
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    std: tuple[float, ...] = (127.5, 127.5, 127.5)
    dtype: str = "float32"
    scale: float = 1.0
    zero_point: int = 0
    pad_value: int = 0
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "color_order", ColorOrder(self.color_order))
        object.__setattr__(self, "resize", ResizeMode(self.resize))
        object.__setattr__(self, "mean", _per_channel(self.mean, self.channels, "mean"))
        object.__setattr__(self, "std", _per_channel(self.std, self.channels, "std"))
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise ValueError(f"input channels must be 1 or 3, got {self.channels}")
        if self.dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {self.dtype!r}")
        if any(s == 0 for s in self.std):
            raise ValueError("normalisation std must be non-zero")
        if self.dtype != "float32" and not self.scale > 0:
            raise ValueError(f"input scale must be positive for {self.dtype}, got {self.scale}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.height, self.width, self.channels)

    def with_dtype(self, dtype: str, scale: float = 1.0, zero_point: int = 0) -> PreprocessSpec:
        return dataclasses.replace(self, dtype=dtype, scale=float(scale), zero_point=int(zero_point))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["color_order"] = self.color_order.value
        d["resize"] = self.resize.value
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.interpolation == "linear":
            # the default is left out: bundles that do not ask for another filter stay readable by runtimes
            # older than the field, and one that does is refused by them rather than resized differently
            del d["interpolation"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        # None: a field the manifest leaves out (interpolation), so the default
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                      if k in fields and v is not None})


def _per_channel(value: Any, channels: int, name: str) -> tuple[float, ...]:
    values = (float(value),) if np.isscalar(value) else tuple(float(v) for v in value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"normalisation {name} needs 1 or {channels} values, got {len(values)}")
    return values


@dataclass(frozen=True)
class FrameTransform:
    """How a frame of ``frame_size`` (w, h) was placed into the model input; maps model boxes back to the frame."""

    frame_width: int
    frame_height: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    input_width: int
    input_height: int

    def boxes_to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """Map boxes ``[..., (ymin, xmin, ymax, xmax)]`` normalised to the model input onto the frame, normalised."""
        b = np.asarray(boxes, dtype=np.float32)
        ys = (b[..., 0::2] * self.input_height - self.pad_y) / self.scale_y / self.frame_height
        xs = (b[..., 1::2] * self.input_width - self.pad_x) / self.scale_x / self.frame_width
        out = np.empty_like(b)
        out[..., 0::2] = ys
        out[..., 1::2] = xs
        return np.clip(out, 0.0, 1.0)

    def visible(self, frame_boxes: np.ndarray) -> np.ndarray:
        """``[N]`` bool: which boxes from :meth:`boxes_to_frame` cover at least one frame pixel each way. A box the
        model puts in the letterbox padding is clipped to the frame's edge with no height or width left; it is not
        on the frame, so it is not a detection."""
        b = np.asarray(frame_boxes, dtype=np.float32).reshape(-1, 4)
        return (((b[:, 2] - b[:, 0]) * self.frame_height >= 1.0)
                & ((b[:, 3] - b[:, 1]) * self.frame_width >= 1.0))


class Preprocessor:
    """Turns BGR uint8 frames into model input, writing into one preallocated buffer.

    >>> pre = Preprocessor(spec)
    >>> tensor, transform = pre(frame)          # tensor has shape spec.shape, dtype spec.dtype

    The returned array is the preprocessor's own buffer: copy it if you keep it past the next call.
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.buffer = np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
        self._lut = build_lut(spec)
        c = spec.channels
        self._shared_lut = bool(np.all(self._lut == self._lut[0]))
        self._flat_lut = self._lut[0] if self._shared_lut else self._lut.reshape(-1)
        self._offsets = (np.arange(c, dtype=np.int32) * 256).reshape(1, 1, c)
        self._index = np.empty((spec.height, spec.width, c), dtype=np.int32)
        self._canvas = np.full((spec.height, spec.width, c), spec.pad_value, dtype=np.uint8)

    def __call__(self, frame: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, FrameTransform]:
        spec = self.spec
        image = to_channels(frame, spec.channels)
        resized, transform = self._resize(image)
        if spec.channels == 3 and spec.color_order is ColorOrder.RGB:
            resized = resized[..., ::-1]
        target = self.buffer if out is None else out
        dest = target.reshape(spec.height, spec.width, spec.channels)
        if self._shared_lut:
            np.take(self._flat_lut, resized, out=dest)
        else:
            np.add(resized, self._offsets, out=self._index)
            np.take(self._flat_lut, self._index, out=dest)
        return target, transform

    def batch(self, frames: list[np.ndarray]) -> np.ndarray:
        """Preprocess many frames into an ``(N, H, W, C)`` array (used for calibration and evaluation)."""
        spec = self.spec
        out = np.empty((len(frames), spec.height, spec.width, spec.channels), dtype=np.dtype(spec.dtype))
        for i, frame in enumerate(frames):
            self(frame, out=out[i : i + 1])
        return out

    def _resize(self, image: np.ndarray) -> tuple[np.ndarray, FrameTransform]:
        import cv2

        spec = self.spec
        h, w = image.shape[:2]
        flag = cv2.INTER_LINEAR_EXACT if spec.interpolation == "linear_exact" else cv2.INTER_LINEAR
        if spec.resize is ResizeMode.STRETCH:
            resized = cv2.resize(image, (spec.width, spec.height), interpolation=flag)
            sx, sy, px, py = spec.width / w, spec.height / h, 0.0, 0.0
        else:
            s = min(spec.width / w, spec.height / h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            px, py = (spec.width - nw) // 2, (spec.height - nh) // 2
            canvas = self._canvas
            canvas[...] = spec.pad_value
            canvas[py : py + nh, px : px + nw] = cv2.resize(image, (nw, nh), interpolation=flag).reshape(
                nh, nw, spec.channels
            )
            resized, sx, sy = canvas, nw / w, nh / h
        resized = resized.reshape(spec.height, spec.width, spec.channels)
        return resized, FrameTransform(w, h, sx, sy, float(px), float(py), spec.width, spec.height)


def build_lut(spec: PreprocessSpec) -> np.ndarray:
    """Per-channel table ``(C, 256)``: pixel value -> normalised (float32) or quantised model input."""
    pixels = np.arange(256, dtype=np.float64)
    mean = np.asarray(spec.mean, dtype=np.float64)[:, None]
    std = np.asarray(spec.std, dtype=np.float64)[:, None]
    normalised = (pixels[None, :] - mean) / std
    if spec.dtype == "float32":
        return normalised.astype(np.float32)
    from edgeq.runtime import quantize_values

    return quantize_values(normalised, spec.scale, spec.zero_point, spec.dtype)


def to_channels(image: np.ndarray, channels: int, source: str = "image") -> np.ndarray:
    """Return ``image`` as uint8 with ``channels`` channels (1 = grey, 3 = BGR).

    Grey images are replicated for colour models and colour images converted for grey models; any other
    channel count (2, 4, ...) is refused, because silently dropping an alpha or depth channel changes the data.
    """
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise CalibrationError(f"{source}: pixel type {image.dtype} is not supported; give 8-bit images")
    have = 1 if image.ndim == 2 else image.shape[2]
    if image.ndim not in (2, 3) or have not in (1, 3):
        raise CalibrationError(
            f"{source}: image has {have} channels but the model takes {channels}; "
            "convert it to 3-channel colour or greyscale first"
        )
    if have == channels:
        return image if image.ndim == 3 else image[:, :, None]
    import cv2

    if channels == 3:
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]


# images larger than this are refused before decoding: a 748 KB PNG can decode to 16000 x 16000 pixels (1.5 GB
# of memory, three times a Pi Zero 2 W's); 50 megapixels is a 8K photo
MAX_IMAGE_PIXELS = 50_000_000


def image_size(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first bytes of a PNG, JPEG or BMP file, without decoding it; None when the
    header is not one of those. (Our own few lines: OpenCV has no header-only read, and the device does not
    install Pillow for it.)"""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] == b"BM" and len(head) >= 26:
        return abs(int.from_bytes(head[18:22], "little", signed=True)), \
            abs(int.from_bytes(head[22:26], "little", signed=True))
    if head[:2] == b"\xff\xd8":  # JPEG: walk the segments to the first start-of-frame
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                return None
            marker, length = head[i + 1], int.from_bytes(head[i + 2:i + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
            i += 2 + length
    return None


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file as uint8, keeping its channels (BGR order for colour). Raises SourceError if
    unreadable, or, before decoding, if its header says it has more than ``max_pixels`` pixels."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    size = image_size(data[:1 << 16].tobytes()) if data.size else None
    if size is not None and size[0] * size[1] > max_pixels:
        raise SourceError(f"{path}: {size[0]} x {size[1]} pixels, over the {max_pixels / 1e6:g}-megapixel cap; "
                          "resize it, or raise max_image_pixels")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise SourceError(f"{path}: not a readable image")
    return image


def list_images(folder: str | Path) -> list[Path]:
    """All jpg/png/bmp files under ``folder``, recursively, in a stable (sorted) order."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def input_spec_for(model: "Model", spec: PreprocessSpec) -> PreprocessSpec:
    """``spec`` with the dtype and quantisation of ``model``'s own input tensor."""
    t = model.input
    dtype = np.dtype(t.dtype).name
    return spec.with_dtype(dtype, t.scale if t.quantized else 1.0, t.zero_point if t.quantized else 0)
