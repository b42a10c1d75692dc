"""The device's memory over time: benchmarks/results/memory.json.

    python benchmarks/memory.py                        # hot swap, then a one-hour soak (needs mosquitto)
    python benchmarks/memory.py --soak-seconds 600     # a shorter soak

1. **Hot swap.** `edgeq run` with updates on, started on a small bundle; a 47 MB float32 bundle (a classifier
   with two 3,584-wide dense layers) is pushed over MQTT (`edgeq push`) and applied. Its RSS once settled, beside
   a fresh `edgeq run` started on the big bundle (the same config), side by side. Target: within 15 MB.
2. **Soak.** `edgeq run` on a looped video at ``--fps`` results a second for ``--soak-seconds``, publishing to
   mosquitto, which is restarted every two minutes; RSS sampled every 10 s. Growth is the highest RSS of the
   last quarter less the RSS at the end of the warm-up (the first ``--warmup`` seconds). Target: at most 5 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _common import edgeq_exe, log, require_clean_tree, write_result  # noqa: E402 (benchmarks/ on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
LABELS = ("circle", "square", "triangle")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def dense_bundle(tmp: Path, name: str, units: int) -> Path:
    """A float32 classifier whose size is set by two ``units``-wide dense layers (3,584: 47 MB)."""
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.data.shapes import write_shape_folder
    from edgeq.converter.tf import import_tensorflow
    from edgeq.converter.training.common import save_model

    import_tensorflow()
    import keras

    shapes = tmp / "shapes"
    if not shapes.is_dir():
        write_shape_folder(shapes, per_class=8, size=96, shapes=LABELS)
    x = keras.Input((96, 96, 3))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=4, activation="relu")(x))
    h = keras.layers.Dense(units, activation="relu")(keras.layers.Dense(units, activation="relu")(h))
    model = keras.Model(x, keras.layers.Dense(len(LABELS), activation="softmax")(h))
    save_model(model, tmp / f"{name}.keras", {"labels": list(LABELS)})
    out = tmp / f"{name}.edgeq"
    convert(recipe_from_flags(str(tmp / f"{name}.keras"), out, quant="float32", density="off"), log=lambda s: None)
    return out


def device(tmp: Path, name: str, model: Path, video: Path, url: str, fps: float, update: bool = True) -> subprocess.Popen:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'device_id = "{name}"\nmodel = "{model}"\nsource = "{video}"\nloop = true\nmax_fps = {fps}\n'
                   f'[mqtt]\nurl = "{url}"\n[spool]\npath = "{tmp / name}.db"\n[stats]\ninterval = 3600\n'
                   f'[update]\nenabled = {"true" if update else "false"}\n')
    return subprocess.Popen([edgeq_exe(), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def settled(proc: subprocess.Popen, seconds: float = 10.0) -> list[float]:
    samples = []
    for _ in range(int(seconds)):
        time.sleep(1)
        samples.append(round(rss_mb(proc.pid), 1))
    return samples


def hot_swap(tmp: Path, video: Path) -> dict:
    from brokers import Broker

    small, big = dense_bundle(tmp, "small", 64), dense_bundle(tmp, "big", 3584)
    broker = Broker(tmp / "broker-swap").start()
    swapper = device(tmp, "swapper", small, video, broker.url, 15)
    before = settled(swapper, 8)
    r = subprocess.run([edgeq_exe(), "push", str(big), "--mqtt", broker.url, "--device-id", "swapper"],
                       capture_output=True, text=True, timeout=180)
    if r.returncode != 0 or "applied" not in r.stdout:
        raise RuntimeError(f"push failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    fresh = device(tmp, "fresh", big, video, broker.url, 15)
    after, fresh_rss = [], []
    for _ in range(20):  # side by side: the swapped device and a fresh one on the big bundle
        time.sleep(1)
        after.append(round(rss_mb(swapper.pid), 1))
        fresh_rss.append(round(rss_mb(fresh.pid), 1))
    for p in (swapper, fresh):
        p.terminate()
        p.communicate(timeout=60)
    broker.stop()
    swapped, start = float(sorted(after[-10:])[5]), float(sorted(fresh_rss[-10:])[5])  # medians of the last 10 s
    return {"bundle_bytes": big.stat().st_size, "rss_before_mb": before[-1], "rss_after_swap_mb": swapped,
            "rss_fresh_start_mb": start, "difference_mb": round(swapped - start, 1), "target_mb": 15,
            "samples_after_swap": after, "samples_fresh": fresh_rss}


def soak(tmp: Path, video: Path, seconds: float, warmup: float, fps: float) -> dict:
    from brokers import Broker

    bundle = dense_bundle(tmp, "soak", 64)
    broker = Broker(tmp / "broker-soak").start()
    proc = device(tmp, "soak", bundle, video, broker.url, fps, update=False)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    next_restart = t0 + 120
    restarts = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(10)
        samples.append((round(time.monotonic() - t0, 1), round(rss_mb(proc.pid), 1)))
        if time.monotonic() >= next_restart:
            broker.stop()
            time.sleep(1)
            broker.start()
            restarts += 1
            next_restart += 120
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    broker.stop()
    at_warmup = next(r for t, r in samples if t >= warmup)
    last = [r for t, r in samples if t >= seconds * 0.75]
    return {"seconds": seconds, "fps_cap": fps, "warmup_seconds": warmup, "broker_restarts": restarts,
            "rss_at_warmup_mb": at_warmup, "rss_last_quarter_max_mb": max(last),
            "growth_mb": round(max(last) - at_warmup, 1), "target_mb": 5, "samples": samples,
            "stopped": err.strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> int:
    require_clean_tree()
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--soak-seconds", type=float, default=3600.0)
    p.add_argument("--warmup", type=float, default=300.0)
    p.add_argument("--fps", type=float, default=200.0, help="the soak's results a second (max_fps)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="edgeq-memory-"))
    try:
        video = write_video(tmp / "clip.avi", moving_shapes_frames(60, 96, 96))
        swap = hot_swap(tmp, video)
        log(f"hot swap: {swap['rss_after_swap_mb']} MB after, {swap['rss_fresh_start_mb']} MB fresh")
        soaked = soak(tmp, video, args.soak_seconds, args.warmup, args.fps)
        log(f"soak: {soaked['growth_mb']} MB growth after warm-up")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_result("memory", {"benchmark": "memory", "hot_swap": swap, "soak": soaked})
    return 0


if __name__ == "__main__":
    sys.exit(main())
