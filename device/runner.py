"""``edgeq run``: source -> preprocess into a preallocated input -> invoke -> decode -> outbox (spool, MQTT).

Three threads overlap: the source's capture/decode thread, this inference loop, and the outbox. Signals
(SIGTERM, SIGINT) stop the loop; every result already produced is flushed into the spool, ``stopped`` is
published, and the process exits 0.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from edgeq._version import __version__
from edgeq.bundle import Bundle, read_bundle
from edgeq.errors import ConfigError, EdgeqError
from edgeq.preprocess import Preprocessor

from .config import DeviceConfig, read_secret
from .decoders import make_decoder
from .homeassistant import discovery_payload
from .mqtt import MqttLink
from .outbox import Outbox
from .sdnotify import Notifier
from .sources import open_source
from .spool import Spool

DETECTIONS_SCHEMA = ("edgeq.detections", 3)
STATS_SCHEMA = ("edgeq.stats", 1)


def utc_timestamp(t: float | None = None) -> str:
    moment = _dt.datetime.fromtimestamp(time.time() if t is None else t, _dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def read_cpu_temp_c() -> float | None:
    try:
        return round(int(Path("/sys/class/thermal/thermal_zone0/temp").read_text().strip()) / 1000, 1)
    except (OSError, ValueError):
        return None


class Runner:
    def __init__(self, cfg: DeviceConfig, log: Callable[[str], None]) -> None:
        if cfg.model is None:
            raise ConfigError("no model: set model = \"...\" in the config or pass --model BUNDLE")
        if cfg.source is None:
            raise ConfigError("no source: set source = \"...\" in the config or pass --source SRC")
        self.cfg = cfg
        self.log = log
        self.bundle: Bundle = read_bundle(cfg.model)
        self.model = self.bundle.load_model(num_threads=cfg.threads)
        self.pre = Preprocessor(self.bundle.preprocess_spec)
        # The source preprocesses on its own thread into this ring (more buffers than frames in flight:
        # 8 queued + 1 being inferred + 1 being written), so decoding overlaps inference.
        self._ring = [np.empty(self.pre.spec.shape, dtype=self.pre.buffer.dtype) for _ in range(12)]
        self._ring_next = 0
        if self.pre.spec.dtype != np.dtype(self.model.input.dtype).name:
            raise EdgeqError(f"{cfg.model}: manifest input dtype {self.pre.spec.dtype} differs from the model's; re-convert")
        self.decoder = make_decoder(self.model, self.bundle, cfg.thresholds.score, cfg.thresholds.top_k,
                                    (cfg.thresholds.review_measure, cfg.thresholds.review), cfg.thresholds.nms_iou,
                                    cfg.thresholds.unfamiliar_percentile)
        self.source = open_source(cfg.source, cfg.loop, self._source_log,
                                  read_secret(cfg.source_password_file, cfg.source_password_credential, "source_password"))
        self.stop_event = threading.Event()
        self.stop_reason = "end of source"
        self.frames = 0
        self.started = time.monotonic()
        self.invoke_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self._stats_frames = 0
        self._stats_time = time.monotonic()
        self.notifier = Notifier()
        self.link = self._make_link() if cfg.mqtt else None
        self.output = self._open_output(cfg.output)
        annotator = None
        if cfg.annotate is not None:  # nothing of it is imported, and no frame kept, when off
            from .annotate import Annotator, check_target

            annotator = Annotator(check_target(cfg.annotate), cfg.max_fps or getattr(self.source, "fps", None))
        self._snapshot_period = (1.0 / cfg.snapshot.rate_hz) if (cfg.snapshot.enabled and cfg.mqtt) else None
        self._next_snapshot = 0.0
        self.outbox = Outbox(
            # without MQTT the spool only numbers results: no reserve to keep
            lambda: Spool(cfg.spool_path(), cfg.spool.max_messages, cfg.spool.max_bytes,
                          cfg.spool.reserve_bytes if cfg.mqtt else 0, log, cfg.spool.max_age_s),
            self.link, self.output, self.stats_payload, cfg.stats.interval, log, cfg.spool.when_full, annotator,
            cfg.snapshot if self._snapshot_period else None,
        )

    def _snapshot_due(self) -> bool:
        """Whether this frame goes out as the snapshot (at most ``rate_hz`` a second); only those frames are kept
        for it."""
        if self._snapshot_period is None:
            return False
        now = time.monotonic()
        if now < self._next_snapshot:
            return False
        self._next_snapshot = now + self._snapshot_period
        return True

    def _source_log(self, line: str) -> None:
        """The source's lines (skipped files, lost streams, truncation) are faults too, kept for `edgeq doctor`."""
        self.log(line)
        outbox = getattr(self, "outbox", None)
        if outbox is not None:
            outbox.note_fault("source", None if line.endswith(": reconnected") else line)

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, Any]:
        buffer = self._ring[self._ring_next]
        self._ring_next = (self._ring_next + 1) % len(self._ring)
        return self.pre(image, out=buffer)

    # -- pieces ----------------------------------------------------------------------------------------
    def _open_output(self, target: str | None) -> IO[str] | None:
        if target is None:
            return None
        if target == "-":
            return sys.stdout
        try:
            return open(target, "a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--output {target}: cannot open for writing ({exc.strerror})") from None

    def _make_link(self) -> MqttLink:
        cfg = self.cfg
        assert cfg.mqtt is not None
        link = MqttLink(cfg.mqtt, cfg.device_id, self.online_payload, self.log, on_connected=self._on_connected)
        if cfg.homeassistant.discovery:
            link.subscribe(f"{cfg.homeassistant.prefix}/status", self._on_ha_status)
        return link

    def _on_connected(self) -> None:
        if self.cfg.homeassistant.discovery:
            self._send_discovery()

    def _on_ha_status(self, topic: str, payload: bytes) -> None:
        if payload.strip().lower() == b"online":
            self._send_discovery()

    def _send_discovery(self) -> None:
        assert self.link is not None
        topic, payload = discovery_payload(self.cfg, self.bundle, self.link.prefix)
        self.link.publish(topic, json.dumps(payload), qos=1, retain=True)

    def online_payload(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "model": {"name": self.bundle.name, "sha256": self.bundle.sha256},
            "runtime": self.model.describe(),
            "source": self.source.name,
            "timestamp": utc_timestamp(),
        }

    def stats_payload(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = max(now - self._stats_time, 1e-9)
        fps = (self.frames - self._stats_frames) / elapsed
        self._stats_frames, self._stats_time = self.frames, now
        times = np.asarray(self.invoke_ms) if self.invoke_ms else np.zeros(1)
        return {
            "schema": STATS_SCHEMA[0], "schema_version": STATS_SCHEMA[1], "device_id": self.cfg.device_id,
            "timestamp": utc_timestamp(), "uptime_s": round(now - self.started, 1), "frames": self.frames,
            "fps": round(fps, 2),
            "inference_ms": {"p50": round(float(np.percentile(times, 50)), 3), "p95": round(float(np.percentile(times, 95)), 3)},
            "dropped_frames": self.source.dropped, "source_reconnects": self.source.reconnects,
            "skipped_frames": self.source.skipped,
            "mqtt_error": self.link.last_error if self.link else None,
            "rss_mb": read_rss_mb(), "cpu_temp_c": read_cpu_temp_c(),
        }

    # -- the loop --------------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_event.set()
        self.source.close()

    def run(self) -> int:
        cfg = self.cfg
        base = {
            "schema": DETECTIONS_SCHEMA[0], "schema_version": DETECTIONS_SCHEMA[1], "device_id": cfg.device_id,
            "model": {"name": self.bundle.name, "sha256": self.bundle.sha256}, "task": self.bundle.task,
        }
        self.outbox.start()
        self.outbox.wait_ready()
        if self.outbox.error is not None:
            raise self.outbox.error
        if self.link:
            self.link.start()
        self.log(f"running {self.bundle.name} on {self.source.name}: {self.model.runtime.name} "
                 f"{self.model.runtime.version}, {self.model.delegation.summary()}")
        # ready once the model, the spool and the source are set up, not at the first frame: a camera or stream
        # that is down at boot is waited for with backoff (watchdog pings go on), not killed by TimeoutStartSec
        self.notifier.ready(f"started; waiting for the first frame from {self.source.name}")
        wait_started = time.perf_counter()
        period = 1.0 / cfg.max_fps if cfg.max_fps else 0.0
        next_slot = time.monotonic()
        try:
            for frame in self.source.frames(prepare=self._prepare):
                if self.stop_event.is_set():
                    break
                if frame is None:  # a live source is reconnecting: the loop is alive, nothing to infer
                    self.notifier.watchdog()
                    continue
                if period:
                    delay = next_slot - time.monotonic()
                    if delay > 0 and self.stop_event.wait(delay):
                        break
                    next_slot = max(next_slot + period, time.monotonic() - period)
                    if not self.source.live:  # a file frame "arrives" when its slot comes, not when decoded
                        frame.captured_at = time.time()
                t0 = time.perf_counter()
                if frame.tensor is None:  # every source prepares on its own thread, whose scratch buffers these are
                    raise RuntimeError(f"source {self.source.name} yielded a frame it did not preprocess (a bug)")
                t1 = time.perf_counter()
                self.model.set_input(frame.tensor)
                self.model.invoke()
                raw = {t.index: self.model.get(t) for t in self.decoder.tensors}
                t2 = time.perf_counter()
                self.invoke_ms.append((t2 - t1) * 1000)
                h, w = frame.image.shape[:2]
                transform = frame.transform
                snap = self._snapshot_due()
                self.outbox.submit(
                    {
                        **base, "seq": 0, "timestamp": utc_timestamp(frame.captured_at),
                        "frame": {"id": frame.id, "width": int(w), "height": int(h)},
                        "latency_ms": {
                            "wait": round((t0 - wait_started) * 1000, 3), "preprocess": round((t1 - t0) * 1000, 3),
                            "invoke": round((t2 - t1) * 1000, 3),
                        },
                    },
                    lambda raw=raw, transform=transform: self.decoder.decode(raw, transform),
                    frame.image if self.outbox.annotator is not None or snap else None,
                    snapshot=snap,
                )
                self.frames += 1
                if self.frames == 1:
                    self.notifier.status(f"running {self.bundle.name} on {self.source.name}")
                self.notifier.watchdog()
                if self.outbox.error is not None:
                    raise self.outbox.error
                if cfg.max_frames is not None and self.frames >= cfg.max_frames:
                    self.stop_reason = "max frames"
                    break
                while self.outbox.full.is_set() and cfg.spool.when_full == "pause" and not self.stop_event.is_set():
                    self.notifier.watchdog()  # paused on purpose, not hung
                    time.sleep(0.05)
                wait_started = time.perf_counter()
        finally:
            self.source.close()
            self.notifier.stopping()
        ended_naturally = self.stop_reason in ("end of source", "max frames")
        drained = self.outbox.finish(cfg.drain_timeout if ended_naturally else min(cfg.drain_timeout, 2.0))
        if self.outbox.error is not None:
            raise self.outbox.error
        if self.link:
            self.link.stop("stopped")
        if self.output not in (None, sys.stdout):
            self.output.close()
        left = "" if drained or not self.link else f", {self.outbox.depth} result(s) kept in the spool for the next run"
        if left and self.link.last_error:
            left += f" (broker not reached: {self.link.last_error})"
        dropped = self.outbox.spool_dropped - self.outbox.dropped_at_start
        if dropped:
            left += (f"; {dropped} result(s) dropped for lack of space, {self.outbox.lost} of them never stored "
                     "(free disk space or raise [spool] max_bytes)")
        self.log(f"stopped ({self.stop_reason}): {self.frames} frames, last seq {self.outbox.last_seq}{left}")
        return 0


def run_device(cfg: DeviceConfig, log: Callable[[str], None] | None = None) -> int:
    log = log or (lambda s: print(f"edgeq: {s}", file=sys.stderr, flush=True))
    runner = Runner(cfg, log)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, _f: runner.request_stop(signal.Signals(signum).name))
    try:
        return runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
