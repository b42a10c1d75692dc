"""``edgeq bench BUNDLE``: how fast a bundle runs here, against a baseline, measured side by side.

- invoke latency, interleaved A/B rounds (median, p95, throughput), so drift and turbo hit both models alike;
- peak memory: the peak RSS of a fresh process that loads only that model and invokes it;
- which runtime ran and whether XNNPACK took the graph;
- with ``--pipeline VIDEO``: the whole ``edgeq run`` pipeline's steady fps on the video vs raw invoke fps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import DataError, EdgeqError
from edgeq.runtime import Model, interleaved_latency

_PEAK_RSS_PROBE = """
import resource, sys
import numpy as np
from edgeq.bench import load_any
m = load_any(sys.argv[1], int(sys.argv[2]), "MODEL")
m.set_input(np.zeros(m.input.shape, dtype=m.input.dtype))
for _ in range(int(sys.argv[3])):
    m.invoke()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

def load_any(path: str | Path, threads: int, flag: str) -> Model:
    """A ``.edgeq`` bundle (verified) or a bare ``.tflite`` file."""
    from edgeq.bundle import read_bundle

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{flag} {path}: not found; give a .edgeq bundle or a .tflite file")
    if p.suffix == ".edgeq":
        return read_bundle(p).load_model(threads)
    if p.suffix == ".tflite":
        return Model(p.read_bytes(), num_threads=threads)
    raise DataError(f"{flag} {path}: unknown format {p.suffix!r}; give a .edgeq bundle or a .tflite file")


def peak_rss_mb(path: str | Path, threads: int, invokes: int = 20) -> float:
    """Peak resident memory (MB) of a fresh Python process that loads only this model and invokes it."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_PROBE, str(path), str(threads), str(invokes)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode != 0:
        raise EdgeqError(f"{path}: the memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def latency_figures(times_ms: np.ndarray) -> dict[str, float]:
    return {
        "median_ms": float(np.median(times_ms)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "throughput_per_s": float(1000.0 / np.median(times_ms)),
    }


def pipeline_fps(bundle: str | Path, video: str | Path, threads: int) -> dict[str, Any]:
    """Run ``edgeq run`` over the video into a JSON-lines file; steady fps from the first to the last result's
    capture timestamp (process start-up and model load excluded)."""
    video = Path(video)
    if not video.is_file():
        raise DataError(f"--pipeline {video}: not found; give a video file")
    exe = shutil.which("edgeq")
    cmd = [exe] if exe else [sys.executable, "-m", "edgeq.cli"]
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        out = Path(tmp) / "out.jsonl"
        r = subprocess.run(cmd + ["run", "--model", str(bundle), "--source", str(video), "--threads", str(threads),
                                  "--output", str(out), "--spool", str(Path(tmp) / "spool.db")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise EdgeqError(f"--pipeline {video}: edgeq run failed: {last}")
        stamps = [json.loads(ln)["timestamp"] for ln in out.read_text().splitlines() if '"edgeq.detections"' in ln]
    if len(stamps) < 3:
        raise DataError(f"--pipeline {video}: only {len(stamps)} frames; give a video of at least 3 frames")
    t = [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps]
    return {"frames": len(stamps), "fps": (len(stamps) - 1) / max(t[-1] - t[0], 1e-9)}


def bench(
    bundle: str | Path, baseline: str | Path | None = None, threads: int = 1, runs: int = 200, warmup: int = 20,
    pipeline: str | Path | None = None, memory: bool = True,
) -> dict[str, Any]:
    if threads < 1 or runs < 1 or warmup < 0:
        raise DataError("--threads and --runs must be at least 1, --warmup at least 0")
    models = {"bundle": load_any(bundle, threads, "BUNDLE")}
    paths = {"bundle": Path(bundle)}
    if baseline is not None:
        models["baseline"] = load_any(baseline, threads, "--baseline")
        paths["baseline"] = Path(baseline)
        a, b = models["bundle"].input, models["baseline"].input
        if list(a.shape) != list(b.shape):
            raise DataError(f"--baseline {baseline}: input shape {list(b.shape)} differs from {bundle}'s "
                            f"{list(a.shape)}; compare models that take the same input")
    inputs = [np.zeros(m.input.shape, dtype=m.input.dtype) for m in models.values()]
    times = interleaved_latency(list(models.values()), inputs, runs=runs, warmup=warmup)
    result: dict[str, Any] = {"threads": threads, "runs": runs, "warmup": warmup, "models": {}}
    for (name, model), t in zip(models.items(), times):
        entry = {"path": str(paths[name]), "size_bytes": model.size, **latency_figures(t), "runtime": model.describe()}
        if memory:
            entry["peak_rss_mb"] = peak_rss_mb(paths[name], threads)
        result["models"][name] = entry
    if baseline is not None:
        b, base = result["models"]["bundle"], result["models"]["baseline"]
        result["speedup_vs_baseline"] = base["median_ms"] / b["median_ms"]
        result["size_ratio_vs_baseline"] = b["size_bytes"] / base["size_bytes"]
    if pipeline is not None:
        if paths["bundle"].suffix != ".edgeq":
            raise DataError("--pipeline needs a .edgeq bundle (edgeq run reads bundles)")
        p = pipeline_fps(bundle, pipeline, threads)
        raw = result["models"]["bundle"]["throughput_per_s"]
        result["pipeline"] = {**p, "raw_invoke_fps": raw, "ratio_to_raw": p["fps"] / raw}
    return result


def format_bench(r: dict[str, Any]) -> str:
    lines = [f"{'model':<9} {'median ms':>10} {'p95 ms':>8} {'per s':>8} {'size MB':>8} {'peak RSS MB':>12}  runtime"]
    for name, m in r["models"].items():
        rt = m["runtime"]
        xnn = "XNNPACK whole graph" if rt["whole_graph"] else (
            f"XNNPACK {rt['delegated_ops']}/{rt['total_ops']} ops" if rt["xnnpack_applied"] else "no XNNPACK")
        rss = f"{m['peak_rss_mb']:.1f}" if "peak_rss_mb" in m else "-"
        lines.append(f"{name:<9} {m['median_ms']:>10.3f} {m['p95_ms']:>8.3f} {m['throughput_per_s']:>8.1f} "
                     f"{m['size_bytes'] / 1e6:>8.3f} {rss:>12}  {rt['runtime']} {rt['runtime_version']}, {xnn}")
    if "speedup_vs_baseline" in r:
        lines.append(f"bundle vs baseline: speed {r['speedup_vs_baseline']:.2f}x (above 1: faster), size "
                     f"{r['size_ratio_vs_baseline']:.3f}x ({r['threads']} thread(s), {r['runs']} interleaved rounds)")
    if "pipeline" in r:
        p = r["pipeline"]
        lines.append(f"pipeline: {p['fps']:.1f} fps over {p['frames']} frames vs raw invoke {p['raw_invoke_fps']:.1f} "
                     f"fps = {p['ratio_to_raw']:.2f}x")
    return "\n".join(lines)
