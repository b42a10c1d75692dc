"""Stage: calibrate. Calibration data for post-training quantisation, always through the core preprocessor.

``--calib`` may be an image folder (jpg/png/bmp, recursive), a video file (frames sampled evenly across it),
or a ``.npy``/``.npz`` array of uint8 images in RGB order, shaped (N, H, W) or (N, H, W, C).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgeq.errors import CalibrationError, SourceError
from edgeq.preprocess import VIDEO_SUFFIXES, Preprocessor, PreprocessSpec, list_images, read_image, to_channels

from ..context import ConvertContext
from ..data.datasets import progress
from ..products import Calibration
from ..recipes import QuantRecipe

MIN_SAMPLES = 10


def run(recipe: QuantRecipe, ctx: ConvertContext) -> Calibration | None:
    """The calibration samples a ``--quant`` mode needs (None for the modes that need none), timed and logged."""
    if not recipe.mode.needs_calibration:
        return None
    with ctx.timed("calibration_s"):
        calibration = load_calibration(recipe.calib, ctx.spec, recipe.calib_samples)
    ctx.log(f"calibration: {len(calibration.samples)} samples from {calibration.source} ({calibration.kind})")
    return calibration


def load_calibration(path: str | Path, spec: PreprocessSpec, max_samples: int = 200) -> Calibration:
    """Read up to ``max_samples`` calibration samples from ``path`` and preprocess them (float32)."""
    if max_samples < MIN_SAMPLES:
        raise CalibrationError(f"--calib-samples must be at least {MIN_SAMPLES}, got {max_samples}")
    path = Path(path)
    float_spec = spec.with_dtype("float32")
    if not path.exists():
        raise CalibrationError(f"--calib {path}: not found; give an image folder, a video file or a .npy/.npz file")
    if path.is_dir():
        frames, skipped = _from_folder(path, spec.channels, max_samples)
        kind = "folder"
    elif path.suffix.lower() in (".npy", ".npz"):
        frames, skipped, kind = _from_array(path, spec.channels, max_samples), 0, "array"
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        frames, skipped, kind = _from_video(path, spec.channels, max_samples), 0, "video"
    else:
        raise CalibrationError(
            f"--calib {path}: unknown kind {path.suffix!r}; give an image folder, a video file or a .npy/.npz file"
        )
    if len(frames) < MIN_SAMPLES:
        raise CalibrationError(
            f"--calib {path}: only {len(frames)} usable samples (need at least {MIN_SAMPLES}); add more images"
        )
    samples = Preprocessor(float_spec).batch(frames)
    return Calibration(samples, str(path), kind, skipped)


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def _from_folder(path: Path, channels: int, max_samples: int) -> tuple[list[np.ndarray], int]:
    files = list_images(path)
    if not files:
        raise CalibrationError(f"--calib {path}: no jpg/png/bmp images in the folder")
    chosen = [files[i] for i in evenly_spaced(len(files), max_samples)]
    frames: list[np.ndarray] = []
    bad: list[Path] = []
    for f in progress(chosen, len(chosen), "calibration"):
        try:
            image = read_image(f)
        except SourceError:
            bad.append(f)
            continue
        frames.append(to_channels(image, channels, source=str(f)))
    if bad:
        print(
            f"edgeq: warning: skipped {len(bad)} unreadable image(s) in {path} (first: {bad[0].name})",
            file=sys.stderr,
        )
    return frames, len(bad)


def _from_video(path: Path, channels: int, max_samples: int) -> list[np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise CalibrationError(f"--calib {path}: cannot open the video (corrupt or unsupported codec)")
    try:
        frames_all: list[np.ndarray] = []
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        wanted = set(evenly_spaced(total, max_samples)) if total > 0 else None
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if wanted is None or index in wanted:
                frames_all.append(to_channels(frame, channels, source=f"{path} frame {index}"))
            index += 1
    finally:
        capture.release()
    if wanted is None and len(frames_all) > max_samples:
        frames_all = [frames_all[i] for i in evenly_spaced(len(frames_all), max_samples)]
    return frames_all


def _from_array(path: Path, channels: int, max_samples: int) -> list[np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CalibrationError(f"--calib {path}: cannot read the array ({exc.__class__.__name__})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        if not keys:
            raise CalibrationError(f"--calib {path}: the .npz holds no arrays")
        key = next((k for k in ("images", "x", "x_train") if k in keys), keys[0])
        array = loaded[key]
    else:
        array = loaded
    if array.dtype != np.uint8:
        raise CalibrationError(f"--calib {path}: array dtype is {array.dtype}; give uint8 images (0-255, RGB)")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise CalibrationError(
            f"--calib {path}: array shape {array.shape} is not (N, H, W) or (N, H, W, C) with 1 or 3 channels; "
            f"the model takes {channels}"
        )
    chosen = evenly_spaced(len(array), max_samples)
    return [to_channels(np.ascontiguousarray(array[i][..., ::-1]), channels, source=f"{path}[{i}]") for i in chosen]
