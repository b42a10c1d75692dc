"""The ``edgeq eval --report`` page of a detection bundle: one self-contained HTML file.

Plots: sample frames with every detection drawn and coloured by its uncertainty (the review measure, one colour
scale for all models; ground truth dashed, unknown objects in magenta), ROC curves of each model's uncertainty for
telling detections of unknown objects from known ones, and a detection reliability diagram (precision per score
bin). Same page conventions as edgeq/report.py, including the image-count attributes a headless browser checks.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .detect import detection_rows, kept, match_all
from .report import VERDICT_COLORS, _colors, _png, check_report_dir, rule_verdict, write_page

SAMPLE_FRAMES = 6


# the measures the ROC plot can draw, in the order of the legend (a bundle publishes those it has)
ROC_MEASURES = ("unknown_score", "unfamiliarity", "one_minus_score", "mutual_information", "predictive_entropy")


def _verdict(d: Any, j: int, rule: dict[str, Any] | None) -> tuple[str, str]:
    """``trusted``, ``review`` or ``unknown`` for detection ``j``, and the reason, as the device decides it: label
    ``unknown`` from the unknown block, else the bundle's review rule (:func:`report.rule_verdict`; no rule:
    trusted)."""
    if d.unknown is not None and bool(d.unknown[j]):
        return "unknown", "unknown"
    if not rule:
        return "trusted", ""
    verdict, reason = rule_verdict(rule, float(d.measure(rule["measure"])[j]),
                                   None if d.unfamiliarity is None else float(d.unfamiliarity[j]))
    return ("trusted", "") if verdict == "none" else (verdict, reason)


def _frames_plot(report: dict[str, Any], runs: list[Any], coco: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    from edgeq.preprocess import read_image

    unknown = coco.unknown_category_ids
    rule = report.get("review_rule")
    # frames with an unknown object first: that is where the uncertainty has something to tell
    order = sorted(range(len(coco.images)), key=lambda i: -int(np.isin(
        coco.category_ids[coco.images[i]["id"]], list(unknown)).any()))[:SAMPLE_FRAMES]
    fig, axes = plt.subplots(len(runs), len(order), figsize=(2.6 * len(order), 2.8 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        for col, i in enumerate(order):
            ax = axes[row][col]
            im = coco.images[i]
            frame = read_image(coco.image_path(im))
            ax.imshow(frame[..., ::-1] if frame.ndim == 3 else frame, cmap=None if frame.ndim == 3 else "gray")
            for b, c in zip(coco.boxes[im["id"]], coco.category_ids[im["id"]]):
                ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, linestyle="--", lw=1,
                                       edgecolor="magenta" if int(c) in unknown else "white"))
            res = run.results[i]
            d = res.detections
            for j in np.flatnonzero(kept(d, report["score_threshold"], report.get("objectness_threshold"))):
                x0, y0, x1, y1 = res.boxes[j]
                verdict, _ = _verdict(d, j, rule)
                color = VERDICT_COLORS[verdict]
                label = report["labels"][int(d.classes[j])]
                text = f"unknown ({label}?)" if verdict == "unknown" else f"{label} {d.scores[j]:.2f}"
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, edgecolor=color))
                ax.text(x0, y0 - 1, text + (" !" if verdict == "review" else ""), fontsize=6, color="white",
                        backgroundcolor=color)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(run.name)
    fig.legend(handles=[Patch(color=VERDICT_COLORS["trusted"], label="trusted"),
                        Patch(color=VERDICT_COLORS["review"], label="needs_review (!)"),
                        Patch(color=VERDICT_COLORS["unknown"], label="published as unknown")],
               loc="lower center", ncol=3, fontsize=8)
    return _png(fig)


def _roc_plot(report: dict[str, Any], runs: list[Any], coco: Any) -> str | None:
    """One panel per model: the ROC of every measure it publishes for telling detections of unknown objects from
    known ones, the unknown score and unfamiliarity included."""
    import matplotlib.pyplot as plt

    matched = []
    for run in runs:
        m = match_all(run.results, coco, list(run.grid.spec.category_ids), report["score_threshold"],
                      report.get("objectness_threshold"))
        if m.known.any() and m.unknown.any():
            matched.append((run.name, m))
    if not matched:
        return None
    fig, axes = plt.subplots(1, len(matched), figsize=(4.6 * len(matched), 4.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], matched):
        measures = {**m.measures, "one_minus_score": 1.0 - m.scores}
        for measure in ROC_MEASURES:
            if measure not in measures:
                continue
            v = measures[measure]
            curve = metrics.roc_curve(v[m.known], v[m.unknown])
            ax.plot(curve["fpr"], curve["tpr"], label=f"{measure.replace('_', ' ')} "
                                                      f"({metrics.roc_auc(v[m.known], v[m.unknown]):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="#999")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("false positive rate (known objects flagged)")
        ax.set_ylabel("true positive rate (unknown objects flagged)")
        ax.legend(fontsize=7, title="AUROC", title_fontsize=7)
    return _png(fig)


def _reliability_plot(report: dict[str, Any], runs: list[Any], coco: Any) -> str:
    import matplotlib.pyplot as plt


    colors = _colors([r.name for r in runs])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    edges = np.linspace(0, 1, 11)
    for run in runs:
        m = match_all(run.results, coco, list(run.grid.spec.category_ids), report["score_threshold"])
        centres, precision = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (m.scores > lo) & (m.scores <= hi)
            if sel.any():
                centres.append(float(m.scores[sel].mean()))
                precision.append(float(m.correct[sel].mean()))
        ax.plot(centres, precision, "o-", color=colors[run.name], label=run.name)
    ax.plot([0, 1], [0, 1], "--", color="#999")
    ax.set_xlabel("score")
    ax.set_ylabel("precision (label and box right)")
    ax.legend(fontsize=8)
    return _png(fig)


def write_detection_report(report: dict[str, Any], runs: list[Any], coco: Any, out_dir: str | Path) -> Path:

    out = check_report_dir(out_dir)
    names = list(report["models"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{html.escape(label)}</td>{''.join(f'<td>{html.escape(v)}</td>' for v in values)}</tr>"
                   for label, values in detection_rows(report))
    frames = _frames_plot(report, runs, coco)
    roc = _roc_plot(report, runs, coco)
    reliability = _reliability_plot(report, runs, coco)
    measure = html.escape(report["uncertainty_measure"].replace("_", " "))
    roc_html = (f"<img alt='unknown_roc' src='{roc}'>" if roc else
                "<p>Not measured: the set has no detections of unknown objects (categories with supercategory "
                "'unknown'), or none of known ones.</p>")
    page_body = f"""<h1>edgeq eval: {html.escape(report['name'])} (detection)</h1>
<p>Bundle {html.escape(report['bundle'])}; {report['count']} images from {html.escape(report['data'])}
({len(report['labels'])} known classes). Detections at score &ge; {report['score_threshold']:g} are matched to
ground truth at IoU &ge; 0.5; mAP comes from pycocotools.</p>
<table><tr><th></th>{head}</tr>{body}</table>
<h2>What the device would say</h2>
<p>Each kept detection coloured as the device publishes it: trusted, needs_review under the bundle's rule (its {measure}
above the threshold, or unfamiliar; marked !), or label "unknown" (with the class it is nearest to). Dashed: ground truth,
magenta for objects of unknown classes. One row per model.</p><img alt='frames' src='{frames}'>
<h2>Unknown objects</h2><p>ROC of every measure the bundle publishes for telling detections of unknown objects
from known ones (AUROC in the legend; 0.5 is chance).</p>
{roc_html}
<h2>Detection reliability</h2><p>Precision per score bin; the dashed line is a calibrated score.</p>
<img alt='reliability' src='{reliability}'>
"""
    return write_page(out, f"edgeq eval: {report['name']}", page_body)
