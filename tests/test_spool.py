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
    for _ in range(40):
        s.append_many([("t", lambda q: b"y" * 20_000)])
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
