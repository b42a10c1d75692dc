"""`edgeq run --annotate`: results drawn on their frames, read back with OpenCV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHAPE_LABELS, assert_clean_error, run_edgeq, save_with_labels

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
    r = run_edgeq("convert", str(model), "--calib", str(shapes_dir), "--calib-samples", "20", "--resize", "letterbox",
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
        h, w = image.shape[:2]
        for d in m["detections"][:1]:  # the best box of the frame: its bottom edge, away from any label text
            px = d["bbox_px"]  # the pixel box the payload gives, which the deprecated array must agree with
            x0, y0, x1, y1 = px["x_min"], px["y_min"], px["x_max"], px["y_max"]
            ymin, xmin, ymax, xmax = d["box"]
            assert [x0, y0, x1, y1] == [round(xmin * w), round(ymin * h), round(xmax * w), round(ymax * h)]
            assert d["bbox"] == {"x_min": xmin, "y_min": ymin, "x_max": xmax, "y_max": ymax}
            if x1 - x0 < 6 or not 0 < y1 < h - 1:
                continue
            colour = FLAGGED if d["needs_review"] else TRUSTED
            row = image[min(y1, h - 1), x0 + 2:x1 - 2]
            assert np.mean([_near(p, colour) for p in row]) > 0.5, (d, row[:5])
            checked += 1
    assert checked >= 3


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
    assert image.shape == original.shape
    # the text in the corner changed those pixels, and only near the corner
    diff = np.abs(image.astype(int) - original.astype(int)).sum(axis=2) > 60
    assert diff[:24, :].mean() > 0.02 and diff[40:, :].mean() < 0.01


def test_drawing_puts_boxes_where_the_detection_says():
    """Pure logic: one trusted and one flagged box on a black frame."""
    from edgeq.device.annotate import FLAGGED, TRUSTED, Annotator

    written = {}

    class Capture(Annotator):
        def _write(self, canvas, seq):
            written[seq] = canvas

    a = Capture(Path("x.avi"), 10)
    frame = np.zeros((100, 200, 3), np.uint8)
    a.add(frame, {"seq": 7, "detections": [
        {"label": "a", "score": 0.9, "bbox": {"x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6},
         "needs_review": False, "uncertainty": {}},
        {"label": "b", "score": 0.5, "bbox": {"x_min": 0.6, "y_min": 0.5, "x_max": 0.9, "y_max": 0.9}, "needs_review": True,
         "review_reason": "unfamiliar", "uncertainty": {"unfamiliarity_percentile": 99.5}}]})
    canvas = written[7]
    assert tuple(canvas[60, 40]) == TRUSTED and tuple(canvas[40, 20]) == TRUSTED  # bottom and middle-left edges
    assert tuple(canvas[90, 150]) == FLAGGED and tuple(canvas[70, 120]) == FLAGGED
    assert not canvas[55, 30].any() and not canvas[95, 10].any()  # inside a box, far from any: untouched
    assert canvas[30:50, 100:200].any(axis=2).any(axis=0).sum() > 80  # the flagged label, kept inside the frame
    assert frame.sum() == 0  # the frame itself is not drawn on


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
