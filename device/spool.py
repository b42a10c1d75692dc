"""Durable store-and-forward spool: every result is written here before it is published, and leaves only when
the broker has acknowledged it (PUBACK).

sqlite3 in WAL mode with ``synchronous=NORMAL``: a committed result survives SIGKILL of the process (the WAL is
in the OS page cache); after a power cut the last few commits may be lost. ``seq`` numbers are allocated in
the same transaction as the row, from a counter kept in the database, so they increase without gaps across
restarts even when the spool is empty.

The spool is bounded by a message count and a byte size; past either, the oldest results are dropped first
and counted in ``dropped``.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from edgeq.errors import ConfigError, EdgeqError

PAGE_SIZE = 4096


class SpoolFullError(EdgeqError):
    """The spool's disk (or its byte bound) is full and dropping old results did not free room."""


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    topic: str
    payload: bytes


class Spool:
    """An on-disk FIFO of (seq, topic, payload); use from one thread only."""

    def __init__(self, path: str | Path, max_messages: int = 100_000, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # results may be private: the file (and the -wal/-shm files SQLite creates with its mode) is 0600
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if max_bytes is not None:
                self.db.execute(f"PRAGMA max_page_count={max(16, max_bytes // PAGE_SIZE)}")
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                INSERT OR IGNORE INTO meta VALUES ('last_seq', 0), ('dropped', 0);
                """
            )
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(
                f"spool {self.path}: cannot open ({exc}); set [spool] path to a writable file"
            ) from None

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
                return self._append(items, store)
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc).lower() or attempt == 2:
                    raise SpoolFullError(
                        f"spool {self.path}: {exc}; free disk space or raise [spool] max_bytes"
                    ) from None
                self._drop_oldest(max(len(items), self.depth() // 10, 1))
        raise AssertionError("unreachable")

    def _append(self, items: list[tuple[str, Callable[[int], bytes]]], store: bool) -> list[int]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = self._meta("last_seq") + 1
            seqs = list(range(first, first + len(items)))
            if store:
                db.executemany(
                    "INSERT INTO messages (seq, topic, payload) VALUES (?, ?, ?)",
                    [(seq, topic, build(seq)) for seq, (topic, build) in zip(seqs, items)],
                )
            db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (first + len(items) - 1,))
            excess = self.depth() - self.max_messages if store else 0
            if excess > 0:
                self._drop_oldest_locked(excess)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may already have rolled back on SQLITE_FULL
                db.execute("ROLLBACK")
            raise
        return seqs

    def _drop_oldest_locked(self, n: int) -> None:
        cur = self.db.execute(
            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)", (n,)
        )
        self.db.execute("UPDATE meta SET value = value + ? WHERE key='dropped'", (cur.rowcount,))

    def _drop_oldest(self, n: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._drop_oldest_locked(n)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    # -- reading -----------------------------------------------------------------------------------
    def pending(self, after: int = 0, limit: int = 100) -> list[SpoolEntry]:
        rows = self.db.execute(
            "SELECT seq, topic, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [SpoolEntry(int(s), str(t), bytes(p)) for s, t, p in rows]

    def ack(self, seqs: Iterable[int]) -> None:
        seqs = [(int(s),) for s in seqs]
        if seqs:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM messages WHERE seq=?", seqs)
            self.db.execute("COMMIT")

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass
