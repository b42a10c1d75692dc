import numpy as np
import pytest

from edgeq.errors import CalibrationError
from edgeq.preprocess import Preprocessor, PreprocessSpec, build_lut, to_channels


def reference(frame_bgr, spec):
    """Straightforward float implementation to check the fused lookup-table path against."""
    import cv2

    resized = cv2.resize(frame_bgr, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    if spec.color_order.value == "RGB":
        resized = resized[..., ::-1]
    x = (resized - np.array(spec.mean)) / np.array(spec.std)
    if spec.dtype == "float32":
        return x.astype(np.float32)
    v = x / spec.scale
    q = np.sign(v) * np.floor(np.abs(v) + 0.5) + spec.zero_point
    info = np.iinfo(spec.dtype)
    return np.clip(q, info.min, info.max).astype(spec.dtype)


@pytest.mark.parametrize("dtype,scale,zp", [("float32", 1.0, 0), ("int8", 2 / 255, -1), ("uint8", 2 / 255, 127)])
def test_lut_path_equals_float_reference(dtype, scale, zp):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    spec = PreprocessSpec(32, 40, 3, mean=(127.5,), std=(127.5,), dtype=dtype, scale=scale, zero_point=zp)
    out, _ = Preprocessor(spec)(frame)
    assert out.shape == (1, 32, 40, 3) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out[0], reference(frame, spec))


def test_per_channel_normalisation_and_bgr_order():
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    frame[..., 0] = 10  # B
    frame[..., 2] = 200  # R
    spec = PreprocessSpec(8, 8, 3, color_order="BGR", mean=(10, 0, 100), std=(1, 1, 2))
    out, _ = Preprocessor(spec)(frame)
    assert np.allclose(out[0, 0, 0], [0.0, 0.0, 50.0])
    spec_rgb = PreprocessSpec(8, 8, 3, color_order="RGB", mean=(0,), std=(1,))
    out, _ = Preprocessor(spec_rgb)(frame)
    assert np.allclose(out[0, 0, 0], [200.0, 0.0, 10.0])


def test_writes_into_preallocated_buffer():
    spec = PreprocessSpec(16, 16, 3, dtype="int8", scale=0.01, zero_point=0)
    pre = Preprocessor(spec)
    rng = np.random.default_rng(1)
    a, _ = pre(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    b, _ = pre(rng.integers(0, 256, (30, 10, 3), dtype=np.uint8))
    assert a is b is pre.buffer
    external = np.empty(spec.shape, dtype=np.int8)
    c, _ = pre(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), out=external)
    assert c is external


def test_letterbox_keeps_aspect_and_maps_boxes_back():
    frame = np.zeros((100, 200, 3), dtype=np.uint8)
    frame[25:75, 50:150] = 255  # a white box in the middle of a 2:1 frame
    spec = PreprocessSpec(64, 64, 3, resize="letterbox", mean=(0,), std=(1,), pad_value=0)
    out, t = Preprocessor(spec)(frame)
    assert (t.pad_x, t.pad_y) == (0.0, 16.0)
    rows = np.where(out[0, :, 32, 0] > 128)[0]
    assert rows.min() == 16 + 8 and rows.max() == 16 + 23
    # the white box in model coordinates (ymin, xmin, ymax, xmax) maps back to the frame's [0.25, 0.25, 0.75, 0.75]
    model_box = np.array([(16 + 8) / 64, 16 / 64, (16 + 24) / 64, 48 / 64])
    np.testing.assert_allclose(t.boxes_to_frame(model_box), [0.25, 0.25, 0.75, 0.75], atol=1e-6)


def test_a_box_in_the_letterbox_padding_is_not_on_the_frame():
    _, t = Preprocessor(PreprocessSpec(64, 64, 3, resize="letterbox", mean=(0,), std=(1,)))(
        np.zeros((100, 200, 3), dtype=np.uint8))
    boxes = np.array([[2 / 64, 0.2, 14 / 64, 0.5],      # inside the top band (rows 0-15): clipped to no height
                      [10 / 64, 0.2, 17 / 64, 0.5],     # reaches 3 frame rows into the image
                      [24 / 64, 0.25, 40 / 64, 0.75]])  # the middle of the frame
    frame_boxes = t.boxes_to_frame(boxes)
    assert frame_boxes[0, 0] == frame_boxes[0, 2] == 0.0
    assert t.visible(frame_boxes).tolist() == [False, True, True]


def test_detections_take_selects_every_per_detection_field():
    from edgeq.detection import Detections

    n = 3
    d = Detections(boxes=np.arange(12, dtype=np.float32).reshape(n, 4), classes=np.array([0, 1, 2]),
                   scores=np.array([0.9, 0.8, 0.7]), objectness=np.ones(n), probabilities=np.eye(n),
                   predictive_entropy=np.arange(n) * 0.1, aleatoric=np.zeros(n), mutual_information=np.zeros(n),
                   std=np.zeros(n), samples=32, cells=np.array([5, 6, 7]), unfamiliarity=np.array([1.0, 2.0, 3.0]))
    t = d.take(np.array([True, False, True]))
    assert len(t) == 2 and t.samples == 32
    assert t.classes.tolist() == [0, 2] and t.cells.tolist() == [5, 7] and t.unfamiliarity.tolist() == [1.0, 3.0]
    assert t.boxes.shape == (2, 4) and t.probabilities.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert len(d.take(np.zeros(n, bool))) == 0


def test_stretch_maps_boxes_identically():
    _, t = Preprocessor(PreprocessSpec(32, 32, 3))(np.zeros((10, 50, 3), dtype=np.uint8))
    box = np.array([[0.1, 0.2, 0.5, 0.9]])
    np.testing.assert_allclose(t.boxes_to_frame(box), box, atol=1e-6)


def test_grey_is_replicated_and_odd_channels_refused():
    grey = np.full((10, 10), 7, dtype=np.uint8)
    assert to_channels(grey, 3).shape == (10, 10, 3)
    assert to_channels(np.zeros((10, 10, 3), np.uint8), 1).shape == (10, 10, 1)
    with pytest.raises(CalibrationError, match="4 channels"):
        to_channels(np.zeros((10, 10, 4), np.uint8), 3, source="x.png")
    with pytest.raises(CalibrationError, match="pixel type"):
        to_channels(np.zeros((10, 10, 3), np.float32), 3)


def test_spec_validation_and_roundtrip():
    spec = PreprocessSpec(10, 12, 3, dtype="int8", scale=0.5, zero_point=3, resize="letterbox")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        PreprocessSpec(10, 10, 2)
    with pytest.raises(ValueError):
        PreprocessSpec(10, 10, 3, dtype="int8", scale=0)
    lut = build_lut(PreprocessSpec(4, 4, 3, dtype="int8", scale=2 / 255, zero_point=-1))
    assert lut[0, 0] == -128 and lut[0, 255] == 127


def test_linear_exact_resizes_with_opencvs_exact_filter_and_is_recorded_only_when_asked():
    import cv2

    frame = np.random.default_rng(3).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    exact = PreprocessSpec(64, 64, 3, dtype="float32", interpolation="linear_exact")
    got, _ = Preprocessor(exact)(frame)
    want = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_LINEAR_EXACT)[..., ::-1].astype(np.float64)
    np.testing.assert_array_equal(got[0], ((want - 127.5) / 127.5).astype(np.float32))
    linear, _ = Preprocessor(PreprocessSpec(64, 64, 3, dtype="float32"))(frame)
    assert not np.array_equal(linear, got)  # the two filters round differently: the field changes what runs
    # the default is left out of the manifest (older runtimes read such bundles); linear_exact round-trips
    assert "interpolation" not in PreprocessSpec(64, 64).to_dict()
    assert exact.to_dict()["interpolation"] == "linear_exact"
    assert PreprocessSpec.from_dict(exact.to_dict()) == exact
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(64, 64, interpolation="cubic")
