import json
import zipfile

import pytest

from edgeq.bundle import MANIFEST_NAME, MODEL_NAME, read_bundle, write_bundle
from edgeq.errors import BundleError


def manifest():
    return {
        "task": "classify",
        "labels": ["a", "b"],
        "input": {"height": 4, "width": 4, "channels": 3, "dtype": "int8", "scale": 0.1, "zero_point": 0},
        "outputs": [{"role": "logits", "name": "out", "shape": [1, 2], "dtype": "int8", "scale": 0.1,
                     "zero_point": 0}],
        "quantization": {"scheme": "int8", "weights": "int8 per-channel", "activations": "int8",
                         "full_integer": True},
        "calibration": {"count": 10, "source": "x"},
    }


def test_roundtrip_fills_schema_and_hash(tmp_path):
    path = write_bundle(tmp_path / "m.edgeq", manifest(), b"model-bytes", report={"k": 1})
    b = read_bundle(path)
    assert b.model_bytes == b"model-bytes"
    assert b.manifest.schema_version == 2 and b.manifest.model.size == 11
    assert len(b.sha256) == 64 and b.report == {"k": 1}
    assert b.manifest.created.endswith("Z")
    assert [p.name for p in tmp_path.iterdir()] == ["m.edgeq"]


def test_truncated_bundle(tmp_path):
    path = write_bundle(tmp_path / "m.edgeq", manifest(), b"x" * 5000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        read_bundle(path)


def _rewrite(path, manifest_obj=None, model=None):
    with zipfile.ZipFile(path) as zf:
        m = json.loads(zf.read(MANIFEST_NAME))
        blob = zf.read(MODEL_NAME)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MANIFEST_NAME, json.dumps(manifest_obj(m) if manifest_obj else m))
        zf.writestr(MODEL_NAME, model if model is not None else blob)


def test_tampered_model_is_refused(tmp_path):
    path = write_bundle(tmp_path / "m.edgeq", manifest(), b"abcdefgh")
    _rewrite(path, model=b"abcdefgX")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(path)


def test_unknown_schema_version(tmp_path):
    path = write_bundle(tmp_path / "m.edgeq", manifest(), b"abc")
    _rewrite(path, manifest_obj=lambda m: {**m, "schema_version": 99})
    with pytest.raises(BundleError, match="unknown schema version 99"):
        read_bundle(path)


def test_missing_field_is_named(tmp_path):
    path = write_bundle(tmp_path / "m.edgeq", manifest(), b"abc")
    _rewrite(path, manifest_obj=lambda m: {k: v for k, v in m.items() if k != "labels"})
    with pytest.raises(BundleError, match="'labels' is missing"):
        read_bundle(path)


def test_not_a_zip_and_missing(tmp_path):
    (tmp_path / "x.edgeq").write_text("hello")
    with pytest.raises(BundleError, match="truncated or corrupt"):
        read_bundle(tmp_path / "x.edgeq")
    with pytest.raises(BundleError, match="not found"):
        read_bundle(tmp_path / "nope.edgeq")


def test_unwritable_target_leaves_nothing(tmp_path):
    with pytest.raises(BundleError, match="cannot write"):
        write_bundle(tmp_path / "missing-dir" / "m.edgeq", manifest(), b"abc")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_removes_temp_file(tmp_path, monkeypatch):
    import edgeq.fsutil as fsutil  # the bundle is written through fsutil.atomic_file, which renames it

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(BundleError, match="No space left"):
        write_bundle(tmp_path / "m.edgeq", manifest(), b"abc")
    assert list(tmp_path.iterdir()) == []


def test_bad_manifest_refused_before_writing(tmp_path):
    with pytest.raises(BundleError, match="'task'"):
        write_bundle(tmp_path / "m.edgeq", {**manifest(), "task": "segment"}, b"abc")
    assert list(tmp_path.iterdir()) == []
