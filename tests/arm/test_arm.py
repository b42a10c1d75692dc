"""The device runtime on an emulated Raspberry Pi 4 (qemu-aarch64, -cpu cortex-a72, Debian bookworm arm64, the
aarch64 wheels of edgeq[device]): every bundle kind gives exactly the x86 results, unfamiliarity included, with
LiteRT and XNNPACK taking the int8 graph. Emulation proves correctness, not speed: no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.bundle import read_bundle

from conftest import SHAPE_LABELS, edgeq_here, run_edgeq, save_with_labels

pytestmark = [pytest.mark.arm, pytest.mark.slow]

FRAMES = 6
DETECT_LABELS = ("trouser", "sneaker", "ankle_boot")  # the detector's classes: scenes of them make its --val


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A clip at a bundle's input size: lossless, because the x86_64 and aarch64 OpenCV wheels decode MJPG to pixels
    a level or two apart, and at the model's size, so that nothing is resized, because their bilinear resize
    (INTER_LINEAR) gives inputs a level apart too (docs/raspberry-pi.md). Either would test OpenCV, not the
    runtime."""
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    folder, made = tmp_path_factory.mktemp("arm-video"), {}

    def clip(size: int) -> Path:
        if size not in made:
            made[size] = write_video(folder / f"clip{size}.avi", moving_shapes_frames(FRAMES, size, size, seed=4),
                                     fourcc="FFV1")
        return made[size]

    return clip


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bundle, tiny_keras_path, shapes_dir) -> dict[str, Path]:
    """One bundle of each kind, through the real converter: int8, float32, clustered (packed 4-bit weights),
    Bayesian (K posterior samples fused into the int8 head) and a grid detector with a Bayesian class head; and
    ``exact``, the int8 bundle converted with ``--interpolation linear_exact``."""
    import keras

    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS
    from edgeq.converter.models.bayes import bayes_dense_class
    from edgeq.converter.stages.load import build_mobilenet_v2

    d = tmp_path_factory.mktemp("arm-bundles")
    out = {"int8": tiny_bundle}
    common = ["--calib", str(shapes_dir), "--calib-samples", "20"]
    jobs = {
        "float32": [str(tiny_keras_path), "--quant", "float32"],
        "clustered": ["mobilenet_v2", "--alpha", "0.35", "--input-size", "64", "--classes", "3", "--weights", "none",
                      *common, "--clusters", "16", "--cluster-per-channel"],
    }
    base = build_mobilenet_v2(64, 0.35, 3, None, 3)
    head = bayes_dense_class()(3, posterior_sigma=0.2, name="bayes_logits")
    bayes_path = d / "bayes.keras"
    save_with_labels(keras.Model(base.inputs, head(base.get_layer("logits").input)), bayes_path, SHAPE_LABELS)
    jobs["bayes"] = [str(bayes_path), *common, "--bayes-samples", "8"]
    # a grid detector (random weights) whose Bayesian class head gives every detection K=8 class samples
    from edgeq.converter.models.detector import build_detector, class_head

    det = build_detector(96, 0.35, 3, seed=2)
    feats = class_head(det).input
    det_head = bayes_dense_class()(3, posterior_sigma=0.2, name="bayes_class_logits")
    # --val scenes of the same three classes: the neck's unfamiliarity measure is fitted and published per box
    others = ",".join(c for c in FASHION_MNIST_LABELS if c not in DETECT_LABELS)
    r = run_edgeq("datasets", "scenes", str(d / "scenes"), "--n", "40", "--size", "96", "--min-size", "24",
                  "--max-size", "40", "--exclude-classes", others)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = {c["name"]: c["id"] for c in json.loads((d / "scenes" / "annotations.json").read_text())["categories"]}
    detect_path = d / "detect.keras"
    save_with_labels(keras.Model(det.inputs, [det.outputs[0], det.outputs[1], det_head(feats)]), detect_path,
                     list(DETECT_LABELS), category_ids=[ids[c] for c in DETECT_LABELS])
    # unit-length neck features (--density-normalise l2): the device's own projection must match to the bit too
    # an untrained detector finds no object, so no objectness threshold can be calibrated for unknown objects
    jobs["detect"] = [str(detect_path), *common, "--val", str(d / "scenes"), "--bayes-samples", "8",
                      "--resize", "letterbox", "--density-normalise", "l2", "--unknown", "off"]
    # the tiny int8 bundle again, resizing with the filter that rounds the same on both (test_resized_frames...)
    jobs["exact"] = [str(tiny_keras_path), "--calib", str(shapes_dir), "--calib-samples", "30", "--val",
                     str(shapes_dir), "--interpolation", "linear_exact", "--resize", "letterbox"]
    for name, args in jobs.items():
        out[name] = d / f"{name}.edgeq"
        r = edgeq_here("convert", *args, "-o", str(out[name]))
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def _results(stdout: str) -> list[dict]:
    """Per frame: what the model said (labels, scores, uncertainty, needs_review), without timings and clocks."""
    frames = []
    for line in stdout.splitlines():
        m = json.loads(line)
        if m["schema"] == "edgeq.detections":
            frames.append({"seq": m["seq"], "frame": m["frame"], "model": m["model"], "detections": m["detections"]})
    return frames


def _first_difference(a: object, b: object, path: str = "") -> str | None:
    """Where two results first differ, as ``path: host vs pi`` (a failure message that names the field)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def _differences(a: object, b: object, path: str = "") -> list[str]:
    """Every field where two results differ, as ``path: host vs pi``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


# the preprocessing of frames that must be resized, as bytes: the same script on x86 and on the Pi
PREPROCESS_PROBE = """
import hashlib, json
import numpy as np
from edgeq.preprocess import Preprocessor, PreprocessSpec
rng = np.random.default_rng(7)  # numpy's generators give the same integers on every platform
frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((120, 160), (480, 640), (75, 100))]
out = {}
for interpolation in ("linear", "linear_exact"):
    for size in (64, 96, 224):
        for resize in ("stretch", "letterbox"):
            spec = PreprocessSpec(size, size, 3, resize=resize, dtype="int8", scale=2 / 255, zero_point=-1,
                                  interpolation=interpolation)
            pre = Preprocessor(spec)
            digest = hashlib.sha256()
            for frame in frames:
                digest.update(pre(frame)[0].tobytes())
            out[f"{interpolation} {size} {resize}"] = digest.hexdigest()
print(json.dumps(out))
"""


def test_linear_exact_preprocessing_gives_the_x86_model_input_exactly(pi):
    """--interpolation linear_exact: the model input made from frames that must be resized (up and down, stretched
    and letterboxed) is byte for byte the x86 one. INTER_LINEAR is not held to that (docs/raspberry-pi.md)."""
    import subprocess
    import sys

    host = subprocess.run([sys.executable, "-c", PREPROCESS_PROBE], capture_output=True, text=True, timeout=300)
    assert host.returncode == 0, host.stderr[-2000:]
    arm = pi.python(PREPROCESS_PROBE)
    assert arm.returncode == 0, arm.stderr[-3000:]
    want, got = json.loads(host.stdout), json.loads(arm.stdout)
    exact = [k for k in want if k.startswith("linear_exact")]
    assert len(exact) == 6 and all(got[k] == want[k] for k in exact), {k: got[k] == want[k] for k in want}


def test_resized_frames_give_the_x86_results_exactly_with_linear_exact(pi, bundles, clips, tmp_path):
    """Frames that must be resized (150x150 into the 64x64 model, letterboxed): with --interpolation linear_exact
    the Pi feeds the model the same pixels as x86, so every output, unfamiliarity included, matches to the bit."""
    bundle = bundles["exact"]
    assert read_bundle(bundle).manifest.input.interpolation == "linear_exact"
    clip = clips(150)
    args = ["run", "--model", str(bundle), "--source", str(clip), "--output", "-", "--max-frames", str(FRAMES)]
    host = run_edgeq(*args, "--spool", str(tmp_path / "host.db"))
    assert host.returncode == 0, host.stderr[-2000:]
    arm = pi.edgeq(*args, "--spool", str(tmp_path / "arm.db"))
    assert arm.returncode == 0, arm.stderr[-3000:]
    want, got = _results(host.stdout), _results(arm.stdout)
    assert len(want) == FRAMES and all(isinstance(d["uncertainty"]["unfamiliarity"], float)
                                       for f in want for d in f["detections"])
    assert got == want, _first_difference(want, got)


def test_emulated_pi_is_an_aarch64_cortex_a72(pi):
    r = pi.edgeq("doctor", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["cpu"]["data"]["machine"] == "aarch64" and checks["cpu"]["data"]["model"] == "Cortex-A72"
    assert checks["cpu"]["data"]["features"] == {"neon": True, "dotprod": False, "i8mm": False}
    assert checks["runtime"]["status"] == "pass" and checks["runtime"]["data"]["runtime"] == "ai-edge-litert"


@pytest.mark.parametrize("kind", ["int8", "float32", "clustered", "bayes", "detect"])
def test_every_bundle_kind_gives_the_x86_results_exactly(kind, pi, bundles, clips, tmp_path):
    bundle = bundles[kind]
    clip = clips(read_bundle(bundle).manifest.input.height)
    args = ["run", "--model", str(bundle), "--source", str(clip), "--output", "-", "--max-frames", str(FRAMES)]
    if kind == "detect":  # an untrained detector scores low: report everything, so there are boxes to compare
        config = tmp_path / "device.toml"
        config.write_text("[thresholds]\nscore = 0.001\n")
        args += ["--config", str(config)]
    host = run_edgeq(*args, "--spool", str(tmp_path / "host.db"))
    assert host.returncode == 0, host.stderr[-2000:]
    arm = pi.edgeq(*args, "--spool", str(tmp_path / "arm.db"))
    assert arm.returncode == 0, arm.stderr[-3000:]
    want, got = _results(host.stdout), _results(arm.stdout)
    assert len(want) == FRAMES and len(got) == FRAMES
    if kind in ("int8", "detect"):  # converted with --val: the unfamiliarity measure is published on the Pi
        assert all(isinstance(d["uncertainty"]["unfamiliarity"], float) and "review_reason" in d
                   for f in got for d in f["detections"])
    if read_bundle(bundle).manifest.density is not None:
        # the projection comes out of XNNPACK's int8 ops identical on both (given the same input pixels), and the
        # numpy finish sums integers, exact in any order (edgeq/density.py): unfamiliarity must match to the bit
        assert any("unfamiliarity" in d["uncertainty"] for f in want for d in f["detections"])
        if kind == "detect":  # the neck's length divides the projection: an integer sum, a sqrt, a product
            assert read_bundle(bundle).manifest.density.normalise == "l2"
        if kind != "detect":  # a classifier's density disagreement (log-sum-exp of those distances) too
            assert all(isinstance(d["uncertainty"]["density_disagreement"], float)
                       for f in want for d in f["detections"])
    assert got == want, _first_difference(want, got)
    if kind == "detect":
        assert sum(len(f["detections"]) for f in got) > 0
        assert all(len(d["box"]) == 4 and d["uncertainty"]["samples"] == 8 for f in got for d in f["detections"])
    if kind == "bayes":
        assert all(d["uncertainty"]["method"] == "mc" and d["uncertainty"]["samples"] == 8
                   for f in got for d in f["detections"])
    # the same bundle on the Pi: LiteRT, and XNNPACK took the whole graph
    r = pi.edgeq("doctor", "--model", str(bundle), "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["bundle"]["status"] == "pass" and checks["model"]["status"] == "pass", r.stdout
    assert checks["xnnpack"]["data"]["whole_graph"] is True, checks["xnnpack"]
    assert checks["model"]["data"]["runtime"] == "ai-edge-litert"


@pytest.fixture(scope="module")
def trained_bundle(fashion_dirs, tmp_path_factory) -> Path:
    """A small CNN trained on Fashion-MNIST (4 classes, 32 px) and converted to int8 with its unfamiliarity
    measure, calibrated on the val images."""
    from edgeq.converter.models.outlier import train_small
    from floors import seeded

    from edgeq.converter.training.classifier import load_folder_arrays
    from edgeq.preprocess import PreprocessSpec

    # the 28 px images are resized to 32: INTER_LINEAR rounds some pixels a level apart on aarch64, which moved
    # every published score (2,256 fields of 300 frames differed); linear_exact gives both machines the same input
    spec = PreprocessSpec(32, 32, 3, "RGB", "stretch", (127.5,), (127.5,), interpolation="linear_exact")
    x, y, labels = load_folder_arrays(fashion_dirs["train"], spec)
    d = tmp_path_factory.mktemp("arm-trained")
    path = save_with_labels(train_small(x, y, len(labels), epochs=8, seed=int(seeded(0))), d / "small.keras", labels)
    out = d / "small.edgeq"
    r = edgeq_here("convert", str(path), "--calib", str(fashion_dirs["train"]), "--calib-samples", "100",
                  "--val", str(fashion_dirs["val"]), "--interpolation", "linear_exact", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _published_figures(frames: list[dict], labels: list[str]) -> dict[str, float]:
    """Top-1 on the clothing frames (the class is the file name's prefix) and the unfamiliarity AUROC of digits
    against clothing, from what the device published."""
    from edgeq.converter.evaluation.metrics import roc_auc

    known, unknown, correct = [], [], []
    for f in frames:
        top = f["detections"][0]
        name = f["frame"]["id"]
        if name.startswith("digit_"):
            unknown.append(top["uncertainty"]["unfamiliarity"])
        else:
            known.append(top["uncertainty"]["unfamiliarity"])
            correct.append(top["label"] == name.split("_")[0])
    return {"top1": sum(correct) / len(correct), "auroc": roc_auc(known, unknown)}


def test_the_pi_and_x86_agree_on_the_quality_floors(pi, trained_bundle, fashion_dirs, tmp_path):
    """A trained int8 classifier run by `edgeq run` on both machines over 200 test images and 100 digits: the
    figures computed from what each published are the same, and both hold the floors (tests/floors.py)."""
    import shutil

    from floors import check

    folder = tmp_path / "mixed"
    folder.mkdir()
    labels = list(read_bundle(trained_bundle).labels)
    for label in labels:
        for f in sorted((fashion_dirs["test"] / label).iterdir())[:50]:
            shutil.copy(f, folder / f"{label}_{f.name}")
    for f in sorted(fashion_dirs["ood"].iterdir())[:100]:
        shutil.copy(f, folder / f"digit_{f.name}")
    args = ["run", "--model", str(trained_bundle), "--source", str(folder), "--output", "-"]
    host = run_edgeq(*args, "--spool", str(tmp_path / "host.db"))
    assert host.returncode == 0, host.stderr[-2000:]
    arm = pi.edgeq(*args, "--spool", str(tmp_path / "arm.db"), timeout=1800)
    assert arm.returncode == 0, arm.stderr[-3000:]
    want, got = _results(host.stdout), _results(arm.stdout)
    assert len(want) == len(got) == 300
    diffs = _differences(want, got)
    assert not diffs, f"{len(diffs)} fields differ, the first: {diffs[:10]}"
    figures = {"x86": _published_figures(want, labels), "arm": _published_figures(got, labels)}
    check("arm.small_cnn.top1", figures["arm"]["top1"])
    check("arm.small_cnn.digits_auroc_unfamiliarity", figures["arm"]["auroc"])
