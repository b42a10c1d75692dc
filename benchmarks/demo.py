"""The demo as a newcomer meets it: a fresh clone of this commit, README's first command (``bash scripts/demo.sh``),
its wall time with the install included, and what the run's ``summary.json`` says (validation mAP, unknown-object
AUROC, how often the unknown bag was detected and flagged, how many known-item detections were flagged).

    python benchmarks/demo.py        # writes benchmarks/results/demo.json

The clone gets its own ``.venv`` (what ``scripts/setup.sh demo`` creates), so the install is measured too. pip's
download cache (``~/.cache/pip``) is left as it is; the results file records whether it held wheels, because a
first install on a new machine downloads TensorFlow (about 250 MB) on top of the figures here. The time of each
printed step (``== N. ...``) is recorded from when its line appeared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, log, require_clean_tree, write_result  # noqa: E402 (benchmarks/ is on sys.path)

STEP = re.compile(r"^== (\d+)\. ")


def _pip_cache() -> dict:
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    files = [p for p in cache.rglob("*") if p.is_file()] if cache.is_dir() else []
    return {"path": str(cache), "files": len(files), "megabytes": round(sum(p.stat().st_size for p in files) / 2**20)}


def main() -> int:
    require_clean_tree()
    cache = _pip_cache()
    with tempfile.TemporaryDirectory(prefix="edgeq-demo-") as tmp:
        clone = Path(tmp) / "edgeq"
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env["EDGEQ_DEMO_DIR"] = str(Path(tmp) / "demo")
        t0 = time.perf_counter()
        marks: dict[str, float] = {}
        out: list[str] = []
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.append(line)
            m = STEP.match(line)
            if m:
                marks[m.group(1)] = time.perf_counter() - t0
                log(f"{marks[m.group(1)]:6.0f} s  {line.strip()}")
        code = proc.wait()
        wall = time.perf_counter() - t0
        if code != 0:
            print("".join(out[-60:]), file=sys.stderr)
            return code
        summary = json.loads((Path(tmp) / "demo" / "summary.json").read_text())
        shutil.rmtree(clone / ".venv", ignore_errors=True)
    steps = sorted(marks.items(), key=lambda kv: int(kv[0]))
    step_seconds = {n: round((steps[i + 1][1] if i + 1 < len(steps) else wall) - t, 1) for i, (n, t) in enumerate(steps)}
    write_result("demo", {"benchmark": "demo", "command": "git clone; bash scripts/demo.sh (install included)",
                          "wall_seconds": round(wall, 1), "install_seconds": round(steps[0][1], 1),
                          "step_seconds": step_seconds, "pip_cache_before": cache, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
