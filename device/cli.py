"""Device subcommands: ``edgeq run``, ``edgeq doctor`` and ``edgeq validate-config``. Imports neither TensorFlow nor the converter;
heavy modules (OpenCV, paho) are imported only when a command runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_device_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a bundle on a camera, stream, video or folder and publish results (device)",
        description="Run a bundle on a source; every result goes through a durable spool to MQTT and/or --output.",
    )
    p.add_argument("--config", metavar="FILE", help="device TOML file (flags below override it)")
    p.add_argument("--model", metavar="BUNDLE", help=".edgeq bundle")
    p.add_argument("--source", metavar="SRC",
                   help="camera index or /dev/videoN, video file, image folder, rtsp://|http:// URL, or picamera2")
    p.add_argument("--mqtt", metavar="URL", help="broker, mqtt://host:port or mqtts://host:port")
    p.add_argument("--device-id", metavar="ID", help="device id used in topics (letters, digits, - and _)")
    p.add_argument("--threads", type=int, metavar="N", help="interpreter threads")
    p.add_argument("--output", metavar="FILE|-", help="also write every message as JSON lines (- for stdout)")
    p.add_argument("--annotate", metavar="PATH", help="draw every result on its frame: a .mp4/.avi video, or a "
                   "folder of JPEGs; flagged results in red with their reason (off by default)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    p.add_argument("--max-fps", type=float, metavar="F", help="cap the inference rate (frames per second)")
    p.add_argument("--loop", action="store_true", default=None, help="restart file and folder sources at their end")
    p.add_argument("--spool", metavar="FILE", help="spool database (default: $STATE_DIRECTORY or ~/.local/state/edgeq)")
    p.add_argument("--stats-interval", type=float, metavar="S", help="seconds between stats messages")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("doctor", help="check this machine: runtime, XNNPACK, CPU, threads, cameras, broker, bundle",
                       description="Check that this machine can run edgeq well: the TFLite runtime and its version, "
                                   "the CPU and its SIMD features, threads, cameras, the MQTT broker (with --config), "
                                   "and a bundle (valid, loads, XNNPACK coverage, one invoke). Exit code 1 if any "
                                   "check fails.")
    p.add_argument("--model", metavar="BUNDLE", help=".edgeq bundle to load and invoke (default: the config's model)")
    p.add_argument("--config", metavar="FILE", help="device TOML file: source, threads, broker and model to check")
    p.add_argument("--threads", type=int, metavar="N", help="interpreter threads (default: the config's, else 1)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(handler=_cmd_doctor)

    p = sub.add_parser("dashboard", help="a live page of every device: state, detections, uncertainty, snapshots",
                       description="Serve (or write, with --write) a self-contained page that connects to the broker "
                                   "over MQTT-over-WebSockets and shows every device live. The broker needs a "
                                   "websockets listener (docs/dashboard.md).")
    p.add_argument("--mqtt", metavar="URL", required=True, help="the broker's websockets listener, ws://HOST:PORT or "
                   "wss://HOST:PORT, as the browser reaches it")
    p.add_argument("--username", metavar="USER", help="broker user (a read-only one)")
    p.add_argument("--password-file", metavar="FILE", help="that user's password (it is written into config.js)")
    p.add_argument("--prefix", default="edgeq", help="topic prefix (default edgeq)")
    p.add_argument("--write", metavar="DIR", help="write the page into DIR for any web server, and exit")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; 0: any free port)")
    p.set_defaults(handler=_cmd_dashboard)

    p = sub.add_parser("push", help="send a bundle (or a rollback) to a device or a group over MQTT",
                       description="Publish a bundle, QoS 1, on <prefix>/<id>/bundle/set (or a group's topic) and "
                                   "report each device's answer from its bundle/state: applied, or refused and why. "
                                   "Devices take it with [update] enabled (docs/fleet.md).")
    p.add_argument("bundle", metavar="BUNDLE", nargs="?", help=".edgeq bundle to send")
    p.add_argument("--mqtt", metavar="URL", required=True, help="broker, mqtt://host:port or mqtts://host:port")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device-id", metavar="ID", help="one device")
    who.add_argument("--group", metavar="NAME", help="every device with NAME in [update] groups")
    p.add_argument("--rollback", action="store_true", help="return to the previous bundle instead")
    p.add_argument("--wait", type=float, metavar="S", help="seconds to wait for answers (default 60 for a device, "
                   "20 for a group)")
    p.add_argument("--expect", type=int, metavar="N", help="with --group: stop waiting once N devices answered "
                   "(exit 1 if fewer did)")
    p.add_argument("--username", metavar="USER", help="broker user")
    p.add_argument("--password-file", metavar="FILE", help="that user's password")
    p.add_argument("--ca", metavar="FILE", help="CA certificate for mqtts://")
    p.add_argument("--prefix", default="edgeq", help="topic prefix (default edgeq)")
    p.add_argument("--max-bytes", type=int, default=64 << 20, help="refuse bigger bundles (default 64 MiB, as devices)")
    p.add_argument("--key", metavar="PUB", help="refuse to send a bundle whose signature does not verify with this "
                   "public key (what devices with trusted_keys check)")
    p.set_defaults(handler=_cmd_push)

    p = sub.add_parser("validate-config", help="check a device config file and say what is wrong",
                       description="Validate a device TOML file; errors name the file, line and key.")
    p.add_argument("config", metavar="FILE")
    p.set_defaults(handler=_cmd_validate)


def _cmd_push(args: argparse.Namespace) -> int:
    from .push import push

    wait = args.wait if args.wait is not None else (60.0 if args.device_id else 20.0)
    if args.expect is not None and (args.group is None or args.expect < 1):
        from edgeq.errors import ConfigError

        raise ConfigError("--expect N goes with --group, N at least 1")
    return push(args.bundle, args.mqtt, args.device_id, args.group, args.rollback, wait, args.username,
                args.password_file, args.ca, args.prefix, args.max_bytes, expect=args.expect, key=args.key)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "source": args.source,
        "mqtt.url": args.mqtt,
        "device_id": args.device_id,
        "threads": args.threads,
        "output": args.output,
        "annotate": args.annotate,
        "max_frames": args.max_frames,
        "max_fps": args.max_fps,
        "loop": args.loop,
        "spool.path": args.spool,
        "stats.interval": args.stats_interval,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runner import run_device

    cfg = load_config(args.config, _overrides(args))
    return run_device(cfg)


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from .doctor import format_table, overall, run_checks, to_json

    if args.threads is not None and args.threads < 1:
        print(f"edgeq: error: --threads {args.threads}: give at least 1", file=sys.stderr)
        return 2
    checks = run_checks(args.model, args.config, args.threads)
    print(json.dumps(to_json(checks), indent=2) if args.json else format_table(checks))
    return 1 if overall(checks) == "fail" else 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from .config import read_secret
    from .dashboard import check_url, serve, write

    check_url(args.mqtt)
    password = read_secret(Path(args.password_file), None, "--password") if args.password_file else None
    if args.write:
        page = write(Path(args.write), args.mqtt, args.prefix, args.username, password)
        print(f"wrote {page} (and config.js, app.js, vendor/); serve the folder with any web server")
        return 0
    with tempfile.TemporaryDirectory(prefix="edgeq-dashboard-") as tmp:
        write(Path(tmp), args.mqtt, args.prefix, args.username, password)
        serve(Path(tmp), args.host, args.port, lambda s: print(s, flush=True))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    if cfg.mqtt is not None and (cfg.mqtt.password_file or cfg.mqtt.password_credential):
        try:
            cfg.mqtt.password()
        except Exception as exc:  # ConfigError: report like any other config problem
            print(f"edgeq: error: {args.config}: {exc}", file=sys.stderr)
            return 2
    from .config import redact_url

    where = f"mqtt {redact_url(cfg.mqtt.url)}" if cfg.mqtt else "no MQTT"
    print(f"{args.config}: ok (device {cfg.device_id}, source {redact_url(str(cfg.source))}, {where})")
    return 0
