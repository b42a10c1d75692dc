"""Detection data: a synthetic scene generator that writes COCO JSON (read back by coco.py), clips of moving
items, and the video writer the demo uses.

``generate_scenes`` pastes Fashion-MNIST items (Debian's dataset-fashion-mnist; each item's own silhouette is its
mask: pixels above a small threshold) at random positions, scales (``min_size`` to ``max_size`` pixels), rotations
and tints onto textured backgrounds, with unannotated clutter (procedural shapes) as distractors. Boxes are the
tight bounds of each pasted mask, in COCO's ``[x, y, width, height]`` pixels. Classes named in ``ood_classes`` are
pasted too but stand for objects the model must not know: their categories carry ``"supercategory": "unknown"``,
training leaves them out, and evaluation uses them to tell known from unknown detections.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.errors import DataError

from .coco import UNKNOWN
from .datasets import FASHION_MNIST_LABELS, fashion_mnist
from .objects import KIND_CATEGORIES, OUTLIER, OUTLIER_CATEGORY, OUTLIER_KINDS, UNKNOWN_KINDS, ObjectSource, check_kinds

SHAPES = ("circle", "square", "triangle", "cross", "ring")
OUTLIERS_PER_SCENE = 2


def _paste(canvas: np.ndarray, item: np.ndarray, size: int, angle: float,
           center: tuple[float, float], color: np.ndarray) -> tuple[int, int, int, int] | None:
    """Paste a grey 28x28 item, its frame scaled to ``size`` pixels and rotated, at ``center``; return the tight
    box ``(x0, y0, x1, y1)`` (exclusive ends) of the pasted mask, or None if nothing is left of it."""
    import cv2

    h, w = canvas.shape[:2]
    scale = size / 28.0
    m = cv2.getRotationMatrix2D((14.0, 14.0), angle, scale)
    m[:, 2] += np.array(center) - np.array([14.0, 14.0])
    alpha = cv2.warpAffine(item.astype(np.float32) / 255.0, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
    mask = alpha > 0.08
    if not mask.any():
        return None
    shade = (0.35 + 0.65 * alpha[..., None]) * color[None, None, :]
    a = np.clip(alpha * 1.6, 0.0, 1.0)[..., None] * mask[..., None]
    canvas[:] = np.clip(canvas * (1 - a) + shade * a, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _paste_patch(canvas: np.ndarray, patch: np.ndarray, alpha: np.ndarray, size: int, angle: float,
                 center: tuple[float, float]) -> tuple[int, int, int, int] | None:
    """Paste a colour ``patch`` in its own colours under ``alpha`` (both square), scaled to ``size`` pixels and
    rotated, at ``center``; return the tight box of what shows, or None."""
    import cv2

    h, w = canvas.shape[:2]
    side = patch.shape[0]
    m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, size / side)
    m[:, 2] += np.array(center) - np.array([side / 2, side / 2])
    a = cv2.warpAffine(alpha.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
    mask = a > 0.15
    if not mask.any():
        return None
    colour = cv2.warpAffine(patch, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    canvas[:] = np.clip(canvas * (1 - a[..., None]) + colour * a[..., None], 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _annotation(ann_id: int, image_id: int, category: int, box: tuple[int, int, int, int]) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category,
            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": (box[2] - box[0]) * (box[3] - box[1]),
            "iscrowd": 0}


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def draw_clutter(canvas: np.ndarray, rng: np.random.Generator, clutter: int) -> None:
    """Up to ``clutter`` small procedural shapes, not annotated: distractors."""
    size = canvas.shape[0]
    for _ in range(int(rng.integers(0, clutter + 1))):
        draw_shape(canvas, str(rng.choice(SHAPES)), (int(rng.integers(0, size)), int(rng.integers(0, size))),
                   int(rng.integers(3, 10)), tuple(int(v) for v in rng.integers(0, 256, 3)), float(rng.uniform(0, 3)))


def free_spot(rng: np.random.Generator, size: int, sizes: tuple[int, int], placed: list[tuple[int, int, int, int]],
              pick: Callable[[], Any] | None = None) -> tuple[Any, int, tuple[float, float]] | None:
    """A size (``sizes`` inclusive) and a centre for one more item whose square overlaps no box in ``placed`` by
    IoU 0.15 or more, in at most 10 tries; None if none was found. ``pick()``, drawn first on every try, chooses
    the item (its result is returned with the spot)."""
    for _attempt in range(10):
        item = pick() if pick is not None else None
        s = int(rng.integers(sizes[0], sizes[1] + 1))
        half = s / 2 + 2
        centre = (float(rng.uniform(half, size - half)), float(rng.uniform(half, size - half)))
        guess = (int(centre[0] - half), int(centre[1] - half), int(centre[0] + half), int(centre[1] + half))
        if all(_iou(guess, b) < 0.15 for b in placed):
            return item, s, centre
    return None


def generate_scenes(out: str | Path, n: int = 200, size: int = 192, seed: int = 0, ood_classes: tuple[str, ...] = (),
                    objects: tuple[int, int] = (1, 4), min_size: int = 28, max_size: int = 72, clutter: int = 3,
                    split: str = "train", exclude_classes: tuple[str, ...] = (), unknown_kinds: tuple[str, ...] = (),
                    outliers: tuple[str, ...] = (), extra_share: float = 0.3) -> dict[str, Any]:
    """Write ``n`` scenes to ``out/images/*.png`` and ``out/annotations.json``; return a summary.

    ``exclude_classes`` are never pasted (a training set without the classes a test set holds out); they stay in
    ``categories``, marked unknown, so that both sets share category ids. ``unknown_kinds`` (digits, photos) are
    objects of other kinds (converter/data/objects.py), marked unknown: ``extra_share`` of the objects are drawn from
    them, the rest are Fashion-MNIST items. ``outliers`` (shapes, textures, mixed) are added on top, up to
    ``OUTLIERS_PER_SCENE`` a scene, from a random stream of their own: the same seed gives the same scenes with and
    without them, so that a detector trained with outlier exposure differs from one without only by them."""
    # over 60 lines: the scene generator's loop, whose placement rules depend on one another
    import cv2


    labels = list(FASHION_MNIST_LABELS)
    for flag, names in (("--ood-classes", ood_classes), ("--exclude-classes", exclude_classes)):
        unknown = [c for c in names if c not in labels]
        if unknown:
            raise DataError(f"{flag} {', '.join(unknown)}: not Fashion-MNIST classes; choose from {', '.join(labels)}")
    ood_classes = tuple(dict.fromkeys((*ood_classes, *exclude_classes)))
    if len(ood_classes) >= len(labels):
        raise DataError("--ood-classes/--exclude-classes: leave at least one class known")
    if n < 1 or size < 64 or not 8 <= min_size <= max_size <= size // 2:
        raise DataError(f"scenes: need n >= 1, size >= 64 and 8 <= min_size <= max_size <= size / 2 (got n={n}, "
                        f"size={size}, sizes {min_size}..{max_size})")
    check_kinds("--unknown-kinds", unknown_kinds, UNKNOWN_KINDS)
    check_kinds("--outliers", outliers, OUTLIER_KINDS)
    x, y = split_items(split)
    allowed = np.isin(y, [labels.index(c) for c in exclude_classes], invert=True)
    x, y = x[allowed], y[allowed]
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": UNKNOWN if name in ood_classes else "fashion"}
                  for i, name in enumerate(labels)]
    categories += [{"id": KIND_CATEGORIES[k][0], "name": KIND_CATEGORIES[k][1], "supercategory": UNKNOWN}
                   for k in unknown_kinds]
    if outliers:
        categories.append({"id": OUTLIER_CATEGORY[0], "name": OUTLIER_CATEGORY[1], "supercategory": OUTLIER})
    extra = tuple(unknown_kinds)
    known_items = x[~np.isin(y, [labels.index(c) for c in ood_classes])]
    source = ObjectSource(rng, known_items) if extra else None
    orng = np.random.default_rng([seed, 1])  # the outliers' own stream
    outlier_source = ObjectSource(orng, known_items) if outliers else None

    def pick() -> tuple[str | None, int]:
        if extra and rng.random() < extra_share:
            return str(rng.choice(extra)), -1
        return None, int(rng.integers(0, len(x)))

    images, annotations = [], []
    for i in range(n):
        canvas = background(rng, size, size)
        draw_clutter(canvas, rng, clutter)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            spot = free_spot(rng, size, (min_size, max_size), boxes, pick)
            if spot is None:
                continue
            (kind, k), s, center = spot
            if kind is None:
                color = rng.uniform(120, 255, 3)
                box = _paste(canvas, x[k], s, float(rng.uniform(-30, 30)), center, color)
                category = int(y[k]) + 1
            else:
                item, patch, alpha = source.draw(kind)
                angle = float(rng.uniform(-30, 30))
                box = (_paste(canvas, item, s, angle, center, rng.uniform(120, 255, 3)) if item is not None
                       else _paste_patch(canvas, patch, alpha, s, angle, center))
                category = KIND_CATEGORIES[kind][0] if kind in KIND_CATEGORIES else OUTLIER_CATEGORY[0]
            if box is None or box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            boxes.append(box)
            annotations.append(_annotation(len(annotations) + 1, i + 1, category, box))
        for _ in range(int(orng.integers(0, OUTLIERS_PER_SCENE + 1)) if outliers else 0):
            spot = free_spot(orng, size, (min_size, max_size), boxes, lambda: str(orng.choice(outliers)))
            if spot is None:
                continue
            kind, s, center = spot
            item, patch, alpha = outlier_source.draw(kind)
            angle = float(orng.uniform(-30, 30))
            box = (_paste(canvas, item, s, angle, center, orng.uniform(120, 255, 3)) if item is not None
                   else _paste_patch(canvas, patch, alpha, s, angle, center))
            if box is None or box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            boxes.append(box)
            annotations.append(_annotation(len(annotations) + 1, i + 1, OUTLIER_CATEGORY[0], box))
        name = f"{i:06d}.png"
        cv2.imwrite(str(out / "images" / name), canvas)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    doc = {
        "info": {"description": "edgeq synthetic scenes: Fashion-MNIST items on textured backgrounds",
                 "seed": seed, "split": split, "ood_classes": list(ood_classes),
                 "excluded_classes": list(exclude_classes), "unknown_kinds": list(unknown_kinds),
                 "outliers": list(outliers)},
        "images": images, "annotations": annotations, "categories": categories,
    }
    tmp = out / ".annotations.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, out / "annotations.json")
    kind_of = {c["id"]: c["supercategory"] for c in categories}
    known = sum(1 for a in annotations if kind_of[a["category_id"]] not in (UNKNOWN, OUTLIER))
    outlier_count = sum(1 for a in annotations if kind_of[a["category_id"]] == OUTLIER)
    return {"images": n, "objects": len(annotations), "known": known, "outliers": outlier_count,
            "unknown": len(annotations) - known - outlier_count, "path": str(out / "annotations.json")}


SPLITS = ("train", "test", "calib", "eval")


def split_items(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST items for a scene split: ``train`` its training split, ``test`` its test split, and for
    benchmarks that must keep calibration and scoring apart, ``calib`` and ``eval``: the test split's even and odd
    items, which share none."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    x, y = fashion_mnist("train" if split == "train" else "test")
    if split in ("calib", "eval"):
        x, y = x[split == "eval"::2], y[split == "eval"::2]
    return x, y


def moving_scene_frames(n_frames: int = 60, size: int = 192, seed: int = 0, classes: tuple[str, ...] = (),
                        unknown_classes: tuple[str, ...] = (), objects: int = 3, object_size: tuple[int, int] = (40, 64),
                        split: str = "test", stripes: bool = True
                        ) -> tuple[list[np.ndarray], list[list[tuple[str, tuple[int, int, int, int]]]]]:
    """A clip of Fashion-MNIST items drifting across one textured background: each object keeps its item, size
    and tint and moves in a straight line, bouncing off the edges. The first ``objects`` are of ``classes``
    (all known classes when empty); each of ``unknown_classes`` adds one more object in the second half of the
    clip, sliding in from the left edge. ``stripes=False`` leaves the background's stripes out (the same random
    draws otherwise). Returns the BGR frames and, per frame, ``(class name, box x0, y0, x1, y1)`` of every object
    (the part inside the frame)."""

    labels = list(FASHION_MNIST_LABELS)
    for name in (*classes, *unknown_classes):
        if name not in labels:
            raise DataError(f"{name}: not a Fashion-MNIST class; choose from {', '.join(labels)}")
    known = [c for c in (classes or labels) if c not in unknown_classes]
    x, y = fashion_mnist(split)
    rng = np.random.default_rng(seed)
    backdrop = background(rng, size, size, stripes)
    specs = []
    for i in range(objects + len(unknown_classes)):
        name = known[i % len(known)] if i < objects else unknown_classes[i - objects]
        item = x[rng.choice(np.flatnonzero(y == labels.index(name)))]
        s = int(rng.integers(object_size[0], object_size[1] + 1))
        pos = rng.uniform(s / 2 + 2, size - s / 2 - 2, 2)
        vel = rng.uniform(-3, 3, 2)
        spec = {"name": name, "item": item, "size": s, "pos": pos, "vel": vel, "color": rng.uniform(140, 255, 3),
                "angle": float(rng.uniform(-20, 20)), "from": 0 if i < objects else n_frames // 2}
        if i >= objects:  # enters: from just outside the left edge, inwards, at its own height
            spec["pos"] = np.array([-s / 2 - 2, pos[1]])
            spec["vel"] = np.array([max(abs(vel[0]), 2.0) + 1.0, vel[1]])
            spec["entering"] = True
        specs.append(spec)
    frames, truth = [], []
    for f in range(n_frames):
        canvas = backdrop.copy()
        boxes = []
        for o in specs:
            if f < o["from"]:
                continue
            half = o["size"] / 2 + 2
            if o.get("entering"):  # slides in along x, at its height, until whole; then drifts and bounces
                o["pos"][0] += o["vel"][0]
                o["entering"] = o["pos"][0] < half
            else:
                for axis in (0, 1):
                    nxt = o["pos"][axis] + o["vel"][axis]
                    if not half <= nxt <= size - half:
                        o["vel"][axis] = -o["vel"][axis]
                    o["pos"][axis] += o["vel"][axis]
            box = _paste(canvas, o["item"], o["size"], o["angle"], (float(o["pos"][0]), float(o["pos"][1])), o["color"])
            if box is not None:
                boxes.append((o["name"], box))
        frames.append(canvas)
        truth.append(boxes)
    return frames, truth


def background(rng: np.random.Generator, height: int, width: int, stripes: bool = True) -> np.ndarray:
    """A smooth colour gradient plus band-limited noise and a few stripes (drawn from ``rng`` either way; left
    out with ``stripes=False``): cheap texture."""
    import cv2

    base = rng.integers(40, 200, size=3)
    ramp = np.linspace(0, rng.integers(20, 60), width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 18, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    image = base[None, None, :] + ramp + noise
    for _ in range(rng.integers(0, 4)):
        y = int(rng.integers(0, height))
        thick, shift = int(rng.integers(1, 4)), rng.integers(-40, 40)
        if stripes:
            image[y : y + thick] += shift
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
