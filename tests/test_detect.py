"""The grid detector end to end with real parts: scenes written as PNG + COCO JSON, `edgeq train --task detect`
(real TensorFlow), `edgeq convert` (real full-int8 conversion), `edgeq run` on a real video file, `edgeq eval`
through pycocotools, and the bad inputs of each."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, edgeq_here, run_edgeq, save_with_labels
from floors import check, seeded

pytestmark = pytest.mark.slow

SIZE = 128  # scenes and model input: an 8x8 grid at stride 16
VAL_SCENES = 100  # enough int8 detections of known objects (>= 20) to read percentiles against
KNOWN = ("tshirt", "trouser", "sneaker")  # three classes a short training tells apart; bag is the unknown object
KNOWN_IDS = [1, 2, 8]  # their COCO category ids (Fashion-MNIST index + 1)
OTHERS = "pullover,dress,coat,sandal,shirt,ankle_boot"
# the quality floors of this short, seeded training are in tests/floors.py ("detect."), set from five seeds; with
# 10 epochs instead of 16 one run matched 14 known objects of --val, under the 20 the percentile reference needs


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scenes")
    common = ["--size", str(SIZE), "--min-size", "32", "--max-size", "56", "--max-objects", "2"]
    assert run_edgeq("datasets", "scenes", str(root / "train"), "--n", "300", "--exclude-classes", f"bag,{OTHERS}",
                     *common).returncode == 0
    # val: what convert --val calibrates on; test: what the figures are scored on (disjoint seeds)
    for split, seed in (("val", "1"), ("test", "2")):
        assert run_edgeq("datasets", "scenes", str(root / split), "--n", str(VAL_SCENES), "--split", "test",
                         "--ood-classes", "bag", "--exclude-classes", OTHERS, "--seed", seed, *common).returncode == 0
    return {"train": root / "train", "val": root / "val", "test": root / "test"}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A MobileNetV2 0.35 classifier of the known classes' items: the detector's starting backbone (the stand-in
    for ImageNet weights, as in the demo)."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder

    root = tmp_path_factory.mktemp("backbone")
    x, y = fashion_mnist("train")
    known = [FASHION_MNIST_LABELS.index(n) for n in KNOWN]
    pick = np.random.default_rng(0).choice(np.flatnonzero(np.isin(y, known)), 1500, replace=False)
    items = write_class_folder(root / "items", x[pick], np.array([known.index(int(v)) for v in y[pick]]), KNOWN)
    out = root / "backbone.keras"
    # 4 epochs: with 2 the detector trained on an Intel Xeon (same seeds, another CPU's numerics than the AMD EPYC
    # it was tuned on) matched only 15 known objects of --val, under the 20 the percentile reference needs
    r = run_edgeq("train", str(items), "--input-size", "96", "--epochs", "4", "--lr", "2e-3", "--no-augment",
                  "--batch-size", "64", "--seed", seeded(0), "-o", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def detector(scenes, backbone, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det") / "det.keras"
    r = run_edgeq("train", "--task", "detect", str(scenes["train"]), "--val", str(scenes["val"]), "-o", str(out),
                  "--init-backbone", str(backbone), "--input-size", str(SIZE), "--epochs", "16", "--bayes-epochs", "5",
                  "--batch-size", "16", "--augment-copies", "1", "--seed", seeded(0), "--json", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["head"]["type"] == "bayes" and summary["head"]["task"] == "detect"
    return out


@pytest.fixture(scope="module")
def bundle(detector, scenes) -> Path:
    out = detector.with_name("det.edgeq")
    r = run_edgeq("convert", str(detector), "--calib", str(scenes["train"]), "--calib-samples", "30",
                  "--val", str(scenes["val"]), "--resize", "letterbox", "-o", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "float / int8 mAP@0.5" in r.stdout
    return out


def test_train_stores_labels_and_category_ids_inside_the_model(detector, scenes, tmp_path):
    from edgeq.bundle import read_bundle
    from edgeq.converter.models.info import read_model_info

    info = read_model_info(detector)
    labels = info["labels"]
    assert labels == list(KNOWN)
    assert info["task"] == "detect" and info["stride"] == 16
    assert info["category_ids"] == KNOWN_IDS  # COCO ids of the known classes, not 1..3
    assert not list(detector.parent.glob("*.labels.txt")) and not list(detector.parent.glob("*.detect.json"))
    # the names travel with the .keras file: copied alone into another folder, it converts with its own labels
    copy = tmp_path / "copied.keras"
    copy.write_bytes(detector.read_bytes())
    out = tmp_path / "copied.edgeq"
    r = edgeq_here("convert", str(copy), "--density", "off", "--calib", str(scenes["train"]), "--calib-samples", "10", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_bundle(out).manifest
    assert list(m.labels) == labels and list(m.detector.category_ids) == info["category_ids"]


def test_convert_gives_a_full_int8_detect_bundle(bundle):
    from edgeq.bundle import read_bundle

    b = read_bundle(bundle)
    m = b.manifest.to_json()
    assert m["task"] == "detect" and m["input"]["resize"] == "letterbox"
    assert m["quantization"]["full_integer"] and m["quantization"]["float_ops"] == []
    head = m["head"]
    assert head["type"] == "bayes" and head["samples"] == 32
    # --bayes-layout auto: stacked only when its output resolves the spread between samples in >= 4 int8 steps
    estimate = head["layout_choice"]["stacked_estimate"]["steps"]
    assert head["layout"] == ("stacked" if estimate >= 4 else "centred")
    # the grid's outputs, then the unfamiliarity measure's projection at every cell (--val: on by default)
    rank = m["density"]["rank"]
    assert "normalise" not in m["density"] and "projection" not in m["density"]  # --density-normalise none
    if head["layout"] == "stacked":
        assert [o["role"] for o in m["outputs"]] == ["objectness", "boxes", "class_logits", "density_projection"]
        assert [o["shape"][-1] for o in m["outputs"]] == [1, 4, 32 * len(KNOWN), rank]
    else:
        assert [o["role"] for o in m["outputs"]] == ["objectness", "boxes", "class_logits", "class_residuals",
                                                     "density_projection"]
        assert [o["shape"][-1] for o in m["outputs"]] == [1, 4, len(KNOWN), 32 * len(KNOWN), rank]
    assert all(o["dtype"] == "int8" for o in m["outputs"])
    det = m["detector"]
    assert det["type"] == "grid" and det["stride"] == 16 and det["grid"] == [SIZE // 16, SIZE // 16]
    assert 0 < det["score_threshold"] < 1 and 0 < det["nms_iou"] <= 1
    ops = {op["op"] for op in b.report["ops"]}
    assert ops <= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "QUANTIZE", "DEQUANTIZE", "PAD"}, ops
    for name in ("float", "quantized"):
        v = m["validation"][name]
        assert 0.0 <= v["map50"] <= 1.0 and 0.0 <= v["map"] <= v["map50"] + 1e-9
        assert v["unknown_objects"] > 0  # the val scenes hold bags
    # unfamiliarity percentiles are read against the int8 detections of known objects in --val (not the density's
    # held-out cells, which run less familiar), so the --review-ood-rate threshold flags about 5% of those
    fit = m["density"]["fit"]
    assert fit["reference"] == "int8 detections matched to known objects of --val", fit
    # a detector's default score: the distance to the 10th nearest of (at most 1,000) fitting cells, kept in the
    # manifest in the projection's whitened coordinates
    dens = m["density"]
    assert dens["method"] == "knn_whitened" and dens["neighbours"] == 10, dens["method"]
    assert dens["references"]["shape"] == [min(fit["samples"], 1000), rank]
    known = m["validation"]["quantized"]["flagged"]["known"]
    assert known["count"] == fit["reference_samples"]
    check("detect.det.known_detections", known["count"])
    # open set (--unknown auto with --val): a cell is kept by its class score or by its objectness, the threshold
    # the best class-agnostic F1 on --val's known objects; the unknown score's threshold publishes --review-ood-rate
    # (5%) of --val's known detections as "unknown", and so the review rule no longer has an unfamiliarity part
    assert 0 < det["objectness_threshold"] < 1
    assert det["objectness_threshold_calibration"]["rule"].startswith("highest class-agnostic F1")
    unknown = m["unknown"]
    assert unknown["measures"] and unknown["count"] == known["count"] and unknown["ood_rate"] == 0.05
    assert m["head"]["review"].get("unfamiliar_threshold") is None
    published = m["validation"]["quantized"]["known_objects"]["published_unknown"]
    assert abs(published - 0.05) <= 1.5 / known["count"] + 0.005, (published, known["count"])
    # the class samples survive int8: the spread between them is kept within a third
    spread = m["head"]["spread"]
    check("detect.det.spread_ratio_error", abs(spread["quantized"] / spread["float"] - 1))
    check("detect.det.density_int8_vs_float_correlation", fit["int8_vs_float_correlation"])
    r = run_edgeq("inspect", str(bundle), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runtime"]["whole_graph"] is True
    r = run_edgeq("inspect", str(bundle))
    assert r.returncode == 0, r.stderr
    assert f"grid {SIZE // 16}x{SIZE // 16} at stride 16" in r.stdout and "mAP@0.5 float" in r.stdout
    assert f"percentiles from the {fit['reference_samples']} int8 detections matched to known objects" in r.stdout
    assert f"score: distance to the 10th nearest of {dens['references']['shape'][0]} fitting samples" in r.stdout


def test_l2_density_outputs_the_neck_and_scores_like_the_float_model(detector, scenes, bundle, tmp_path):
    """--density-normalise l2: the graph outputs the neck instead of the projection, the manifest carries the
    whitening, the device projects each detection's unit-length features, and the result is what the float model's
    neck gives (the same detections, scores within int8 rounding of the float features)."""
    from edgeq.bundle import read_bundle
    from edgeq.converter.evaluation.detect import run_detector
    from edgeq.converter.data.coco import read_coco
    from edgeq.density import unit_length
    from edgeq.detection import GridSpec

    out = tmp_path / "l2.edgeq"
    layout = read_bundle(bundle).manifest.head.layout
    r = edgeq_here("convert", str(detector), "--calib", str(scenes["train"]), "--calib-samples", "30", "--val",
                  str(scenes["val"]), "--bayes-layout", layout, "--density-normalise", "l2", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the features divided by their length, an output the device projects" in r.stderr + r.stdout
    b = read_bundle(out)
    m = b.manifest.to_json()
    width, rank = m["density"]["features"], m["density"]["rank"]
    assert m["density"]["normalise"] == "l2" and m["density"]["projection"]["shape"] == [width, rank]
    assert m["outputs"][-1]["role"] == "density_features" and m["outputs"][-1]["shape"][-1] == width
    assert "density_projection" not in [o["role"] for o in m["outputs"]]
    check("detect.l2.density_int8_vs_float_correlation", m["density"]["fit"]["int8_vs_float_correlation"])
    r = run_edgeq("inspect", str(out))
    assert r.returncode == 0 and "features (neck, divided by their length)" in r.stdout, r.stdout
    # the device's path: every detection of the val scenes gets a finite unfamiliarity from the neck's codes
    model = b.load_model()
    grid = GridSpec.from_manifest(b.manifest, b.where).bind(model, b.manifest.outputs, b.where, b.manifest.density)
    assert grid.density.projection is None and grid.density.features is not None
    results = run_detector(model, grid, b.preprocess_spec, read_coco(str(scenes["val"])))
    scores = np.concatenate([r.detections.unfamiliarity for r in results])
    assert len(scores) > 20 and np.all(np.isfinite(scores)) and np.all(scores >= 0)
    # the projection is linear: unit-length features projected in float give the same coordinates within int8
    t = grid.density.features
    raw = {t.index: np.random.default_rng(0).integers(-128, 127, t.shape).astype(np.int8)}
    want = unit_length(t.dequantize(raw[t.index]).reshape(-1, width)) @ grid.density.density.whitening
    np.testing.assert_allclose(grid.density.whitened(raw), want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def evaluated(bundle, detector, scenes, tmp_path_factory) -> tuple[dict, Path]:
    """`edgeq eval` of the int8 bundle beside its Keras reference on the test scenes, which convert never saw; and
    the HTML report."""
    report = tmp_path_factory.mktemp("det-report")
    r = run_edgeq("eval", str(bundle), "--data", str(scenes["test"]), "--reference", str(detector),
                  "--report", str(report), "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), report / "report.html"


def test_detection_quality_floor_on_a_fixed_seed(evaluated):
    """The whole chain (scenes -> backbone -> detector -> int8) on fixed seeds reaches its floors on the test
    scenes: mAP@0.5, int8 within reach of float, labels better than chance, known objects rarely published as
    unknown; and tripwires on how unfamiliarity and the unknown score rank bags against known objects, which on
    this small detector sit near chance or below it over five seeds (tests/floors.py, floors.json): the open
    problem of issue 37, held here so that it cannot get worse unseen."""
    models = evaluated[0]["models"]
    f, q = models["reference"], models["quantized"]
    check("detect.det.map50_int8", q["map50"])
    check("detect.det.map50_gap", abs(q["map50"] - f["map50"]))
    assert q["matched_known"] > 0 and q["matched_unknown"] > 0
    check("detect.det.label_accuracy_known", q["label_accuracy_known"])
    check("detect.det.test_unknown_auroc_unfamiliarity", q["unknown_auroc"]["unfamiliarity"])
    # the unknown score on objects convert never saw: bags found at all (kept by class score or objectness), ranked
    # above known objects, published as "unknown"; known objects published as such near the 5% set on --val
    bag = q["unknown_kinds"]["bag"]
    check("detect.det.test_bag_found_rate", bag["found_rate"])
    check("detect.det.test_bag_auroc_unknown_score", bag["auroc"]["unknown_score"])
    # found bags published as "unknown": 0 to 25% over five seeds (floors.json at 5f821d3), too low and too spread
    # for a floor that could fail; the detector's unknown score does not yet do this job (issue 37)
    check("detect.det.test_known_published_unknown", q["known_objects"]["published_unknown"])


def test_run_publishes_detections_with_uncertainty_on_a_video(bundle, tmp_path):
    import jsonschema

    from edgeq.bundle import message_schema
    from edgeq.converter.data.scenes import moving_scene_frames
    from edgeq.converter.data.shapes import write_video

    frames, _ = moving_scene_frames(12, 160, seed=3, unknown_classes=("bag",), object_size=(30, 50))
    # a 4:3 frame into the square letterboxed input: boxes must map back through the padding
    clip = write_video(tmp_path / "clip.avi", [f[20:140] for f in frames], fourcc="FFV1")
    from edgeq.bundle import read_bundle

    m = read_bundle(bundle).manifest.to_json()
    r = run_edgeq("run", "--model", str(bundle), "--source", str(clip), "--output", "-", "--spool",
                  str(tmp_path / "s.db"), "--config", str(_config(tmp_path, score=0.001)))
    assert r.returncode == 0, r.stderr[-2000:]
    msgs = [json.loads(ln) for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]
    assert len(msgs) == 12  # a file source drops nothing
    schema = message_schema("detections")
    found = 0
    for msg in msgs:
        jsonschema.validate(msg, schema)
        assert msg["task"] == "detect" and msg["frame"]["width"] == 160 and msg["frame"]["height"] == 120
        for d in msg["detections"]:
            found += 1
            y0, x0, y1, x1 = d["box"]
            assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
            if d["label"] == "unknown":  # none of its classes: the box is kept, the nearest class beside it
                assert d["nearest_label"] in m["labels"] and d["review_reason"] == "unknown"
                assert d["uncertainty"].get("unknown_score", np.inf) >= m["unknown"]["threshold"]
            else:
                assert d["label"] in m["labels"] and d["score"] <= d["objectness"] + 1e-6
            u = d["uncertainty"]
            assert u["method"] == "mc" and u["samples"] == 32
            assert abs(u["predictive_entropy"] - u["aleatoric"] - u["mutual_information"]) < 1e-4
            assert isinstance(d["needs_review"], bool)
    assert found > 0


def _config(tmp_path: Path, score: float) -> Path:
    """A device config setting the score threshold and a needs_review rule of its own (a 1-epoch model may have
    too few confident validation detections for convert to calibrate one)."""
    p = tmp_path / "device.toml"
    p.write_text(f"[thresholds]\nscore = {score}\nreview = 0.01\nreview_measure = \"mutual_information\"\n")
    return p


def test_eval_reports_map_calibration_and_unknown_auroc(bundle, detector, scenes, evaluated, tmp_path):
    report, page = evaluated
    assert report["task"] == "detect" and set(report["models"]) == {"reference", "quantized"}
    for fig in report["models"].values():
        # the Keras reference is exported with the bundle's own 32 weight samples
        assert fig["images"] == VAL_SCENES and fig["samples"] == 32
    q = report["models"]["quantized"]
    assert q["runtime"]["runtime"] == "ai-edge-litert"  # setup installs it; the fallbacks are for other machines
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 2 and "https://" not in text
    # the measures that decide are shown: the unknown score's and unfamiliarity's AUROC, frames by verdict
    assert "AUROC unknown: unknown score" in text and "What the device would say" in text
    assert report["review_rule"] is not None and report["objectness_threshold"] is not None
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: scripts/setup.sh installs it"
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    n = text.count("data:image/png;base64,")
    assert f'data-images-loaded="{n}"' in out.stdout, out.stdout[:500]
    # a float32 bundle of the same detector, with the int8 bundle beside it: convert's float path and eval's Keras
    # reference are the same float model (same weight samples) read with the float bundle's manifest (the reference
    # takes the first bundle's thresholds and unknown block), so their figures agree exactly
    from edgeq.bundle import read_bundle

    float_bundle = tmp_path / "float32.edgeq"
    layout = read_bundle(bundle).manifest.head.layout
    r = edgeq_here("convert", str(detector), "--quant", "float32", "--bayes-layout", layout, "-o", str(float_bundle))
    assert r.returncode == 0, r.stderr[-2000:]
    r = edgeq_here("eval", str(float_bundle), "--data", str(scenes["test"]), "--compare", str(bundle),
                  "--reference", str(detector), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    models = json.loads(r.stdout)["models"]
    for key in ("map50", "map", "detections", "matched_known", "matched_unknown"):
        assert models["quantized"][key] == models["reference"][key], key
    int8 = models[Path(bundle).stem]
    assert models["quantized"]["variant"].startswith("float32") and int8["variant"].startswith("int8")
    assert int8["size_bytes"] < models["quantized"]["size_bytes"]
    r = edgeq_here("eval", str(bundle), "--data", str(scenes["test"]))
    assert r.returncode == 0 and "mAP@0.5" in r.stdout and "AUROC unknown" in r.stdout
    # the plain table shows the same figures as the JSON
    assert f"{q['map50']:.4f}" in r.stdout and f"{q['unknown_auroc']['unfamiliarity']:.4f}" in r.stdout


def test_eval_refuses_a_task_and_data_mismatch(bundle, tiny_bundle, scenes, shapes_dir):
    assert_clean_error(edgeq_here("eval", str(bundle), "--data", str(shapes_dir)), "detection bundle", "COCO")
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(scenes["val"])),
                       "COCO detection set", "classification bundle")
    assert_clean_error(edgeq_here("eval", str(bundle), "--data", str(scenes["val"]), "--ood", str(shapes_dir)), "--ood")


def _broken_coco(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "annotations.json").read_text())
    edit(doc)
    (dst / "annotations.json").write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["images"][0].update(file_name="gone.png"), "gone.png not found"),
    (lambda d: d["annotations"][0].update(category_id=99), "category_id 99"),
    (lambda d: d["annotations"][0].update(bbox=[90, 90, 40, 40]), "outside"),
    (lambda d: d.update(annotations=[]), "empty"),
])
def test_train_refuses_broken_coco_sets(scenes, tmp_path, edit, needle):
    data = _broken_coco(scenes["train"], tmp_path / "broken", edit)
    out = tmp_path / "m.keras"
    err = assert_clean_error(edgeq_here("train", "--task", "detect", str(data), "-o", str(out),
                                       "--input-size", str(SIZE), "--epochs", "1"), needle)
    assert "annotations.json" in err
    assert not out.exists()


@pytest.mark.parametrize("flags,needle", [
    (["--epochs", "0"], "--epochs 0"), (["--input-size", "100"], "multiple of 16"), (["--lr", "0"], "--lr 0"),
    (["--freeze-backbone"], "--freeze-backbone"),
])
def test_train_detect_refuses_bad_options(scenes, tmp_path, flags, needle):
    assert_clean_error(edgeq_here("train", "--task", "detect", str(scenes["train"]), "-o", str(tmp_path / "m.keras"),
                                 *flags), needle)


def test_convert_refuses_what_a_detector_does_not_take(detector, scenes, tmp_path):
    out = tmp_path / "x.edgeq"
    assert_clean_error(edgeq_here("convert", str(detector), "--calib", str(scenes["train"]), "--clusters", "16",
                                 "-o", str(out)), "--clusters", "detectors")
    assert_clean_error(edgeq_here("convert", str(detector), "--calib", str(scenes["train"]), "--quant", "float16",
                                 "-o", str(out)), "float16")
    assert not out.exists()
    # a --val of other categories fails before any conversion
    other = tmp_path / "other"
    shutil.copytree(scenes["val"], other)
    doc = json.loads((other / "annotations.json").read_text())
    for c in doc["categories"]:
        c["id"] += 100
    for a in doc["annotations"]:
        a["category_id"] += 100
    (other / "annotations.json").write_text(json.dumps(doc))
    assert_clean_error(edgeq_here("convert", str(detector), "--calib", str(scenes["train"]), "--val", str(other),
                                 "-o", str(out)), "category ids", "--val")
    assert not out.exists()


def test_grid_decoder_maps_boxes_back_through_letterbox():
    """Pure logic: one object on a hand-built grid, a 4:3 frame letterboxed into a square input."""
    from edgeq.detection import decode
    from edgeq.preprocess import Preprocessor, PreprocessSpec

    spec = PreprocessSpec(96, 96, resize="letterbox")
    _, transform = Preprocessor(spec)(np.zeros((120, 160, 3), np.uint8))  # scale 0.6, 12 px padding top/bottom
    obj = np.full((6, 6), -8.0, np.float32)
    obj[2, 3] = 6.0  # cell centre (56, 40) in input pixels
    boxes = np.zeros((6, 6, 4), np.float32)
    boxes[2, 3] = [1.0, 0.5, 1.0, 1.5]  # left, top, right, bottom in cells: x 40..72, y 32..64
    logits = np.zeros((6, 6, 4, 3), np.float32)
    logits[2, 3, :, 1] = 5.0
    d = decode(obj, boxes, logits, 16, (96, 96), score_threshold=0.3)
    assert len(d) == 1 and int(d.classes[0]) == 1
    frame_box = transform.boxes_to_frame(d.boxes)[0] * np.array([120, 160, 120, 160])
    # input y 32..64 -> frame (y - 12) / 0.6 = 33.3..86.7; x 40..72 -> 66.7..120
    np.testing.assert_allclose(frame_box, [33.33, 66.67, 86.67, 120.0], atol=0.05)


def test_centred_outputs_add_up_to_the_stacked_sample_logits():
    """Pure logic: the centred layout's mean + residual tensors give the same [cells, K, C] logits as stacked."""
    from edgeq.detection import GridSpec
    from edgeq.runtime import TensorInfo

    rng = np.random.default_rng(0)
    k, c, g = 4, 3, 2
    samples = rng.normal(size=(g * g, k, c)).astype(np.float32)
    mean = samples.mean(axis=1, keepdims=True)

    def info(i: int, ch: int) -> TensorInfo:
        return TensorInfo(f"t{i}", i, (1, g, g, ch), np.dtype(np.float32), 0.0, 0)

    from edgeq.detection import BoundGrid
    from edgeq.manifest import Detector, Head

    detector = Detector(stride=16, grid=(g, g))
    spec = GridSpec.from_blocks(detector, Head(type="bayes", samples=k, classes=c, layout="centred"), c)
    bound = BoundGrid(spec, [info(0, 1), info(1, 4), info(2, c), info(3, k * c)])
    raw = {2: mean.reshape(1, g, g, c), 3: (samples - mean).reshape(1, g, g, k * c)}
    np.testing.assert_allclose(bound.class_samples(raw), samples, atol=1e-6)
    stacked = BoundGrid(GridSpec.from_blocks(detector, Head(type="bayes", samples=k, classes=c, layout="stacked"), c),
                        [info(0, 1), info(1, 4), info(2, k * c)])
    np.testing.assert_allclose(stacked.class_samples({2: samples.reshape(1, g, g, k * c)}), samples)


def test_conversion_checks_each_output_role_against_the_keras_model(detector):
    """Roles come from the TFLite signature's order; the converter verifies them numerically, so a swap (which
    shapes alone would miss for a 4-class deterministic head) is an error, not a silently wrong bundle."""
    from edgeq.converter.products import Converted
    from edgeq.converter.models.detector import export_detector
    from edgeq.converter.recipes import QuantMode, QuantRecipe
    from edgeq.converter.stages.load import SourceModel, load_source_model
    from edgeq.converter.tflite import convert_model
    from edgeq.converter.tasks.detect import _check_roles
    from edgeq.detection import BoundGrid, GridSpec, describe_grid_outputs, signature_outputs
    from edgeq.errors import QuantizationError
    from edgeq.manifest import Detector, Head
    from edgeq.runtime import Model

    source = load_source_model(str(detector))
    exported, head = export_detector(source.keras_model, 4, layout="stacked")
    data = convert_model(SourceModel(exported, None, source.input_shape, 1, "d", "d"), QuantRecipe(QuantMode.FLOAT32),
                         None)
    model = Model(data)
    spec = GridSpec.from_blocks(Detector(stride=16, grid=(SIZE // 16, SIZE // 16)),
                                Head(type="bayes", samples=4, classes=head["classes"], layout="stacked"), head["classes"])
    outputs = describe_grid_outputs(model, signature_outputs(model))
    grid = spec.bind(model, outputs)
    x = np.random.default_rng(0).uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    _check_roles(exported, Converted(data, model, outputs, grid), x)  # the right roles pass
    swapped = BoundGrid(grid.spec, [grid.tensors[1], grid.tensors[0], grid.tensors[2]])
    with pytest.raises(QuantizationError, match="output roles"):
        _check_roles(exported, Converted(data, model, outputs, swapped), x)


def test_init_backbone_is_refused_where_it_cannot_apply(scenes, tiny_keras_path, tmp_path, shapes_dir):
    out = tmp_path / "m.keras"
    assert_clean_error(edgeq_here("train", str(shapes_dir), "--init-backbone", str(tiny_keras_path), "-o", str(out)),
                       "--init-backbone", "--task detect")
    common = ["train", "--task", "detect", str(scenes["train"]), "-o", str(out), "--input-size", str(SIZE),
              "--epochs", "1"]
    assert_clean_error(edgeq_here(*common, "--init-backbone", str(shapes_dir)), "--init-backbone", ".keras")
    # a model with none of MobileNetV2's layers
    assert_clean_error(edgeq_here(*common, "--init-backbone", str(tiny_keras_path)), "no layer matches")
    assert not out.exists()


@pytest.fixture(scope="module")
def deterministic_detector(tmp_path_factory) -> Path:
    """An untrained detector with a deterministic class head (no BayesDense)."""
    from edgeq.converter.models.detector import build_detector

    path = tmp_path_factory.mktemp("det-dense") / "dense.keras"
    return save_with_labels(build_detector(SIZE, 0.35, len(KNOWN), seed=1), path, list(KNOWN))


def test_deterministic_detector_options(deterministic_detector, scenes, tmp_path):
    out = tmp_path / "x.edgeq"
    common = ["convert", str(deterministic_detector), "--calib", str(scenes["train"]), "--calib-samples", "10",
              "-o", str(out)]
    assert_clean_error(edgeq_here(*common, "--bayes-samples", "8"), "--bayes-samples", "deterministic")
    assert_clean_error(edgeq_here(*common, "--val", str(scenes["val"]), "--review-measure", "mutual_information"),
                       "--review-measure", "deterministic")
    assert_clean_error(edgeq_here(*common, "--bias-correction", "on"), "--bias-correction")
    assert not out.exists()
    # an untrained model with no stored COCO ids takes ids 1..C, and the --calib set holds none of id 3: the
    # unfamiliarity fit (on by default with labelled data) refuses it, naming the class
    assert_clean_error(edgeq_here(*common), "class 'sneaker' has 0 usable sample(s)", "--density off")
    assert not out.exists()
    # and without those, it converts: K = 1, the single layout, three outputs
    r = edgeq_here(*common, "--density", "off")
    assert r.returncode == 0, r.stderr[-2000:]
    from edgeq.bundle import read_bundle

    m = read_bundle(out).manifest.to_json()
    assert m["head"]["samples"] == 1 and m["head"]["layout"] == "single" and len(m["outputs"]) == 3
