"""The update store's bookkeeping (device/updates.py), pure logic on a real folder: what a kill leaves is removed,
nothing else is, and state.json only ever names complete files."""

from __future__ import annotations

import json
import stat

from edgeq.device.updates import BundleStore


def test_clean_removes_only_what_the_store_wrote(tmp_path):
    store = BundleStore(tmp_path)
    a, b, stale = "a" * 64 + ".edgeq", "b" * 64 + ".edgeq", "c" * 64 + ".edgeq"
    for name in (a, b, stale, ".incoming-" + "0" * 32 + ".tmp", "model.edgeq", "notes.tmp", "spool.sqlite3"):
        (tmp_path / name).write_bytes(b"x")
    store.commit(a, b)  # commits clean up too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [a, b, "model.edgeq", "notes.tmp", "spool.sqlite3", "state.json"])  # a shared folder keeps its files
    assert json.loads((tmp_path / "state.json").read_text()) == {"current": a, "previous": b}
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


def test_state_names_only_files_inside_the_store(tmp_path):
    store = BundleStore(tmp_path / "store")
    (tmp_path / "store" / "state.json").write_text(json.dumps({"current": "../../etc/passwd", "previous": 3}))
    assert store.state() == {"current": "../../etc/passwd", "previous": None}
    assert store.path_of(store.state()["current"]) is None
    (tmp_path / "store" / "state.json").write_text("{broken")
    assert store.state() == {"current": None, "previous": None}


def test_staged_bundles_are_private_and_complete(tmp_path):
    store = BundleStore(tmp_path)
    staged = store.stage(b"PK\x03\x04 data")
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600 and staged.read_bytes() == b"PK\x03\x04 data"
    name = store.keep(staged, "d" * 64)
    assert (tmp_path / name).is_file() and not staged.exists()
