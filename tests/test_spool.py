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
