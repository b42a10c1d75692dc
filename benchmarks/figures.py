"""The figures README and docs/ quote, rendered from benchmarks/results/*.json: one definition per table.

Each table lives in its markdown file between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``.

    python benchmarks/figures.py            # print every table
    python benchmarks/figures.py --write    # rewrite them in README.md and docs/*.md

tests/test_figures.py renders them again and fails when a file's table differs from its results, so a figure
cannot drift from the run that measured it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class R(dict):
    """A results file: keys as attributes, dotted paths with ``at``."""

    def __getattr__(self, key: str) -> Any:
        value = self[key]
        return R(value) if isinstance(value, dict) else value

    def at(self, dotted: str) -> Any:
        value: Any = self
        for k in dotted.split("."):
            value = value[k]
        return value


def results() -> dict[str, R]:
    return {p.stem: R(json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))}


Row = tuple[str, Callable[[dict[str, R]], str], str]  # figure, value from the results, command


# results files withdrawn until a clean re-run: why, for the rows and tables that read them
PENDING = {
}


def _pending(res: dict[str, R], name: str, render: Callable[[R], str], short: bool = False) -> str:
    """``render(res[name])``, or, while that results file is withdrawn (``PENDING``), what to run (and, unless
    ``short``, why it was withdrawn)."""
    if name in res:
        return render(res[name])
    return "not measured yet: re-run pending" if short else \
        f"not measured yet: `python benchmarks/{name}.py` ({PENDING[name]})"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _annotate(s: dict) -> str:
    f = s["fps_median"]
    return (f"{s['video_over_off']:.2f}x / {s['jpeg_over_off']:.2f}x ({f['video_avi']:.0f} and {f['jpeg_folder']:.0f} "
            f"vs {f['off']:.0f} fps; off runs spread {100 * s['off_spread']:.0f}%)")


README: list[Row] = [
    ("MobileNetV2 1.0/224, 10 classes: int8 / float32 `.tflite` size",
     lambda r: f"{r['ptq_mobilenet_v2'].int8_over_float32_size:.3f} ({_mb(r['ptq_mobilenet_v2'].int8_tflite_bytes)} / "
               f"{_mb(r['ptq_mobilenet_v2'].float32_tflite_bytes)})",
     "`python benchmarks/ptq_mobilenet_v2.py`"),
    ("conversion with 200 calibration images (incl. float reference and verification)",
     lambda r: f"{r['ptq_mobilenet_v2'].convert_seconds_total:.1f} s", "same"),
    ("invoke latency float32 / int8, interleaved, 1 thread (XNNPACK)",
     lambda r: _lat(r["ptq_mobilenet_v2"].latency, "1_thread"), "same"),
    ("same, 2 threads", lambda r: _lat(r["ptq_mobilenet_v2"].latency, "2_thread"), "same"),
    ("MobileNetV2 0.35/96 (the `edgeq train` default), float32 / int8, 1 thread",
     lambda r: _lat(r["ptq_mobilenet_v2"].small_model.latency, "1_thread"), "same"),
    ("same, 2 threads", lambda r: _lat(r["ptq_mobilenet_v2"].small_model.latency, "2_thread"), "same"),
    ("MobileNetV2 0.35/64, 3 epochs on 12,000 Fashion-MNIST images: float / int8 top-1 on held-out test images "
     "(convert's --val is another 1,000)",
     lambda r: f"{r['fashion_mnist_ptq'].float_top1:.3f} / {r['fashion_mnist_ptq'].int8_top1:.3f} (drop "
               f"{r['fashion_mnist_ptq'].drop_points:g} points, {r['fashion_mnist_ptq'].test_images:,} images)",
     "`python benchmarks/fashion_mnist_ptq.py`"),
    ("`edgeq run` on a 640x480 video vs raw invoke, MobileNetV2 224 int8, 1 thread",
     lambda r: _pipe(r["device_pipeline"].throughput["1_thread"]), "`python benchmarks/device_pipeline.py`"),
    ("same, 2 threads (video decoding shares the 2 cores)",
     lambda r: _pipe(r["device_pipeline"].throughput["2_thread"]), "same"),
    ("frame time to subscriber receive over loopback mosquitto, 30 fps, p50 / p99",
     lambda r: f"{r['device_pipeline'].latency_and_rss['capture_to_receive_ms_p50']:.1f} / "
               f"{r['device_pipeline'].latency_and_rss['capture_to_receive_ms_p99']:.1f} ms", "same"),
    ("peak RSS of `edgeq run`, MobileNetV2 224 int8",
     lambda r: f"{r['device_pipeline'].latency_and_rss['rss_peak_mb']:.1f} MB", "same"),
    ("results lost across 5 broker restarts in a 2,000-frame run",
     lambda r: f"{r['device_pipeline'].broker_restarts['lost']} ({r['device_pipeline'].broker_restarts['duplicates']} "
               "duplicates, dropped by seq)", "same"),
    ("`edgeq run` after a 47 MB bundle is pushed and applied vs a fresh start on it, side by side: RSS (target: "
     "within 15 MB)",
     lambda r: f"{r['memory'].hot_swap['rss_after_swap_mb']:.1f} vs {r['memory'].hot_swap['rss_fresh_start_mb']:.1f} "
               f"MB ({r['memory'].hot_swap['difference_mb']:+.1f} MB)", "`python benchmarks/memory.py --fps 50`"),
    ("`edgeq run`, one hour at up to 50 results a second, the broker restarted every 2 minutes: RSS growth after a "
     "5-minute warm-up (target: at most 5 MB)",
     lambda r: f"{r['memory'].soak['growth_mb']:+.1f} MB ({r['memory'].soak['rss_at_warmup_mb']:.1f} MB at warm-up, "
               f"{r['memory'].soak['rss_last_quarter_max_mb']:.1f} MB highest in the last quarter; "
               f"{r['memory'].soak['broker_restarts']} restarts)", "same"),
    ("bytes `edgeq run` writes per result at 10 fps, broker up: spool `disk` (default) / `memory` / a commit per "
     "result / the spool before this version, side by side",
     lambda r: " / ".join(f"{r['spool_wear'].modes[m]['bytes_per_result']:,.0f}"
                          for m in ("disk", "memory", "each_result", "before") if m in r["spool_wear"].modes)
               + f" B (payload about {r['spool_wear'].modes['disk']['payload_bytes_mean']:.0f} B)",
     "`python benchmarks/spool_wear.py`"),
    ("preprocessing one frame into an int8 input, `--interpolation linear` vs `linear_exact`, 1 OpenCV thread: "
     "640x480 to 224 (stretch) / 1280x720 to 300 (letterbox)",
     lambda r: " / ".join(f"{c['ms_median']['linear']:.2f} vs {c['ms_median']['linear_exact']:.2f} ms "
                          f"({c['exact_over_linear']:.2f}x)" for c in r["resize"].cases
                          if (c["frame"], c["input"]) in (("640x480", 224), ("1280x720", 300))),
     "`python benchmarks/resize.py`"),
    ("`edgeq run --annotate` on vs off, the demo clip (192x192, 4 boxes a frame): fps into a .avi / a JPEG folder",
     lambda r: _annotate(r["annotate"].scenarios["demo_clip"]), "`python benchmarks/annotate.py`"),
    ("same, worst case: 640x480, 50 boxes a frame",
     lambda r: _annotate(r["annotate"].scenarios["worst_case"]), "same"),
    ("`--annotate`, one demo-clip frame (4 boxes) on the drawing thread, in-process: draw / draw and write a .avi / "
     "draw and write a JPEG file; share of one core at 30 fps (video / JPEG)",
     lambda r: (lambda c: f"{c['us_median']['draw'] / 1e3:.2f} / {c['us_median']['draw_write_avi'] / 1e3:.2f} / "
                          f"{c['us_median']['draw_write_jpeg'] / 1e3:.2f} ms; "
                          f"{100 * c['core_share_at_30fps']['draw_write_avi']:.1f}% / "
                          f"{100 * c['core_share_at_30fps']['draw_write_jpeg']:.1f}%")(r["annotate"].per_frame),
     "same"),
    ("`--annotate` and snapshots off: the loop's per-frame hand-over vs a bare queue put (in-process, 200,000 "
     "frames, median of 5)",
     lambda r: f"{r['annotate'].off_path['submit_us_per_frame']:.3f} vs {r['annotate'].off_path['bare_put_us_per_frame']:.3f} "
               f"us a frame ({r['annotate'].off_path['extra_us_per_frame']:+.3f} us; one demo-clip frame takes "
               f"{1e6 / r['annotate'].scenarios['demo_clip']['fps_median']['off']:.0f} us)",
     "same"),
    ("snapshots at 1 Hz, demo clip at 30 fps for 20 s: extra CPU, share of one core (median of 3 runs each)",
     lambda r: f"{r['annotate'].snapshots_1hz['extra_percent_of_a_core']:+.2f}% (process CPU "
               f"{r['annotate'].snapshots_1hz['cpu_s_median']['on_1hz']:.2f} vs "
               f"{r['annotate'].snapshots_1hz['cpu_s_median']['off']:.2f} s)", "same"),
    ("Bayesian head, K=32, int8, one invoke vs the same backbone with a dense head, MobileNetV2 0.35/96",
     lambda r: _bayes_latency(r["bayes_head"]), "`python benchmarks/bayes_head.py`"),
    ("one K=32 pass vs 32 passes of the deterministic int8 network (0.35/96)",
     lambda r: _k_passes(r["bayes_head"]), "same"),
    ("int8 QBNN vs float BNN, one training seed, held-out Fashion-MNIST (the half of 2,000 that convert's --val "
     "did not see): top-1",
     lambda r: _bayes_q(r["bayes_head"], "top1", "{:.4f}"), "same"),
    ("same: ECE (15 bins)", lambda r: _bayes_q(r["bayes_head"], "ece", "{:.4f}"), "same"),
    ("same: AUROC of mutual information, Fashion-MNIST vs 2,000 MNIST digits (0.5 is chance)",
     lambda r: _bayes_q(r["bayes_head"], "auroc_mi", "{:.3f}"), "same"),
    ("classifier (MobileNetV2 0.35/96, 8 Fashion-MNIST classes), three training seeds: AUROC of unfamiliarity, mean "
     "(range), vs predictive entropy, mean, int8, against MNIST digits / the 2 held-out classes / photo crops",
     lambda r: " / ".join(f"{_spread(v['quantized']['auroc']['unfamiliarity'])} vs "
                          f"{v['quantized']['auroc']['predictive_entropy']['mean']:.3f}"
                          for v in r["unknowns"].mean["ood"].values()), "`python benchmarks/unknowns.py`"),
    ("same, float32 bundle (same flags): unfamiliarity, mean",
     lambda r: " / ".join(f"{v['reference']['auroc']['unfamiliarity']['mean']:.3f}"
                          for v in r["unknowns"].mean["ood"].values()), "same"),
    ("same: `needs_review` with the defaults flags, int8, mean: in-distribution / MNIST digits",
     lambda r: f"{r['unknowns'].mean['in_distribution']['quantized']['flagged']['mean']:.1%} / "
               f"{r['unknowns'].mean['ood']['digits']['quantized']['flagged']['mean']:.1%}", "same"),
    ("same: accuracy of unflagged vs all in-distribution results, int8, mean",
     lambda r: f"{r['unknowns'].mean['in_distribution']['quantized']['accuracy_unflagged']['mean']:.4f} vs "
               f"{r['unknowns'].mean['in_distribution']['quantized']['accuracy_all']['mean']:.4f}", "same"),
    ("same: ranking wrong above right in-distribution results, AUROC int8, mean: density disagreement (the default "
     "review measure) vs predictive entropy; accuracy kept when the 10% most ambiguous on --val are set aside",
     lambda r: f"{_amb(r, 'density_disagreement', 'error_auroc', '{:.3f}')} vs "
               f"{_amb(r, 'predictive_entropy', 'error_auroc', '{:.3f}')}; "
               f"{_amb(r, 'density_disagreement', 'accuracy_kept', '{:.4f}')} vs "
               f"{_amb(r, 'predictive_entropy', 'accuracy_kept', '{:.4f}')}", "same"),
    ("same: cost of the measure, invoke latency ratio / with the device's numpy finish / extra peak RSS of `edgeq run`",
     lambda r: f"{r['unknowns'].cost['latency_ratio']:.3f}x / {r['unknowns'].cost['invoke_plus_finish_ratio']:.3f}x / "
               f"{r['unknowns'].cost['rss_extra_mb']:+.1f} MB", "same"),
    ("MobileNetV2 1.0/224 bundle file / float32 `.tflite`: int8, int8 + 16 clusters per tensor, per channel (packed 4-bit)",
     lambda r: " / ".join(f"{r['clustering'].variants[v]['bundle_over_float32']:.3f}" for v in
                          ("int8", "clustered_per_tensor", "clustered_per_channel")),
     "`python benchmarks/clustering.py`"),
    ("model with an outlier channel (small CNN, Fashion-MNIST): top-1 drop plain / bias-corrected / `--equalize` / "
     "float layers (`--max-drop 0.01 --equalize off`)",
     lambda r: " / ".join(f"{r['accuracy_aware'].hard_model['variants'][v]['drop_points']:g}" for v in
                          ("plain", "bias_corrected", "equalized", "accuracy_aware")) + " points",
     "`python benchmarks/accuracy_aware.py`"),
    ("same: latency vs plain int8, `--equalize` / float layers",
     lambda r: " / ".join(f"{r['accuracy_aware'].hard_model['variants'][v]['latency_vs_plain']:.2f}x" for v in
                          ("equalized", "accuracy_aware")), "same"),
    ("PTQ vs QAT: MobileNetV2 0.35/96 trained 3 epochs on Fashion-MNIST, three training seeds: int8 top-1 after "
     "`--qat` (2 epochs: more training too, see docs/accuracy.md) less float top-1 / less the best PTQ (plain, "
     "bias-corrected, equalised), points, mean (range)",
     lambda r: f"{_spread(r['accuracy_aware'].mobilenet_v2_bias_correction['qat_vs_float_points'], '{:+.2f}')} / "
               f"{_spread(r['accuracy_aware'].mobilenet_v2_bias_correction['qat_vs_best_ptq_points'], '{:+.2f}')}",
     "same"),
    ("same: a QAT epoch's time over a float training epoch's, per seed",
     lambda r: " / ".join(f"{v['training']['qat_epoch_over_float_epoch']:.2f}x"
                          for v in r["accuracy_aware"].mobilenet_v2_bias_correction["seeds"].values()), "same"),
    ("grid detector, MobileNetV2 0.35 at 192x192, K=32 Bayesian class head, three training seeds, test scenes "
     "`edgeq convert --val` never saw: mAP@0.5 of the known classes, int8, mean (range)",
     lambda r: " / ".join(_spread(_dv(r, v)["map50_int8"]) for v in DET_VARIANTS), "`python benchmarks/detection.py`"),
    ("same: unknown objects found at all (IoU >= 0.5, any label), near (bag, sandal), far (digits, photo crops)",
     lambda r: " / ".join(f"{_spread(_dv(r, v)['groups']['near']['found_rate'], '{:.2f}')}, "
                          f"{_spread(_dv(r, v)['groups']['far']['found_rate'], '{:.2f}')}" for v in DET_VARIANTS),
     "same"),
    ("same: AUROC of the published unknown score, unknown vs known detections, near, far",
     lambda r: " / ".join(f"{_spread(_dv(r, v)['groups']['near']['auroc_unknown_score'], '{:.2f}')}, "
                          f"{_spread(_dv(r, v)['groups']['far']['auroc_unknown_score'], '{:.2f}')}"
                          for v in DET_VARIANTS), "same"),
    ("same: detections published as `unknown`, of unknown objects (all kinds), of known objects",
     lambda r: " / ".join(f"{_spread(_dv(r, v)['groups']['all']['published_unknown'], '{:.0%}')}, "
                          f"{_spread(_dv(r, v)['known_published_unknown'], '{:.0%}')}" for v in DET_VARIANTS),
     "same"),
    ("same, on the device: decode + NMS + unknown score per test frame (median), and over decoding without the "
     "unknown rule; invoke with the density's output over without it (the unknown score adds no op)",
     lambda r: f"{r['detection'].device_cost['decode_ms_median']['with_unknown']:.2f} ms, "
               f"{r['detection'].device_cost['decode_with_over_without']:.2f}x; "
               f"{r['detection'].device_cost['density_over_no_density']:.3f}x", "same"),
    ("device decode + NMS, 12x12 grid, K=32, 100 candidates (median / p95)",
     lambda r: f"{r['detection_decode'].cases['grid12_cand100']['median_ms']:.2f} / "
               f"{r['detection_decode'].cases['grid12_cand100']['p95_ms']:.2f} ms",
     "`python benchmarks/detection_decode.py`"),
    ("the demo from a fresh clone (`bash scripts/demo.sh`, the install into .venv included): wall time (of it, install)",
     lambda r: f"{r['demo'].wall_seconds / 60:.1f} min ({r['demo'].install_seconds / 60:.1f} min)",
     "`python benchmarks/demo.py`"),
    # the demo's mAP and unknown-object AUROC are scored on the scenes its convert --val calibrated on (demo.json's
    # "validation"), so README quotes neither; the clip and the classifier's folder are data convert never saw
    ("the demo clip: frames where the never-seen bag is detected / published as unknown / flagged for any "
     "reason, of frames it is in",
     lambda r: f"{r['demo'].unknown['frames_detected']} / {r['demo'].unknown.get('frames_published_unknown', '-')} / "
               f"{r['demo'].unknown['frames_flagged']} of {r['demo'].unknown['frames_present']}", "same"),
    ("the demo clip: detections of known items flagged for review (published as unknown)",
     lambda r: f"{r['demo'].known['flagged']} ({r['demo'].known.get('published_unknown', '-')}) of "
               f"{r['demo'].known['detections']}", "same"),
    ("the demo's classifier: images flagged unfamiliar (flagged for any reason)",
     lambda r: ", ".join(f"{v['unfamiliar']} ({v['flagged']}) of {v['images']} {kind}"
                         for kind, v in r["demo"].classifier.items()), "same"),
]


def _lat(latency: dict, threads: str) -> str:
    t = latency[threads]
    return f"{t['float32_median_ms']:.2f} / {t['int8_median_ms']:.2f} ms = {t['float32_over_int8']:.2f}x"


def _pipe(t: dict) -> str:
    return f"{t['pipeline_fps']:.0f} / {t['raw_invoke_fps']:.0f} fps = {t['ratio']:.2f}x"


def _auto(r: R) -> str:
    return r.auto_layout["chose"]


def _bayes_latency(r: R) -> str:
    t = r.latency_trained[_auto(r)]
    return (f"{t['median_ms']['bayes_one_pass']:.3f} / {t['median_ms']['deterministic']:.3f} ms = "
            f"{t['ratio_vs_deterministic']:.2f}x ({_auto(r)} layout)")


def _k_passes(r: R) -> str:
    t = r.latency_trained[_auto(r)]
    return (f"{t['median_ms']['bayes_one_pass']:.2f} / {t['median_ms']['deterministic_x32']:.1f} ms: "
            f"{t['speedup_vs_k_passes']:.1f}x faster")


def _bayes_q(r: R, key: str, fmt: str) -> str:
    q = r.quality[_auto(r)]
    return f"{fmt.format(q['int8'][key])} int8 vs {fmt.format(q['float'][key])} float"


def environment_rows(res: dict[str, R]) -> list[str]:
    """Where each results file was measured: CPU and flags, runtime versions, commit and date."""
    lines = ["| results file | CPU (cores; SIMD flags) | LiteRT / TensorFlow | commit, date |", "|---|---|---|---|"]
    for name, r in res.items():
        env = r.get("environment")
        if not env:
            lines.append(f"| {name}.json | not recorded | | |")
            continue
        pk = env["packages"]
        lines.append(f"| {name}.json | {env['cpu']} ({env['cores']}; {' '.join(env['cpu_flags'])}) | "
                     f"{pk.get('ai-edge-litert', '-')} / {pk.get('tensorflow-cpu', pk.get('tensorflow', '-'))} | "
                     f"{env['commit']}, {env['date'][:10]} |")
    return lines


def render_table(rows: list[Row], res: dict[str, R]) -> str:
    lines = ["| figure | value | command |", "|---|---|---|"]
    for label, value, command in rows:
        try:
            text = value(res)
        except KeyError as exc:  # a row of a withdrawn results file, and only that
            if exc.args[0] not in PENDING or exc.args[0] in res:
                raise
            text = _pending(res, exc.args[0], str, True)
        lines.append(f"| {label} | {text} | {command} |")
    return "\n".join(lines)


# the outlier-exposure variant ("oe") joins when its three seeds are trained (docs/detection.md)
DET_VARIANTS = ("plain",)
DET_KINDS = {"bag": "bag (near)", "sandal": "sandal (near)", "digit": "digits (far)", "photo": "photo crops (far)"}


def _dv(r: dict[str, R], variant: str) -> dict:
    """detection.json's figures of one training variant, over its seeds."""
    return r["detection"]["variants"][variant]["mean"]


def _ci(r: dict[str, R], variant: str, kind: str) -> str:
    """The outermost bootstrap 95% interval of a kind's unknown-score AUROC over the seeds."""
    seeds = r["detection"]["variants"][variant]["seeds"].values()
    ci = [s["kinds"][kind]["auroc_unknown_score_ci95"] for s in seeds if "auroc_unknown_score_ci95" in s["kinds"].get(kind, {})]
    return f"{min(c[0] for c in ci):.2f}-{max(c[1] for c in ci):.2f}" if ci else "-"


def _det_rows() -> list[tuple[str, Callable[[dict[str, R], str], str]]]:
    rows: list[tuple[str, Callable[[dict[str, R], str], str]]] = [
        ("mAP@0.5 of the known classes, int8 / float32",
         lambda r, v: f"{_spread(_dv(r, v)['map50_int8'])} / {_spread(_dv(r, v)['map50_float32'])}"),
        ("mAP@[.5:.95], int8", lambda r, v: _spread(_dv(r, v)["map_int8"])),
        ("label accuracy of detections of known objects", lambda r, v: _spread(_dv(r, v)["label_accuracy_known"])),
        ("known objects found (IoU >= 0.5)", lambda r, v: _spread(_dv(r, v)["known_found_rate"], "{:.2f}")),
        ("detections of known objects published as `unknown`",
         lambda r, v: _spread(_dv(r, v)["known_published_unknown"], "{:.1%}")),
        ("detections per empty scene (background and clutter, no object)",
         lambda r, v: _spread(_dv(r, v)["empty_per_scene"], "{:.2f}")),
    ]
    for kind, label in DET_KINDS.items():
        rows += [
            (f"{label}: objects found at all",
             lambda r, v, k=kind: _spread(_dv(r, v)["kinds"][k]["found_rate"], "{:.2f}")),
            (f"{label}: its detections published as `unknown`",
             lambda r, v, k=kind: _spread(_dv(r, v)["kinds"][k]["published_unknown"], "{:.0%}")),
            (f"{label}: AUROC of the unknown score against known detections (bootstrap 95% interval, the widest "
             "of the seeds)",
             lambda r, v, k=kind: f"{_spread(_dv(r, v)['kinds'][k]['auroc_unknown_score'], '{:.2f}')}; "
                                  f"CI {_ci(r, v, k)}"),
        ]
    rows.append(("unknown score AUROC, float32 less int8, mean over the kinds and seeds",
                 lambda r, v: "{:+.3f}".format(sum(_dv(r, v)["kinds"][k]["auroc_float_minus_int8"]["mean"]
                                                   for k in DET_KINDS) / len(DET_KINDS))))
    return rows


def _detection(res: dict[str, R]) -> str:
    """docs/detection.md: the detection benchmark's figures, each training variant over its seeds."""
    d = res["detection"]
    heads = [d["variants"][v]["description"] for v in DET_VARIANTS]
    lines = [f"| test scenes, int8 unless said; mean (range) over seeds {', '.join(d['variants']['plain']['seeds'])} "
             f"| {' | '.join(heads)} |", "|---" * (len(heads) + 1) + "|"]
    for label, value in _det_rows():
        lines.append(f"| {label} | {' | '.join(value(res, v) for v in DET_VARIANTS)} |")
    return "\n".join(lines)


DET_MEASURES = {"unknown_score": "the unknown score (published)", "class_doubt": "class doubt (-log max p)",
                "energy": "energy", "mutual_information": "mutual information", "unfamiliarity": "unfamiliarity",
                "objectness_doubt": "objectness doubt (-log objectness)", "one_minus_score": "1 - detection score"}


def _detection_measures(res: dict[str, R]) -> str:
    """docs/uncertainty.md: each measure's AUROC per kind of unknown object, int8, per training variant."""
    lines = ["| AUROC, unknown vs known detections, int8, mean over three seeds | " +
             " | ".join(f"{DET_KINDS[k]}" for k in DET_KINDS) + " |", "|---" * (len(DET_KINDS) + 1) + "|"]
    for v in DET_VARIANTS:
        kinds = _dv(res, v)["kinds"]
        for m, label in DET_MEASURES.items():
            cells = [kinds[k]["auroc_unknown_score"] if m == "unknown_score" else kinds[k]["auroc_by_measure"][m]
                     for k in DET_KINDS]
            lines.append(f"| {label}, {res['detection']['variants'][v]['description']} | " +
                         " | ".join("-" if c["mean"] is None else f"{c['mean']:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def _detection_rules(res: dict[str, R]) -> str:
    """docs/detection.md: the candidate unknown-score rules on the select scenes (where the default was chosen)
    and on the eval scenes, for the detectors trained without outlier objects (the select scenes' unknowns)."""
    rules = _dv(res, "plain")["rules"]
    t = next(iter(res["detection"]["variants"]["plain"]["seeds"].values()))["thresholds"]
    shipped = f"{'+'.join(t['unknown_measures'])}, {t['unknown_combine']}"  # what the benchmark's bundles use

    def cell(v: dict) -> str:
        return f"{v['auroc']['mean']:.3f} ({v['unknown_flagged']['mean']:.0%})"

    lines = ["| rule (percentiles among the known detections of the calib scenes), mean of the seeds | select "
             "scenes: outlier objects | eval: near | eval: far |", "|---|---|---|---|"]
    for name, v in rules.items():
        label = f"**{name}** (the default)" if name == shipped else name
        lines.append(f"| {label} | {cell(v['select'])} | {cell(v['eval_near'])} | {cell(v['eval_far'])} |")
    return "\n".join(lines)


def _detection_cost(res: dict[str, R]) -> str:
    """docs/detection.md: the device's cost of the unknown score and of the Bayesian head (one model, interleaved)."""
    c = res["detection"]["device_cost"]
    t, dm, dp = c["invoke_ms_median"], c["decode_ms_median"], c["decode_ms_p95"]
    rows = [
        ("invoke, int8 / float32 (LiteRT, XNNPACK, 1 thread, interleaved, median)",
         f"{t['int8']:.3f} / {t['float32']:.3f} ms = {c['float32_over_int8']:.2f}x"),
        ("K=32 Bayesian class head vs the posterior-mean head (int8, no density output)",
         f"{t['int8_no_density']:.3f} vs {t['int8_mean_head']:.3f} ms = {c['mc_head_over_mean_head']:.3f}x"),
        ("the unfamiliarity output (int8 with vs without it)",
         f"{t['int8']:.3f} vs {t['int8_no_density']:.3f} ms = {c['density_over_no_density']:.3f}x"),
        ("decode + NMS + measures per test frame, with the unknown rule / without (median; p95)",
         f"{dm['with_unknown']:.2f} / {dm['without']:.2f} ms ({dp['with_unknown']:.2f} / {dp['without']:.2f}) = "
         f"{c['decode_with_over_without']:.2f}x"),
        ("model size int8 / float32", f"{c['sizes']['int8'] / 1e3:.0f} / {c['sizes']['float32'] / 1e3:.0f} KB"),
    ]
    return "\n".join([f"| device cost ({c['model']}) | value |", "|---|---|"] +
                     [f"| {a} | {b} |" for a, b in rows])


DECODE = [(f"{c['grid']}x{c['grid']} grid, {c['cells_above_threshold']} cells above the threshold", key)
          for key, c in json.loads((RESULTS / "detection_decode.json").read_text())["cases"].items()]


def _decode(res: dict[str, R]) -> str:
    lines = ["| case | median | p95 | detections after NMS |", "|---|---|---|---|"]
    for label, key in DECODE:
        c = res["detection_decode"].cases[key]
        lines.append(f"| {label} | {c['median_ms']:.2f} ms | {c['p95_ms']:.2f} ms | {c['mean_detections_after_nms']} |")
    return "\n".join(lines)


def _bayes_rows(res: dict[str, R]) -> str:
    if "bayes_head" not in res:
        return _pending(res, "bayes_head", str).capitalize() + "."
    r = res["bayes_head"]
    lines = ["| layout | figure | float BNN | int8 QBNN |", "|---|---|---|---|"]
    for layout, q in r.quality.items():
        for key, label, fmt in (("top1", "top-1", "{:.4f}"), ("ece", "ECE (15 bins)", "{:.4f}"),
                                ("auroc_mi", "AUROC MNIST digits, mutual information", "{:.3f}"),
                                ("auroc_predictive_entropy", "AUROC MNIST digits, predictive entropy", "{:.3f}")):
            lines.append(f"| {layout} | {label} | {fmt.format(q['float'][key])} | {fmt.format(q['int8'][key])} |")
        lines.append(f"| {layout} | per-image MI correlation float vs int8 | | {q['mi_correlation']:.3f} |")
    for layout, t in r.latency_trained.items():
        lines.append(f"| {layout} | invoke, K=32 one pass vs dense head (0.35/96, median) | | "
                     f"{t['median_ms']['bayes_one_pass']:.3f} vs {t['median_ms']['deterministic']:.3f} ms = "
                     f"{t['ratio_vs_deterministic']:.3f}x |")
        lines.append(f"| {layout} | one K=32 pass vs 32 deterministic passes | | {t['speedup_vs_k_passes']:.1f}x faster |")
    for layout in ("centred", "stacked"):
        t = r.latency_224[layout]
        lines.append(f"| {layout} | invoke vs dense head, MobileNetV2 1.0/224 (median) | | "
                     f"{t['ratio_vs_deterministic']:.3f}x |")
    return "\n".join(lines)


def _accuracy(res: dict[str, R]) -> str:
    if "accuracy_aware" not in res:
        return _pending(res, "accuracy_aware", str).capitalize() + "."
    h = res["accuracy_aware"].hard_model
    lines = ["| outlier-channel model | float top-1 | int8 top-1 | drop (points) | float layers | size | latency |",
             "|---|---|---|---|---|---|---|"]
    for name, v in h["variants"].items():
        lines.append(f"| {name.replace('_', ' ')} | {v['float_top1']:.4f} | {v['int8_top1']:.4f} | {v['drop_points']:g} | "
                     f"{len(v['float_layers'])} | {v['size_vs_plain']:.2f}x | {v['latency_vs_plain']:.2f}x |")
    m = res["accuracy_aware"].mobilenet_v2_bias_correction
    lines += ["", "| MobileNetV2 0.35/96, training seed | float top-1 | int8 plain | bias-corrected | equalised | "
              "QAT, 2 epochs | QAT vs the best PTQ |", "|---|---|---|---|---|---|---|"]
    for seed, v in m["seeds"].items():
        lines.append(f"| {seed} | {v['float_top1']:.4f} | {v['int8_top1_without']:.4f} | {v['int8_top1_with']:.4f} | "
                     f"{v['int8_top1_equalized']:.4f} | {v['int8_top1_qat']:.4f} | "
                     f"{v['qat_vs_best_ptq_points']:+g} points |")
    return "\n".join(lines)


def _clustering(res: dict[str, R]) -> str:
    c = res["clustering"].variants
    lines = ["| MobileNetV2 1.0/224, random weights | bundle / float32 `.tflite` | max distinct int8 values per channel |",
             "|---|---|---|"]
    for name, v in c.items():
        lines.append(f"| {name.replace('_', ' ')} | {v['bundle_over_float32']:.3f} | {v.get('max_distinct_per_channel', '-')} |")
    if "clustering_quality" not in res:
        return "\n".join(lines + ["", "Quality on a trained model: " + _pending(res, "clustering_quality", str) + "."])
    q = res["clustering_quality"]
    lines += ["", "| Fashion-MNIST model | variant | bundle / f32 | top-1 | ECE | OOD AUROC (MNIST digits) | latency vs int8 |",
              "|---|---|---|---|---|---|---|"]
    for family, fam in q.families.items():
        for name, v in fam["variants"].items():
            ratio = (v.get("delta_vs_int8") or {}).get("latency_ratio", 1.0)
            lines.append(f"| {family} | {v['variant']} ({name}) | {v['bundle_over_float32']:.3f} | {v['top1']:.4f} | "
                         f"{v['ece']:.4f} | {fam['ood_measure'].replace('_', ' ')} {v['ood_auroc'][fam['ood_measure']]:.3f} | "
                         f"{ratio:.2f}x |")
    lo = q.load_ms
    lines += ["", f"Load (read, rebuild, sha256, interpreter), packed per-channel vs plain int8: {lo['packed']:.1f} vs "
              f"{lo['plain']:.1f} ms (median of {lo['loads']})."]
    return "\n".join(lines)


KINDS = {"digits": "MNIST digits", "held_out": "the 2 held-out classes (bag, sandal)", "photos": "photo crops"}


def _spread(v: dict, fmt: str = "{:.3f}") -> str:
    """A figure measured once per training seed: its mean and (range)."""
    return f"{fmt.format(v['mean'])} ({fmt.format(v['min'])}-{fmt.format(v['max'])})"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _amb(r: dict[str, R], measure: str, key: str, fmt: str) -> str:
    """One figure of unknowns.json's ambiguity block, int8, mean over the training seeds."""
    return fmt.format(r["unknowns"].mean["ambiguity"][measure][key]["mean"])


def _unknowns(res: dict[str, R]) -> str:
    """docs/uncertainty.md: every measure, float vs int8, per kind of unknown input, over the training seeds; the
    rule's flags; the ambiguity measures; the alternatives; the cost."""
    if "unknowns" not in res:
        return _pending(res, "unknowns", str).capitalize() + "."
    r = res["unknowns"]
    t, mean, seeds = r.targets, r.mean, list(r.seeds.values())
    first = next(iter(r.seeds))
    lines = [f"| unknown input | measure | AUROC float, mean | AUROC int8, mean (range over {len(seeds)} seeds) | "
             f"int8, seed {first}: 95% bootstrap interval | FPR at 95% TPR, int8, mean | target (int8 AUROC) |",
             "|---|---|---|---|---|---|---|"]
    for kind, v in mean["ood"].items():
        for m, q in v["quantized"]["auroc"].items():
            target = f">= {t['auroc_int8'][kind]}" if m == "unfamiliarity" else ""
            ci = seeds[0]["ood"][kind]["quantized"].get("auroc_ci95", {}).get(m)
            fpr = _mean([s["ood"][kind]["quantized"]["fpr_at_95_tpr"][m] for s in seeds])
            lines.append(f"| {KINDS[kind]} | {m.replace('_', ' ')} | {v['reference']['auroc'][m]['mean']:.3f} | "
                         f"{_spread(q)} | {f'{ci[0]:.3f}-{ci[1]:.3f}' if ci else ''} | {fpr:.3f} | {target} |")
    lines += ["", f"The photo crops are {r.data['ood_each']} crops of {r.data['photographs']} photographs; their "
              "interval resamples photographs, not crops."]

    def flags(pick) -> tuple[float, float, float]:
        return tuple(_mean([pick(s)[k] for s in seeds]) for k in ("flagged", "unfamiliar", "ambiguous"))

    lines += ["", "| `needs_review` with the defaults, int8 (float), mean over the seeds | flagged | unfamiliar | "
              "ambiguous |", "|---|---|---|---|"]
    fi = flags(lambda s: s["in_distribution"]["quantized"]["flagged"])
    ff = flags(lambda s: s["in_distribution"]["reference"]["flagged"])
    lines.append(f"| in-distribution test images (target <= {t['flag_in_distribution_max']:.0%}) | {fi[0]:.1%} "
                 f"({ff[0]:.1%}) | {fi[1]:.1%} | {fi[2]:.1%} |")
    for kind in mean["ood"]:
        q = flags(lambda s: s["ood"][kind]["quantized"]["flagged_ood"])
        f = flags(lambda s: s["ood"][kind]["reference"]["flagged_ood"])
        goal = f" (target >= {t['flag_digits_min']:.0%})" if kind == "digits" else ""
        lines.append(f"| {KINDS[kind]}{goal} | {q[0]:.1%} ({f[0]:.1%}) | {q[1]:.1%} | {q[2]:.1%} |")
    ind = mean["in_distribution"]["quantized"]
    gain = 100 * (ind["accuracy_unflagged"]["mean"] - ind["accuracy_all"]["mean"])
    lines += ["", f"Accuracy of the in-distribution results left unflagged vs all, int8, mean: "
              f"{_spread(ind['accuracy_unflagged'], '{:.4f}')} vs {_spread(ind['accuracy_all'], '{:.4f}')}, "
              f"{gain:+.1f} points (target +{t['unflagged_accuracy_gain_points']}); top-1 "
              f"{_spread(ind['top1'], '{:.4f}')}; the rule's ambiguous part rests on "
              f"{seeds[0]['review_rule']['measure'].replace('_', ' ')}."]
    amb = seeds[0]["ambiguity"]
    lines += ["", f"| ambiguity measure, in-distribution test images, int8 | AUROC, wrong vs right results, mean (range) "
              f"| accuracy kept when the {amb['budget']:.0%} most ambiguous (threshold read on --val) are set aside, "
              "mean |", "|---|---|---|"]
    for m, v in mean["ambiguity"].items():
        lines.append(f"| {m.replace('_', ' ')} | {_spread(v['error_auroc'])} | {v['accuracy_kept']['mean']:.4f} |")
    lines.append(f"| (all results) | | {_mean([s['ambiguity']['accuracy_all'] for s in seeds]):.4f} |")
    alt = r.alternatives["float_features"]
    names = list(next(iter(alt.values())))
    lines += ["", f"| alternative, float features of seed {first}'s model, on the selection sets (AUROC) | " +
              " | ".join(KINDS[k] for k in alt) + " |", "|---|" + "---|" * len(alt)]
    for n in names:
        lines.append(f"| {n.replace('_', ' ')} | " + " | ".join(f"{alt[k][n]:.3f}" for k in alt) + " |")
    lines += ["", f"The shipped measure is the Mahalanobis distance on the taps at rank {r.density['rank']}; the "
              "selection sets are other digits, other held-out items and other crops than the reported ones."]
    c = r.cost
    lines += ["", f"Cost against the same model converted with `--density off`: invoke {c['invoke_median_ms']['with_density']:.4f} "
              f"vs {c['invoke_median_ms']['without']:.4f} ms = {c['latency_ratio']:.3f}x (target <= {t['latency_ratio']}x; "
              f"interleaved, 1 thread, XNNPACK {'whole graph' if c['runtime']['whole_graph'] else 'partial'}); with the "
              f"device's numpy finish after each invoke ({c['density_finish_median_ms']:.4f} ms: read the projection, "
              f"unfamiliarity and disagreement) {c['invoke_plus_finish_ratio']:.3f}x; peak RSS of "
              f"`edgeq run` {c['rss_peak_mb']['with_density']:.1f} vs {c['rss_peak_mb']['without']:.1f} MB "
              f"({c['rss_extra_mb']:+.1f} MB); bundle {c['bundle_bytes']['with_density'] / 1e3:.0f} vs "
              f"{c['bundle_bytes']['without'] / 1e3:.0f} KB."]
    return "\n".join(lines)


def _bayes_mi(res: dict[str, R]) -> str:
    """docs/bayesian.md: Bayesian heads trained one change at a time, and what their MI catches."""
    if "bayes_mi" not in res:
        return _pending(res, "bayes_mi", str).capitalize() + "."
    r = res["bayes_mi"]
    lines = ["| head | posterior sigma mean (p5-p95) | ELBO per sample | train acc. sampled / mean weights | "
             "corr(MI, feature norm) | MI AUROC digits / held-out / photos | vote disagreement AUROC, same | "
             "entropy AUROC, same |", "|---|---|---|---|---|---|---|---|"]

    def three(h: dict, key: str) -> str:
        return " / ".join(f"{h['ood_auroc'][k][key]:.3f}" for k in ("digits", "held_out", "photos"))

    for name, h in r.heads.items():
        lo, hi = h["posterior_sigma_p5_p95"]
        elbo = "-" if h["elbo"] is None else f"{h['elbo']:.4f}"
        lines.append(f"| {name.replace('_', ' ')} | {h['posterior_sigma_mean']:.4f} ({lo:.4f}-{hi:.4f}) | {elbo} | "
                     f"{h['train_accuracy_sampled']:.3f} / {h['train_accuracy_mean']:.3f} | "
                     f"{h['mi_vs_feature_norm_correlation']:.2f} | {three(h, 'mutual_information')} | "
                     f"{three(h, 'vote_disagreement')} | {three(h, 'predictive_entropy')} |")
    lines += ["", f"The prior width the ELBO prefers (empirical Bayes over the sweep): "
              f"{r.empirical_bayes_prior.replace('_', ' ')}. The feature norm itself as a score: AUROC "
              + " / ".join(f"{next(iter(r.heads.values()))['ood_auroc'][k]['feature_norm']:.3f}"
                           for k in ("digits", "held_out", "photos")) + "."]
    return "\n".join(lines)


def _fleet(res: dict[str, R]) -> str:
    f = res["fleet"]
    g, k, sizes = f["group_push"], f["fleet_10k"], f["message_sizes"]

    def size(kind: str) -> str:
        s = sizes.get(kind)
        return f"{s['mean_bytes']:.0f} B" if s else "-"

    rows = [
        ("devices (`edgeq run` processes) on one loopback mosquitto, 2 cores; results a second each (max_fps 5)",
         f"{f['devices']}; {f['detections_per_device_s']:.2f} (1-minute load average at start "
         f"{f['load_average_at_start'][0]:.1f})"),
        ("mean message size: detections (4 boxes) / stats / status / bundle/state",
         f"{size('detections')} / {size('stats')} / {size('status')} / {size('bundle/state')}"),
        (f"group push of a {g['bundle_bytes'] / 1e6:.2f} MB signed bundle: devices applied",
         f"{g['applied']} of {g['of']}"),
        ("seconds from the publish to the first / median / last device's `applied`",
         f"{g['seconds_to_first']} / {g['seconds_median']} / {g['seconds_to_all']}"),
        ("seq gaps / duplicates across the swap, all devices (results after it)",
         f"{g['seq_gaps']} / {g['seq_duplicates']} ({g['results_after_swap']})"),
        (f"{k['devices']:,} devices at 1 result/s, stats every 30 s: publishes/s (QoS 1 packets/s), inbound",
         f"{k['at_1_result_s']['publishes_per_s']:,} ({k['at_1_result_s']['qos1_packets_per_s']:,}), "
         f"{k['at_1_result_s']['inbound_mb_per_s']} MB/s"),
        ("same at 5 results/s",
         f"{k['at_5_results_s']['publishes_per_s']:,} ({k['at_5_results_s']['qos1_packets_per_s']:,}), "
         f"{k['at_5_results_s']['inbound_mb_per_s']} MB/s"),
        ("retained messages (status + bundle/state, without snapshots) and their size",
         f"{k['retained_messages']:,}, {k['retained_mb']} MB"),
        ("one group push of this bundle to all of them: broker fan-out", f"{k['group_push_fanout_gb']} GB"),
    ]
    lines = ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


TABLES: dict[str, tuple[str, Callable[[dict[str, R]], str]]] = {
    "bayes_mi": ("docs/bayesian.md", _bayes_mi),
    "unknowns": ("docs/uncertainty.md", _unknowns),
    "detection_measures": ("docs/uncertainty.md", _detection_measures),
    "readme": ("README.md", lambda res: render_table(README, res)),
    "environments": ("README.md", lambda res: "\n".join(environment_rows(res))),
    "detection": ("docs/detection.md", _detection),
    "detection_cost": ("docs/detection.md", _detection_cost),
    "detection_rules": ("docs/detection.md", _detection_rules),
    "decode": ("docs/detection.md", _decode),
    "bayesian": ("docs/bayesian.md", _bayes_rows),
    "accuracy": ("docs/accuracy.md", _accuracy),
    "clustering": ("docs/clustering.md", _clustering),
    "fleet": ("docs/fleet.md", _fleet),
}


# a figure in prose: <!--fig FILE:dotted.path FORMAT-->value<!--/fig-->, FILE a results file's name (a space in a
# key written as +), FORMAT a Python format spec (".2f", ",d", ".1%"; none: str); the markdown shows only the value
INLINE = re.compile(r"<!--fig (\w+):([\w.+-]+)(?: ([^ >]+))?-->(.*?)<!--/fig-->", re.S)
DOCS = ("README.md", "docs/*.md")


def inline_value(res: dict[str, R], name: str, path: str, spec: str | None) -> str:
    value: Any = res[name]
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key.replace("+", " ")]
    return format(value, spec) if spec else str(value)


def inline_figures(res: dict[str, R] | None = None) -> list[tuple[Path, str, str, str]]:
    """Every figure in prose: (file, marker, what the file says, what the results file says)."""
    res = results() if res is None else res
    out = []
    for pattern in DOCS:
        for path in sorted(ROOT.glob(pattern)):
            for m in INLINE.finditer(path.read_text()):
                out.append((path, m.group(0), m.group(4), inline_value(res, m.group(1), m.group(2), m.group(3))))
    return out


def write_inline(path: Path, res: dict[str, R]) -> str:
    """``path``'s text with every prose figure rendered again from the results."""
    return INLINE.sub(lambda m: f"<!--fig {m.group(1)}:{m.group(2)}{' ' + m.group(3) if m.group(3) else ''}-->"
                      f"{inline_value(res, m.group(1), m.group(2), m.group(3))}<!--/fig-->", path.read_text())


def blocks(res: dict[str, R] | None = None) -> dict[str, tuple[Path, str]]:
    """Every table: its file and its rendered markdown."""
    res = results() if res is None else res
    return {name: (ROOT / file, render(res)) for name, (file, render) in TABLES.items()}


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
    if start not in text or end not in text:
        raise KeyError(f"no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def current_block(text: str, name: str) -> str:
    start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def main(argv: list[str]) -> int:
    for name, (path, body) in blocks().items():
        if "--write" in argv:
            path.write_text(replace_block(path.read_text(), name, body))
            print(f"wrote {name} in {path.relative_to(ROOT)}")
        else:
            print(f"## {name} ({path.relative_to(ROOT)})\n{body}\n")
    res = results()
    for pattern in DOCS:
        for path in sorted(ROOT.glob(pattern)):
            if "--write" in argv and INLINE.search(path.read_text()):
                path.write_text(write_inline(path, res))
                print(f"wrote the prose figures of {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
