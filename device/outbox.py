"""The publishing stage: numbers results, puts them in the durable spool, writes ``--output`` lines, and
publishes from the spool, deleting a result only when the broker's PUBACK for it arrives.

Written for an SD card ([spool] in docs/raspberry-pi.md; benchmarks/spool_wear.py measures it):
- results are numbered at once from blocks of seqs the spool reserves (one small write per SEQ_BLOCK results), so
  ``--output`` lines and frames to draw never wait for the disk;
- ``mode = "disk"`` (the default): results are committed together every ``commit_interval`` seconds (1 s), with
  the deletion of what the broker acknowledged since the last commit, and published only once committed: a
  result is on disk before it is published, as before, and a commit carries a second of results instead of one;
- ``mode = "memory"``: while the broker keeps up, results wait for their PUBACK in memory (at most
  ``memory_max``) and nothing is written per result; they are spilled to the spool when the connection drops,
  when memory_max is reached and at a stop. A SIGKILL or power cut loses what memory held (at most memory_max,
  about the last second at the broker's pace), seen by subscribers as a gap in seq.

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
from .spool import Spool, SpoolEntry, SpoolFullError

WINDOW = 200  # results in flight at once
SEQ_BLOCK = 1000  # seqs reserved at a time (a clean stop gives back the unused rest)
COMMIT_MAX = 500  # results committed at once at most, whatever the interval
GIVE_BACK_EVERY_S = 10.0  # how often an empty spool is asked to give its free pages back
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
        mode: str = "disk",
        commit_interval: float = 1.0,
        memory_max: int = 2000,
    ) -> None:
        super().__init__(name="edgeq-outbox", daemon=True)
        self.when_full = when_full
        self.mode = mode
        self.commit_interval = commit_interval
        self.memory_max = memory_max
        self._to_commit: list[SpoolEntry] = []  # numbered, waiting for the next commit (not yet published)
        self._commit_due = 0.0  # monotonic time of the next commit, set by the first result or ack waiting
        self._ack_pending: list[int] = []  # acknowledged, deleted by the next commit
        self._memory: dict[int, SpoolEntry] = {}  # memory mode: numbered, published or not, not yet acknowledged
        self._disk_rows = 0  # results in the spool file (acknowledged ones not yet deleted included)
        self._seqs: range = range(0)  # the reserved block numbers come from
        self._next_seq = 0
        self._gave_back_at = 0.0
        self.annotator = annotator  # device/annotate.py, or None: results are drawn on their frames here
        self.snapshot = snapshot  # SnapshotConfig, or None: no snapshots
        self.snapshots = 0
        self.full = threading.Event()  # set while results cannot be stored (the runner pauses on it, if asked to)
        self.lost = 0  # results that could not be stored on a full disk (drop_oldest)
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
            if self.link is not None and self.mode == "disk":
                self.spool.resume()
            self.last_seq = self.spool.last_seq
            self.depth = self._disk_rows = self.spool.depth()
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
                if batch:
                    self._store(batch)
                if self.link:
                    self._apply_acks()
                    self._spill_if_needed()
                self._commit(force=stopping)
                if self.link:
                    self._pump()
                self._save_faults()
                if time.monotonic() >= next_stats:
                    next_stats += self._stats_interval
                    self._publish_stats()
                if stopping and self._to_commit and self.full.is_set():
                    self._give_up_unsaved()
                if stopping and not batch:
                    if self.link:
                        self._apply_acks()
                        self._memory_to_disk()  # what is not acknowledged by now waits on disk for the next run
                    self._commit(force=True)
                    self._publish_stats()  # a final one, so short runs report too
                    break
        except BaseException as exc:  # surfaced by the runner as a clean error
            self.error = exc
        finally:
            try:
                self._save_faults()
                if self.error is None and self._seqs:
                    self.spool.release_seqs(self.last_seq, self._seqs[-1])
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
        """Number ``batch``, write its ``--output`` lines and queue it for the spool (or, in memory mode while the
        broker keeps up, for publishing straight from memory). False when no seq could be reserved (full disk)."""
        try:
            seqs = self._number(len(batch))
        except SpoolFullError as exc:
            self._on_full(exc, unnumbered=len(batch))
            return False
        encoded = []
        for seq, r in zip(seqs, batch):
            r["seq"] = seq
            encoded.append(json.dumps(r, separators=(",", ":")))
        self.last_seq = seqs[-1]
        self.spooled += len(seqs)
        if self.output is not None:
            self.output.write("\n".join(encoded) + "\n")
            self.output.flush()
        if self.link is None:
            return True
        entries = [SpoolEntry(seq, self.topic, text.encode()) for seq, text in zip(seqs, encoded)]
        # memory holds only results newer than every one on disk or waiting for it: publishing goes by seq
        if (self.mode == "memory" and self.link.connected.is_set() and not self._to_commit
                and len(self._memory) + len(entries) <= self.memory_max):
            self._memory.update((e.seq, e) for e in entries)
        else:
            self._memory_to_disk()  # the spool keeps the older results, memory the newest: order stays by seq
            self._queue_commit(entries)
        self._update_depth()
        return True

    def _number(self, n: int) -> list[int]:
        seqs = []
        while len(seqs) < n:
            if self._next_seq >= self._seqs.stop:
                # disk mode publishes nothing before its commit: numbers not stored by a crash can be used again
                shown = self.link is None or self.mode == "memory"
                self._seqs = self.spool.reserve_seqs(max(SEQ_BLOCK, n), shown=shown)
                self._next_seq = self._seqs.start
            take = min(n - len(seqs), self._seqs.stop - self._next_seq)
            seqs.extend(range(self._next_seq, self._next_seq + take))
            self._next_seq += take
        return seqs

    def _queue_commit(self, entries: list[SpoolEntry]) -> None:
        if not self._to_commit and not self._ack_pending:
            self._commit_due = time.monotonic() + self.commit_interval
        self._to_commit.extend(entries)

    def _memory_to_disk(self) -> None:
        if self._memory:
            entries = list(self._memory.values())
            self._memory.clear()
            self._queue_commit(entries)
            self._commit_due = 0.0  # now: they were never on disk

    def _spill_if_needed(self) -> None:
        """Memory mode: results held in memory go to disk when the broker is not connected."""
        if self._memory and not self.link.connected.is_set():
            self._memory_to_disk()

    def _commit(self, force: bool = False) -> None:
        """One transaction: the results waiting for the disk and the deletion of acknowledged ones, when the
        commit interval has passed (``force``: now), or at once while the disk is full (to retry)."""
        if not self._to_commit and not self._ack_pending:
            return
        now = time.monotonic()
        if not force and now < self._commit_due and len(self._to_commit) < COMMIT_MAX:
            return
        entries, acked = self._to_commit, self._ack_pending
        try:
            left_out = self.spool.store_numbered(entries, delete=acked)
        except SpoolFullError as exc:
            try:  # deleting what was acknowledged frees room; then the new results once more
                self.spool.ack(acked)
                self._ack_pending = acked = []
                self._disk_rows = self.spool.depth()
                left_out = self.spool.store_numbered(entries)
            except SpoolFullError:
                self._on_full(exc)
                self._update_depth()
                return
        if left_out:  # more at once than the spool can hold: the newest were kept
            self.lost += left_out
            self._log(f"spool {self.spool.path}: full; the oldest {left_out} of {len(entries)} new result(s) were "
                      f"not kept ({self.lost} so far); free disk space or raise [spool] max_bytes")
        self._to_commit, self._ack_pending = [], []
        if self.full.is_set():
            self.full.clear()
            self._log(f"spool {self.spool.path}: storing results again")
            self.note_fault("spool", None)
        self._disk_rows = self.spool.depth()
        self.spool_dropped = self.spool.dropped + self.lost
        self._update_depth()
        if self._disk_rows == 0 and now - self._gave_back_at >= GIVE_BACK_EVERY_S:
            self._gave_back_at = now
            self.spool.give_back_space()

    def _update_depth(self) -> None:
        """Results not yet acknowledged: on disk, in memory, waiting for the disk."""
        self.depth = self._disk_rows - len(self._ack_pending) + len(self._memory) + len(self._to_commit)

    def _on_full(self, exc: SpoolFullError, unnumbered: int = 0) -> None:
        """A full disk, even after the spool released its reserve and dropped what it could: results waiting for
        the disk are kept in memory (``pause``, up to UNSAVED_MAX) or not kept (``drop_oldest``); ``unnumbered``
        results that could not even get a seq are not kept either way."""
        now = time.monotonic()
        self.lost += unnumbered
        if self.when_full == "pause":
            keep = self._to_commit[-UNSAVED_MAX:]
            self.lost += len(self._to_commit) - len(keep)
            self._to_commit = keep
            self._commit_due = now + 0.5  # try again soon: capture waits meanwhile
            what = f"pausing capture, {len(keep)} result(s) held in memory"
        else:
            gone = len(self._to_commit) + unnumbered
            self.lost += len(self._to_commit)
            what = f"{gone} new result(s) not kept ({self.lost} so far)"
            self._to_commit = []
        if not self.full.is_set() or now - self._full_logged >= FULL_LOG_S:
            self._log(f"{exc}: {what}; results already spooled are still sent")
            self._full_logged = now
            self.note_fault("spool", f"{exc}: {what}")
        self.full.set()
        self.spool_dropped = self.spool.dropped + self.lost

    def _give_up_unsaved(self) -> None:
        self.lost += len(self._to_commit)
        self._log(f"spool {self.spool.path}: disk still full at stop; {len(self._to_commit)} result(s) held in "
                  "memory were not kept")
        self._to_commit = []
        self._update_depth()

    def _publish_snapshot(self, frame: Any, result: dict[str, Any], canvas: Any) -> None:
        """The snapshot: best effort (QoS 0, retained, never spooled: only the latest matters). ``canvas``: the
        frame already drawn by --annotate, else None (drawn here)."""
        from .annotate import draw, snapshot_jpeg

        cfg = self.snapshot
        jpeg = snapshot_jpeg(draw(frame, result) if canvas is None else canvas, cfg.max_width, cfg.quality)
        if self.link.publish(f"{self.link.prefix}/snapshot", jpeg, qos=0, retain=True) is not None:
            self.snapshots += 1

    def _apply_acks(self) -> None:
        """PUBACKs received: a result held in memory is forgotten, one on disk is deleted by the next commit."""
        link = self.link
        assert link is not None
        n = 0
        while link.acked:
            generation, mid = link.acked.popleft()
            if generation == self._generation and mid in self._inflight:
                seq = self._inflight.pop(mid)
                n += 1
                if self._memory.pop(seq, None) is None:
                    if not self._to_commit and not self._ack_pending:
                        self._commit_due = time.monotonic() + self.commit_interval
                    self._ack_pending.append(seq)
        if n:
            self.acked += n
            self._update_depth()

    def _pump(self) -> None:
        """Publish what is on disk (oldest first), then what memory holds, up to WINDOW in flight."""
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
        acked = set(self._ack_pending)
        entries = [e for e in self.spool.pending(after=self._cursor, limit=room + len(acked)) if e.seq not in acked]
        if len(entries) < room:
            entries += [e for seq, e in self._memory.items() if seq > self._cursor][: room - len(entries)]
        for entry in entries[:room]:
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
