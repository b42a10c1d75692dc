"""The demo's figures, as README quotes them: ``edgeq demo`` run end to end in a fresh folder (the same command
scripts/demo.sh runs after setup), its wall time, and what its ``summary.json`` says (validation mAP, unknown-object
AUROC, how often the unknown bag was detected and flagged, how many known-item detections were flagged).

    python benchmarks/demo.py        # writes benchmarks/results/demo.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgeq-demo-") as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "edgeq.cli", "demo", "--workdir", tmp], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stdout[-3000:], file=sys.stderr)
            return r.returncode
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    write_result("demo", {"benchmark": "demo", "command": "edgeq demo (scripts/demo.sh after setup)",
                          "wall_seconds": round(wall, 1), **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
