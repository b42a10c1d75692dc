"""Issue 3 figures for `edgeq run` with MobileNetV2 1.0/224 int8 (random weights), on this machine:

- pipeline throughput on a video file vs raw invoke throughput, same bundle and threads, measured in one run
  (raw, pipeline, raw; the pipeline is compared with the mean of the two raw runs);
- frame-timestamp-to-subscriber latency p50/p99 over loopback mosquitto at 30 fps;
- peak RSS of the `edgeq run` process;
- results lost across 5 broker restarts (SIGTERM, then start) during a 2,000-frame run.

    python benchmarks/device_pipeline.py        # writes benchmarks/results/device_pipeline.json      (needs mosquitto)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _common import write_result, edgeq_exe  # noqa: E402 (benchmarks/ is the script's folder on sys.path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_bundle(tmp: Path) -> Path:
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.data.shapes import write_shape_folder

    write_shape_folder(tmp / "calib", per_class=20, size=224, seed=3)
    out = tmp / "mnv2.edgeq"
    convert(recipe_from_flags("mobilenet_v2", out, calib=str(tmp / "calib"), calib_samples=100, classes=10),
            log=lambda s: None)
    return out


def edgeq_cmd() -> list[str]:
    exe = edgeq_exe()
    return [exe] if exe else [sys.executable, "-m", "edgeq.cli"]


def raw_fps(bundle_path: Path, threads: int, n: int) -> float:
    from edgeq.bundle import read_bundle

    model = read_bundle(bundle_path).load_model(threads)
    x = np.zeros(model.input.shape, dtype=model.input.dtype)
    model.set_input(x)
    for _ in range(20):
        model.invoke()
    t0 = time.perf_counter()
    for _ in range(n):
        model.set_input(x)
        model.invoke()
    return n / (time.perf_counter() - t0)


def rss_and_latency(bundle: Path, video: Path, tmp: Path) -> dict:
    from brokers import Broker, Collector

    broker = Broker(tmp / "broker-lat").start()
    sub = Collector(broker.port, ["edgeq/+/detections"], client_id="bench-lat")
    received: list[float] = []
    stamps: list[float] = []
    original = sub._on_message

    def on_message(client, userdata, msg):
        received.append(time.time())
        stamps.append(datetime.fromisoformat(json.loads(msg.payload)["timestamp"].replace("Z", "+00:00")).timestamp())
        original(client, userdata, msg)

    sub.client.on_message = on_message
    sub.wait_for(lambda: sub.client.is_connected(), 10)
    cmd = edgeq_cmd() + ["run", "--model", str(bundle), "--source", str(video), "--mqtt", broker.url,
                         "--spool", str(tmp / "lat.db"), "--max-fps", "30", "--loop", "--max-frames", "600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    sub.wait_for(lambda: len(received) >= 600, 10)
    sub.close()
    broker.stop()
    lat = (np.asarray(received) - np.asarray(stamps)) * 1000
    return {"rss_peak_mb": round(peak / 1024, 1), "frames": len(lat),
            "capture_to_receive_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "capture_to_receive_ms_p99": round(float(np.percentile(lat, 99)), 2)}


def broker_restarts(bundle: Path, video: Path, tmp: Path, restarts: int = 5, frames: int = 2000) -> dict:
    from brokers import Broker, Collector

    broker = Broker(tmp / "broker-restarts").start()
    sub = Collector(broker.port, ["edgeq/+/detections"], client_id="bench-restarts")
    sub.wait_for(lambda: sub.client.is_connected(), 10)
    cmd = edgeq_cmd() + ["run", "--model", str(bundle), "--source", str(video), "--mqtt", broker.url,
                         "--spool", str(tmp / "restarts.db"), "--loop", "--max-frames", str(frames), "--max-fps", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = 0
    for i in range(restarts):
        sub.wait_for(lambda: len(sub.seqs()) >= (i + 1) * frames // (restarts + 1), 60)
        # SIGTERM: a restart. After SIGKILL the broker itself can lose messages it had already acknowledged
        # (its socket buffers and unsaved queue die with it), which is not a loss edgeq can see or prevent.
        broker.stop(signal.SIGTERM)
        time.sleep(0.5)
        broker.start()
        done += 1
    proc.wait(timeout=300)
    sub.wait_for(lambda: sub.seqs() >= set(range(1, frames + 1)), 30)
    got = sub.seqs()
    sub.close()
    broker.stop()
    duplicates = len(sub.payloads("/detections")) - len(got)
    return {"frames": frames, "broker_restarts": done, "received_unique": len(got & set(range(1, frames + 1))),
            "lost": len(set(range(1, frames + 1)) - got), "duplicates": duplicates, "exit_code": proc.returncode}


def main() -> int:
    from edgeq.bench import pipeline_fps
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp)
        video = write_video(tmp / "clip.avi", moving_shapes_frames(300, 480, 640))
        throughput = {}
        for threads in (1, 2):
            raw_a = raw_fps(bundle, threads, 300)
            p = pipeline_fps(bundle, video, threads)  # the same measurement as `edgeq bench --pipeline`
            pipe, frames = p["fps"], p["frames"]
            raw_b = raw_fps(bundle, threads, 300)
            raw = (raw_a + raw_b) / 2
            throughput[f"{threads}_thread"] = {"raw_invoke_fps": round(raw, 1), "pipeline_fps": round(pipe, 1),
                                               "ratio": round(pipe / raw, 3), "frames": frames}
        result = {
            "benchmark": "device_pipeline",
            "model": "MobileNetV2 1.0/224 int8, random weights; video 640x480 MJPG",
            "throughput": throughput,
            "target_ratio": 0.9,
            "latency_and_rss": rss_and_latency(bundle, video, tmp),
            "target_rss_mb": 200,
            "broker_restarts": broker_restarts(bundle, video, tmp),
        }
    write_result("device_pipeline", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
