"""`edgeq run --annotate`: results drawn on their frames, read back with OpenCV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHAPE_LABELS, assert_clean_error, edgeq_here, run_edgeq, save_with_labels

pytestmark = pytest.mark.slow

FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    return write_video(tmp_path_factory.mktemp("annotate-video") / "clip.avi", moving_shapes_frames(FRAMES, 120, 160))


@pytest.fixture(scope="module")
def detector_bundle(tmp_path_factory, shapes_dir) -> Path:
    """A grid detector with random weights, through the real converter: it reports boxes (low scores)."""
    from edgeq.converter.models.detector import build_detector

    d = tmp_path_factory.mktemp("annotate-det")
    model = save_with_labels(build_detector(96, 0.35, 3, seed=2), d / "det.keras", SHAPE_LABELS)
    out = d / "det.edgeq"
    r = edgeq_here("convert", str(model), "--calib", str(shapes_dir), "--calib-samples", "20", "--resize", "letterbox",
                  "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _messages(stdout: str) -> list[dict]:
    return [m for m in map(json.loads, stdout.splitlines()) if m["schema"] == "edgeq.detections"]


def _near(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 70) -> bool:
    return int(np.abs(pixel.astype(int) - np.array(colour)).sum()) <= tol


def test_annotated_video_has_every_frame_and_the_boxes_where_the_results_say(tmp_path, detector_bundle, clip):
    import cv2

    from edgeq.device.annotate import FLAGGED, TRUSTED

    config = tmp_path / "device.toml"
    config.write_text("[thresholds]\nscore = 0.001\n")  # an untrained detector scores low
    out = tmp_path / "annotated.avi"
    r = run_edgeq("run", "--model", str(detector_bundle), "--source", str(clip), "--output", "-", "--config",
                  str(config), "--annotate", str(out), "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr
    messages = _messages(r.stdout)
    assert len(messages) == FRAMES and any(m["detections"] for m in messages)
    video = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, image = video.read()
        if not ok:
            break
        frames.append(image)
    assert len(frames) == FRAMES
    checked = 0
    for image, m in zip(frames, messages):
        h, w = m["frame"]["height"], m["frame"]["width"]
        k = image.shape[1] // w  # a 160-px frame is written 3x larger, so that its text is readable
        assert k == 3 and image.shape[:2] == (h * k, w * k)
        for d in m["detections"][:1]:  # the best box of the frame: its bottom edge, away from any label text
            px = d["bbox_px"]  # the pixel box the payload gives, which the deprecated array must agree with
            x0, y0, x1, y1 = px["x_min"], px["y_min"], px["x_max"], px["y_max"]
            ymin, xmin, ymax, xmax = d["box"]
            assert [x0, y0, x1, y1] == [round(xmin * w), round(ymin * h), round(xmax * w), round(ymax * h)]
            assert d["bbox"] == {"x_min": xmin, "y_min": ymin, "x_max": xmax, "y_max": ymax}
            bottom = round(ymax * h * k)
            if x1 - x0 < 6 or not 0 < bottom < h * k - 1:
                continue
            colour = FLAGGED if d["needs_review"] else TRUSTED
            row = image[bottom, round(xmin * w * k) + 8:round(xmax * w * k) - 8]
            assert np.mean([_near(p, colour) for p in row]) > 0.5, (d, row[:5])
            checked += 1
    assert checked >= 3


def test_tags_on_the_demo_s_small_frames_are_readable_apart_and_inside(tmp_path, detector_bundle):
    """The demo's 128-px scenes, annotated into a video and read back: each tag's text is at least 12 px tall,
    no two tags overlap, and every tag lies inside the frame."""
    import cv2

    from edgeq.bundle import read_bundle, with_manifest
    from edgeq.converter.data.scenes import moving_scene_frames
    from edgeq.converter.data.shapes import write_video
    from edgeq.device.annotate import TEXT_ON, layout

    frames, _ = moving_scene_frames(8, 128, seed=5, objects=3, unknown_classes=("bag",), object_size=(32, 56),
                                    stripes=False)  # as the demo draws them
    clip = write_video(tmp_path / "scene.avi", frames, fourcc="FFV1")
    m = read_bundle(detector_bundle).manifest
    bundle = with_manifest(detector_bundle, tmp_path / "det4.edgeq",
                           m.replace(detector=m.detector.model_copy(update={"max_detections": 4})))
    config = tmp_path / "device.toml"
    config.write_text('[thresholds]\nscore = 0.001\nreview = 0.5\nreview_measure = "predictive_entropy"\n')
    out = tmp_path / "annotated.avi"
    r = run_edgeq("run", "--model", str(bundle), "--source", str(clip), "--output", "-", "--config", str(config),
                  "--annotate", str(out), "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr[-2000:]
    messages = _messages(r.stdout)
    video = cv2.VideoCapture(str(out))
    checked = 0
    for m, frame in zip(messages, frames):
        ok, image = video.read()
        assert ok and image.shape[:2] == (384, 384)  # 128 px drawn 3x larger
        tags = layout(m, 384, 384)  # where draw() put each tag; the frame read back must show it there
        assert len(tags) == len(m["detections"])
        for i, t in enumerate(tags):
            x0, y0, x1, y1 = t.rect
            assert 0 <= x0 < x1 <= 384 and 0 <= y0 < y1 <= 384, t
            for other in tags[i + 1:]:  # apart: not even touching
                o = other.rect
                assert not (x0 <= o[2] and o[0] <= x1 and y0 <= o[3] and o[1] <= y1), (t, other)
            # on the frame: the tag's colour fills it (no box line or other tag crosses it) around its text...
            tag = image[y0:y1, x0:x1].astype(int)
            fill = np.abs(tag - np.array(t.colour)).sum(axis=2) <= 90
            # (its outermost pixels blur into the background in XVID's 8x8 blocks: looked at 1 and 2 px in, clear
            # of the text, which starts 3 px in)
            sides = fill[2:-2, 1:3].mean(), fill[2:-2, -3:-1].mean()
            assert fill.mean() > 0.6 and min(sides) > 0.9, (t, fill.mean(), sides)
            # ...and the text, ink of the other colour, is at least 12 px tall
            rows = np.flatnonzero((np.abs(tag - np.array(TEXT_ON[t.colour])).sum(axis=2) <= 150).any(axis=1))
            assert rows.size and rows[-1] - rows[0] + 1 >= 12, (t, rows)
        checked += len(tags)
    assert len(messages) == 8 and checked >= 16


def test_annotated_jpegs_of_a_classifier_name_the_top_result(tmp_path, tiny_bundle, clip):
    import cv2

    out = tmp_path / "frames"
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(clip), "--output", "-", "--annotate", str(out),
                  "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr
    messages = _messages(r.stdout)
    files = sorted(out.glob("*.jpg"))
    assert [f.stem for f in files] == [f"{m['seq']:08d}" for m in messages] and len(files) == FRAMES
    image = cv2.imread(str(files[0]))
    original = cv2.VideoCapture(str(clip)).read()[1]
    original = cv2.resize(original, None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)  # 160 px, written 3x
    assert image.shape == original.shape
    # the text in the corner changed those pixels, and only near the corner
    diff = np.abs(image.astype(int) - original.astype(int)).sum(axis=2) > 60
    assert diff[:30, :].mean() > 0.02 and diff[60:, :].mean() < 0.01


def test_drawing_puts_boxes_where_the_detection_says():
    """Pure logic: one trusted and one flagged box on a black frame."""
    from edgeq.device.annotate import FLAGGED, TRUSTED, Annotator, layout

    written = {}

    class Capture(Annotator):
        def _write(self, canvas, seq):
            written[seq] = canvas

    a = Capture(Path("x.avi"), 10)
    frame = np.zeros((400, 800, 3), np.uint8)  # wide enough to be drawn as it is
    a.add(frame, message := {"seq": 7, "detections": [
        {"label": "a", "score": 0.9, "bbox": {"x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6},
         "needs_review": False, "uncertainty": {}},
        {"label": "b", "score": 0.5, "bbox": {"x_min": 0.6, "y_min": 0.5, "x_max": 0.9, "y_max": 0.9}, "needs_review": True,
         "review_reason": "unfamiliar", "uncertainty": {"unfamiliarity_percentile": 99.5}}]})
    canvas = written[7]
    assert canvas.shape == frame.shape
    assert tuple(canvas[240, 160]) == TRUSTED and tuple(canvas[160, 80]) == TRUSTED  # bottom and middle-left edges
    assert tuple(canvas[360, 600]) == FLAGGED and tuple(canvas[280, 480]) == FLAGGED
    assert not canvas[220, 120].any() and not canvas[380, 40].any()  # inside a box, far from any: untouched
    # each tag just above its box (ending a pixel over its top edge), from its left edge, filled with its colour
    tags = layout(message, 800, 400)
    assert [t.rect[3] for t in tags] == [79, 199] and [t.rect[0] for t in tags] == [80, 480]
    for t, colour in zip(tags, (TRUSTED, FLAGGED)):
        x0, y0, x1, y1 = t.rect
        assert (canvas[y0:y1, x0:x1] == colour).all(axis=2).mean() > 0.6 and x1 <= 800
    assert frame.sum() == 0  # the frame itself is not drawn on


def test_tags_go_where_they_overlap_no_other():
    """Pure logic: two boxes with the same top edge, side by side, and a third that would put its tag on theirs."""
    from edgeq.device.annotate import place_tag

    taken = []
    for box in [(10, 100, 60, 150), (40, 100, 90, 150), (20, 60, 120, 300)]:
        rect = place_tag((80, 26), box, (200, 400), taken)
        assert 0 <= rect[0] and rect[2] <= 200 and 0 <= rect[1] and rect[3] <= 400
        assert all(not (rect[0] < t[2] + 4 and t[0] < rect[2] + 4 and rect[1] < t[3] + 4 and t[1] < rect[3] + 4)
                   for t in taken)
        taken.append(rect)
    assert taken[0] == (10, 73, 90, 99)  # the first: just above its box


def test_small_frames_are_enlarged_by_a_whole_factor_and_text_is_readable():
    from edgeq.device.annotate import CAP_PX, draw, enlargement, font_scale

    assert [enlargement(w) for w in (96, 128, 160, 192, 320, 383, 384, 1920)] == [4, 3, 3, 2, 2, 2, 1, 1]
    import cv2

    for w in (384, 640, 768, 1280, 1920):
        assert cv2.getTextSize("A", cv2.FONT_HERSHEY_SIMPLEX, font_scale(w), 1)[0][1] >= CAP_PX
    frame = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
    canvas = draw(frame, {"detections": []})
    assert canvas.shape == (288, 384, 3) and (canvas[::6, ::6] == frame).all()  # each pixel a 6x6 block


@pytest.mark.parametrize("target,needle", [("clip.gif", "unsupported extension"), ("/proc/annotated.avi", "cannot write")])
def test_bad_annotate_targets(tmp_path, tiny_bundle, clip, target, needle):
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(clip), "--output", "-", "--annotate",
                  target if target.startswith("/") else str(tmp_path / target), "--spool", str(tmp_path / "s.db"))
    assert_clean_error(r, "--annotate", needle)


def test_frames_held_for_drawing_are_bounded(tmp_path):
    """A drawing slower than inference makes the loop wait at 8 frames held, never queue them all; every frame
    is still drawn, and a snapshot-only frame without a slot is skipped instead of waited for."""
    import io
    import threading
    import time

    from edgeq.device.outbox import FRAMES_IN_FLIGHT, Outbox
    from edgeq.device.spool import Spool

    held, peak, drawn = [0], [0], []
    lock = threading.Lock()

    class Slow:
        def add(self, frame, result):
            time.sleep(0.01)
            drawn.append(result["seq"])
            with lock:
                held[0] -= 1

        def close(self):
            pass

    out = io.StringIO()
    box = Outbox(lambda: Spool(tmp_path / "s.db"), None, out, lambda: {"type": "stats"}, 3600, lambda s: None,
                 annotator=Slow())
    box.start()
    box.wait_ready()
    for i in range(60):
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        box.submit({"frame": {"id": i}, "latency_ms": {}}, list, np.zeros((4, 4, 3), np.uint8))
    assert box.finish(1.0)
    assert drawn == list(range(1, 61))  # every frame drawn, in order
    assert peak[0] <= FRAMES_IN_FLIGHT + 1 and box.frame_waits > 0
    assert json.loads(out.getvalue().splitlines()[-1])["annotate_waits"] == box.frame_waits

    snap = Outbox(lambda: Spool(tmp_path / "t.db"), None, None, dict, 3600, lambda s: None)
    for i in range(FRAMES_IN_FLIGHT + 3):  # not started: nothing frees a slot
        snap.submit({"latency_ms": {}}, list, np.zeros((4, 4, 3), np.uint8), snapshot=True)
    assert snap.snapshots_skipped == 3


def test_drawing_runs_beside_the_outbox_and_its_error_stops_the_run(tmp_path):
    """Frames are drawn on a thread of their own, in order, after their results are stored; a drawing that fails
    (the annotate folder gone mid-run) gives its frame slots back, so the loop never hangs, and the outbox stops
    with that error for the runner to report."""
    import threading

    from edgeq.device.outbox import FRAMES_IN_FLIGHT, Outbox
    from edgeq.device.spool import Spool
    from edgeq.errors import ConfigError

    threads, drawn = set(), []

    class Failing:
        def add(self, frame, result):
            threads.add(threading.current_thread().name)
            if result["seq"] == 5:
                raise ConfigError("--annotate /gone: cannot write 00000005.jpg")
            drawn.append(result["seq"])

        def close(self):
            pass

    box = Outbox(lambda: Spool(tmp_path / "s.db"), None, None, dict, 3600, lambda s: None, annotator=Failing())
    box.start()
    box.wait_ready()
    for i in range(3 * FRAMES_IN_FLIGHT):  # more than the slots: a drawer that kept them would block this loop
        if not box.is_alive():
            break
        box.submit({"frame": {"id": i}, "latency_ms": {}}, list, np.zeros((4, 4, 3), np.uint8))
    box.finish(1.0)
    assert threads == {"edgeq-draw"}
    assert drawn == [1, 2, 3, 4]
    assert isinstance(box.error, ConfigError) and "cannot write" in str(box.error)
