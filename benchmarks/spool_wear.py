"""What the spool writes to the SD card per published result: benchmarks/results/spool_wear.json.

    python benchmarks/spool_wear.py                 # three write modes side by side, ~4 minutes (needs mosquitto)
    python benchmarks/spool_wear.py --seconds 60    # shorter
    python benchmarks/spool_wear.py --before-python /old/venv/bin/python   # also an older edgeq, side by side

Each mode is a real `edgeq run` of a grid detector (random weights, every cell above a low score kept, so each
result carries several detections with their uncertainty, as a busy camera's would) on a looped video at 10 fps,
publishing to a real mosquitto on loopback. The three runs go side by side, so they share the machine and its
kernel's writeback:
- ``each_result``: ``commit_interval = 0``, a commit per result (how every result was stored before);
- ``disk``: the default, one commit a second carrying the second's results and the deletion of what was
  acknowledged;
- ``memory``: ``mode = "memory"``, nothing written per result while the broker keeps up;
- ``before`` (with ``--before-python``): the same config run by another install of edgeq, e.g. a checkout of the
  commit before this spool (4 KiB pages, raw payloads, a commit per result and one per acknowledgement); its
  commit is recorded.

Bytes are the process's ``write_bytes`` from /proc/<pid>/io (what it caused to be sent to the storage layer; the
filesystem's journal and the card's own overhead come on top), counted after a warm-up, divided by the results
the subscriber received meanwhile; per day at 10 fps is that times 864,000. Then an outage in disk mode: the
broker stopped for ``--outage`` seconds and started again, the spool's size at the end of the outage and after it
drained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _common import log, require_clean_tree, write_result  # noqa: E402 (benchmarks/ is the script's folder)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
MODES = {"each_result": 'commit_interval = 0\n', "disk": "", "memory": 'mode = "memory"\n'}
FPS = 10
SCORE = 0.1  # a random detector's cells above this: several detections a result


def make_bundle(tmp: Path) -> Path:
    """A 96 px grid detector with random weights through the real converter."""
    from edgeq.converter import convert, recipe_from_flags
    from edgeq.converter.data.shapes import write_shape_folder
    from edgeq.converter.models.detector import build_detector
    from edgeq.converter.training.common import save_model

    shapes = tmp / "shapes"
    labels = write_shape_folder(shapes, per_class=8, size=96)
    model = tmp / "det.keras"
    save_model(build_detector(96, 0.35, len(labels), seed=2), model, {"labels": labels})
    out = tmp / "det.edgeq"
    convert(recipe_from_flags(str(model), out, calib=str(shapes), calib_samples=20, resize="letterbox"),
            log=lambda s: None)
    return out


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/<pid>/io")


def config(tmp: Path, name: str, bundle: Path, video: Path, url: str, extra: str) -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'model = "{bundle}"\nsource = "{video}"\nloop = true\nmax_fps = {FPS}\ndevice_id = "{name}"\n'
                   f'[thresholds]\nscore = {SCORE}\n[mqtt]\nurl = "{url}"\n[spool]\npath = "{tmp / name}.db"\n{extra}')
    return cfg


def spool_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def side_by_side(tmp: Path, bundle: Path, video: Path, seconds: float, warmup: float,
                 before: str | None = None) -> dict:
    from brokers import Broker, Collector

    broker = Broker(tmp / "broker").start()
    sub = Collector(broker.port, ["edgeq/+/detections"], client_id="bench-wear")
    sub.wait_for(lambda: sub.client.is_connected(), 10)
    modes = {**MODES, **({"before": ""} if before else {})}
    procs = {name: subprocess.Popen([before if name == "before" else sys.executable, "-m", "edgeq.cli", "run",
                                     "--config", str(config(tmp, name, bundle, video, broker.url, extra))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, extra in modes.items()}

    def received(name: str) -> list[dict]:
        return [m for m in sub.payloads("/detections") if m.get("device_id") == name]

    time.sleep(warmup)
    start = {name: (write_bytes(p.pid), len(received(name))) for name, p in procs.items()}
    time.sleep(seconds)
    end = {name: (write_bytes(p.pid), len(received(name))) for name, p in procs.items()}
    out = {}
    for name, p in procs.items():
        p.terminate()
        _, err = p.communicate(timeout=60)
        results = end[name][1] - start[name][1]
        written = end[name][0] - start[name][0]
        payloads = [len(json.dumps(m, separators=(",", ":"))) for m in received(name)]
        per = written / max(results, 1)
        out[name] = {"results": results, "write_bytes": written, "bytes_per_result": round(per, 1),
                     "per_day_at_10fps_mb": round(per * FPS * 86400 / 1e6, 1),
                     "payload_bytes_mean": round(sum(payloads) / max(len(payloads), 1), 1),
                     "exit_code": p.returncode, "stderr_tail": err.strip().splitlines()[-1:]}
        log(f"{name}: {results} results, {per:.0f} bytes each")
    sub.close()
    broker.stop()
    return out


def outage(tmp: Path, bundle: Path, video: Path, seconds: float) -> dict:
    """Disk mode with the broker gone for ``seconds``: bytes per result meanwhile, the spool's size at the end of
    the outage and once it drained (the space given back)."""
    from brokers import Broker, Collector

    broker = Broker(tmp / "broker-outage").start()
    sub = Collector(broker.port, ["edgeq/+/detections"], client_id="bench-outage")
    sub.wait_for(lambda: sub.client.is_connected(), 10)
    cfg = config(tmp, "outage", bundle, video, broker.url, "")
    cfg.write_text(cfg.read_text().replace(f"max_fps = {FPS}", "max_fps = 100"))  # a backlog worth giving back
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sub.wait_for(lambda: len(sub.seqs()) > 50, 30)
    broker.stop()
    before = write_bytes(proc.pid)
    time.sleep(seconds)
    db = tmp / "outage.db"
    spooled = {"file": db.stat().st_size, "wal": spool_bytes(db) - db.stat().st_size}
    written = write_bytes(proc.pid) - before
    broker.start()
    # the backlog goes out, and the outbox asks the empty spool to give its space back (at most every 10 s)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any("gave back" in ln for ln in _stderr_so_far(proc)):
        time.sleep(0.2)
    db = tmp / "outage.db"
    drained = {"file": db.stat().st_size, "wal": spool_bytes(db) - db.stat().st_size}
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    err = "".join(_STDERR.pop(proc.pid, [])) + err
    sub.close()
    broker.stop()
    seqs = sorted(sub.seqs())
    return {"outage_seconds": seconds, "fps": 100, "write_bytes_during_outage": written,
            "results_during_outage_about": int(seconds * 100),
            "spool_at_end_of_outage": spooled, "spool_once_drained": drained,
            "gave_back_line": [ln for ln in err.splitlines() if "gave back" in ln][:1],
            "received": len(seqs), "missing": len(set(range(1, seqs[-1] + 1)) - set(seqs)) if seqs else None}


_STDERR: dict[int, list[str]] = {}


def _stderr_so_far(proc: subprocess.Popen) -> list[str]:
    """Lines ``proc`` wrote to stderr so far (read without blocking)."""
    import select

    lines = _STDERR.setdefault(proc.pid, [])
    while select.select([proc.stderr], [], [], 0)[0]:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    require_clean_tree()
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180.0, help="measured time after the warm-up")
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--outage", type=float, default=30.0)
    p.add_argument("--before-python", metavar="PYTHON", help="also run this interpreter's edgeq side by side")
    args = p.parse_args(argv)
    before = None
    if args.before_python:
        where = subprocess.run([args.before_python, "-c", "import edgeq, pathlib; print(pathlib.Path("
                                "edgeq.__file__).resolve().parents[1])"], capture_output=True, text=True, check=True)
        before = {"python": args.before_python, "commit": subprocess.run(
            ["git", "-C", where.stdout.strip(), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp)
        video = write_video(tmp / "clip.avi", moving_shapes_frames(200, 240, 320))
        modes = side_by_side(tmp, bundle, video, args.seconds, args.warmup, args.before_python)
        drained = outage(tmp, bundle, video, args.outage)
    write_result("spool_wear", {
        "benchmark": "spool_wear", "fps": FPS, "seconds": args.seconds, "warmup": args.warmup,
        "what": "write_bytes of the edgeq run process per result received by a subscriber, broker up",
        "target_bytes_per_result": 2048, "modes": modes, "before": before, "outage_disk_mode": drained,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
