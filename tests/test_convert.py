"""`edgeq convert` end to end with the real TensorFlow converter and LiteRT, and every bad input it must refuse."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import (SHAPE_LABELS, assert_clean_error, edgeq_here, manifest_of, run_edgeq, save_with_labels,
                      write_pngs)
from edgeq.bundle import read_bundle
from edgeq.cli import main

pytestmark = pytest.mark.slow


def test_builtin_mobilenet_v2_to_int8_bundle(tmp_path, shapes_dir, tiny_bundle):
    out = tmp_path / "m.edgeq"
    r = run_edgeq("convert", "mobilenet_v2", "--alpha", "0.35", "--input-size", "64", "--classes", "3",
                  "--calib", str(shapes_dir), "--calib-samples", "24", "--val", str(shapes_dir),
                  "--interpolation", "linear_exact", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "wrote" in r.stdout and "quantized top-1" in r.stdout
    b = read_bundle(out)
    m = b.manifest.to_json()
    assert m["labels"] == ["circle", "square", "triangle"]  # from the --val folders
    assert m["input"]["dtype"] == "int8" and m["input"]["height"] == 64 and m["input"]["color_order"] == "RGB"
    assert m["input"]["mean"] == [127.5] * 3 and m["input"]["scale"] > 0
    # the resize filter asked for is recorded; the default is left out of the manifest (older runtimes read those)
    assert m["input"]["interpolation"] == "linear_exact" and b.preprocess_spec.interpolation == "linear_exact"
    assert "interpolation" not in manifest_of(tiny_bundle)["input"]
    assert m["outputs"][0]["dtype"] == "int8" and m["outputs"][0]["shape"] == [1, 3]
    assert m["quantization"]["scheme"] == "int8" and m["quantization"]["float_ops"] == []
    assert m["calibration"]["count"] == 24 and m["calibration"]["kind"] == "folder"
    assert 0 < m["sizes"]["ratio_to_float32"] < 0.5
    v = m["validation"]
    assert v["count"] == 36 and 0 <= v["top1_agreement"] <= 1 and v["mean_abs_logit_error"] >= 0
    model = b.load_model()
    assert all(not op.is_float for op in model.ops)

    info = run_edgeq("inspect", str(out), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["runtime"]["runtime"] == "ai-edge-litert" and data["runtime"]["whole_graph"]
    assert {o["op"] for o in data["ops"]} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    assert all(o["results"] == "int8" for o in data["ops"])
    text = run_edgeq("inspect", str(out))
    assert "CONV_2D" in text.stdout and "int8" in text.stdout and "XNNPACK: whole graph" in text.stdout
    assert "RGB stretch (linear_exact)" in text.stdout


def test_validation_numbers_match_an_independent_run(tiny_bundle, tiny_keras_path, shapes_dir):
    """The manifest's quantised top-1 equals a fresh run of the bundle; the float one a run of the Keras model."""
    import keras

    from edgeq.converter.data.datasets import class_folder
    from edgeq.converter.evaluation.classify import score_files
    from edgeq.preprocess import Preprocessor, read_image

    b = read_bundle(tiny_bundle)
    data = class_folder(shapes_dir, b.labels)
    model = b.load_model()
    logits = b.manifest.outputs[0]  # the model also has the unfamiliarity projection: take the logits by name
    assert logits.role == "logits"
    scores = score_files(model, b.preprocess_spec, data.files, model.find_output(logits.name, logits.shape))
    assert b.manifest.to_json()["validation"]["quantized_top1"] == pytest.approx(np.mean(scores.argmax(1) == data.targets))
    k = keras.models.load_model(tiny_keras_path)
    pre = Preprocessor(b.preprocess_spec.with_dtype("float32"))
    x = pre.batch([read_image(f) for f in data.files])
    ref = k.predict(x, verbose=0)
    assert b.manifest.to_json()["validation"]["float_top1"] == pytest.approx(np.mean(ref.argmax(1) == data.targets))


@pytest.mark.parametrize("quant,dtype", [("uint8", "uint8"), ("int16x8", "int16"), ("float16", "float32")])
def test_other_modes(tmp_path, tiny_keras_path, shapes_dir, quant, dtype):
    out = tmp_path / f"{quant}.edgeq"
    code = main(["convert", str(tiny_keras_path), "--calib", str(shapes_dir), "--quant", quant, "-o", str(out)])
    assert code == 0
    m = read_bundle(out).manifest.to_json()
    assert m["quantization"]["scheme"] == quant and m["input"]["dtype"] == dtype


def test_calibration_from_video_and_npy(tmp_path, tiny_keras_path):
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    video = write_video(tmp_path / "clip.avi", moving_shapes_frames(40, 60, 80))
    out = tmp_path / "v.edgeq"
    assert main(["convert", str(tiny_keras_path), "--calib", str(video), "--calib-samples", "12", "-o", str(out)]) == 0
    cal = read_bundle(out).manifest.to_json()["calibration"]
    assert cal["kind"] == "video" and cal["count"] == 12
    arr = np.random.default_rng(0).integers(0, 256, (15, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "calib.npy", arr)
    out2 = tmp_path / "n.edgeq"
    assert main(["convert", str(tiny_keras_path), "--calib", str(tmp_path / "calib.npy"), "-o", str(out2)]) == 0
    assert read_bundle(out2).manifest.to_json()["calibration"]["count"] == 15


def test_keras_export_route_and_saved_model_input(tmp_path, tiny_keras_path, shapes_dir):
    """The fallback route (model.export -> SavedModel) gives the same model, and a SavedModel folder converts."""
    import keras

    from edgeq.converter.stages.calibrate import load_calibration
    from edgeq.converter.stages.load import load_source_model
    from edgeq.converter.recipes import QuantRecipe
    from edgeq.converter.tflite import convert_model
    from edgeq.preprocess import PreprocessSpec
    from edgeq.runtime import Model

    src = load_source_model(str(tiny_keras_path))
    calib = load_calibration(shapes_dir, PreprocessSpec(32, 32, 3), 20)
    direct = Model(convert_model(src, QuantRecipe(), calib, routes=("keras",)))
    exported = Model(convert_model(src, QuantRecipe(), calib, routes=("export",)))
    x = np.random.default_rng(0).integers(-128, 128, direct.input.shape, dtype=np.int8)
    a, b = direct.run(x), exported.run(x)
    assert np.allclose(list(a.values())[0], list(b.values())[0], atol=2 * direct.outputs[0].scale)

    saved = tmp_path / "saved"
    keras.models.load_model(tiny_keras_path).export(str(saved), format="tf_saved_model", verbose=False)
    out = tmp_path / "s.edgeq"
    # a SavedModel stores no class names: without --labels or --val it is refused, naming the fix
    code = main(["convert", str(saved), "--calib", str(shapes_dir), "-o", str(out)])
    assert code != 0 and not out.exists()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(SHAPE_LABELS) + "\n")
    assert main(["convert", str(saved), "--calib", str(shapes_dir), "--labels", str(labels), "-o", str(out)]) == 0
    m = read_bundle(out).manifest
    assert m.input.height == 32 and list(m.labels) == SHAPE_LABELS


# ---------------------------------------------------------------------------------------------------- bad input
def _no_bundle_left(folder: Path):
    assert not [p for p in folder.iterdir() if p.suffix in (".edgeq", ".tmp") or p.name.endswith(".tmp")]


def test_missing_model(tmp_path, shapes_dir):
    res = edgeq_here("convert", str(tmp_path / "nope.keras"), "--calib", str(shapes_dir), "-o", str(tmp_path / "o.edgeq"))
    assert_clean_error(res, "nope.keras", "not found")
    _no_bundle_left(tmp_path)


def test_corrupt_model(tmp_path, shapes_dir, tiny_keras_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(tiny_keras_path.read_bytes()[:300])
    res = edgeq_here("convert", str(bad), "--calib", str(shapes_dir), "-o", str(tmp_path / "o.edgeq"))
    assert_clean_error(res, "bad.keras", "cannot load")
    _no_bundle_left(tmp_path)


def test_ops_that_cannot_be_quantized(tmp_path, shapes_dir):
    import keras

    @keras.saving.register_keras_serializable(package="edgeq_tests")
    class Wave(keras.layers.Layer):
        def call(self, t):
            return keras.ops.sin(t)

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = Wave(name="wave")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    path = save_with_labels(model, tmp_path / "sin.keras", SHAPE_LABELS)
    out = tmp_path / "o.edgeq"
    res = edgeq_here("convert", str(path), "--calib", str(shapes_dir), "-o", str(out))
    line = assert_clean_error(res, "SIN", "--allow-float-fallback")
    assert "wave" in line  # names the layer the op came from
    _no_bundle_left(tmp_path)
    assert main(["convert", str(path), "--calib", str(shapes_dir), "-o", str(out), "--allow-float-fallback"]) == 0
    assert "SIN" in read_bundle(out).manifest.to_json()["quantization"]["float_ops"]


def test_empty_calibration_folder(tmp_path, tiny_keras_path):
    (tmp_path / "empty").mkdir()
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(tmp_path / "empty"), "-o", str(tmp_path / "o.edgeq"))
    assert_clean_error(res, "empty", "no jpg/png/bmp")
    _no_bundle_left(tmp_path)


def test_corrupt_calibration_folder(tmp_path, tiny_keras_path):
    calib = tmp_path / "calib"
    write_pngs(calib, 4, (40, 40, 3))
    for i in range(12):
        (calib / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(calib), "-o", str(tmp_path / "o.edgeq"))
    assert "skipped 12 unreadable" in res.stderr
    assert_clean_error(res, "only 4 usable samples")
    _no_bundle_left(tmp_path)


def test_wrong_channel_count(tmp_path, tiny_keras_path):
    calib = write_pngs(tmp_path / "rgba", 12, (40, 40, 4))
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(calib), "-o", str(tmp_path / "o.edgeq"))
    assert_clean_error(res, "4 channels", "takes 3")
    np.save(tmp_path / "two.npy", np.zeros((12, 40, 40, 2), np.uint8))
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(tmp_path / "two.npy"), "-o", str(tmp_path / "o.edgeq"))
    assert_clean_error(res, "two.npy", "1 or 3 channels")
    _no_bundle_left(tmp_path)


def test_unwritable_output(tmp_path, tiny_keras_path, shapes_dir):
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(shapes_dir), "-o", str(tmp_path / "no" / "o.edgeq"))
    assert_clean_error(res, "does not exist")
    (tmp_path / "file").write_text("x")
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(shapes_dir), "-o", str(tmp_path / "file" / "o.edgeq"))
    assert_clean_error(res, "o.edgeq")


def test_label_count_mismatch(tmp_path, tiny_keras_path, shapes_dir):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    res = edgeq_here("convert", str(tiny_keras_path), "--calib", str(shapes_dir), "--labels", str(labels),
                     "-o", str(tmp_path / "o.edgeq"))
    assert_clean_error(res, "2 labels", "3 classes")


def test_imagenet_weights_offline_is_clear(tmp_path, shapes_dir):
    # offline on any machine: an empty Keras cache, and every download through a proxy that refuses connections
    down = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY":
            "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    res = run_edgeq("convert", "mobilenet_v2", "--weights", "imagenet", "--alpha", "0.35", "--input-size", "96",
                    "--classes", "3", "--calib", str(shapes_dir), "-o", str(tmp_path / "o.edgeq"), env=down)
    assert_clean_error(res, "imagenet")
    assert not (tmp_path / "o.edgeq").exists()


def _damage(bundle: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / f"{how}.edgeq"
    data = bundle.read_bytes()
    if how == "truncated":
        target.write_bytes(data[: len(data) * 2 // 3])
        return target
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            blob = zin.read(item.filename)
            if how == "tampered" and item.filename == "model.tflite":
                blob = blob[:-1] + bytes([blob[-1] ^ 1])
            if how == "schema" and item.filename == "manifest.json":
                m = json.loads(blob)
                m["schema_version"] = 7
                blob = json.dumps(m).encode()
            zout.writestr(item, blob)
    return target


@pytest.mark.parametrize("how,needle", [("truncated", "truncated"), ("tampered", "sha256"), ("schema", "schema version 7")])
def test_damaged_bundles_are_refused(tiny_bundle, tmp_path, how, needle):
    r = run_edgeq("inspect", str(_damage(tiny_bundle, tmp_path, how)))
    assert_clean_error(r, needle)
