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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from edgeq._version import __version__
from edgeq.bundle import Bundle, read_bundle
from edgeq.errors import ConfigError, EdgeqError
from edgeq.quiet import say
from edgeq.preprocess import Preprocessor

from .config import DeviceConfig, read_secret
from .decoders import make_decoder
from .homeassistant import discovery_payload
from .mqtt import MqttLink
from .outbox import Outbox
from .sdnotify import Notifier
from .sources import open_source
from .spool import Spool

DETECTIONS_SCHEMA = ("edgeq.detections", 4)
STATS_SCHEMA = ("edgeq.stats", 1)
STOP_JOIN_S = 0.5  # how long a stop waits for the source's thread (a stalled stream's read may block for 10 s)


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


@dataclass
class Loaded:
    """A checked bundle ready to run: its model, preprocessor, ring of input buffers and decoder. The inference
    loop swaps the whole of it at a frame boundary (device/updates.py)."""

    bundle: Bundle
    model: Any
    pre: Preprocessor
    decoder: Any
    ring: list[np.ndarray]
    spare: np.ndarray  # the loop's own buffer for frames prepared by an earlier Loaded

    @property
    def tag(self) -> dict[str, str]:
        """How every result names the bundle that made it."""
        return {"name": self.bundle.name, "sha256": self.bundle.sha256, "bundle": self.bundle.file_sha256[:12]}


class Runner:
    def __init__(self, cfg: DeviceConfig, log: Callable[[str], None]) -> None:
        if cfg.model is None:
            raise ConfigError("no model: set model = \"...\" in the config or pass --model BUNDLE")
        if cfg.source is None:
            raise ConfigError("no source: set source = \"...\" in the config or pass --source SRC")
        self.cfg = cfg
        self.log = log
        self._keys = cfg.public_keys()
        self.store = None
        self.updater = None
        if cfg.update.enabled:
            from .updates import BundleStore

            self.store = BundleStore(cfg.update_store())
        self.active: Loaded = self._start_bundle()
        self._pending: Loaded | None = None
        self._ring_next = 0
        self._swapped = threading.Condition()
        self.source = open_source(cfg.source, cfg.loop, self._source_log,
                                  read_secret(cfg.source_password_file, cfg.source_password_credential, "source_password"),
                                  cfg.max_image_pixels)
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
            cfg.snapshot if self._snapshot_period else None, cfg.spool.mode, cfg.spool.commit_interval,
            cfg.spool.memory_max,
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
        active = self.active  # read once: a swap replaces it whole
        buffer = active.ring[self._ring_next % len(active.ring)]
        self._ring_next = (self._ring_next + 1) % len(active.ring)
        return active.pre(image, out=buffer)

    # -- bundles ----------------------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle:
        return self.active.bundle

    @property
    def model(self) -> Any:
        return self.active.model

    @property
    def decoder(self) -> Any:
        return self.active.decoder

    def load(self, path: Path) -> Loaded:
        """Read, verify (trusted_keys), load and self-test a bundle; EdgeqError names what is wrong."""
        cfg = self.cfg
        bundle = read_bundle(path)
        if self._keys:
            from edgeq.signing import verify_bundle

            verify_bundle(path, self._keys)
        model = bundle.load_model(num_threads=cfg.threads)
        pre = Preprocessor(bundle.preprocess_spec)
        if pre.spec.dtype != np.dtype(model.input.dtype).name:
            raise EdgeqError(f"{path}: manifest input dtype {pre.spec.dtype} differs from the model's; re-convert")
        decoder = make_decoder(model, bundle, cfg.thresholds.score, cfg.thresholds.top_k,
                               (cfg.thresholds.review_measure, cfg.thresholds.review), cfg.thresholds.nms_iou,
                               cfg.thresholds.unfamiliar_percentile)
        # The source preprocesses on its own thread into this ring (more buffers than frames in flight:
        # 8 queued + 1 being inferred + 1 being written), so decoding overlaps inference.
        ring = [np.empty(pre.spec.shape, dtype=pre.buffer.dtype) for _ in range(12)]
        loaded = Loaded(bundle, model, pre, decoder, ring, np.empty(pre.spec.shape, dtype=pre.buffer.dtype))
        self._self_test(loaded, path)
        return loaded

    @staticmethod
    def _self_test(loaded: Loaded, path: Path) -> None:
        """One invoke on a grey frame, decoded: a bundle that cannot do this never replaces a running one."""
        spec = loaded.pre.spec
        grey = np.full((spec.height, spec.width, 3), 128, np.uint8)
        try:
            tensor, transform = loaded.pre(grey)
            loaded.model.set_input(tensor)
            loaded.model.invoke()
            raw = {t.index: loaded.model.get(t) for t in loaded.decoder.tensors}
            if not all(np.isfinite(v).all() for v in raw.values() if np.issubdtype(v.dtype, np.floating)):
                raise ValueError("the outputs hold NaN or inf")
            loaded.decoder.decode(raw, transform)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of an untried model is a refusal, in one line
            raise EdgeqError(f"{path}: self-test invoke failed ({exc}); re-convert the bundle") from None

    def _start_bundle(self) -> Loaded:
        """The bundle to start with: the update store's current one (a bundle pushed earlier), else the configured
        model. A store bundle that no longer passes (keys changed) falls back to the configured model, with a line."""
        assert self.cfg.model is not None
        if self.store is not None:
            for name in self.store.clean():
                self.log(f"update store {self.store.root}: removed {name}, left by an interrupted update")
            current = self.store.current()
            if current is not None:
                try:
                    loaded = self.load(current)
                except EdgeqError as exc:
                    self.log(f"update store: {exc}; starting on the configured model {self.cfg.model}")
                else:
                    self.log(f"running the pushed bundle {current.name} from the update store (the configured model "
                             f"{self.cfg.model} is used when the store is empty)")
                    return loaded
        return self.load(self.cfg.model)

    def swap(self, loaded: Loaded, timeout: float = 30.0) -> bool:
        """Called by the updater: the loop takes ``loaded`` at its next frame boundary. True once it did."""
        with self._swapped:
            self._pending = loaded
            return self._swapped.wait_for(lambda: self._pending is not loaded, timeout)

    def _take_pending(self, base: dict[str, Any]) -> None:
        with self._swapped:
            loaded, self._pending = self._pending, None
            if loaded is None:
                return
            old, self.active = self.active, loaded
            base["model"], base["task"] = loaded.tag, loaded.bundle.task
            self._swapped.notify_all()
        del old  # its interpreter goes once the outbox has decoded the results it made
        if self.link:
            self.link.announce()  # the retained online status names the new model
            if self.cfg.homeassistant.discovery:
                self._send_discovery()

    def _publish_bundle_state(self, payload: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.publish(f"{self.link.prefix}/bundle/state", json.dumps(payload), qos=1, retain=True)

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
        if self.store is not None:
            from .updates import Updater

            self.updater = Updater(cfg, self.store, self.load, self.swap, lambda: self.active,
                                   self._publish_bundle_state, self.log)
            link.subscribe(f"{link.prefix}/bundle/set", self.updater.offer)
            for group in cfg.update.groups:
                link.subscribe(f"{cfg.mqtt.topic_prefix}/group/{group}/bundle/set", self.updater.offer)
        return link

    def _on_connected(self) -> None:
        if self.cfg.homeassistant.discovery:
            self._send_discovery()
        if self.store is not None:
            from .updates import state_payload

            self._publish_bundle_state(state_payload(self.cfg.device_id, "running", self.bundle, self.store))

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
            "model": self.active.tag,
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
            "model": self.active.tag, "task": self.bundle.task,
        }
        self.outbox.start()
        self.outbox.wait_ready()
        if self.outbox.error is not None:
            raise self.outbox.error
        if self.updater is not None:
            self.updater.start()
            if not self._keys:
                self.log("updates over MQTT are accepted unsigned: anyone who can publish to "
                         f"{self.link.prefix}/bundle/set can replace the model; set trusted_keys")
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
                if self._pending is not None:  # an update: the new model from this frame on
                    self._take_pending(base)
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
                active = self.active
                if not any(frame.tensor is b for b in active.ring):  # prepared for the model before a swap
                    frame.tensor, frame.transform = active.pre(frame.image, out=active.spare)
                t1 = time.perf_counter()
                active.model.set_input(frame.tensor)
                active.model.invoke()
                raw = {t.index: active.model.get(t) for t in active.decoder.tensors}
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
                    lambda raw=raw, transform=transform, decoder=active.decoder: decoder.decode(raw, transform),
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
            # its capture released on its own thread, before the interpreter shuts down; but a stalled stream can
            # block a read for read_timeout (10 s), and systemd and a person expect a stop in a second or two
            if not self.source.join(STOP_JOIN_S):
                self.log(f"source {self.source.name}: a read is still blocked (stalled stream); not waiting for it")
            self.notifier.stopping()
            if self.updater is not None:
                self.updater.stop()
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
        if self.frames == 0 and self.stop_reason == "end of source":
            # a source that ended without one usable frame is a failure to report, not a run that succeeded
            print(f"edgeq: error: source {self.source.name}: no frame could be processed ({self.source.skipped} "
                  "skipped); check what it holds", file=sys.stderr, flush=True)
            return 1
        return 0


def run_device(cfg: DeviceConfig, log: Callable[[str], None] | None = None) -> int:
    log = log or say
    from .updates import tune_malloc

    tune_malloc()
    runner = Runner(cfg, log)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, _f: runner.request_stop(signal.Signals(signum).name))
    try:
        return runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
