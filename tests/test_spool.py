from edgeq.device.spool import Spool


def test_seq_gapless_and_persistent(tmp_path):
    s = Spool(tmp_path / "s.db")
    assert s.append_many([("t", lambda q: f"{q}".encode())] * 3) == [1, 2, 3]
    s.ack([1, 2])
    assert [e.seq for e in s.pending()] == [3]
    s.close()
    s = Spool(tmp_path / "s.db")
    assert s.append_many([("t", lambda q: b"x")]) == [4]
    assert s.append_many([("t", lambda q: b"x")], store=False) == [5]
    assert s.depth() == 2 and s.last_seq == 5


def test_bounded_drops_oldest_and_counts(tmp_path):
    s = Spool(tmp_path / "s.db", max_messages=10)
    s.append_many([("t", lambda q: str(q).encode())] * 25)
    assert s.depth() == 10 and s.dropped == 15
    assert [e.seq for e in s.pending(limit=100)] == list(range(16, 26))


def test_byte_bound_drops_oldest_when_full(tmp_path):
    s = Spool(tmp_path / "s.db", max_bytes=256 * 1024)
    noise = __import__("os").urandom(20_000)  # payloads are stored compressed: these do not shrink
    for _ in range(40):
        s.append_many([("t", lambda q: noise)])
    assert s.dropped > 0 and s.last_seq == 40
    assert s.pending(limit=1000)[-1].seq == 40


def test_spool_files_are_private(tmp_path):
    import stat

    from edgeq.device.spool import Spool

    spool = Spool(tmp_path / "s.db")
    spool.append_many([("t", lambda seq: b"{}")])
    for p in tmp_path.iterdir():  # the database and SQLite's -wal and -shm files
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    spool.close()


def test_drops_are_logged_once_a_minute_with_the_reason(tmp_path):
    said: list[str] = []
    s = Spool(tmp_path / "s.db", max_messages=10, log=said.append)
    for _ in range(5):
        s.append_many([("t", lambda q: b"x")] * 10)
    drops = [ln for ln in said if "dropped" in ln]
    assert len(drops) == 1 and "over max_messages 10" in drops[0] and "10 in all" in drops[0]
    assert s.dropped == 40


def test_results_older_than_max_age_are_dropped_and_logged(tmp_path):
    import sqlite3

    said: list[str] = []
    s = Spool(tmp_path / "s.db", max_age_s=3600, log=said.append)
    s.append_many([("t", lambda q: b"old")] * 3)
    s.close()
    db = sqlite3.connect(tmp_path / "s.db")  # as if written two hours ago
    db.execute("UPDATE messages SET created = created - 7200")
    db.commit()
    db.close()
    s = Spool(tmp_path / "s.db", max_age_s=3600, log=said.append)
    s.append_many([("t", lambda q: b"new")])
    assert [e.payload for e in s.pending()] == [b"new"] and s.dropped == 3
    assert any("3 older than max_age_s 3600" in ln for ln in said)


def test_a_spool_from_before_the_age_cap_keeps_its_rows(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "s.db")
    db.executescript("""
        CREATE TABLE messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('last_seq', 2), ('dropped', 0);
        INSERT INTO messages VALUES (1, 't', x'01'), (2, 't', x'02');
    """)
    db.commit()
    db.close()
    s = Spool(tmp_path / "s.db", max_age_s=1)
    assert s.append_many([("t", lambda q: b"x")]) == [3]
    assert [e.seq for e in s.pending()] == [1, 2, 3]


def test_a_drained_spool_gives_its_space_back(tmp_path):
    """An outage's backlog, sent and acknowledged: the file goes back to its size at rest (it used to stay at its
    high-water mark), with one line saying so."""
    import os

    said: list[str] = []
    s = Spool(tmp_path / "s.db", log=said.append)
    noise = os.urandom(600)
    for _ in range(20):
        s.append_many([("t", lambda q: noise)] * 200)
    full = (tmp_path / "s.db").stat().st_size
    assert full > 2_000_000
    s.ack(e.seq for e in s.pending(limit=10_000))
    assert s.give_back_space() > 0 and s.depth() == 0
    assert (tmp_path / "s.db").stat().st_size < 64 * 1024
    assert not (tmp_path / "s.db-wal").exists() or (tmp_path / "s.db-wal").stat().st_size == 0
    assert any("drained; gave back" in ln for ln in said)
    assert s.give_back_space() == 0  # nothing more to give
    assert s.append_many([("t", lambda q: b"x")]) == [4001]  # the counter is kept


def test_payloads_are_stored_compressed_in_small_pages_and_older_spools_still_read(tmp_path):
    import json
    import sqlite3

    s = Spool(tmp_path / "s.db")
    text = json.dumps({"detections": [{"label": "tshirt", "score": 0.5}] * 20}).encode()
    s.append_many([("t", lambda q: text)])
    raw = s.db.execute("SELECT payload, encoding FROM messages").fetchone()
    assert raw[1] == 1 and len(raw[0]) < len(text) / 3
    assert [e.payload for e in s.pending()] == [text]
    assert s.db.execute("PRAGMA page_size").fetchone()[0] == 1024
    s.close()
    # a spool of an earlier edgeq: 4 KiB pages, raw payloads; its rows are read as they are, its pages kept
    # while it holds results and made small once it is empty
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.executescript("""
        PRAGMA page_size=4096;
        CREATE TABLE messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('last_seq', 2), ('dropped', 0);
        INSERT INTO messages VALUES (1, 't', x'7b7d', NULL), (2, 't', x'02', NULL);
    """)
    db.commit()
    db.close()
    s = Spool(old)
    assert [e.payload for e in s.pending()] == [b"{}", b"\x02"] and s.page_size == 4096
    s.ack([1, 2])
    s.close()
    s = Spool(old)
    assert s.page_size == 1024 and s.append_many([("t", lambda q: b"x")]) == [3]


def test_reserved_numbers_a_crash_and_a_clean_stop(tmp_path):
    """Numbers handed out from a block: shown ones (memory mode, no MQTT) are never used twice, even after a crash
    (a gap); unshown ones (disk mode) resume from the last stored result; a clean stop gives the rest back."""
    from edgeq.device.spool import SpoolEntry

    s = Spool(tmp_path / "s.db")
    block = s.reserve_seqs(1000, shown=True)
    assert list(block[:2]) == [1, 2]
    s.close()  # a crash: nothing given back
    s = Spool(tmp_path / "s.db")
    s.resume()
    assert s.reserve_seqs(10, shown=False)[0] == 1001  # after the shown block: a gap, no duplicate
    s.store_numbered([SpoolEntry(1001, "t", b"{}")])
    s.close()  # a crash in disk mode: 1002.. were never stored, so never published
    s = Spool(tmp_path / "s.db")
    s.resume()
    block = s.reserve_seqs(1000, shown=False)
    assert block[0] == 1002
    s.release_seqs(1005, block[-1])  # a clean stop after using 1002..1005
    s.close()
    s = Spool(tmp_path / "s.db")
    assert s.last_seq == 1005


def test_a_batch_larger_than_the_spool_keeps_its_newest(tmp_path):
    import os

    from edgeq.device.spool import SpoolEntry

    s = Spool(tmp_path / "s.db", max_bytes=65536)
    entries = [SpoolEntry(i, "t", os.urandom(1000)) for i in range(1, 201)]
    left_out = s.store_numbered(entries)
    kept = [e.seq for e in s.pending(limit=1000)]
    assert 0 < left_out < 200 and kept == list(range(left_out + 1, 201))
