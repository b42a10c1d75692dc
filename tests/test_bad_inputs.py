"""Every bad input edgeq's host commands refuse before doing work: one table, one row per case met.

Each row runs the real CLI in this process and must end with exit code != 0, exactly one ``edgeq: error:`` line
naming the flag or file, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_clean_error
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
    ("convert {model} --quant float32 --layer-errors -o {out}", ["--layer-errors", "float32"]),
    ("convert {model} --quant float16 --keep-float conv -o {out}", ["--keep-float", "float16"]),
    ("convert {model} --calib {calib} -o {tmp}/missing/o.edgeq", ["missing", "does not exist"]),
    ("convert {model} --calib {calib} -o {tmp}", ["is a folder"]),
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
    ("convert {model} --calib {calib} --review-budget 1.5 -o {out}", ["--review-budget 1.5"]),
    ("convert {model} --calib {calib} --review-ood-rate 0 -o {out}", ["--review-ood-rate 0"]),
    ("train {calib} --epochs 0 -o {tmp}/m.keras", ["--epochs 0"]),
    ("train {calib} -o {tmp}/m.h5", ["-o", ".keras"]),
    ("train {calib} -o {tmp}/missing/m.keras", ["does not exist"]),
    ("datasets check {tmp}/nope.json", ["no COCO annotations file"]),
    ("inspect {tmp}", ["is a folder"]),
    ("inspect {tmp}/nope.edgeq", ["not found"]),
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
    code = main(argv)
    err = capsys.readouterr().err
    assert_clean_error((code, err), *needles)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".edgeq", ".keras", ".tmp")]
