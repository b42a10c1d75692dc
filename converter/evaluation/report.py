"""The ``edgeq eval --report`` page: one self-contained HTML file, its plots embedded as PNG data URIs.

Plots use matplotlib's Agg backend (no display). The page carries a few lines of script that count the images that
decoded, into ``data-images-loaded`` / ``data-images-total`` on ``<body>``, so a headless browser can check it.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import DataError

COLORS = {"reference": "#4c72b0", "quantized": "#dd8452"}
# what the device would say about a result, and the colour both reports draw it in ("unknown": a detection of none
# of the detector's classes; "none": the bundle has no review rule)
VERDICT_COLORS = {"trusted": "#1b8a3a", "review": "#e08a00", "unknown": "#b3261e", "none": "#8c8c8c"}
SAMPLES = 6  # sample images of --data and of --ood on the page
PALETTE = ("#55a868", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def _colors(names: list[str]) -> dict[str, str]:
    """Reference and the bundle keep their colours; --compare bundles take the palette in order."""
    extra = iter(PALETTE * (1 + len(names) // len(PALETTE)))
    return {n: COLORS.get(n) or next(extra) for n in names}


def check_report_dir(path: str | Path) -> Path:
    """Fail before the slow part when the report folder cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DataError(f"--report {p}: is a file; give a folder for report.html")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--report {p}: cannot create the folder ({exc.strerror or exc.__class__.__name__})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise DataError(f"--report {p}: folder is not writable")
    return p


def write_page(out: Path, title: str, body: str) -> Path:
    """``out/report.html``, written atomically: ``body`` (HTML) in the page shell with the image-count script."""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body>
{body}
<script>
window.addEventListener("load", function () {{
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute("data-images-loaded", ok);
  document.body.setAttribute("data-images-total", imgs.length);
}});
</script>
</body></html>
"""
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: dict[str, Any], runs: list[Any]) -> dict[str, str]:
    # over 60 lines: one short block per figure of the report
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    colors = _colors(list(models))
    images: dict[str, str] = {}

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        r = m["reliability"]
        centres = (np.array(r["edges"][:-1]) + np.array(r["edges"][1:])) / 2
        acc = [a if a is not None else 0.0 for a in r["accuracy"]]
        ax.bar(centres, acc, width=1 / len(centres), edgecolor="black", color=colors[name], alpha=0.8)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=f"{name}: ECE {m['ece']:.4f}", xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    images["reliability"] = _png(fig)

    measures = ["predictive_entropy"] + (["mutual_information"] if all(r.scored.summary.samples > 1 for r in runs) else [])
    fig, axes = plt.subplots(len(measures), len(runs), figsize=(4.2 * len(runs), 3.2 * len(measures)), squeeze=False)
    for j, run in enumerate(runs):
        for i, measure in enumerate(measures):
            ax = axes[i][j]
            values = run.scored.summary.measure(measure)
            bins = np.linspace(0, max(float(values.max()), 1e-6), 30)
            for mask, label, color in ((run.scored.correct, "correct", "#55a868"), (~run.scored.correct, "incorrect", "#c44e52")):
                if mask.any():
                    ax.hist(values[mask], bins=bins, density=True, alpha=0.6, label=label, color=color)
            ax.set(title=f"{run.name}: {measure.replace('_', ' ')}", xlabel="nats", ylabel="density")
            ax.legend()
    images["uncertainty"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for name, m in models.items():
        s = m["selective"]
        ax.plot(s["referral_rate"], s["accuracy"], marker="o", ms=3, label=name, color=colors[name])
    target = next(iter(models.values()))["target_accuracy"]
    ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target}")
    ax.set(xlabel="referral rate (most uncertain sent to a person)", ylabel="accuracy of the rest", xlim=(0, 1))
    ax.legend()
    images["referral"] = _png(fig)

    if all("ood_roc" in m for m in models.values()):
        names = list(dict.fromkeys(k for m in models.values() for k in m["ood_roc"]))  # every measure of any model
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
        for ax, measure in zip(axes[0], names):
            for name, m in models.items():
                if measure not in m["ood_roc"]:
                    continue
                c = m["ood_roc"][measure]
                ax.plot(c["fpr"], c["tpr"], label=f"{name} AUROC {m['ood_auroc'][measure]:.3f}", color=colors[name])
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set(title=measure.replace("_", " "), xlabel="false positive rate", ylabel="true positive rate")
            ax.legend(loc="lower right")
        images["ood_roc"] = _png(fig)
    layers = [r for r in report.get("layers") or [] if r.get("rmse_over_scale") is not None][:20]
    if layers:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(layers) + 1.2))
        names = [f"{r['op']} {r['layer'][-48:]}" for r in layers][::-1]
        ax.barh(names, [r["rmse_over_scale"] for r in layers][::-1], color=COLORS["quantized"])
        ax.axvline(1 / 12 ** 0.5, color="k", ls=":", lw=1, label="uniform rounding (0.29)")
        ax.set(xlabel="RMSE / quantisation step", title="worst layers (TFLite QuantizationDebugger)")
        ax.legend(loc="lower right")
        ax.tick_params(axis="y", labelsize=7)
        images["layers"] = _png(fig)
    return images


def rule_verdict(rule: dict[str, Any] | None, ambiguity: float | None, unfamiliarity: float | None) -> tuple[str, str]:
    """``(verdict, reason)`` of one result under the bundle's review rule, as the device decides it
    (edgeq.uncertainty.review): ``trusted``, ``review`` with its reason, or ``none`` when no rule applies."""
    from edgeq.uncertainty import review

    if not rule:
        return "none", ""
    v = review(ambiguity, rule.get("threshold"), unfamiliarity, rule.get("unfamiliar_threshold"))
    if v.flag is None:
        return "none", ""
    return ("review", v.reason or "") if v.flag else ("trusted", "")


def _verdicts(scored: Any, rule: dict[str, Any] | None) -> list[tuple[str, str]]:
    """:func:`rule_verdict` of each result of ``scored``."""
    ambiguity = scored.measure(rule["measure"]) if rule and rule.get("threshold") is not None else None
    return [rule_verdict(rule, None if ambiguity is None else float(ambiguity[i]),
                         None if scored.unfamiliarity is None else float(scored.unfamiliarity[i]))
            for i in range(len(scored.targets))]


def _thumbnail(path: Path) -> str:
    import cv2

    from edgeq.preprocess import read_image

    ok, png = cv2.imencode(".png", read_image(path))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii") if ok else ""


def _samples(report: dict[str, Any], run: Any) -> str:
    """Up to :data:`SAMPLES` images of --data (flagged ones first, up to half) and of --ood (in file order), each
    framed in the colour of the device's verdict and captioned with the top label, its probability and the reason
    for review. Each figure carries ``data-file`` and ``data-verdict`` for a browser test to check."""
    rule = report.get("review_rule")
    sets = [("data", run.scored, run.files or [])]
    if run.ood is not None:
        sets.append(("ood", run.ood, run.ood_files or []))
    parts = []
    for kind, scored, files in sets:
        verdicts = _verdicts(scored, rule)
        flagged = [i for i, (v, _) in enumerate(verdicts) if v == "review"]
        if kind == "data":
            pick = flagged[:SAMPLES // 2]
            pick += [i for i in range(len(files)) if i not in pick][:SAMPLES - len(pick)]
        else:
            pick = list(range(min(SAMPLES, len(files))))
        probs = scored.summary.mean
        cells = []
        for i in pick:
            verdict, reason = verdicts[i]
            top = int(probs[i].argmax())
            said = {"trusted": "trusted", "review": f"needs review: {reason}", "none": "no review rule"}[verdict]
            truth = f"true: {report['labels'][int(scored.targets[i])]}" if kind == "data" else "out of distribution"
            cells.append(
                f"<figure class='sample {verdict}' data-file='{html.escape(files[i].name)}' data-verdict='{verdict}' "
                f"style='display:inline-block;margin:4px;text-align:center;font-size:12px'>"
                f"<img alt='{html.escape(files[i].name)}' src='{_thumbnail(files[i])}' style='width:96px;height:96px;"
                f"image-rendering:pixelated;border:4px solid {VERDICT_COLORS[verdict]}'>"
                f"<figcaption>{html.escape(report['labels'][top])} {probs[i][top]:.2f}<br>{html.escape(said)}<br>"
                f"<small>{html.escape(truth)}</small></figcaption></figure>")
        title = "--data" if kind == "data" else "--ood"
        parts.append(f"<h3>{title}: {len(pick)} of {len(files)}</h3><div>{''.join(cells)}</div>")
    legend = ", ".join(f"<span style='color:{c}'>&#9632;</span> {n}" for n, c in
                       (("trusted", VERDICT_COLORS["trusted"]), ("needs review", VERDICT_COLORS["review"]),
                        ("no rule in the bundle", VERDICT_COLORS["none"])))
    return (f"<h2>Sample images ({html.escape(run.name)})</h2><p>What the device would publish for each: framed by "
            f"its verdict ({legend}); of --data, the flagged ones first (up to half).</p>" + "".join(parts))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def summary_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    models = report["models"]
    rows = [
        ("top-1 accuracy", "top1"), ("NLL", "nll"), ("Brier", "brier"), ("ECE (15 bins)", "ece"),
        ("UCE (15 bins)", "uce"), (f"referral for accuracy {next(iter(models.values()))['target_accuracy']}",
                                   "referral_at_target"),
        ("mean predictive entropy", "mean_predictive_entropy"), ("mean mutual information", "mean_mutual_information"),
    ]
    out = [(label, [_fmt(m.get(key)) for m in models.values()]) for label, key in rows]
    measures = sorted({k for m in models.values() for k in m.get("ood_auroc", {})})
    for measure in measures:
        out.append((f"OOD AUROC, {measure.replace('_', ' ')}", [_fmt(m.get("ood_auroc", {}).get(measure)) for m in models.values()]))
        out.append((f"OOD FPR at 95% TPR, {measure.replace('_', ' ')}",
                    [_fmt(m.get("ood_fpr_at_95_tpr", {}).get(measure)) for m in models.values()]))
    for where, label in (("in_distribution", "in-distribution"), ("ood", "OOD")):
        if any(where in (m.get("flagged") or {}) for m in models.values()):
            out.append((f"needs_review flags, {label}", [_fmt((m.get("flagged") or {}).get(where, {}).get("flagged"))
                                                         for m in models.values()]))
    if any("in_distribution" in (m.get("flagged") or {}) for m in models.values()):
        out.append(("accuracy of unflagged / all", [
            "-" if "in_distribution" not in (m.get("flagged") or {}) else
            f"{m['flagged']['in_distribution']['accuracy_unflagged'] or 0:.4f} / "
            f"{m['flagged']['in_distribution']['accuracy_all']:.4f}" for m in models.values()]))
    out.insert(0, ("variant", [html.escape(m.get("variant", "float reference")) for m in models.values()]))
    out.append(("model size (MB)", [f"{m['size_bytes'] / 1e6:.3f}" for m in models.values()]))
    out.append(("bundle file (MB)", [f"{m['bundle_bytes'] / 1e6:.3f}" if m.get("bundle_bytes") else "-"
                                     for m in models.values()]))
    out.append(("invoke latency, median (ms)", [f"{m['latency_ms_median']:.3f}" for m in models.values()]))
    out.append(("runtime", [html.escape(f"{m['runtime']['runtime']} {m['runtime']['runtime_version']}, XNNPACK "
                                        + ("whole graph" if m["runtime"]["whole_graph"] else
                                           f"{m['runtime']['delegated_ops']}/{m['runtime']['total_ops']} ops"))
                            for m in models.values()]))
    return out


def write_report(report: dict[str, Any], runs: list[Any], out_dir: str | Path) -> Path:
    out = check_report_dir(out_dir)
    images = _plots(report, runs)
    names = list(report["models"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{html.escape(label)}</td>{''.join(f'<td>{v}</td>' for v in values)}</tr>"
                   for label, values in summary_rows(report))
    agreement = report.get("agreement")
    agree = (f"<p>Top-1 agreement reference vs quantized: {agreement['top1_agreement']:.4f}</p>" if agreement else "")
    sections = [
        ("Reliability diagram", "reliability", "Accuracy per confidence bin; the dashed line is perfect calibration."),
        ("Uncertainty of correct and incorrect predictions", "uncertainty",
         "Density of each measure for correct (green) and incorrect (red) predictions, per model."),
        ("Accuracy vs referral rate", "referral",
         "Refer the most uncertain results to a person; the accuracy of those kept."),
        ("Out-of-distribution detection", "ood_roc", f"In-distribution {html.escape(report['data'])} vs "
                                                     f"{html.escape(str(report['ood']))}: ROC of each measure."),
    ]
    figures = "".join(
        f"<h2>{title}</h2><p>{text}</p><img alt='{key}' src='{images[key]}'>" for title, key, text in sections if key in images
    )
    if "ood_roc" not in images:
        figures += "<h2>Out-of-distribution detection</h2><p>Not measured: run edgeq eval with --ood DIR.</p>"
    if "layers" in images:
        figures += ("<h2>Per-layer quantisation error</h2><p>Each int8 layer's output against its float counterpart "
                    "on calibration images, in quantisation steps; 0.29 is what rounding alone gives.</p>"
                    f"<img alt='layers' src='{images['layers']}'>")
    else:
        figures += ("<h2>Per-layer quantisation error</h2><p>Not recorded for this bundle: convert it with "
                    "--layer-errors.</p>")
    bundle_run = next((r for r in runs if r.name == "quantized"), runs[-1])
    figures += _samples(report, bundle_run)
    page_body = f"""<h1>edgeq eval: {html.escape(report['name'])}</h1>
<p>Bundle {html.escape(report['bundle'])}; {report['count']} images from {html.escape(report['data'])}
({len(report['labels'])} classes){f"; {report['ood_count']} out-of-distribution images" if report['ood_count'] else ""}.
Uncertainty for referral: {html.escape(report['uncertainty_measure'].replace('_', ' '))}.</p>
<table><tr><th></th>{head}</tr>{body}</table>{agree}
{figures}
"""
    return write_page(out, f"edgeq eval: {report['name']}", page_body)
