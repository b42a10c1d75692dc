"""COCO instances files: a reader that refuses, with one line naming the file and the entry, what would silently
corrupt training or evaluation: missing image files, boxes outside their image, unknown category ids, duplicate
ids, an empty annotation set. Categories whose ``supercategory`` is ``"unknown"`` stand for objects a detector
must not know (edgeq datasets scenes --ood-classes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import DataError

UNKNOWN = "unknown"
# objects of no known class that training may push away (outlier exposure, converter/data/objects.py): never a class
OUTLIER = "outlier"


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
        return [c for c in self.categories if c.get("supercategory") not in (UNKNOWN, OUTLIER)]

    @property
    def unknown_category_ids(self) -> set[int]:
        """Objects a detector never learned (an outlier in an evaluation set counts as one too)."""
        return {c["id"] for c in self.categories if c.get("supercategory") in (UNKNOWN, OUTLIER)}

    @property
    def outlier_category_ids(self) -> set[int]:
        return {c["id"] for c in self.categories if c.get("supercategory") == OUTLIER}

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
    # over 60 lines: every check of a COCO file, in the order a user fixes them, each naming its entry
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


def is_coco_path(path: str | Path) -> bool:
    """A COCO instances file, or a folder holding ``annotations.json``: what a detection eval takes."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".json") or (p.is_dir() and (p / "annotations.json").is_file())


def object_window(image: np.ndarray, box: np.ndarray, size: int = 96, context: float = 1.25) -> np.ndarray:
    """The ``size`` x ``size`` window of ``image`` (BGR) centred on ``box`` (x0, y0, x1, y1 in pixels), shifted to
    stay inside the image, so the object keeps its pixel scale; a box that, times ``context``, does not fit is cut
    with that margin and scaled down to ``size``. What :func:`write_object_crops` writes for each object."""
    import cv2

    h, w = image.shape[:2]
    side = int(np.ceil(max(size, context * float(max(box[2] - box[0], box[3] - box[1])))))
    if side > min(h, w):  # pad a small image, as the letterbox does, so the window fits
        pad = side - min(h, w)
        image = cv2.copyMakeBorder(image, 0, pad, 0, pad, cv2.BORDER_REPLICATE)
        h, w = image.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    crop = image[y0:y0 + side, x0:x0 + side]
    return crop if side == size else cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def write_object_crops(coco: CocoSet, out: str | Path, size: int = 96, context: float = 1.25) -> dict[str, Any]:
    """Cut every object of a known category out of ``coco``'s images into a class folder, ``out/<category>/*.png``,
    for ``edgeq train``: a backbone for a detector learns its objects as the detector will see them, on their own
    backgrounds, instead of clean cut-outs.

    Each crop is the ``size`` x ``size`` window centred on the object's box, shifted to stay inside the image (so an
    object keeps the pixel scale it has in the scenes); an object whose box, times ``context``, does not fit is
    cut with that margin and scaled down to ``size``. Crops are named ``<image id>_<box index in the image>.png``.
    Unknown categories are left out. Written to a sibling folder first and renamed at the end, so a failure leaves
    no half-written set; ``out`` must not exist yet. Returns the count per category."""
    # over 60 lines: one loop over the images, its skip rules read together
    import os
    import shutil

    import cv2

    from edgeq.errors import SourceError
    from edgeq.preprocess import read_image

    out = Path(out)
    if size < 32:
        raise DataError(f"--size {size}: give at least 32 pixels")
    if out.exists():
        raise DataError(f"{out}: already exists; give a new folder for the crops")
    known = {int(c["id"]): str(c["name"]).replace(os.sep, "_") for c in coco.known_categories}
    if not any(int(c) in known for ids in coco.category_ids.values() for c in ids.tolist()):
        raise DataError(f"{coco.path}: no boxes of a known category to crop; the crops need labelled objects")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {name: 0 for name in known.values()}
    try:
        for name in counts:
            (tmp / name).mkdir(parents=True)
        for im in coco.images:
            # k: the box's index in its image, so a crop's name points back at its annotation
            picks = [(k, b, int(c)) for k, (b, c) in enumerate(zip(coco.boxes[im["id"]],
                                                                   coco.category_ids[im["id"]].tolist()))
                     if int(c) in known]
            if not picks:
                continue
            try:
                image = read_image(coco.image_path(im))
            except SourceError as exc:
                raise DataError(f"{coco.path}: {exc}; remove the image or replace it") from None
            if image.ndim == 2:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            elif image.shape[2] == 4:  # a PNG with alpha: the colours, as the detector's preprocessing reads them
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
            for k, box, cat in picks:
                crop = object_window(image, box, size, context)
                name = known[cat]
                if not cv2.imwrite(str(tmp / name / f"{im['id']:07d}_{k}.png"), crop):
                    raise DataError(f"{out}: cannot write the crops there; choose a writable folder")
                counts[name] += 1
        os.replace(tmp, out)
    except OSError as exc:  # a folder that cannot take files: one line, and nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: cannot write the crops there ({exc.strerror or exc}); choose a writable "
                        "folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"objects": sum(counts.values()), "per_category": counts, "size": size, "path": str(out)}
