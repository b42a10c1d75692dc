"""Issue 19 figures for fleet updates: what a fleet puts on a broker, and a group push, measured on one mosquitto.

Measured: ``DEVICES`` `edgeq run` processes (the grid detector of benchmarks/annotate.py, 4 boxes a frame, signed,
[update] enabled in group ``lobby``, trusted_keys set, ``max_fps`` 5, stats every 5 s) on the demo's moving
scene, publishing to one loopback mosquitto. A subscriber on ``edgeq/#`` records every message for ``STEADY_S``
seconds: its count and size by kind. Then one signed bundle is published on ``edgeq/group/lobby/bundle/set``, and
the time from that publish to each device's ``applied`` state is recorded; results keep being collected, and each
device's seq numbers are checked for gaps and duplicates across the swap.

Computed from those measured sizes (not measured on a cluster): what 10,000 devices put on a broker at 1 and 5
results a second, stats every 30 s, the retained messages, and a group push's fan-out.

    python benchmarks/fleet.py        # writes benchmarks/results/fleet.json (needs mosquitto)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _common import edgeq_exe, write_result  # noqa: E402
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEVICES = 20
STEADY_S = 20.0
FPS = 5.0
FLEET = 10_000


def renamed(src: Path, dst: Path, name: str) -> Path:
    from edgeq.bundle import read_bundle, with_manifest

    return with_manifest(src, dst, read_bundle(src).manifest.replace(name=name))


class Listener:
    """Every message on edgeq/#, with its arrival time."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fleet-listener")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edgeq/#", qos=1)
        self.client.on_message = self._on
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((time.monotonic(), msg.topic, bytes(msg.payload)))

    def since(self, t0: float, t1: float = float("inf")) -> list[tuple[float, str, bytes]]:
        with self.lock:
            return [m for m in self.messages if t0 <= m[0] < t1]

    def states(self, state: str) -> dict[str, tuple[float, dict]]:
        out = {}
        for t, topic, payload in self.since(0):
            if topic.endswith("/bundle/state") and payload:
                s = json.loads(payload)
                if s["state"] == state and s["device_id"] not in out:
                    out[s["device_id"]] = (t, s)
        return out


def kind(topic: str) -> str:
    parts = topic.split("/")
    return "/".join(parts[2:]) if len(parts) > 2 else topic


def main() -> int:
    from annotate import make_bundle, with_max_detections
    from brokers import Broker

    from edgeq.bundle import read_bundle
    from edgeq.cli import main as edgeq
    from edgeq.converter.data.scenes import moving_scene_frames, write_video

    cmd = [edgeq_exe()]  # this environment's edgeq: a worktree's measures its own code
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = with_max_detections(make_bundle(tmp), 4)
        assert edgeq(["keygen", str(tmp / "release")]) == 0
        v1, v2 = renamed(base, tmp / "v1.edgeq", "fleet-v1"), renamed(base, tmp / "v2.edgeq", "fleet-v2")
        for b in (v1, v2):
            assert edgeq(["sign", str(b), "--key", str(tmp / "release.key")]) == 0
        sha2 = read_bundle(v2).file_sha256
        bundle_bytes = v2.stat().st_size
        frames, _ = moving_scene_frames(200, 192, seed=5, objects=3)
        clip = write_video(tmp / "clip.avi", frames, fps=10)
        broker = Broker(tmp / "broker").start()
        listener = Listener(broker.port)
        procs = []
        load_before = os.getloadavg()
        try:
            for i in range(DEVICES):
                d = tmp / f"d{i:02d}"
                d.mkdir()
                (d / "device.toml").write_text(
                    f'device_id = "pi-{i:02d}"\nmodel = "{v1}"\nsource = "{clip}"\nloop = true\nmax_fps = {FPS}\n'
                    f'trusted_keys = ["{tmp / "release.pub"}"]\n[mqtt]\nurl = "{broker.url}"\n'
                    f'[spool]\npath = "{d / "spool.db"}"\n[stats]\ninterval = 5\n[update]\nenabled = true\n'
                    'groups = ["lobby"]\n')
                procs.append(subprocess.Popen(cmd + ["run", "--config", str(d / "device.toml")],
                                              stdout=subprocess.DEVNULL, stderr=open(d / "run.log", "w")))
            deadline = time.monotonic() + 300
            while len(listener.states("running")) < DEVICES and time.monotonic() < deadline:
                time.sleep(0.2)
            if len(listener.states("running")) < DEVICES:
                raise SystemExit("not every device started")
            time.sleep(3)  # past start-up
            t0 = time.monotonic()
            time.sleep(STEADY_S)
            steady = listener.since(t0, t0 + STEADY_S)

            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion

            pusher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fleet-pusher")
            pusher.connect("127.0.0.1", broker.port)
            pusher.loop_start()
            pushed = time.monotonic()
            pusher.publish("edgeq/group/lobby/bundle/set", v2.read_bytes(), qos=1).wait_for_publish(60)
            deadline = time.monotonic() + 180
            while len(listener.states("applied")) < DEVICES and time.monotonic() < deadline:
                time.sleep(0.05)
            pusher.loop_stop()
            pusher.disconnect()
            applied = listener.states("applied")
            time.sleep(5)  # results after the swap
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=60) for p in procs]
            for i, code in enumerate(codes):
                if code != 0:
                    print(f"pi-{i:02d} exited {code}:\n{(tmp / f'd{i:02d}' / 'run.log').read_text()[-3000:]}",
                          file=sys.stderr)
            time.sleep(1)
            listener.client.loop_stop()
            broker.stop()

    by_kind: dict[str, list[int]] = {}
    for _, topic, payload in steady:
        by_kind.setdefault(kind(topic), []).append(len(payload))
    for _, topic, payload in listener.since(0):  # retained ones are published at connect, before the window
        if kind(topic) in ("status", "bundle/state") and payload:
            by_kind.setdefault(kind(topic), []).append(len(payload))
    sizes = {k: {"messages": len(v), "mean_bytes": round(float(np.mean(v)), 1)} for k, v in sorted(by_kind.items())}
    det_rate = sizes["detections"]["messages"] / STEADY_S / DEVICES
    gaps = dups = 0
    after_swap = 0
    seqs: dict[str, list[int]] = {}
    for _, topic, payload in listener.since(0):
        if topic.endswith("/detections"):
            m = json.loads(payload)
            seqs.setdefault(m["device_id"], []).append(m["seq"])
            after_swap += m["model"].get("bundle") == sha2[:12]
    for values in seqs.values():
        unique = sorted(set(values))
        dups += len(values) - len(unique)
        gaps += (unique[-1] - unique[0] + 1) - len(unique)
    delays = sorted(t - pushed for t, _ in applied.values())
    det_bytes, stats_bytes = sizes["detections"]["mean_bytes"], sizes["stats"]["mean_bytes"]
    retained = sizes.get("status", {}).get("mean_bytes", 0) + sizes.get("bundle/state", {}).get("mean_bytes", 0)

    def fleet_rate(rate: float) -> dict:
        msgs = FLEET * rate + FLEET / 30.0
        return {"results_per_device_s": rate, "publishes_per_s": round(msgs),
                "qos1_packets_per_s": round(2 * msgs),  # each QoS 1 publish is answered by a PUBACK
                "inbound_mb_per_s": round((FLEET * rate * det_bytes + FLEET / 30.0 * stats_bytes) / 1e6, 2)}

    result = {
        "benchmark": "fleet",
        "devices": DEVICES, "max_fps": FPS, "steady_seconds": STEADY_S, "load_average_at_start": load_before,
        "model": "grid detector MobileNetV2 0.35/192 int8 (random weights, 4 boxes a frame), signed",
        "message_sizes": sizes,
        "detections_per_device_s": round(det_rate, 2),
        "group_push": {
            "bundle_bytes": bundle_bytes, "applied": len(applied), "of": DEVICES,
            "seconds_to_first": round(delays[0], 3) if delays else None,
            "seconds_median": round(float(np.median(delays)), 3) if delays else None,
            "seconds_to_all": round(delays[-1], 3) if len(delays) == DEVICES else None,
            "seq_gaps": gaps, "seq_duplicates": dups, "results_after_swap": after_swap,
            "exit_codes_nonzero": sum(c != 0 for c in codes),
        },
        "fleet_10k": {
            "devices": FLEET, "stats_interval_s": 30,
            "at_1_result_s": fleet_rate(1.0), "at_5_results_s": fleet_rate(5.0),
            "retained_messages": 2 * FLEET, "retained_mb": round(FLEET * retained / 1e6, 2),
            "group_push_fanout_gb": round(FLEET * bundle_bytes / 1e9, 2),
        },
    }
    write_result("fleet", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
