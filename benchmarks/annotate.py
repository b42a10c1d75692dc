"""Issue 18 figures for `edgeq run --annotate`: what drawing results on frames costs.

A grid detector (MobileNetV2 0.35/192, random weights, int8), two clips of 600 frames, looped for each timed run
(``RUN_FRAMES``: 6,000 frames of the demo clip, 1,500 of the worst case):
- ``demo_clip``: the demo's scene (128x128 as in the demo, Fashion-MNIST items drifting on a textured background, a bag entering
  halfway), 4 boxes per frame, as the demo's trained detector gives (random weights score every cell alike, so
  a threshold cannot pick 4: the copy of the bundle used here has ``detector.max_detections`` set to 4 in its
  manifest);
- ``worst_case``: a 640x480 clip with a score threshold of 0.001, so that every frame has the most boxes the
  decoder reports (50).
Each configuration is one `edgeq run` process; runs are interleaved (off, video, jpeg, off, ...) and repeated.
Processing fps = frames / (wall time - the start-up time of a 1-frame run of the same configuration), so model
loading is left out and the drawing, which runs on its own thread once the results are stored, is counted until the
last frame is written.

Files: every run and every in-process repeat writes to a new path, and nothing is deleted until the end. On a
file system without a journal (ext4 as this machine's root is mounted) creating a file soon after many were
deleted is two to five times slower (measured by hand), because ext4 then skips inodes freed in the last
minutes: the runs of an earlier version of this script, which deleted the previous run's 6,000 JPEGs just before
each run, paid for that. A device writing its folder does not delete thousands of files as it goes; files deleted
shortly before the script starts (an earlier run's) can still slow its first minutes.

Off path: what annotation and snapshots add to the inference loop's per-frame work when both are off, timed
in-process: the loop's `_snapshot_due()` check, the frame test and `Outbox.submit()` without a frame, against a
bare queue put (what handing a result over costs with neither feature built), 200,000 times each, interleaved;
given in microseconds per frame and as a share of the off run's time per frame on the demo clip.

Per frame: what drawing and writing one demo-clip frame costs the drawing thread, timed in-process (see
``per_frame``); at a camera's 30 fps, the share of one core --annotate takes.

Snapshots: the CPU time (user + system, from the kernel's accounting of the child process) of `edgeq run` on the
demo clip at 30 fps for 20 s, publishing to a loopback mosquitto, with 1 Hz snapshots vs without; interleaved,
repeated.

    python benchmarks/annotate.py        # writes benchmarks/results/annotate.json (needs mosquitto)
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _common import write_result, edgeq_exe  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FRAMES = 600  # frames in each clip
# frames processed per timed run (the clip looped): enough seconds of work that the start-up time subtracted
# (a 1-frame run of the same configuration, about 2 s) does not swamp it
RUN_FRAMES = {"demo_clip": 6000, "worst_case": 1500}
RUN_IDS = itertools.count()


def make_bundle(tmp: Path) -> Path:
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.models.detector import build_detector
    from edgeq.converter.data.shapes import write_shape_folder

    from conftest import save_with_labels

    write_shape_folder(tmp / "calib", per_class=10, size=192, seed=3)
    model = save_with_labels(build_detector(192, 0.35, 3, seed=2), tmp / "det.keras", ["circle", "square", "triangle"])
    out = tmp / "det.edgeq"
    convert(recipe_from_flags(str(model), out, calib=str(tmp / "calib"), calib_samples=30, resize="letterbox"),
            log=lambda s: None)
    return out


def run(bundle: Path, video: Path, tmp: Path, annotate: str | None, frames: int, score: float) -> float:
    exe = edgeq_exe()
    cmd = [exe] if exe else [sys.executable, "-m", "edgeq.cli"]
    config = tmp / "device.toml"
    config.write_text(f"[thresholds]\nscore = {score}\n")
    args = ["run", "--model", str(bundle), "--source", str(video), "--config", str(config), "--loop", "--max-frames",
            str(frames), "--spool", str(tmp / "spool.db"), "--output", str(tmp / "out.jsonl")]
    if annotate:
        # a new path for every run, nothing deleted until the end (see the module's docstring: files deleted
        # just before would make this run's file creations slower)
        target = tmp / "runs" / f"{next(RUN_IDS):03d}-{annotate}"
        args += ["--annotate", str(target)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd + args, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"edgeq run failed: {r.stderr[-500:]}")
    return elapsed


def scenario(bundle: Path, video: Path, tmp: Path, score: float, repeats: int, frames: int) -> dict:
    import json

    configs = {"off": None, "video_avi": "annotated.avi", "jpeg_folder": "annotated"}
    startup = {name: [] for name in configs}
    full = {name: [] for name in configs}
    for _ in range(repeats):
        for name, target in configs.items():
            startup[name].append(run(bundle, video, tmp, target, 1, score))
            full[name].append(run(bundle, video, tmp, target, frames, score))
    boxes = [len(json.loads(ln)["detections"]) for ln in (tmp / "out.jsonl").read_text().splitlines()
             if '"edgeq.detections"' in ln][-FRAMES:]
    fps = {name: [frames / max(f - s, 1e-6) for f, s in zip(full[name], startup[name])] for name in configs}
    med = {name: float(np.median(v)) for name, v in fps.items()}
    return {
        "frames_per_run": frames, "score_threshold": score, "boxes_per_frame_mean": round(float(np.mean(boxes)), 1),
        "fps": {name: [round(v, 1) for v in values] for name, values in fps.items()},
        "fps_median": {name: round(v, 1) for name, v in med.items()},
        "off_spread": round((max(fps["off"]) - min(fps["off"])) / med["off"], 4),
        "video_over_off": round(med["video_avi"] / med["off"], 4),
        "jpeg_over_off": round(med["jpeg_folder"] / med["off"], 4),
    }


def cpu_seconds(bundle: Path, video: Path, tmp: Path, snapshot: bool, port: int) -> float:
    """User + system CPU seconds of one `edgeq run` over ``video`` at 30 fps, publishing to the broker."""
    exe = edgeq_exe()
    cmd = [exe] if exe else [sys.executable, "-m", "edgeq.cli"]
    config = tmp / "snap.toml"
    config.write_text(f'max_fps = 30\n[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n[spool]\npath = "{tmp / "snap.db"}"\n'
                      f'[snapshot]\nenabled = {"true" if snapshot else "false"}\nrate_hz = 1\n')
    proc = subprocess.Popen(cmd + ["run", "--model", str(bundle), "--source", str(video), "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"edgeq run failed: {proc.stderr.read()[-500:]}")
    return usage.ru_utime + usage.ru_stime


def snapshots(bundle: Path, video: Path, tmp: Path, repeats: int) -> dict:
    from brokers import Broker

    broker = Broker(tmp / "broker").start()
    try:
        cpu: dict[str, list[float]] = {"off": [], "on_1hz": []}
        for _ in range(repeats):
            cpu["off"].append(cpu_seconds(bundle, video, tmp, False, broker.port))
            cpu["on_1hz"].append(cpu_seconds(bundle, video, tmp, True, broker.port))
    finally:
        broker.stop()
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    seconds = FRAMES / 30.0
    return {"cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
            "cpu_s_median": {k: round(v, 3) for k, v in med.items()}, "run_seconds": seconds,
            # the extra CPU as a share of one core over the run, and relative to the whole process's CPU time
            # (start-up included)
            "extra_percent_of_a_core": round(100 * (med["on_1hz"] - med["off"]) / seconds, 2),
            "on_over_off": round(med["on_1hz"] / med["off"], 4), "target_extra_percent": 3.0}


def off_path(repeats: int = 5, n: int = 200_000) -> dict:
    """Microseconds per frame the off path adds (see the module docstring)."""
    import queue
    from types import SimpleNamespace

    from edgeq.device.outbox import Outbox
    from edgeq.device.runner import Runner

    box = Outbox(lambda: None, None, None, dict, 3600, lambda s: None)  # never started: submit only queues
    runner = SimpleNamespace(_snapshot_period=None, _next_snapshot=0.0)
    image = object()

    def features() -> float:
        box._queue = queue.SimpleQueue()
        t = time.perf_counter()
        for _ in range(n):
            snap = Runner._snapshot_due(runner)
            box.submit({}, list, image if box.annotator is not None or snap else None, snapshot=snap)
        return time.perf_counter() - t

    def bare() -> float:
        q = queue.SimpleQueue()
        t = time.perf_counter()
        for _ in range(n):
            q.put(({}, list))
        return time.perf_counter() - t

    with_features, without = [], []
    for _ in range(repeats):
        with_features.append(features())
        without.append(bare())
    extra_us = (float(np.median(with_features)) - float(np.median(without))) / n * 1e6
    return {"calls": n, "repeats": repeats, "extra_us_per_frame": round(extra_us, 3),
            "submit_us_per_frame": round(float(np.median(with_features)) / n * 1e6, 3),
            "bare_put_us_per_frame": round(float(np.median(without)) / n * 1e6, 3)}


def per_frame(frames: list[np.ndarray], tmp: Path, repeats: int = 5, n: int = 2000) -> dict:
    """Microseconds one frame of the demo clip costs the drawing thread, in-process: ``draw()`` alone, and
    ``Annotator.add()`` (draw, then write) into a .avi and into a JPEG folder; 4 boxes a frame (one flagged), as
    in ``demo_clip``; median of ``repeats`` runs of ``n`` frames each. At a camera's frame rate this is the share
    of one core that --annotate takes."""
    from edgeq.device.annotate import Annotator, draw

    def message(seq: int) -> dict:
        dets = [{"label": "tshirt", "score": 0.8,
                 "bbox": {"x_min": 0.05 + 0.22 * k, "y_min": 0.2, "x_max": 0.22 + 0.22 * k, "y_max": 0.55},
                 "box": [0.2, 0.05 + 0.22 * k, 0.55, 0.22 + 0.22 * k],
                 "uncertainty": {"unfamiliarity": 12.5, "unfamiliarity_percentile": 50.0, "predictive_entropy": 0.3},
                 "needs_review": k == 0, "review_reason": "unfamiliar" if k == 0 else None} for k in range(4)]
        return {"seq": seq, "detections": dets}

    messages = [message(i) for i in range(n)]  # seq i: one JPEG file per frame

    def timed(fn) -> float:
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - t) / n * 1e6

    out: dict[str, list[float]] = {"draw": [], "draw_write_avi": [], "draw_write_jpeg": []}
    for r in range(repeats):
        out["draw"].append(timed(lambda i: draw(frames[i % len(frames)], messages[i])))
        video = Annotator(tmp / f"per-frame-{r}.avi", 15)
        out["draw_write_avi"].append(timed(lambda i: video.add(frames[i % len(frames)], messages[i])))
        video.close()
        folder = tmp / f"per-frame-{r}"
        folder.mkdir()
        jpeg = Annotator(folder, None)
        out["draw_write_jpeg"].append(timed(lambda i: jpeg.add(frames[i % len(frames)], messages[i])))
    med = {k: round(float(np.median(v)), 1) for k, v in out.items()}
    return {"frames": n, "repeats": repeats, "boxes": 4, "us_median": med,
            "core_share_at_30fps": {k: round(v * 30 / 1e6, 4) for k, v in med.items() if k != "draw"}}


def with_max_detections(bundle: Path, n: int) -> Path:
    """A copy of ``bundle`` whose decoder keeps at most ``n`` boxes (the manifest's detector.max_detections)."""
    from edgeq.bundle import read_bundle, with_manifest

    m = read_bundle(bundle).manifest
    return with_manifest(bundle, bundle.with_name(f"{bundle.stem}-max{n}.edgeq"),
                         m.replace(detector=m.detector.model_copy(update={"max_detections": n})))


def main() -> int:
    from edgeq.converter.data.scenes import moving_scene_frames, write_video as write_scene_video
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    repeats = 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp)
        demo_frames, _ = moving_scene_frames(FRAMES, 128, seed=5, objects=3, unknown_classes=("bag",), stripes=False)
        demo = write_scene_video(tmp / "demo.avi", demo_frames, fps=10)
        worst = write_video(tmp / "clip.avi", moving_shapes_frames(FRAMES, 480, 640))
        scenarios = {
            "demo_clip": scenario(with_max_detections(bundle, 4), demo, tmp, 0.001, repeats, RUN_FRAMES["demo_clip"]),
            "worst_case": scenario(bundle, worst, tmp, 0.001, repeats, RUN_FRAMES["worst_case"]),
        }
        snaps = snapshots(with_max_detections(bundle, 4), demo, tmp, repeats)
        off = off_path()
        cost = per_frame(demo_frames, tmp)
        off["share_of_demo_frame_time"] = round(off["extra_us_per_frame"] * 1e-6
                                                * scenarios["demo_clip"]["fps_median"]["off"], 6)
    result = {
        "benchmark": "annotate",
        "model": "grid detector MobileNetV2 0.35/192 int8, random weights",
        "clips": {"demo_clip": "128x128 (the demo's size), the demo's moving scene (converter/data/scenes.py), MJPG",
                  "worst_case": "640x480 moving shapes, MJPG"},
        "frames": FRAMES, "repeats": repeats, "scenarios": scenarios, "target_on_over_off": 0.8,
        "snapshots_1hz": snaps, "off_path": off, "per_frame": cost,
    }
    write_result("annotate", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
