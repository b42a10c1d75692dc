"""The spread of every quality floor in the suite over five training seeds: benchmarks/results/floors.json.

    python benchmarks/floors.py                  # seeds 0..4, the test modules that hold floors, two workers
    python benchmarks/floors.py --seeds 0 1      # some seeds only (the results file wants five)
    python benchmarks/floors.py --modules tests/test_detect.py   # these modules' floors again, the rest kept

For each seed it runs those test modules with ``EDGEQ_TEST_SEED`` set and ``EDGEQ_FLOORS_RECORD`` naming a file:
every ``floors.check`` then records its value instead of asserting it (tests/floors.py). The results file keeps
each floor's values by seed, their minimum, maximum, mean and standard deviation, the bound tests/floors.py holds
it to, and the bound the margin rule allows (the lowest value less max(margin, 1.5 standard deviations), rounded
down to two digits; the mirror image for a ceiling). tests/test_floors.py checks every bound against it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import RESULTS as RESULTS_DIR
from _common import ROOT, log, require_clean_tree, write_result

sys.path.insert(0, str(ROOT / "tests"))
from floors import FLOORS, SPREAD_SIGMAS  # noqa: E402

RESULTS = RESULTS_DIR / "floors.json"
LOGS = Path(tempfile.gettempdir()) / "edgeq-floors"  # each seed's pytest output
MODULES = ["tests/test_detect.py", "tests/test_bayes.py", "tests/arm/test_arm.py", "tests/test_accuracy.py"]


def run_seed(seed: int, workers: int, modules: list[str]) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "floors.jsonl"
        record.touch()
        env = {**os.environ, "EDGEQ_TEST_SEED": str(seed), "EDGEQ_FLOORS_RECORD": str(record)}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", str(workers), "--dist", "loadfile",
                            "--no-loadscope-reorder", "-p", "no:cacheprovider", *modules],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        values = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    (LOGS / f"seed{seed}.log").write_text(r.stdout + r.stderr)  # what failed, while the other seeds run
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
    print(f"seed {seed}: {summary} ({seconds:.0f} s, {len(values)} values)", file=sys.stderr)
    return values, {"seed": seed, "seconds": round(seconds, 1), "pytest": summary, "failed": failed}


def allowed_bound(at_least: bool, lo: float, hi: float, margin: float) -> float:
    """The bound the margin rule allows, rounded away from the spread to two digits."""
    return math.floor((lo - margin) * 100) / 100 if at_least else math.ceil((hi + margin) * 100) / 100


def main(argv: list[str] | None = None) -> int:
    require_clean_tree()  # before the slow part: the results must name the commit that ran
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modules", nargs="+", default=MODULES, help="test modules to run (default: all that hold "
                    "floors); the floors of the others are kept from the results file, with the commit that measured "
                    "them")
    args = ap.parse_args(argv)
    LOGS.mkdir(exist_ok=True)
    log(f"each seed's pytest output goes to {LOGS}")
    values: dict[str, dict[int, float]] = {}
    runs = []
    for seed in args.seeds:
        recorded, run = run_seed(seed, args.workers, args.modules)
        run["modules"] = args.modules
        runs.append(run)
        for rec in recorded:
            values.setdefault(rec["name"], {})[rec["seed"]] = rec["value"]
    from _common import _commit

    floors = {}
    kept_runs = []
    if args.modules != MODULES and RESULTS.is_file():  # a partial run: the other modules' floors stay as measured
        earlier = json.loads(RESULTS.read_text())
        prefixes = tuple(Path(m).stem.removeprefix("test_") + "." for m in args.modules)
        floors = {k: v for k, v in earlier["floors"].items() if not k.startswith(prefixes)}
        kept_runs = [r for r in earlier["runs"] if set(r.get("modules", MODULES)) - set(args.modules)]
    for name, by_seed in sorted(values.items()):
        floor = FLOORS[name]
        v = np.array([by_seed[s] for s in sorted(by_seed)])
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        margin = max(floor.margin, SPREAD_SIGMAS * std)
        floors[name] = {
            "what": floor.what, "kind": "floor" if floor.at_least else "ceiling",
            "seeds": sorted(by_seed), "values": [round(float(x), 6) for x in v],
            "min": round(float(v.min()), 6), "max": round(float(v.max()), 6), "mean": round(float(v.mean()), 6),
            "std": round(std, 6), "bound": floor.bound, "margin": round(margin, 6),
            "allowed_bound": allowed_bound(floor.at_least, float(v.min()), float(v.max()), margin),
            "commit": _commit(),
        }
    never = sorted(set(FLOORS) - set(floors))
    write_result("floors", {
        "what": "every quality floor of the suite over training seeds (EDGEQ_TEST_SEED); tests/floors.py",
        "modules": MODULES, "spread_sigmas": SPREAD_SIGMAS, "runs": kept_runs + runs,
        "floors": dict(sorted(floors.items())), "never_measured": never,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
