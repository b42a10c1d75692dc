"""Durable store-and-forward spool: every result is written here before it is published, and leaves only when
the broker has acknowledged it (PUBACK).

sqlite3 in WAL mode with ``synchronous=NORMAL``: a committed result survives SIGKILL of the process (the WAL is
in the OS page cache); after a power cut the last few commits may be lost. ``seq`` numbers are allocated in
the same transaction as the row, from a counter kept in the database, so they increase without gaps across
restarts even when the spool is empty.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from edgeq.errors import ConfigError, DiskFullError, EdgeqError

PAGE_SIZE = 4096
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
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._bound(max_bytes)
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                INSERT OR IGNORE INTO meta VALUES ('last_seq', 0), ('dropped', 0);
                CREATE TABLE IF NOT EXISTS faults (kind TEXT PRIMARY KEY, at TEXT NOT NULL, message TEXT NOT NULL,
                                                   active INTEGER NOT NULL);
                """
            )
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
            if "created" not in columns:  # spools written before the age cap: their rows have no time, and stay
                self.db.execute("ALTER TABLE messages ADD COLUMN created REAL")
        except BaseException:
            if getattr(self, "db", None) is not None:
                self.db.close()
                self.db = None
            raise

    def _bound(self, max_bytes: int | None) -> None:
        """Preflight: cap the database at a third of what its disk can give it (free space plus what it holds,
        less the reserve), so that the WAL, which holds copies of pages until a checkpoint, and the -shm file
        always have room; and checkpoint often enough to keep the WAL within that. SQLite then reports "full" at the cap, while the disk
        still has room to delete the oldest results and to send."""
        held = sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                   if p.exists())
        budget = self._free_bytes() + held - (0 if self.reserve.exists() else self.reserve_bytes)
        pages = max(16, budget // 3 // PAGE_SIZE)
        if max_bytes is not None:
            pages = min(pages, max(16, max_bytes // PAGE_SIZE))
        elif pages * PAGE_SIZE < 64 << 20:
            self._log(f"spool {self.path}: {self._free_bytes() // 1024} KiB free on its disk; the spool keeps at "
                      f"most {pages * PAGE_SIZE // 1024} KiB of results, the oldest dropped first")
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
        return self._free_bytes() < 16 * PAGE_SIZE

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
    def append_many(self, items: Iterable[tuple[str, Callable[[int], bytes]]], store: bool = True) -> list[int]:
        """Allocate a seq for each item and store ``(topic, build(seq))`` in one transaction; return the seqs.

        ``store=False`` only allocates seqs (for runs without MQTT, which still number their results).
        """
        items = list(items)
        for attempt in range(3):
            try:
                seqs = self._retrying(lambda: self._append(items, store))
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

    def _append(self, items: list[tuple[str, Callable[[int], bytes]]], store: bool) -> list[int]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = self._meta("last_seq") + 1
            seqs = list(range(first, first + len(items)))
            now = time.time()
            if store:
                db.executemany(
                    "INSERT INTO messages (seq, topic, payload, created) VALUES (?, ?, ?, ?)",
                    [(seq, topic, build(seq), now) for seq, (topic, build) in zip(seqs, items)],
                )
            db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (first + len(items) - 1,))
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
            "SELECT seq, topic, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [SpoolEntry(int(s), str(t), bytes(p)) for s, t, p in rows]

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
