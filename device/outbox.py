"""The publishing stage: numbers results, puts them in the durable spool, writes ``--output`` lines, and
publishes from the spool, deleting a result only when the broker's PUBACK for it arrives.

It runs on its own thread; the inference loop only hands results over (``submit``) and never waits for it.
Frames to draw (``--annotate``) and snapshots go on to a drawing thread of their own once their results are
stored, so that numbering, storing and publishing never wait behind drawing and encoding a frame.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import IO, Any, Callable

from .mqtt import MqttLink
from .spool import Spool, SpoolFullError

WINDOW = 200  # results in flight at once
UNSAVED_MAX = 1000  # results held in memory while a full disk pauses the run
FULL_LOG_S = 60.0
FRAMES_IN_FLIGHT = 8  # frames held for drawing or a snapshot; more waits (--annotate) or is not kept (snapshot)


class Outbox(threading.Thread):
    def __init__(
        self,
        spool_factory: Callable[[], Spool],
        link: MqttLink | None,
        output: IO[str] | None,
        stats: Callable[[], dict[str, Any]],
        stats_interval: float,
        log: Callable[[str], None],
        when_full: str = "drop_oldest",
        annotator: Any = None,
        snapshot: Any = None,
    ) -> None:
        super().__init__(name="edgeq-outbox", daemon=True)
        self.when_full = when_full
        self.annotator = annotator  # device/annotate.py, or None: results are drawn on their frames here
        self.snapshot = snapshot  # SnapshotConfig, or None: no snapshots
        self.snapshots = 0
        self.full = threading.Event()  # set while results cannot be stored (the runner pauses on it, if asked to)
        self.lost = 0  # results that could not be stored on a full disk (drop_oldest)
        self._unsaved: list[dict[str, Any]] = []
        self._unacked: list[int] = []
        self._full_logged = 0.0
        self._faults: queue.SimpleQueue[tuple[str, str | None, str]] = queue.SimpleQueue()
        self._mqtt_fault: str | None = None
        self._spool_factory = spool_factory
        self.link = link
        self.output = output
        self._stats = stats
        self._stats_interval = stats_interval
        self._log = log
        self._queue: queue.SimpleQueue[tuple[dict[str, Any], Callable[[], list[dict[str, Any]]]]] = queue.SimpleQueue()
        # a full frame is ~1 MB: when drawing is slower than inference, --annotate waits for a slot (every frame is
        # written) and a snapshot frame without a slot is skipped (only the latest matters)
        self._frame_slots = threading.BoundedSemaphore(FRAMES_IN_FLIGHT)
        self._drawer = _Drawer(self) if annotator is not None or snapshot is not None else None
        self.frame_waits = 0  # times the inference loop waited for the drawing to catch up
        self.snapshots_skipped = 0
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.topic = f"{link.prefix}/detections" if link else ""
        self.published = 0
        self.acked = 0
        self.spooled = 0
        self.depth = 0
        self.spool_dropped = 0
        self.dropped_at_start = 0
        self.last_seq = 0
        self._inflight: dict[int, int] = {}  # mid -> seq, for the current connection generation
        self._generation = -1
        self._cursor = 0

    # -- called from the inference thread ----------------------------------------------------------------
    def submit(self, result: dict[str, Any], decode: Callable[[], list[dict[str, Any]]],
               image: Any = None, snapshot: bool = False) -> None:
        """Hand over a result; ``decode`` (output arrays -> detections) runs here, off the inference thread.
        ``image``: the frame, when results are drawn (``--annotate``) or it is the snapshot (``snapshot``)."""
        if image is not None and self._take_slot(needed=self.annotator is not None):
            result["_frame"] = image
            if snapshot:
                result["_snapshot"] = True
        elif image is not None:
            self.snapshots_skipped += 1
        self._queue.put((result, decode))

    def _take_slot(self, needed: bool) -> bool:
        if self._frame_slots.acquire(blocking=False):
            return True
        if not needed:
            return False
        self.frame_waits += 1
        while not self._frame_slots.acquire(timeout=0.1):
            if not self.is_alive():  # the thread failed: the runner raises its error after this submit
                return False
        return True

    def note_fault(self, kind: str, message: str | None) -> None:
        """Record a fault (or its end, message None) in the spool for `edgeq doctor`; from any thread."""
        from datetime import datetime, timezone

        self._faults.put((kind, message, datetime.now(timezone.utc).isoformat(timespec="seconds")))

    def _save_faults(self) -> None:
        if self.link is not None:  # a fault once it is known, cleared once connected (also one of an earlier run)
            state = "connected" if self.link.connected.is_set() else self.link.last_error
            if state is not None and state != self._mqtt_fault:
                self._mqtt_fault = state
                self.note_fault("mqtt", None if state == "connected" else state)
        while not self._faults.empty():
            self.spool.record_fault(*self._faults.get_nowait())

    def finish(self, drain_timeout: float) -> bool:
        """Flush every submitted result into the spool; then wait up to ``drain_timeout`` for the broker to
        acknowledge them. Returns True when the spool is empty."""
        deadline = time.monotonic() + drain_timeout
        while self.is_alive() and not self._queue.empty():
            time.sleep(0.01)
        while self.link and self.is_alive() and time.monotonic() < deadline and self.depth > 0:
            time.sleep(0.02)
        self._stopping.set()
        self.join(timeout=10)
        return self.depth == 0

    def wait_ready(self, timeout: float = 10.0) -> None:
        self._ready.wait(timeout)

    # -- the thread ------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.spool = self._spool_factory()
            self.last_seq = self.spool.last_seq
            self.depth = self.spool.depth()
            self.spool_dropped = self.dropped_at_start = self.spool.dropped
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        if self._drawer is not None:
            self._drawer.start()
        next_stats = time.monotonic() + self._stats_interval
        try:
            while True:
                stopping = self._stopping.is_set()
                batch = self._take(timeout=0.0 if stopping else 0.02)
                if self._unsaved:
                    batch, self._unsaved = self._unsaved + batch, []
                if batch:
                    self._store(batch)
                if self.link:
                    self._apply_acks()
                    self._pump()
                self._save_faults()
                if time.monotonic() >= next_stats:
                    next_stats += self._stats_interval
                    self._publish_stats()
                if stopping and self._unsaved and self.full.is_set():
                    self._give_up_unsaved()
                if stopping and not batch:
                    self._publish_stats()  # a final one, so short runs report too
                    if self.link:
                        self._apply_acks()
                        self._pump()
                    break
        except BaseException as exc:  # surfaced by the runner as a clean error
            self.error = exc
        finally:
            try:
                self._save_faults()
            except Exception:  # noqa: BLE001 - the history line is best effort; closing the spool is not
                pass
            self.spool.close()
            if self._drawer is not None and self._drawer.is_alive():
                self._drawer.queue.put(None)  # after every frame already handed over: the video gets them all
                self._drawer.join()
            if self.annotator is not None:
                self.annotator.close()
            if self.error is None and self._drawer is not None and self._drawer.error is not None:
                self.error = self._drawer.error

    def _take(self, timeout: float) -> list[dict[str, Any]]:
        items: list[Any] = []
        try:
            items.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
        except queue.Empty:
            return items
        while len(items) < 500:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        results = []
        for result, decode in items:
            t0 = time.perf_counter()
            result["detections"] = decode()
            result["latency_ms"]["decode"] = round((time.perf_counter() - t0) * 1000, 3)
            results.append(result)
        return results

    def _store(self, batch: list[dict[str, Any]]) -> None:
        frames = [r.pop("_frame", None) for r in batch]
        snapshot = [r.pop("_snapshot", False) for r in batch]
        stored = False
        try:
            stored = self._store_results(batch)
        finally:
            for frame, r, snap in zip(frames, batch, snapshot):
                if frame is None:
                    continue
                if stored and self._drawer is not None:
                    self._drawer.queue.put((frame, r, snap))  # the drawer gives the frame's slot back
                else:
                    self._frame_slots.release()
        if self._drawer is not None and self._drawer.error is not None:
            # e.g. --annotate's folder became unwritable: the run stops with its line, this batch already stored
            raise self._drawer.error

    def _draw(self, frame: Any, result: dict[str, Any], snap: bool) -> None:
        """On the drawing thread: ``result`` (stored, numbered, not changed any more) drawn on ``frame``."""
        canvas = self.annotator.add(frame, result) if self.annotator is not None else None
        if snap and self.snapshot is not None and self.link is not None:
            self._publish_snapshot(frame, result, canvas)

    def _store_results(self, batch: list[dict[str, Any]]) -> bool:
        """Number, spool and write ``batch``; False when the spool is full (kept in memory, see ``_on_full``)."""
        encoded: list[str] = []

        def builder(result: dict[str, Any]) -> Callable[[int], bytes]:
            def build(seq: int) -> bytes:
                result["seq"] = seq
                text = json.dumps(result, separators=(",", ":"))
                encoded.append(text)
                return text.encode()

            return build

        try:
            seqs = self.spool.append_many(((self.topic, builder(r)) for r in batch), store=self.link is not None)
        except SpoolFullError as exc:
            self._on_full(batch, exc)
            return False
        if self.full.is_set():
            self.full.clear()
            self._log(f"spool {self.spool.path}: storing results again")
            self.note_fault("spool", None)
        if self.link is None:  # seqs allocated only: build the lines here
            for seq, r in zip(seqs, batch):
                r["seq"] = seq
                encoded.append(json.dumps(r, separators=(",", ":")))
        self.last_seq = seqs[-1]
        self.spooled += len(seqs)
        if self.output is not None:
            self.output.write("\n".join(encoded) + "\n")
            self.output.flush()
        if self.link is not None:
            self.depth = self.spool.depth()
            self.spool_dropped = self.spool.dropped + self.lost
        return True

    def _on_full(self, batch: list[dict[str, Any]], exc: SpoolFullError) -> None:
        """A full disk, even after the spool released its reserve and dropped what it could."""
        now = time.monotonic()
        if self.when_full == "pause":
            self._unsaved = batch[-UNSAVED_MAX:]
            self.lost += len(batch) - len(self._unsaved)
            what = f"pausing capture, {len(self._unsaved)} result(s) held in memory"
        else:
            self.lost += len(batch)
            what = f"{len(batch)} new result(s) not kept ({self.lost} so far)"
        if not self.full.is_set() or now - self._full_logged >= FULL_LOG_S:
            self._log(f"{exc}: {what}; results already spooled are still sent")
            self._full_logged = now
            self.note_fault("spool", f"{exc}: {what}")
        self.full.set()
        self.spool_dropped = self.spool.dropped + self.lost

    def _give_up_unsaved(self) -> None:
        self.lost += len(self._unsaved)
        self._log(f"spool {self.spool.path}: disk still full at stop; {len(self._unsaved)} result(s) held in memory "
                  "were not kept")
        self._unsaved = []

    def _publish_snapshot(self, frame: Any, result: dict[str, Any], canvas: Any) -> None:
        """The snapshot: best effort (QoS 0, retained, never spooled: only the latest matters). ``canvas``: the
        frame already drawn by --annotate, else None (drawn here)."""
        from .annotate import draw, snapshot_jpeg

        cfg = self.snapshot
        jpeg = snapshot_jpeg(draw(frame, result) if canvas is None else canvas, cfg.max_width, cfg.quality)
        if self.link.publish(f"{self.link.prefix}/snapshot", jpeg, qos=0, retain=True) is not None:
            self.snapshots += 1

    def _apply_acks(self) -> None:
        link = self.link
        assert link is not None
        done = self._unacked
        while link.acked:
            generation, mid = link.acked.popleft()
            if generation == self._generation and mid in self._inflight:
                done.append(self._inflight.pop(mid))
        if done:
            try:
                self.spool.ack(done)
            except SpoolFullError:  # not even room to delete: they stay spooled, try again next time
                self._unacked = done
                return
            self._unacked = []
            self.acked += len(done)
            self.depth = self.spool.depth()

    def _pump(self) -> None:
        link = self.link
        assert link is not None
        if not link.connected.is_set():
            return
        if link.generation != self._generation:  # a new connection: everything unacknowledged goes again
            self._generation = link.generation
            self._inflight.clear()
            self._cursor = 0
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for entry in self.spool.pending(after=self._cursor, limit=room):
            mid = link.publish(entry.topic, entry.payload)
            if mid is None:
                break
            self._inflight[mid] = entry.seq
            self._cursor = entry.seq
            self.published += 1

    def _publish_stats(self) -> None:
        stats = self._stats()
        stats["spool_depth"] = self.depth
        stats["spool_dropped"] = self.spool_dropped
        stats["spool_full"] = self.full.is_set()
        if self.snapshot is not None:
            stats["snapshots"] = self.snapshots
            stats["snapshots_skipped"] = self.snapshots_skipped
        if self.annotator is not None:
            stats["annotate_waits"] = self.frame_waits
        if self.output is not None:
            self.output.write(json.dumps(stats, separators=(",", ":")) + "\n")
            self.output.flush()
        if self.link is not None:
            self.link.publish(f"{self.link.prefix}/stats", json.dumps(stats), qos=0)


class _Drawer(threading.Thread):
    """The drawing thread: frames in the order their results were stored, each drawn (``--annotate``) and/or
    published as the snapshot, then its slot given back. After an error it only gives slots back (the outbox
    raises the error with its next batch, and the run stops)."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__(name="edgeq-draw", daemon=True)
        self.outbox = outbox
        self.queue: queue.SimpleQueue[tuple[Any, dict[str, Any], bool] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self.outbox._draw(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the outbox, which stops the run with it
                self.error = exc
            finally:
                self.outbox._frame_slots.release()
