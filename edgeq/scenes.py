"""Detection data: a synthetic scene generator that writes COCO JSON, and a COCO reader that checks what it reads.

``generate_scenes`` pastes Fashion-MNIST items (Debian's dataset-fashion-mnist; each item's own silhouette is its
mask: pixels above a small threshold) at random positions, scales (``min_size`` to ``max_size`` pixels), rotations
and tints onto textured backgrounds, with unannotated clutter (procedural shapes) as distractors. Boxes are the
tight bounds of each pasted mask, in COCO's ``[x, y, width, height]`` pixels. Classes named in ``ood_classes`` are
pasted too but stand for objects the model must not know: their categories carry ``"supercategory": "unknown"``,
training leaves them out, and evaluation uses them to tell known from unknown detections.

``read_coco`` loads a COCO instances file (the ecosystem's convention) and refuses, with one line naming the
file and the entry, what would silently corrupt training or evaluation: missing image files, boxes outside
their image, unknown category ids, duplicate ids, an empty annotation set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import DataError

UNKNOWN = "unknown"


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


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def generate_scenes(out: str | Path, n: int = 200, size: int = 192, seed: int = 0, ood_classes: tuple[str, ...] = (),
                    objects: tuple[int, int] = (1, 4), min_size: int = 28, max_size: int = 72, clutter: int = 3,
                    split: str = "train", exclude_classes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write ``n`` scenes to ``out/images/*.png`` and ``out/annotations.json``; return a summary.

    ``exclude_classes`` are never pasted (a training set without the classes a test set holds out); they stay in
    ``categories``, marked unknown, so that both sets share category ids."""
    import cv2

    from edgeq.datasets import FASHION_MNIST_LABELS, fashion_mnist
    from edgeq.synthetic import SHAPES, _background, draw_shape

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
    x, y = fashion_mnist("train" if split == "train" else "test")
    allowed = np.isin(y, [labels.index(c) for c in exclude_classes], invert=True)
    x, y = x[allowed], y[allowed]
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": UNKNOWN if name in ood_classes else "fashion"}
                  for i, name in enumerate(labels)]
    images, annotations = [], []
    for i in range(n):
        canvas = _background(rng, size, size)
        for _ in range(int(rng.integers(0, clutter + 1))):  # distractors, not annotated
            draw_shape(canvas, str(rng.choice(SHAPES)), (int(rng.integers(0, size)), int(rng.integers(0, size))),
                       int(rng.integers(3, 10)), tuple(int(v) for v in rng.integers(0, 256, 3)), float(rng.uniform(0, 3)))
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            for _attempt in range(10):
                k = int(rng.integers(0, len(x)))
                s = int(rng.integers(min_size, max_size + 1))
                half = s / 2 + 2
                center = (float(rng.uniform(half, size - half)), float(rng.uniform(half, size - half)))
                guess = (int(center[0] - half), int(center[1] - half), int(center[0] + half), int(center[1] + half))
                if all(_iou(guess, b) < 0.15 for b in boxes):
                    break
            else:
                continue
            color = rng.uniform(120, 255, 3)
            box = _paste(canvas, x[k], s, float(rng.uniform(-30, 30)), center, color)
            if box is None or box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            boxes.append(box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(y[k]) + 1,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0,
            })
        name = f"{i:06d}.png"
        cv2.imwrite(str(out / "images" / name), canvas)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    doc = {
        "info": {"description": "edgeq synthetic scenes: Fashion-MNIST items on textured backgrounds",
                 "seed": seed, "split": split, "ood_classes": list(ood_classes),
                 "excluded_classes": list(exclude_classes)},
        "images": images, "annotations": annotations, "categories": categories,
    }
    tmp = out / ".annotations.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, out / "annotations.json")
    known = sum(1 for a in annotations if labels[a["category_id"] - 1] not in ood_classes)
    return {"images": n, "objects": len(annotations), "known": known, "unknown": len(annotations) - known,
            "path": str(out / "annotations.json")}


@dataclass
class CocoSet:
    """A checked COCO instances file: per image its path, size, boxes ``[x0, y0, x1, y1]`` (pixels) and category
    ids; the categories, and which of them stand for unknown objects."""

    path: Path
    image_dir: Path
    images: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    category_ids: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def known_categories(self) -> list[dict[str, Any]]:
        return [c for c in self.categories if c.get("supercategory") != UNKNOWN]

    @property
    def unknown_category_ids(self) -> set[int]:
        return {c["id"] for c in self.categories if c.get("supercategory") == UNKNOWN}

    def image_path(self, image: dict[str, Any]) -> Path:
        return self.image_dir / image["file_name"]

    def require_categories(self, category_ids: list[int] | tuple[int, ...], flag: str, owner: str) -> None:
        """Refuse a set that lacks any of ``owner``'s (a model's, a bundle's) COCO category ids."""
        have = {int(c["id"]) for c in self.categories}
        missing = [int(c) for c in category_ids if int(c) not in have]
        if missing:
            raise DataError(f"{flag} {self.path}: {owner}'s category ids {missing} are not in its categories; give a "
                            "COCO set with the training set's categories")


def read_coco(path: str | Path, image_dir: str | Path | None = None, flag: str = "DATA") -> CocoSet:
    """Load and check a COCO instances file. ``image_dir`` defaults to ``images/`` next to it, else its folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "annotations.json"
    if not p.is_file():
        raise DataError(f"{flag} {path}: no COCO annotations file (give annotations.json or the folder holding it)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not readable JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{p}: a COCO file is a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{p}: field '{key}' is missing or not a list; not a COCO instances file")
    if image_dir is None:
        image_dir = p.parent / "images" if (p.parent / "images").is_dir() else p.parent
    image_dir = Path(image_dir)
    categories, cat_ids = [], set()
    for i, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f"{p}: categories[{i}] needs an integer 'id' and a string 'name'")
        if c["id"] in cat_ids:
            raise DataError(f"{p}: categories[{i}]: id {c['id']} appears twice")
        cat_ids.add(c["id"])
        categories.append(c)
    images, by_id = [], {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise DataError(f"{p}: images[{i}] needs an integer 'id' and a string 'file_name'")
        if not isinstance(im.get("width"), int) or not isinstance(im.get("height"), int) or im["width"] < 1 or im["height"] < 1:
            raise DataError(f"{p}: images[{i}] ({im['file_name']}) needs positive integer 'width' and 'height'")
        if im["id"] in by_id:
            raise DataError(f"{p}: images[{i}]: id {im['id']} appears twice")
        if not (image_dir / im["file_name"]).is_file():
            raise DataError(f"{p}: images[{i}]: file {im['file_name']} not found in {image_dir}; "
                            "fix the path or give the image folder")
        by_id[im["id"]] = im
        images.append(im)
    if not doc["annotations"]:
        raise DataError(f"{p}: the annotation set is empty; a detector needs boxes to learn from or be scored on")
    boxes: dict[int, list[list[float]]] = {im["id"]: [] for im in images}
    cats: dict[int, list[int]] = {im["id"]: [] for im in images}
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{p}: annotations[{i}] is not an object")
        im = by_id.get(a.get("image_id"))
        if im is None:
            raise DataError(f"{p}: annotations[{i}]: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in cat_ids:
            raise DataError(f"{p}: annotations[{i}] ({im['file_name']}): category_id {a.get('category_id')!r} is not "
                            f"in categories ({', '.join(str(c) for c in sorted(cat_ids))})")
        b = a.get("bbox")
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise DataError(f"{p}: annotations[{i}] ({im['file_name']}): bbox must be [x, y, width, height]")
        x0, y0, bw, bh = (float(v) for v in b)
        tol = 1.0  # one pixel: COCO tools round boxes
        if bw <= 0 or bh <= 0 or x0 < -tol or y0 < -tol or x0 + bw > im["width"] + tol or y0 + bh > im["height"] + tol:
            raise DataError(f"{p}: annotations[{i}] ({im['file_name']}): bbox {b} is empty or outside the "
                            f"{im['width']}x{im['height']} image")
        boxes[im["id"]].append([max(0.0, x0), max(0.0, y0), min(float(im["width"]), x0 + bw),
                                min(float(im["height"]), y0 + bh)])
        cats[im["id"]].append(int(a["category_id"]))
    return CocoSet(p, image_dir, images, categories,
                   {k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in boxes.items()},
                   {k: np.asarray(v, dtype=np.int64) for k, v in cats.items()})


def moving_scene_frames(n_frames: int = 60, size: int = 192, seed: int = 0, classes: tuple[str, ...] = (),
                        unknown_classes: tuple[str, ...] = (), objects: int = 3, object_size: tuple[int, int] = (40, 64),
                        split: str = "test") -> tuple[list[np.ndarray], list[list[tuple[str, tuple[int, int, int, int]]]]]:
    """A clip of Fashion-MNIST items drifting across one textured background: each object keeps its item, size
    and tint and moves in a straight line, bouncing off the edges. The first ``objects`` are of ``classes``
    (all known classes when empty); each of ``unknown_classes`` adds one more object, for the second half of the
    clip only. Returns the BGR frames and, per frame, ``(class name, box x0, y0, x1, y1)`` of every object."""
    from edgeq.datasets import FASHION_MNIST_LABELS, fashion_mnist
    from edgeq.synthetic import _background

    labels = list(FASHION_MNIST_LABELS)
    for name in (*classes, *unknown_classes):
        if name not in labels:
            raise DataError(f"{name}: not a Fashion-MNIST class; choose from {', '.join(labels)}")
    known = [c for c in (classes or labels) if c not in unknown_classes]
    x, y = fashion_mnist(split)
    rng = np.random.default_rng(seed)
    background = _background(rng, size, size)
    specs = []
    for i in range(objects + len(unknown_classes)):
        name = known[i % len(known)] if i < objects else unknown_classes[i - objects]
        item = x[rng.choice(np.flatnonzero(y == labels.index(name)))]
        s = int(rng.integers(object_size[0], object_size[1] + 1))
        pos = rng.uniform(s / 2 + 2, size - s / 2 - 2, 2)
        vel = rng.uniform(-3, 3, 2)
        specs.append({"name": name, "item": item, "size": s, "pos": pos, "vel": vel, "color": rng.uniform(140, 255, 3),
                      "angle": float(rng.uniform(-20, 20)), "from": 0 if i < objects else n_frames // 2})
    frames, truth = [], []
    for f in range(n_frames):
        canvas = background.copy()
        boxes = []
        for o in specs:
            half = o["size"] / 2 + 2
            for axis in (0, 1):
                nxt = o["pos"][axis] + o["vel"][axis]
                if not half <= nxt <= size - half:
                    o["vel"][axis] = -o["vel"][axis]
                o["pos"][axis] += o["vel"][axis]
            if f < o["from"]:
                continue
            box = _paste(canvas, o["item"], o["size"], o["angle"], (float(o["pos"][0]), float(o["pos"][1])), o["color"])
            if box is not None:
                boxes.append((o["name"], box))
        frames.append(canvas)
        truth.append(boxes)
    return frames, truth
