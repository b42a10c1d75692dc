"""``edgeq demo``: the whole job end to end on embedded defaults, in a work folder.

Steps: generate labelled images -> train a small MobileNetV2 on them -> ``edgeq convert`` (full int8, with
--val) -> ``edgeq inspect`` -> a video through ``edgeq run`` into a loopback mosquitto, printed by a subscriber. Everything is made here; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from edgeq.cli import main as edgeq_main


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="edgeq-demo", help="folder for the demo's files (default ./edgeq-demo)")
    p.add_argument("--input-size", type=int, default=96, help="model input size (default 96)")
    p.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width (default 0.35)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--frames", type=int, default=30, help="frames in the demo video (default 30)")


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def train_demo_model(images: Path, out: Path, size: int, alpha: float, epochs: int) -> dict[str, float]:
    from edgeq.converter.models import build_mobilenet_v2
    from edgeq.converter.quantize import import_tensorflow
    from edgeq.converter.train import fit_classifier, load_folder_arrays
    from edgeq.preprocess import PreprocessSpec

    import_tensorflow()
    x, y, labels = load_folder_arrays(images, PreprocessSpec(size, size, 3))
    model = build_mobilenet_v2(size, alpha, len(labels), None, seed=0)
    summary = fit_classifier(model, x, y, epochs=epochs, seed=0)
    model.save(out)
    return summary


def run_demo(args: argparse.Namespace) -> int:
    from edgeq.synthetic import SHAPES, write_shape_folder

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = step(f"1. generating labelled images in {work}/images ({len(SHAPES)} shape classes)")
    write_shape_folder(work / "images", per_class=60, size=args.input_size, seed=0)
    print(f"   {60 * len(SHAPES)} images, {time.perf_counter() - t:.1f} s")

    t = step(f"2. training a MobileNetV2 {args.alpha:g}/{args.input_size} on them for {args.epochs} epochs")
    model_path = work / "shapes.keras"
    summary = train_demo_model(work / "images", model_path, args.input_size, args.alpha, args.epochs)
    print(f"   train accuracy {summary['accuracy']:.3f}, {time.perf_counter() - t:.1f} s -> {model_path}")

    bundle = work / "shapes.edgeq"
    step("3. edgeq convert: Keras model -> full-integer int8 bundle, float vs int8 checked on the images")
    argv = [
        "convert", str(model_path), "--calib", str(work / "images"), "--calib-samples", "100",
        "--val", str(work / "images"), "-o", str(bundle),
    ]
    print("   $ edgeq " + " ".join(argv))
    code = edgeq_main(argv)
    if code:
        return code

    step("4. edgeq inspect")
    print(f"   $ edgeq inspect {bundle}")
    code = edgeq_main(["inspect", str(bundle)])
    if code:
        return code
    return run_device_demo(work, bundle, args.frames)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_mosquitto(work: Path) -> tuple[subprocess.Popen | None, int]:
    import shutil
    import socket

    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None, 0
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, 0


def run_device_demo(work: Path, bundle: Path, frames: int) -> int:
    """Write a short video, start a broker on loopback, run ``edgeq run`` on it and print what a subscriber gets."""
    import json
    import shutil
    import sys

    from edgeq.synthetic import moving_shapes_frames, write_video

    t = step(f"5. writing a {frames}-frame video of moving shapes")
    video = write_video(work / "shapes.avi", moving_shapes_frames(frames, 240, 320))
    print(f"   {video}, {time.perf_counter() - t:.1f} s")

    step("6. starting a broker on loopback and subscribing to edgeq/#")
    broker, port = _start_mosquitto(work)
    exe = shutil.which("edgeq")
    cmd = [exe] if exe else [sys.executable, "-m", "edgeq.cli"]
    cmd += ["run", "--model", str(bundle), "--source", str(video), "--device-id", "demo",
            "--spool", str(work / "spool.sqlite3"), "--stats-interval", "1"]
    embedded = None
    if broker is None:
        from edgeq.minibroker import MiniBroker

        embedded = MiniBroker().start()
        port = embedded.port
        print(f"   mosquitto is not installed: using edgeq's embedded demo broker on 127.0.0.1:{port}")

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received: list[dict] = []

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        payload = json.loads(msg.payload)
        received.append(payload)
        if payload.get("schema") == "edgeq.detections":
            top = payload["detections"][0]
            print(f"   {msg.topic} seq={payload['seq']:>3} frame={payload['frame']['id']:>3} "
                  f"{top['label']:<9} p={top['score']:.2f} entropy={top['uncertainty']['predictive_entropy']:.2f} "
                  f"invoke={payload['latency_ms']['invoke']:.2f} ms")
        else:
            print(f"   {msg.topic} {json.dumps(payload)[:150]}")

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="edgeq-demo-subscriber")
    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("edgeq/#", qos=1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        step("7. edgeq run: video -> int8 inference -> spool -> MQTT")
        print(f"   $ edgeq run --model {bundle} --source {video} --mqtt mqtt://127.0.0.1:{port} --device-id demo")
        code = subprocess.call(cmd + ["--mqtt", f"mqtt://127.0.0.1:{port}"])
        time.sleep(0.5)
    finally:
        sub.loop_stop()
        sub.disconnect()
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=10)
        if embedded is not None:
            embedded.stop()
    seqs = [m["seq"] for m in received if m.get("schema") == "edgeq.detections"]
    print(f"\n   subscriber received {len(seqs)} detection messages for {frames} frames (seq {min(seqs, default=0)}..{max(seqs, default=0)})")
    return code
