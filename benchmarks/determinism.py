"""Does the same seed give the same model on another machine? benchmarks/results/determinism.json.

    python benchmarks/determinism.py            # about 25 min on 2 cores
    python benchmarks/determinism.py --quick    # the one-epoch probes and the op table only

Three measurements:
1. **Twice, fresh processes.** The suite's trained models (tests/test_bayes.py's backbone and Bayesian head,
   tests/test_detect.py's backbone and detector, same data, commands and seeds) are trained twice, each in a new
   `edgeq train` process, and their weights compared bit for bit.
2. **One setting at a time.** One epoch of the 48 px classifier under edgeq's pinned numerics
   (converter/tf.py: PORTABLE_NUMERICS) and with each pin undone: TensorFlow's defaults, oneDNN's AVX-512 kernels,
   1 and 4 threads. A setting that changes the weights here is one that differs between machines unless pinned.
3. **Another CPU.** The ops that training uses, run natively and under qemu-x86_64 emulating an Intel Haswell and
   an AMD EPYC-Rome (AVX2, other cache sizes, another vendor's CPUID): which give the same bits. Emulation stands
   in for a machine we do not have; its approximate reciprocals are exact, which is itself another CPU's answer.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from _common import edgeq_exe, log, require_clean_tree, write_result

from edgeq.converter.tf import PORTABLE_NUMERICS

PYTHON = os.path.realpath(sys.executable)
QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
EMULATED_CPUS = ("Haswell-v4", "EPYC-Rome")

# what each pin is, undone one at a time (1-epoch classifier)
VARIANTS = {
    "pinned": {},
    "tensorflow defaults": {k: None for k in PORTABLE_NUMERICS},
    "oneDNN ops on, AVX-512 kernels": {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "oneDNN sgemm with AVX-512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "1 thread": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
    "4 threads": {"TF_NUM_INTRAOP_THREADS": "4", "TF_NUM_INTEROP_THREADS": "4"},
}

OPS_PROBE = r'''
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
tf.config.experimental.enable_op_determinism()
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(16, 24, 24, 96)).astype(np.float32))
pos = tf.constant(rng.uniform(0.1, 10, size=(4096,)).astype(np.float32))
w3 = tf.Variable(rng.normal(size=(3, 3, 96, 32)).astype(np.float32))
wd = tf.Variable(rng.normal(size=(3, 3, 96, 1)).astype(np.float32))
out = {
    "conv 1x1 (k=96)": tf.nn.conv2d(x, rng.normal(size=(1, 1, 96, 576)).astype(np.float32), 1, "SAME"),
    "conv 3x3": tf.nn.conv2d(x, w3, 1, "SAME"),
    "depthwise 3x3": tf.nn.depthwise_conv2d(x, wd, [1, 1, 1, 1], "SAME"),
    "matmul (k=1280)": tf.linalg.matmul(rng.normal(size=(64, 1280)).astype(np.float32),
                                        rng.normal(size=(1280, 10)).astype(np.float32)),
    "sum over a batch": tf.reduce_sum(x, axis=[0, 1, 2]),
    "exp": tf.exp(x[..., :8]),
    "log": tf.math.log(pos),
    "tanh": tf.tanh(x[..., :8]),
    "sigmoid": tf.sigmoid(x[..., :8]),
    "sqrt": tf.sqrt(pos),
    "division": 1.0 / pos,
    "rsqrt": tf.math.rsqrt(pos),
    "reciprocal": tf.math.reciprocal(pos),
    "softmax": tf.nn.softmax(x[..., :8]),
    "batch norm (training)": tf.nn.batch_normalization(x, tf.reduce_mean(x, [0, 1, 2]),
                                                       tf.math.reduce_variance(x, [0, 1, 2]), 0.1, 1.0, 1e-3),
}
with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    y3 = tf.reduce_sum(tf.square(tf.nn.conv2d(x, w3, 1, "SAME")))
    yd = tf.reduce_sum(tf.square(tf.nn.depthwise_conv2d(x, wd, [1, 1, 1, 1], "SAME")))
out["conv 3x3 gradient (weights)"] = tape.gradient(y3, w3)
out["depthwise gradient (weights)"] = tape.gradient(yd, wd)
out["depthwise gradient (input)"] = tape.gradient(yd, x)
np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in out.items()})
'''


def weights_digest(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """sha256 of every weight array of a .keras file, in name order, and the arrays."""
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(zipfile.ZipFile(path).read("model.weights.h5")), "r") as f:
        f.visititems(lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest(), arrays


def environment(changes: dict[str, str | None]) -> dict[str, str]:
    env = {**os.environ, **PORTABLE_NUMERICS, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def edgeq_train(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([edgeq_exe(), "train", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgeq train {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def make_data(root: Path) -> dict[str, Path]:
    """The suite's training data, drawn as its fixtures draw it (tests/conftest.py, test_bayes.py, test_detect.py)."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder

    x, y = fashion_mnist("train")
    out = {}
    idx = np.random.default_rng(0).choice(np.flatnonzero(y < 4), 800, replace=False)
    out["fashion_train"] = write_class_folder(root / "fashion_train", x[idx], y[idx], FASHION_MNIST_LABELS[:4])
    idx = np.random.default_rng(5).choice(np.flatnonzero(y < 4), 2400, replace=False)
    out["backbone_train"] = write_class_folder(root / "backbone_train", x[idx], y[idx], FASHION_MNIST_LABELS[:4])
    known = ("tshirt", "trouser", "sneaker")
    ids = [FASHION_MNIST_LABELS.index(n) for n in known]
    pick = np.random.default_rng(0).choice(np.flatnonzero(np.isin(y, ids)), 1500, replace=False)
    out["items"] = write_class_folder(root / "items", x[pick], np.array([ids.index(int(v)) for v in y[pick]]), known)
    others = "pullover,dress,coat,sandal,shirt,ankle_boot"
    common = ["--size", "128", "--min-size", "32", "--max-size", "56", "--max-objects", "2"]
    r = subprocess.run([edgeq_exe(), "datasets", "scenes", str(root / "scenes"), "--n", "300",
                        "--exclude-classes", f"bag,{others}", *common], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    out["scenes"] = root / "scenes"
    return out


def suite_models(data: dict[str, Path], d: Path, env: dict[str, str]) -> dict[str, dict]:
    """The suite's four trained models, as its fixtures train them (seed 0 of EDGEQ_TEST_SEED)."""
    jobs = {
        "test_bayes backbone (48 px, 6 epochs)": (
            "det.keras", [str(data["backbone_train"]), "--head", "dense", "--input-size", "48", "--epochs", "6",
                          "--lr", "3e-3", "--no-augment", "--seed", "1"]),
        "test_bayes Bayesian head (frozen backbone, 15 epochs)": (
            "bayes.keras", [str(data["fashion_train"]), "--head", "bayes", "--init", str(d / "det.keras"),
                            "--freeze-backbone", "--epochs", "15", "--seed", "1"]),
        "test_detect backbone (96 px, 4 epochs)": (
            "backbone.keras", [str(data["items"]), "--input-size", "96", "--epochs", "4", "--lr", "2e-3",
                               "--no-augment", "--batch-size", "64", "--seed", "0"]),
        "test_detect detector (128 px, 16 + 5 epochs)": (
            "det_scenes.keras", ["--task", "detect", str(data["scenes"]), "--init-backbone", str(d / "backbone.keras"),
                                 "--input-size", "128", "--epochs", "16", "--bayes-epochs", "5", "--batch-size", "16",
                                 "--augment-copies", "1", "--seed", "0"]),
    }
    out = {}
    for name, (file, args) in jobs.items():
        seconds = edgeq_train([*args, "-o", str(d / file)], env)
        out[name] = {"sha256": weights_digest(d / file)[0], "seconds": round(seconds, 1)}
        log(f"{name}: {out[name]['sha256'][:16]} in {seconds:.0f} s")
    return out


def one_epoch(data: dict[str, Path], d: Path, changes: dict[str, str | None]) -> dict:
    out = d / "probe.keras"
    seconds = edgeq_train([str(data["backbone_train"]), "--head", "dense", "--input-size", "48", "--epochs", "1",
                           "--lr", "3e-3", "--no-augment", "--seed", "1", "-o", str(out)], environment(changes))
    digest, arrays = weights_digest(out)
    return {"sha256": digest, "seconds": round(seconds, 1), "arrays": arrays}


def max_relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for k in a:
        scale = float(np.max(np.abs(a[k]))) or 1.0
        worst = max(worst, float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) / scale)
    return worst


def op_table(d: Path) -> dict:
    """Each op natively and on each emulated CPU: identical bits, or how many values differ."""
    probe = d / "ops_probe.py"
    probe.write_text(OPS_PROBE)
    env = environment({})
    runs = {"native": [PYTHON]}
    if QEMU:
        for cpu in EMULATED_CPUS:
            runs[f"qemu {cpu}"] = [QEMU, "-cpu", cpu, PYTHON]
    arrays, seconds = {}, {}
    for name, prefix in runs.items():
        t0 = time.perf_counter()
        r = subprocess.run([*prefix, str(probe), str(d / f"{name}.npz")], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: {r.stderr[-2000:]}")
        seconds[name] = round(time.perf_counter() - t0, 1)
        arrays[name] = dict(np.load(d / f"{name}.npz"))
    table = {}
    for op, want in arrays["native"].items():
        table[op] = {cpu: int(np.sum(arrays[cpu][op] != want)) for cpu in arrays if cpu != "native"}
        table[op]["values"] = int(want.size)
    return {"differing_values": table, "seconds": seconds, "emulator": QEMU}


def main(argv: list[str] | None = None) -> int:
    require_clean_tree()  # before the slow part: the results must name the commit that ran
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip training the suite's models twice")
    args = ap.parse_args(argv)
    result: dict = {"pinned": PORTABLE_NUMERICS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root)
        probes = {}
        for name, changes in VARIANTS.items():
            probes[name] = one_epoch(data, root, changes)
            log(f"one epoch, {name}: {probes[name]['sha256'][:16]} in {probes[name]['seconds']} s")
        again = one_epoch(data, root, {})
        base = probes["pinned"]
        result["one_epoch"] = {
            "what": "one epoch of the 48 px classifier on 2,400 images, seed 1, each in a fresh edgeq train process",
            "pinned_twice_identical": again["sha256"] == base["sha256"],
            "variants": {name: {"changes": VARIANTS[name], "sha256": p["sha256"], "seconds": p["seconds"],
                                "identical_to_pinned": p["sha256"] == base["sha256"],
                                "max_relative_weight_difference": max_relative_difference(base["arrays"], p["arrays"])}
                         for name, p in probes.items()},
        }
        result["ops"] = op_table(root)
        if not args.quick:
            runs = []
            for i in range(2):
                d = root / f"run{i}"
                d.mkdir()
                runs.append(suite_models(data, d, environment({})))
            result["suite_models_twice"] = {
                name: {"identical": runs[0][name]["sha256"] == runs[1][name]["sha256"],
                       "sha256": [r[name]["sha256"] for r in runs], "seconds": [r[name]["seconds"] for r in runs]}
                for name in runs[0]}
    write_result("determinism", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
