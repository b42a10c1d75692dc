"""What every benchmark shares: progress on stderr, and results written with the machine they were measured on
(CPU model and SIMD flags, cores, runtime and library versions, the commit). Benchmarks import nothing from
tests/: the data and models they share with the tests live in the converter room (edgeq.converter.data.shapes,
edgeq.converter.models.outlier).

    from _common import write_result
    write_result("detection", result)   # benchmarks/results/detection.json, and the same JSON on stdout
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# a results file is measured from a clean tree (the commit it names is then what ran), unless a run says otherwise:
# --allow-dirty (taken off sys.argv here, so every benchmark's own parser never sees it) marks the file as such
ALLOW_DIRTY = "--allow-dirty" in sys.argv
if ALLOW_DIRTY:
    sys.argv.remove("--allow-dirty")

# SIMD features that decide int8 and float speed (x86 and ARM names as /proc/cpuinfo spells them)
FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
         "neon", "asimd", "asimddp", "i8mm", "bf16", "sve")
PACKAGES = ("edgeq", "numpy", "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "tflite-runtime",
            "opencv-python-headless", "scikit-learn", "pycocotools", "paho-mqtt")


def machine() -> dict[str, Any]:
    """The CPU, its flags, the Python and package versions, and the commit the figures were measured at."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": model, "cpu_flags": sorted(f for f in FLAGS if f in flags), "cores": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(), "packages": versions,
        "commit": _commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        # results files are what benchmarks write, not what they run: one benchmark's fresh results must not
        # make the next one in the same checkout refuse to start
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def edgeq_exe() -> str:
    """The ``edgeq`` console script of this interpreter's environment, then the one on PATH (a worktree's
    environment measures its own code)."""
    import shutil

    beside = Path(sys.executable).parent / "edgeq"
    return str(beside) if beside.is_file() else (shutil.which("edgeq") or "edgeq")


def log(message: str) -> None:
    """Progress on stderr (stdout carries the results' JSON), shown at once."""
    print(message, file=sys.stderr, flush=True)


def require_clean_tree() -> None:
    """Refuse, before hours of work, to measure a tree with uncommitted changes (unless --allow-dirty)."""
    if _commit().endswith("+changes") and not ALLOW_DIRTY:
        sys.exit("benchmarks: the tree has uncommitted changes, so the results file could not name what ran; "
                 "commit first, or pass --allow-dirty (the file then says so)")


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Add the machine to ``result``, write ``benchmarks/results/<name>.json`` and print it. A tree with
    uncommitted changes is refused unless --allow-dirty was given, and then the file records it."""
    require_clean_tree()
    env = machine()
    if env["commit"].endswith("+changes"):
        env["dirty_allowed"] = True
    result = {**result, "environment": env}
    text = json.dumps(result, indent=2) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    sys.stdout.write(text)
    return path


def split_folder(src: Path, first: Path, second: Path) -> tuple[Path, Path]:
    """A class folder's images copied alternately into two disjoint folders of the same classes (by sorted name
    within each class): one for ``edgeq convert --val``, one to score on."""
    import shutil

    for folder in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
            dst = (first if i % 2 == 0 else second) / folder.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    return require_disjoint(first, second)


def require_disjoint(calibration: str | Path, scoring: str | Path) -> tuple[Path, Path]:
    """Refuse a benchmark that would score on what convert calibrated on (its ``--val``): the same folder or
    file, or one inside the other."""
    a, b = Path(calibration).resolve(), Path(scoring).resolve()
    if a == b or a in b.parents or b in a.parents:
        sys.exit(f"benchmarks: {scoring} is scored on and {calibration} calibrated on: they overlap; give convert "
                 "--val a split of its own")
    return a, b
