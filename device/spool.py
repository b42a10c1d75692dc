"""Durable store-and-forward spool: every result is written here before it is published, and leaves only when
the broker has acknowledged it (PUBACK).

sqlite3 in WAL mode with ``synchronous=NORMAL``: a committed result survives SIGKILL of the process (the WAL is
in the OS page cache); after a power cut the last few commits may be lost. ``seq`` numbers are allocated in
the same transaction as the row, from a counter kept in the database, so they increase without gaps across
restarts even when the spool is empty.

Written for an SD card (docs/raspberry-pi.md, benchmarks/spool_wear.py): 1 KiB pages (a small commit rewrites
less), payloads stored zlib-compressed (column ``encoding``: NULL raw, 1 zlib; rows of older spools stay raw), and
the outbox commits on a short timer, deleting what the broker acknowledged in the same transaction as the new
results (``append_many(delete=...)``). When an outage drains, the file is vacuumed back to its size at rest.
``reserve_seqs`` hands out numbers without storing (the outbox's memory mode, and runs without MQTT);
``store_numbered`` then stores results that already have theirs.

The spool is bounded by a message count, a byte size and an age (``max_age_s``); past any of them the oldest
results are dropped first, counted in ``dropped`` and logged (a line at most once a minute, with the count and
the reason).

A full disk: SQLite needs free space even to delete (the WAL grows before a checkpoint shrinks it), so a spool
that filled its disk could neither store nor send. The spool therefore keeps a small reserve file next to it
(``<spool>.reserve``, ``reserve_bytes``). When a write fails for lack of space it releases the reserve (one
line), checkpoints, and retries; the caller's policy decides what happens to what still does not fit. When
space returns the reserve is made again. The same applies when the spool is opened on a full disk.
"""

from __future__ import annotations

import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from edgeq.errors import ConfigError, DiskFullError, EdgeqError

PAGE_SIZE = 1024  # of a new spool (SQLite's default is 4096): an SD card is written by the page
COMPRESSION = 6  # zlib level of stored payloads: a detection result's JSON to about half
GIVE_BACK_BYTES = 256 << 10  # after an outage drains, vacuum when at least this much of the file is free pages
ZLIB = 1
DROP_LOG_S = 60.0  # drops are logged at most this often, summed
EXPIRE_EVERY_S = 30.0  # how often results older than max_age_s are looked for
T = TypeVar("T")


class SpoolFullError(EdgeqError):
    """The spool's disk (or its byte bound) is full and dropping old results did not free room."""


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    topic: str
    payload: bytes


class Spool:
    """An on-disk FIFO of (seq, topic, payload); use from one thread only."""

    def __init__(self, path: str | Path, max_messages: int = 100_000, max_bytes: int | None = None,
                 reserve_bytes: int = 1 << 20, log: Callable[[str], None] = lambda s: None,
                 max_age_s: float = 0.0) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self._drops: dict[str, int] = {}  # dropped in the open transaction, by reason
        self._drops_unlogged: dict[str, int] = {}
        self._drops_logged_at = -DROP_LOG_S
        self._expired_at = -EXPIRE_EVERY_S
        self.reserve = self.path.with_name(self.path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self._log = log
        self.short_of_space = False
        try:
            self._open(max_bytes)
        except (sqlite3.Error, OSError) as exc:
            # a disk filled to the last byte shows as "disk I/O error": SQLite cannot create its -shm file
            if not (_is_full(exc) or self._disk_short()):
                raise ConfigError(f"spool {self.path}: cannot open ({exc}); set [spool] path to a writable file") \
                    from None
            self._release_reserve()
            try:
                self._open(max_bytes)
            except (sqlite3.Error, OSError):
                # no room even for the -shm file: keep the WAL index in memory (exclusive locking; `edgeq doctor`
                # cannot read the spool meanwhile), so that what is spooled can still be sent and deleted
                try:
                    self._open(max_bytes, exclusive=True)
                except (sqlite3.Error, OSError) as again:
                    raise DiskFullError(f"spool {self.path}: cannot open ({again}): its disk is full; free space "
                                        "on it and start edgeq again (a service is not restarted on this, exit 3)") \
                        from None
                self._log(f"spool {self.path}: opened on a full disk (no room for its shared-memory file)")
        self._make_reserve()

    def _open(self, max_bytes: int | None, exclusive: bool = False) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # results may be private: the file (and the -wal/-shm files SQLite creates with its mode) is 0600
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            if exclusive:  # before the first access: then WAL mode needs no -shm file
                self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._small_pages()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA journal_size_limit={1 << 20}")  # the WAL file shrinks back after a checkpoint
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._bound(max_bytes)
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                INSERT OR IGNORE INTO meta VALUES ('last_seq', 0), ('dropped', 0);
                INSERT OR IGNORE INTO meta SELECT 'committed_seq', value FROM meta WHERE key='last_seq';
                CREATE TABLE IF NOT EXISTS faults (kind TEXT PRIMARY KEY, at TEXT NOT NULL, message TEXT NOT NULL,
                                                   active INTEGER NOT NULL);
                """
            )
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
            if "created" not in columns:  # spools written before the age cap: their rows have no time, and stay
                self.db.execute("ALTER TABLE messages ADD COLUMN created REAL")
            if "encoding" not in columns:  # spools written before compression: their rows stay raw (NULL)
                self.db.execute("ALTER TABLE messages ADD COLUMN encoding INTEGER")
            self.page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        except BaseException:
            if getattr(self, "db", None) is not None:
                self.db.close()
                self.db = None
            raise

    def _small_pages(self) -> None:
        """A new spool gets PAGE_SIZE pages; an older one with larger pages is rebuilt with them when it holds no
        result (an empty database vacuums in a moment; one with results keeps its pages until it drains)."""
        size = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        if size == PAGE_SIZE:
            return
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "messages" in tables and self.db.execute("SELECT 1 FROM messages LIMIT 1").fetchone():
            return
        self.db.execute("PRAGMA journal_mode=DELETE")  # a WAL database cannot change its page size
        self.db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        if tables:
            self.db.execute("VACUUM")

    def _bound(self, max_bytes: int | None) -> None:
        """Preflight: cap the database at a third of what its disk can give it (free space plus what it holds,
        less the reserve), so that the WAL, which holds copies of pages until a checkpoint, and the -shm file
        always have room; and checkpoint often enough to keep the WAL within that. SQLite then reports "full" at the cap, while the disk
        still has room to delete the oldest results and to send."""
        held = sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                   if p.exists())
        budget = self._free_bytes() + held - (0 if self.reserve.exists() else self.reserve_bytes)
        page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        pages = max(64, budget // 3 // page)
        if max_bytes is not None:
            pages = min(pages, max(64, max_bytes // page))
        elif pages * page < 64 << 20:
            self._log(f"spool {self.path}: {self._free_bytes() // 1024} KiB free on its disk; the spool keeps at "
                      f"most {pages * page // 1024} KiB of results, the oldest dropped first")
        self.db.execute(f"PRAGMA max_page_count={pages}")
        self.db.execute(f"PRAGMA wal_autocheckpoint={max(8, min(1000, pages // 4))}")

    # -- the disk reserve ----------------------------------------------------------------------------
    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 1 << 62  # no folder to measure: the open itself will say what is wrong
        return st.f_bavail * st.f_frsize

    def _make_reserve(self) -> None:
        """Write the reserve file when it is missing and the disk has room for it and twice as much again (so that
        it is not taken back only to be released again at once)."""
        if self.reserve_bytes <= 0 or self.reserve.exists():
            return
        try:
            if self._free_bytes() < 3 * self.reserve_bytes:
                return
            fd = os.open(self.reserve, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(self.reserve_bytes))
            if self.short_of_space:
                self._log(f"spool {self.path}: disk space is back; writing normally again")
            self.short_of_space = False
        except OSError:
            self.reserve.unlink(missing_ok=True)

    def _disk_short(self) -> bool:
        """Whether the disk itself is (nearly) full, as opposed to the spool at its own page cap, which SQLite
        reports with the same "database or disk is full"."""
        return self._free_bytes() < 64 * PAGE_SIZE

    def _release_reserve(self) -> bool:
        """Free the reserve (True), or say there is none left (False)."""
        if not self.reserve.exists():
            return False
        self.reserve.unlink()
        self.short_of_space = True
        self._log(f"spool {self.path}: disk full; released the {self.reserve_bytes} byte reserve to keep storing "
                  "and sending results")
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (sqlite3.Error, AttributeError):
            pass
        return True

    def _retrying(self, write: Callable[[], "T"]) -> "T":
        """``write()``, once more after releasing the reserve if the disk is full."""
        try:
            return write()
        except sqlite3.OperationalError as exc:
            if not _is_full(exc) or not self._disk_short() or not self._release_reserve():
                raise
            return write()

    # -- counters ----------------------------------------------------------------------------------
    def _meta(self, key: str) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    @property
    def last_seq(self) -> int:
        return self._meta("last_seq")

    @property
    def dropped(self) -> int:
        return self._meta("dropped")

    def depth(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    # -- writing -----------------------------------------------------------------------------------
    def append_many(self, items: Iterable[tuple[str, Callable[[int], bytes]]], store: bool = True,
                    delete: Iterable[int] = ()) -> list[int]:
        """Allocate a seq for each item and store ``(topic, build(seq))`` in one transaction, deleting the
        results ``delete`` names (acknowledged since the last commit) in the same one; return the seqs.

        ``store=False`` only allocates seqs (for runs without MQTT, which still number their results).
        """
        items = list(items)
        gone = [(int(q),) for q in delete]
        for attempt in range(3):
            try:
                seqs = self._retrying(lambda: self._append(items, store, gone))
                if self.short_of_space:
                    self._make_reserve()
                return seqs
            except sqlite3.OperationalError as exc:
                if not _is_full(exc) or attempt == 2 or not self.depth():
                    raise SpoolFullError(
                        f"spool {self.path}: {exc}; free disk space or raise [spool] max_bytes"
                    ) from None
                try:  # make room: the oldest results go first
                    self._drop_oldest(max(len(items), self.depth() // 10, 1))
                except sqlite3.OperationalError as drop_exc:
                    raise SpoolFullError(f"spool {self.path}: {drop_exc}; free disk space") from None
        raise AssertionError("unreachable")

    def _append(self, items: list[tuple[str, Callable[[int], bytes]]], store: bool,
                delete: list[tuple[int]] = []) -> list[int]:  # noqa: B006 - read only
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if delete:
                db.executemany("DELETE FROM messages WHERE seq=?", delete)
            first = self._meta("last_seq") + 1
            seqs = list(range(first, first + len(items)))
            now = time.time()
            if store:
                db.executemany(
                    "INSERT INTO messages (seq, topic, payload, created, encoding) VALUES (?, ?, ?, ?, ?)",
                    [(seq, topic, zlib.compress(build(seq), COMPRESSION), now, ZLIB)
                     for seq, (topic, build) in zip(seqs, items)],
                )
            if items:
                db.execute("UPDATE meta SET value=? WHERE key IN ('last_seq', 'committed_seq')",
                           (first + len(items) - 1,))
            excess = self.depth() - self.max_messages if store else 0
            if excess > 0:
                self._drop_oldest_locked(excess, f"over max_messages {self.max_messages}")
            if store and self.max_age_s and time.monotonic() - self._expired_at >= EXPIRE_EVERY_S:
                self._expired_at = time.monotonic()
                cur = db.execute("DELETE FROM messages WHERE created IS NOT NULL AND created < ?",
                                 (now - self.max_age_s,))
                self._count_drops(cur.rowcount, f"older than max_age_s {self.max_age_s:g}")
            db.execute("COMMIT")
        except BaseException:
            self._drops.clear()
            if db.in_transaction:  # SQLite may already have rolled back on SQLITE_FULL
                db.execute("ROLLBACK")
            raise
        self._log_drops()
        return seqs

    def reserve_seqs(self, n: int, shown: bool = True) -> range:
        """Advance the counter by ``n`` in one small transaction and hand the numbers out without storing.

        ``shown``: the numbers may be seen before they are stored (memory mode publishes from memory, a run
        without MQTT prints them), so they count as used: a crash leaves a gap in seq, never a number used twice
        (``release_seqs`` at a clean stop gives back the unused rest). Not ``shown`` (disk mode: nothing is
        published before its commit): ``resume`` after a crash goes on from the last stored result instead."""
        def reserve() -> range:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                first = self._meta("last_seq") + 1
                keys = "('last_seq', 'committed_seq')" if shown else "('last_seq')"
                self.db.execute(f"UPDATE meta SET value=? WHERE key IN {keys}", (first + n - 1,))
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            return range(first, first + n)

        try:
            return self._retrying(reserve)
        except sqlite3.OperationalError as exc:
            raise SpoolFullError(f"spool {self.path}: {exc}; free disk space") from None

    def release_seqs(self, last_used: int, reserved_to: int) -> None:
        """At a clean stop: set the counters back to ``last_used`` where they still stand at ``reserved_to``."""
        try:
            self.db.execute("UPDATE meta SET value=? WHERE key IN ('last_seq', 'committed_seq') AND value=?",
                            (last_used, reserved_to))
        except sqlite3.Error:
            pass  # best effort: the next run then starts after the reserved block (a gap, no duplicate)

    def resume(self) -> None:
        """Disk mode at start: numbers reserved but never stored (a crash between two commits) were never
        published, so numbering goes on from the last stored result: no gap for them."""
        try:
            self.db.execute("UPDATE meta SET value=(SELECT value FROM meta WHERE key='committed_seq') "
                            "WHERE key='last_seq'")
        except sqlite3.Error:
            pass  # a full disk: the next numbers come after the reserved block (a gap, no duplicate)

    def store_numbered(self, entries: list[SpoolEntry], delete: Iterable[int] = ()) -> int:
        """Store results that already have their seq (from ``reserve_seqs``), the spool's oldest dropped first
        when full; when even an empty spool cannot hold them all, the oldest of ``entries`` are left out (their
        count is returned) and the newest stored. SpoolFullError when not even one fits."""
        gone = [(int(q),) for q in delete]
        left_out = 0

        def store() -> None:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                if gone:
                    db.executemany("DELETE FROM messages WHERE seq=?", gone)
                now = time.time()
                db.executemany(
                    "INSERT OR REPLACE INTO messages (seq, topic, payload, created, encoding) VALUES (?, ?, ?, ?, ?)",
                    [(e.seq, e.topic, zlib.compress(e.payload, COMPRESSION), now, ZLIB) for e in entries])
                if entries:
                    db.execute("UPDATE meta SET value=MAX(value, ?) WHERE key='committed_seq'", (entries[-1].seq,))
                excess = self.depth() - self.max_messages
                if excess > 0:
                    self._drop_oldest_locked(excess, f"over max_messages {self.max_messages}")
                db.execute("COMMIT")
            except BaseException:
                self._drops.clear()
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._log_drops()

        attempt = 0
        while True:
            try:
                self._retrying(store)
                return left_out
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                if self.depth() and attempt < 2:
                    attempt += 1
                    self._drop_oldest(max(len(entries), self.depth() // 10, 1))
                elif len(entries) > 1:
                    half = len(entries) // 2
                    left_out, entries = left_out + half, entries[half:]
                else:
                    raise SpoolFullError(f"spool {self.path}: {exc}; free disk space or raise [spool] max_bytes") \
                        from None

    def give_back_space(self) -> int:
        """Once the spool is empty after an outage: vacuum the file back to its size at rest and truncate the WAL,
        when at least GIVE_BACK_BYTES of it are free pages. Returns the bytes given back (0: nothing to do)."""
        try:
            free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0]) * self.page_size
            if free < GIVE_BACK_BYTES or self.depth():
                return 0
            before = sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                         if p.exists())
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            after = sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                        if p.exists())
        except (sqlite3.Error, OSError):
            return 0  # a disk too full to vacuum: the free pages are reused as they are
        self._log(f"spool {self.path}: drained; gave back {max(before - after, 0) // 1024} KiB")
        return max(before - after, 0)

    def _count_drops(self, n: int, reason: str) -> None:
        if n > 0:
            self.db.execute("UPDATE meta SET value = value + ? WHERE key='dropped'", (n,))
            self._drops[reason] = self._drops.get(reason, 0) + n

    def _log_drops(self) -> None:
        """After a commit: one line for what was dropped, at most once a minute (summed in between)."""
        for reason, n in self._drops.items():
            self._drops_unlogged[reason] = self._drops_unlogged.get(reason, 0) + n
        self._drops.clear()
        now = time.monotonic()
        if self._drops_unlogged and now - self._drops_logged_at >= DROP_LOG_S:
            what = "; ".join(f"{n} {reason}" for reason, n in self._drops_unlogged.items())
            self._log(f"spool {self.path}: dropped the oldest result(s), never sent: {what} ({self.dropped} in all)")
            self._drops_unlogged.clear()
            self._drops_logged_at = now

    def _drop_oldest_locked(self, n: int, reason: str) -> None:
        cur = self.db.execute(
            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)", (n,)
        )
        self._count_drops(cur.rowcount, reason)

    def _drop_oldest(self, n: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._drop_oldest_locked(n, "to make room on a full spool")
            self.db.execute("COMMIT")
        except BaseException:
            self._drops.clear()
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self._log_drops()

    # -- faults: the last of each kind, for `edgeq doctor` ---------------------------------------------
    def record_fault(self, kind: str, message: str | None, at: str) -> None:
        """Keep the last fault of ``kind`` (message None: it cleared, the message stays as history). Best
        effort: a disk too full for this line loses only the line."""
        try:
            if message is None:
                self.db.execute("UPDATE faults SET active=0 WHERE kind=?", (kind,))
            else:
                self.db.execute("INSERT OR REPLACE INTO faults VALUES (?, ?, ?, 1)", (kind, at, message))
        except sqlite3.Error:
            pass

    def faults(self) -> list[dict[str, object]]:
        rows = self.db.execute("SELECT kind, at, message, active FROM faults ORDER BY at DESC").fetchall()
        return [{"kind": k, "at": a, "message": m, "active": bool(x)} for k, a, m, x in rows]

    # -- reading -----------------------------------------------------------------------------------
    def pending(self, after: int = 0, limit: int = 100) -> list[SpoolEntry]:
        rows = self.db.execute(
            "SELECT seq, topic, payload, encoding FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [SpoolEntry(int(s), str(t), zlib.decompress(p) if e == ZLIB else bytes(p)) for s, t, p, e in rows]

    def ack(self, seqs: Iterable[int]) -> None:
        """Delete acknowledged results. On a disk too full even for that, raise SpoolFullError: the results stay
        and go again (at least once)."""
        rows = [(int(s),) for s in seqs]
        if not rows:
            return

        def delete() -> None:
            try:
                self.db.execute("BEGIN")
                self.db.executemany("DELETE FROM messages WHERE seq=?", rows)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

        try:
            self._retrying(delete)
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise SpoolFullError(f"spool {self.path}: {exc}; free disk space") from None
            raise
        if self.short_of_space:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._make_reserve()

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass


def _is_full(exc: BaseException) -> bool:
    return "full" in str(exc).lower()
