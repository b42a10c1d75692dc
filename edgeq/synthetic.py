"""Procedurally generated images and videos: shapes on textured backgrounds.

They serve the demo, the tests and the benchmarks on a machine without downloads. Each image shows one
dominant shape whose kind is its class, so a labelled folder made here is learnable and checkable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient plus band-limited noise and a few stripes: cheap texture."""
    import cv2

    base = rng.integers(40, 200, size=3)
    ramp = np.linspace(0, rng.integers(20, 60), width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 18, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    image = base[None, None, :] + ramp + noise
    for _ in range(rng.integers(0, 4)):
        y = int(rng.integers(0, height))
        image[y : y + int(rng.integers(1, 4))] += rng.integers(-40, 40)
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_shape(
    image: np.ndarray, shape: str, center: tuple[int, int], size: int, color: tuple[int, int, int], angle: float = 0.0
) -> tuple[int, int, int, int]:
    """Draw ``shape`` in place; return its box (xmin, ymin, xmax, ymax) in pixels."""
    import cv2

    cx, cy = center
    if shape == "circle":
        cv2.circle(image, (cx, cy), size, color, -1, cv2.LINE_AA)
    elif shape == "ring":
        cv2.circle(image, (cx, cy), size, color, max(2, size // 3), cv2.LINE_AA)
    else:
        if shape == "square":
            pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float32)
        elif shape == "triangle":
            pts = np.array([[0, -1.15], [1, 0.85], [-1, 0.85]], dtype=np.float32)
        elif shape == "cross":
            a, b = 1.0, 0.33
            pts = np.array(
                [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]],
                dtype=np.float32,
            )
        else:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        c, s = np.cos(angle), np.sin(angle)
        rot = pts @ np.array([[c, s], [-s, c]], dtype=np.float32)
        poly = np.round(rot * size + np.array([cx, cy], dtype=np.float32)).astype(np.int32)
        cv2.fillPoly(image, [poly], color, cv2.LINE_AA)
    h, w = image.shape[:2]
    return (max(0, cx - size), max(0, cy - size), min(w, cx + size), min(h, cy + size))


def shape_image(rng: np.random.Generator, shape: str, height: int = 96, width: int = 96) -> np.ndarray:
    """One BGR image with a single ``shape`` at a random place, size, colour and angle."""
    image = _background(rng, height, width)
    size = int(rng.integers(min(height, width) // 6, min(height, width) // 3))
    cx = int(rng.integers(size, width - size))
    cy = int(rng.integers(size, height - size))
    color = tuple(int(v) for v in rng.integers(0, 256, size=3))
    draw_shape(image, shape, (cx, cy), size, color, float(rng.uniform(0, np.pi)))
    return image


def write_shape_folder(
    root: str | Path, per_class: int = 20, shapes: tuple[str, ...] = SHAPES, size: int = 96, seed: int = 0
) -> list[str]:
    """Write ``root/<shape>/<i>.png`` (one subfolder per class); return the class names."""
    import cv2

    rng = np.random.default_rng(seed)
    root = Path(root)
    for shape in shapes:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(str(root / shape / f"{i:04d}.png"), shape_image(rng, shape, size, size))
    return list(shapes)


def moving_shapes_frames(
    n_frames: int, height: int = 240, width: int = 320, shapes: tuple[str, ...] = SHAPES[:3], seed: int = 0
) -> list[np.ndarray]:
    """Frames of a few shapes bouncing over a fixed textured background."""
    rng = np.random.default_rng(seed)
    background = _background(rng, height, width)
    objects = []
    for shape in shapes:
        size = int(rng.integers(min(height, width) // 10, min(height, width) // 5))
        objects.append({
            "shape": shape,
            "size": size,
            "pos": rng.uniform([size, size], [width - size, height - size]),
            "vel": rng.uniform(-6, 6, size=2),
            "color": tuple(int(v) for v in rng.integers(0, 256, size=3)),
            "angle": float(rng.uniform(0, np.pi)),
        })
    frames = []
    for _ in range(n_frames):
        frame = background.copy()
        for o in objects:
            o["pos"] += o["vel"]
            for axis, limit in ((0, width), (1, height)):
                if not o["size"] <= o["pos"][axis] <= limit - o["size"]:
                    o["vel"][axis] *= -1
                    o["pos"][axis] = np.clip(o["pos"][axis], o["size"], limit - o["size"])
            o["angle"] += 0.05
            draw_shape(frame, o["shape"], (int(o["pos"][0]), int(o["pos"][1])), o["size"], o["color"], o["angle"])
        frames.append(frame)
    return frames


def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 15.0, fourcc: str = "MJPG") -> Path:
    """Write frames as an AVI, MJPG by default (decodable by every OpenCV build); return the path.

    ``fourcc="FFV1"`` writes lossless frames: the x86_64 and aarch64 OpenCV wheels decode JPEG to slightly different
    pixels, so a clip meant to give bit-identical inputs on both must be lossless."""
    import cv2

    path = Path(path)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write {fourcc} video here")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return path
