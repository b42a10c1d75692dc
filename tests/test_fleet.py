"""Fleet updates with real parts: `edgeq run` processes with [update] enabled, `edgeq push`, one mosquitto.

A good bundle is applied while results keep flowing, with no gap in seq; every bad one is refused with its reason
on bundle/state and the old model keeps running; a rollback returns to the previous bundle; a device killed while
it writes a new bundle restarts on the old one; a group push reaches 20 device processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from brokers import Broker, Collector
from conftest import SHAPE_LABELS, edgeq_exe, edgeq_here, run_edgeq, save_with_labels
from edgeq.bundle import message_schema, read_bundle
from edgeq.cli import main
from test_bad_inputs import _rewrite

pytestmark = pytest.mark.slow


def edgeq_cmd(*args: str) -> list[str]:
    exe = edgeq_exe()
    return [exe, *args] if exe else [sys.executable, "-m", "edgeq.cli", *args]


def renamed(src: Path, dst: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    """Another bundle of the same model: the manifest's name changed (so another file sha256)."""
    def edit(entry: str, data: bytes) -> bytes:
        if entry != "manifest.json":
            return data
        m = json.loads(data)
        m["name"] = name
        return json.dumps(m).encode()

    return _rewrite(src, dst, edit, extra)


def sign(path: Path, key: Path) -> Path:
    assert main(["sign", str(path), "--key", str(key)]) == 0
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    return write_video(tmp_path_factory.mktemp("fleet-video") / "clip.avi", moving_shapes_frames(30, 96, 96))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_bundle, shapes_dir) -> dict[str, Path]:
    """Keys, and every bundle the tests push: two good versions and one of each kind of bad."""
    d = tmp_path_factory.mktemp("fleet")
    assert main(["keygen", str(d / "release")]) == 0 and main(["keygen", str(d / "intruder")]) == 0
    key, intruder = d / "release.key", d / "intruder.key"
    b = {"pub": d / "release.pub", "key": key}
    b["v1"] = sign(renamed(tiny_bundle, d / "v1.edgeq", "tiny-v1"), key)
    b["v2"] = sign(renamed(tiny_bundle, d / "v2.edgeq", "tiny-v2"), key)

    def tamper(entry: str, data: bytes) -> bytes:  # labels swapped; the model and its sha256 untouched
        if entry != "manifest.json":
            return data
        m = json.loads(data)
        m["labels"] = list(reversed(m["labels"]))
        return json.dumps(m).encode()

    b["tampered"] = _rewrite(b["v2"], d / "tampered.edgeq", tamper)
    b["unsigned"] = renamed(tiny_bundle, d / "unsigned.edgeq", "tiny-unsigned")
    b["intruder"] = sign(renamed(tiny_bundle, d / "intruder.edgeq", "tiny-intruder"), intruder)
    b["oversized"] = sign(renamed(tiny_bundle, d / "oversized.edgeq", "tiny-big",
                                  {"padding.bin": os.urandom(600_000)}), key)
    blob = b["v2"].read_bytes()
    b["corrupt"] = d / "corrupt.edgeq"
    b["corrupt"].write_bytes(blob[: len(blob) // 2])
    from edgeq.converter.models.detector import build_detector

    det = save_with_labels(build_detector(96, 0.35, 3, seed=2), d / "det.keras", SHAPE_LABELS)
    r = edgeq_here("convert", str(det), "--calib", str(shapes_dir), "--calib-samples", "20", "--resize", "letterbox",
                  "--sign", str(key), "-o", str(d / "detector.edgeq"))
    assert r.returncode == 0, r.stderr[-2000:]
    b["detector"] = d / "detector.edgeq"
    return b


class Device:
    """One `edgeq run` process with updates enabled, publishing to the broker and writing --output lines."""

    def __init__(self, workdir: Path, broker: Broker, model: Path, source: Path, device_id: str = "cam1",
                 update: str = "", keys: Path | None = None, max_fps: float = 15) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.out = workdir, workdir / "out.jsonl"
        self.config = workdir / "device.toml"
        trusted = f'trusted_keys = ["{keys}"]\n' if keys else ""
        self.config.write_text(
            f'device_id = "{device_id}"\nmodel = "{model}"\nsource = "{source}"\nloop = true\nmax_fps = {max_fps}\n'
            f'output = "{self.out}"\n{trusted}[mqtt]\nurl = "{broker.url}"\n[spool]\npath = "{workdir / "spool.db"}"\n'
            f'[stats]\ninterval = 3600\n[update]\nenabled = true\n{update}')
        self.store = workdir / f"bundles-{device_id}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Device":
        self.log = open(self.workdir / "run.log", "a")
        self.proc = subprocess.Popen(edgeq_cmd("run", "--config", str(self.config)), stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code

    def results(self) -> list[dict]:
        return [m for m in map(json.loads, self.out.read_text().splitlines()) if m["schema"] == "edgeq.detections"]

    def stderr(self) -> str:
        return (self.workdir / "run.log").read_text()


def states(sub: Collector, device_id: str) -> list[dict]:
    return sub.payloads(f"{device_id}/bundle/state")


def raw_publish(broker: Broker, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-pusher")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(30)
    client.loop_stop()
    client.disconnect()


def push(broker: Broker, *args: str, wait: str = "30") -> subprocess.CompletedProcess:
    return run_edgeq("push", *args, "--mqtt", broker.url, "--wait", wait)


REFUSED = [
    ("tampered", ["manifest.json changed after signing"]),
    ("unsigned", ["unsigned", "trusted_keys"]),
    ("intruder", ["not in trusted_keys"]),
    ("oversized", ["over the", "max_bytes"]),
    ("corrupt", ["truncated or corrupt"]),
    ("detector", ["task detect differs", "allow_task_change"]),
]


def test_push_applies_without_a_gap_refuses_bad_bundles_and_rolls_back(tmp_path, fleet, video):
    broker = Broker(tmp_path / "broker").start()
    sub = Collector(broker.port, ["edgeq/+/bundle/state", "edgeq/+/status"])
    max_bytes = max(fleet["v2"].stat().st_size, fleet["detector"].stat().st_size) + 100_000  # padded: 600 kB more
    dev = Device(tmp_path / "dev", broker, fleet["v1"], video, update=f"max_bytes = {max_bytes}\n",
                 keys=fleet["pub"]).start()
    v1, v2 = read_bundle(fleet["v1"]), read_bundle(fleet["v2"])
    schema = message_schema("bundle_state")
    try:
        assert sub.wait_for(lambda: any(s["state"] == "running" for s in states(sub, "cam1")), 60), dev.stderr()
        assert sub.wait_for(lambda: len(dev.results()) >= 10, 30)

        r = push(broker, str(fleet["v2"]), "--device-id", "cam1")
        assert r.returncode == 0 and "cam1: applied" in r.stdout, r.stdout + r.stderr
        count = len(dev.results())
        assert sub.wait_for(lambda: len(dev.results()) >= count + 10, 30)  # results keep flowing on v2

        for name, needles in REFUSED:
            if name == "corrupt":  # edgeq push checks the bundle first: sent raw, as a broken transfer would
                assert push(broker, str(fleet[name]), "--device-id", "cam1").returncode != 0
                before = len(states(sub, "cam1"))
                raw_publish(broker, "edgeq/cam1/bundle/set", fleet[name].read_bytes())
                assert sub.wait_for(lambda: len(states(sub, "cam1")) > before, 30)
                s = states(sub, "cam1")[-1]
                line = f"cam1: {s['state']}: {s['reason']} (running {s['bundle']['name']})"
            else:
                r = push(broker, str(fleet[name]), "--device-id", "cam1")
                assert r.returncode == 1 and "cam1: refused" in r.stdout, (name, r.stdout, r.stderr)
                line = next(ln for ln in r.stdout.splitlines() if "cam1: refused" in ln)
            for needle in needles:
                assert needle in line, (name, line)
            assert "cam1: refused" in line and "running tiny-v2" in line  # the old model keeps running

        r = push(broker, "--rollback", "--device-id", "cam1")
        assert r.returncode == 0 and "cam1: rolled_back" in r.stdout and "running tiny-v1" in r.stdout, r.stdout
        count = len(dev.results())
        assert sub.wait_for(lambda: len(dev.results()) >= count + 10, 30)
    finally:
        code = dev.stop() if dev.proc.poll() is None else dev.proc.returncode
        sub.close()
        broker.stop()
    assert code == 0, dev.stderr()
    assert "Traceback" not in dev.stderr()

    results = dev.results()
    seqs = [m["seq"] for m in results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate across two swaps
    made_by = [m["model"]["bundle"] for m in results]
    runs = [b for i, b in enumerate(made_by) if i == 0 or made_by[i - 1] != b]
    assert runs == [v1.file_sha256[:12], v2.file_sha256[:12], v1.file_sha256[:12]], runs
    detections = message_schema("detections")
    for m in results[::7]:
        jsonschema.validate(m, detections)

    seen = states(sub, "cam1")
    for s in seen:
        jsonschema.validate(s, schema)
    verdicts = [s["state"] for s in seen if s["state"] != "running"]
    assert verdicts == ["applied"] + ["refused"] * len(REFUSED) + ["rolled_back"], verdicts
    assert seen[-1]["bundle"]["sha256"] == v1.file_sha256 and seen[-1]["previous_sha256"] == v2.file_sha256
    status = sub.payloads("cam1/status")
    assert any(s["state"] == "online" and s["model"]["bundle"] == v2.file_sha256[:12] for s in status)
    assert sorted(p.name for p in dev.store.iterdir()) == sorted(
        [f"{v1.file_sha256}.edgeq", f"{v2.file_sha256}.edgeq", "state.json"])


def test_killed_while_writing_an_update_restarts_on_the_old_bundle(tmp_path, fleet, video):
    """SIGKILL as soon as the new bundle's temporary file appears in the store: the restart runs the old one."""
    big = sign(renamed(fleet["v2"], tmp_path / "big.edgeq", "tiny-big", {"padding.bin": os.urandom(20_000_000)}),
               fleet["key"])
    broker = Broker(tmp_path / "broker").start()
    sub = Collector(broker.port, ["edgeq/+/bundle/state"])
    dev = Device(tmp_path / "dev", broker, fleet["v1"], video, keys=fleet["pub"]).start()
    try:
        assert sub.wait_for(lambda: states(sub, "cam1"), 60), dev.stderr()
        killed = threading.Event()

        def kill_when_writing() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if list(dev.store.glob(".incoming-*.tmp")):
                    dev.proc.kill()
                    killed.set()
                    return
                time.sleep(0.0005)

        watcher = threading.Thread(target=kill_when_writing)
        watcher.start()
        raw_publish(broker, "edgeq/cam1/bundle/set", big.read_bytes())
        watcher.join()
        assert killed.is_set(), "the update never started: " + dev.stderr()
        assert dev.stop(signal.SIGKILL) == -signal.SIGKILL
        state = json.loads((dev.store / "state.json").read_text()) if (dev.store / "state.json").exists() else {}
        assert not str(state.get("current", "")).startswith(read_bundle(big).file_sha256)

        dev.out.unlink(missing_ok=True)
        dev.start()
        assert sub.wait_for(lambda: dev.out.exists() and len(dev.results()) >= 5, 60), dev.stderr()
    finally:
        if dev.proc.poll() is None:
            dev.stop()
        sub.close()
        broker.stop()
    assert {m["model"]["bundle"] for m in dev.results()} == {read_bundle(fleet["v1"]).file_sha256[:12]}
    assert not list(dev.store.glob("*.tmp"))  # the leftover was removed at start
    assert "left by an interrupted update" in dev.stderr()


def test_another_task_is_applied_when_the_config_allows_it(tmp_path, fleet, video):
    broker = Broker(tmp_path / "broker").start()
    dev = Device(tmp_path / "dev", broker, fleet["v1"], video, update="allow_task_change = true\n",
                 keys=fleet["pub"]).start()
    try:
        deadline = time.monotonic() + 60
        while not (dev.out.exists() and dev.results()) and time.monotonic() < deadline:
            time.sleep(0.1)
        r = push(broker, str(fleet["detector"]), "--device-id", "cam1")
        assert r.returncode == 0 and "cam1: applied" in r.stdout, r.stdout + r.stderr
        deadline = time.monotonic() + 30
        while not any(m["task"] == "detect" for m in dev.results()[-3:]) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        code = dev.stop()
        broker.stop()
    assert code == 0, dev.stderr()
    results = dev.results()
    assert [m["task"] for m in results[:1]] == ["classify"] and results[-1]["task"] == "detect"
    detections = message_schema("detections")
    for m in results[-3:]:
        jsonschema.validate(m, detections)
    seqs = [m["seq"] for m in results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_group_push_reaches_20_devices(tmp_path, fleet, video):
    """One push to edgeq/group/lobby/bundle/set; 20 `edgeq run` processes on one mosquitto all apply it."""
    broker = Broker(tmp_path / "broker").start()
    sub = Collector(broker.port, ["edgeq/+/bundle/state"])
    devices = [Device(tmp_path / f"d{i:02d}", broker, fleet["v1"], video, device_id=f"pi-{i:02d}",
                      update='groups = ["lobby"]\n', max_fps=2) for i in range(20)]
    v2 = read_bundle(fleet["v2"]).file_sha256
    try:
        for d in devices:
            d.start()

        def running() -> set:
            return {s["device_id"] for s in sub.payloads("/bundle/state") if s["state"] == "running"}

        assert sub.wait_for(lambda: len(running()) == 20, 180), sorted(running())
        r = push(broker, str(fleet["v2"]), "--group", "lobby", "--expect", "20", wait="60")
        assert r.returncode == 0 and "20 device(s) answered: 20 applied, 0 refused" in r.stdout, r.stdout + r.stderr
        count = [len(d.results()) if d.out.exists() else 0 for d in devices]
        deadline = time.monotonic() + 30  # a few results from the new bundle on every device
        while time.monotonic() < deadline and not all(
                d.out.exists() and len(d.results()) > c + 2 for d, c in zip(devices, count)):
            time.sleep(0.2)
        r = push(broker, str(fleet["v2"]), "--group", "nobody", wait="1")  # a group no device is in
        assert r.returncode == 1 and "no device of group nobody answered" in r.stdout, r.stdout + r.stderr
    finally:
        codes = []
        for d in devices:
            d.proc.send_signal(signal.SIGTERM)
        for d in devices:
            codes.append(d.proc.wait(timeout=60))
            d.log.close()
        sub.close()
        broker.stop()
    applied = {s["device_id"] for s in sub.payloads("/bundle/state") if s["state"] == "applied"
               and s["bundle"]["sha256"] == v2}
    assert applied == {f"pi-{i:02d}" for i in range(20)} and codes == [0] * 20
    for d in devices:
        assert d.results()[-1]["model"]["bundle"] == v2[:12] and "Traceback" not in d.stderr()


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024


def test_memory_after_a_hot_swap_is_that_of_a_fresh_start(tmp_path, fleet, video):
    """Found in the field: after a 51 MB bundle was applied over the air, the device kept 89 MB more than a fresh
    start on it (the offer's bytes were held while the updater waited for the next one; glibc kept freed heap).
    Now a 47 MB bundle, pushed and applied, leaves the device within 5 MB of a fresh start on it, side by side
    (benchmarks/memory.py measures it too). Without device/updates.tune_malloc's fixed mmap threshold it kept 1 to
    16 MB more, varying from run to run."""
    from edgeq.converter.tf import import_tensorflow
    from edgeq.converter.training.common import save_model

    import_tensorflow()
    import keras

    x = keras.Input((32, 32, 3))  # the running bundle's input: an update may not change it
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x))
    h = keras.layers.Dense(3584, activation="relu")(keras.layers.Dense(3584, activation="relu")(h))
    save_model(keras.Model(x, keras.layers.Dense(3, activation="softmax")(h)), tmp_path / "big.keras",
               {"labels": SHAPE_LABELS})
    big = tmp_path / "big.edgeq"
    r = edgeq_here("convert", str(tmp_path / "big.keras"), "--quant", "float32", "--density", "off", "--sign",
                  str(fleet["key"]), "-o", str(big))
    assert r.returncode == 0 and big.stat().st_size > 40e6, r.stderr[-2000:]
    broker = Broker(tmp_path / "broker").start()
    update = f"max_bytes = {big.stat().st_size + 1000}\n"
    swapped = Device(tmp_path / "swapped", broker, fleet["v1"], video, "swapped", update, fleet["pub"]).start()
    fresh = None
    try:
        time.sleep(3)
        r = push(broker, str(big), "--device-id", "swapped", wait="120")
        assert r.returncode == 0 and "applied" in r.stdout, (r.stdout, r.stderr, swapped.stderr())
        fresh = Device(tmp_path / "fresh", broker, big, video, "fresh", update, fleet["pub"]).start()
        time.sleep(8)  # both settled: the model loaded and packed, the old one gone
        after, start = [], []
        for _ in range(5):
            after.append(_rss_mb(swapped.proc.pid))
            start.append(_rss_mb(fresh.proc.pid))
            time.sleep(1)
        assert sorted(after)[2] <= sorted(start)[2] + 5, (after, start)
    finally:
        for d in (swapped, fresh):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.stop()
        broker.stop()


@pytest.mark.parametrize("tuned", [False, True])
def test_a_large_block_freed_is_given_back_at_once(tuned):
    """The mechanism behind the hot-swap figure, in a process of its own (mallopt is process-wide): glibc, left
    alone, raises its mmap threshold to the size of a large block once it is freed (20 MB here), so the next
    block under that size (10 MB) comes from the heap and stays resident after it is freed. With
    device/updates.tune_malloc it is mapped on its own and given back."""
    code = (
        "from pathlib import Path\n"
        "def rss():\n"
        "    line = [s for s in Path('/proc/self/status').read_text().splitlines() if s.startswith('VmRSS:')][0]\n"
        "    return int(line.split()[1]) / 1024\n"
        + ("from edgeq.device.updates import tune_malloc\ntune_malloc()\n" if tuned else "")
        + "b = bytearray(20 << 20)\ndel b\nr0 = rss()\nb = bytearray(10 << 20)\ndel b\nprint(rss() - r0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    kept = float(r.stdout)
    assert kept < 2 if tuned else kept > 8, (kept, r.stderr)
