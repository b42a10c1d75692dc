"""Standard SSD models keep working: a real TFLite model ending in TFLite_Detection_PostProcess (built here with
TensorFlow: the converter lowers an ``experimental_implements`` composite function to the op) runs through
``edgeq run`` with its boxes, classes and scores reported as the op computed them, score only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_edgeq, write_pngs

pytestmark = pytest.mark.slow

ANCHORS, CLASSES, SIZE = 64, 3, 64


def _ssd_tflite() -> bytes:
    import tensorflow as tf

    attrs = {"max_detections": ("i", 10), "max_classes_per_detection": ("i", 1), "use_regular_nms": ("b", "false"),
             "nms_score_threshold": ("f", 0.1), "nms_iou_threshold": ("f", 0.5), "y_scale": ("f", 10.0),
             "x_scale": ("f", 10.0), "h_scale": ("f", 5.0), "w_scale": ("f", 5.0), "num_classes": ("i", CLASSES)}
    signature = " ".join(['name: "TFLite_Detection_PostProcess"'] + [
        f'attr {{ key: "{k}" value {{ {t}: {v} }} }}' for k, (t, v) in attrs.items()])
    centres = (np.arange(8) + 0.5) / 8
    yx = np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    anchors = np.concatenate([yx, np.full((ANCHORS, 2), 0.25)], 1).astype(np.float32)

    @tf.function(experimental_implements=signature)
    def postprocess(box_encodings, class_predictions, anchor_boxes):  # noqa: ARG001 (the op replaces the body)
        zero = tf.constant(0.0)
        return zero, zero, zero, zero

    class SSD(tf.Module):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.conv = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32))
            self.box = tf.Variable(rng.normal(0, 0.1, (8, 4)).astype(np.float32))
            self.cls = tf.Variable(rng.normal(0, 1.0, (8, CLASSES + 1)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)])
        def __call__(self, x):
            f = tf.reshape(tf.nn.relu(tf.nn.conv2d(x, self.conv, 8, "SAME")), [1, ANCHORS, 8])
            return postprocess(tf.matmul(f, self.box), tf.sigmoid(tf.matmul(f, self.cls)), tf.constant(anchors))

    module = SSD()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    converter.allow_custom_ops = True
    return bytes(converter.convert())


def _postprocess_outputs(model) -> list:
    """The TFLite_Detection_PostProcess op's four output tensors in the op's own order (boxes, classes, scores,
    count, by its definition): the roles known by construction, not guessed from names or shapes."""
    op = next(d for d in model.interpreter._get_ops_details() if d["op_name"] == "TFLite_Detection_PostProcess")
    by_index = {t.index: t for t in model.outputs}
    return [by_index[int(i)] for i in op["outputs"]]


@pytest.fixture(scope="module")
def ssd_bundle(tmp_path_factory) -> Path:
    from edgeq.bundle import write_bundle
    from edgeq.runtime import Model

    model_bytes = _ssd_tflite()
    model = Model(model_bytes)
    outputs = [{"role": role, **t.to_dict()} for role, t in zip(("boxes", "classes", "scores", "count"),
                                                                _postprocess_outputs(model))]
    manifest = {
        "name": "ssd_test", "task": "detect", "labels": ["a", "b", "c"],
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "dtype": "float32", "color_order": "RGB",
                  "resize": "stretch", "mean": [127.5] * 3, "std": [127.5] * 3},
        "outputs": outputs, "quantization": {"scheme": "float32", "weights": "float32", "activations": "float32",
                                             "full_integer": False},
        "calibration": {"count": 0, "source": None},
    }
    return write_bundle(tmp_path_factory.mktemp("ssd") / "ssd.edgeq", manifest, model_bytes)


def test_ssd_bundle_runs_and_reports_the_ops_own_boxes(ssd_bundle, tmp_path):
    from edgeq.bundle import read_bundle
    from edgeq.preprocess import Preprocessor, read_image

    frames = write_pngs(tmp_path / "frames", 3, (SIZE, SIZE, 3), seed=4)
    r = run_edgeq("run", "--model", str(ssd_bundle), "--source", str(frames), "--output", "-",
                  "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr[-2000:]
    msgs = [json.loads(ln) for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]
    assert len(msgs) == 3
    # the same frame through the interpreter directly: edgeq reports what the op computed, above the threshold
    b = read_bundle(ssd_bundle)
    model = b.load_model()
    first = sorted(frames.iterdir())[0]
    tensor, _ = Preprocessor(b.preprocess_spec)(read_image(first))
    model.set_input(tensor)
    model.invoke()
    roles = dict(zip(("boxes", "classes", "scores", "count"), _postprocess_outputs(model)))
    n = int(model.get(roles["count"]).reshape(-1)[0])
    scores = model.get(roles["scores"]).reshape(-1)[:n]
    keep = scores >= 0.5  # the device's default score threshold for SSD bundles
    dets = msgs[0]["detections"]
    assert len(dets) == int(keep.sum()) > 0
    np.testing.assert_allclose([d["score"] for d in dets], scores[keep], atol=1e-5)
    want = np.clip(model.get(roles["boxes"]).reshape(-1, 4)[:n][keep], 0, 1)
    np.testing.assert_allclose([d["box"] for d in dets], want, atol=1e-5)
    classes = model.get(roles["classes"]).reshape(-1)[:n][keep].astype(int)
    assert [d["class_id"] for d in dets] == classes.tolist()
    assert all(d["uncertainty"] is None and d["needs_review"] is None for d in dets)
    # what each role means, checked on the published values (a classes/scores swap fails here): scores are
    # probabilities sorted high to low and not whole numbers, class ids index the labels
    published = [d["score"] for d in dets]
    assert published == sorted(published, reverse=True) and all(0.5 <= s < 1 and s != round(s) for s in published)
    assert all(0 <= d["class_id"] < CLASSES and d["label"] == ["a", "b", "c"][d["class_id"]] for d in dets)
