"""``edgeq inspect BUNDLE``: manifest summary, ops with their tensor dtypes, and sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgeq.bundle import read_bundle
from edgeq.runtime import weight_stats


def inspect_bundle(path: str | Path) -> dict[str, Any]:
    bundle = read_bundle(path)
    m = bundle.manifest
    model = bundle.load_model()
    ops = Counter(
        (op.name, "/".join(op.operand_types) or "-", "/".join(op.result_types) or "-", op.delegated) for op in model.ops
    )
    sizes = dict(m.get("sizes", {}))
    sizes["model_tflite"] = len(bundle.model_bytes)
    sizes["bundle_file"] = bundle.file_size
    return {
        "bundle": str(path),
        "name": bundle.name,
        "task": bundle.task,
        "labels": bundle.labels,
        "schema_version": m["schema_version"],
        "edgeq_version": m["edgeq_version"],
        "created": m["created"],
        "sha256": bundle.sha256,
        "input": m["input"],
        "outputs": m["outputs"],
        "head": m.get("head"),
        "quantization": m["quantization"],
        "calibration": m["calibration"],
        "validation": m.get("validation"),
        "sizes": sizes,
        "runtime": model.describe(),
        "clustering": m.get("clustering"),
        "detector": m.get("detector"),
        "kernels": weight_stats(model),
        "ops": [
            {"op": name, "operands": operands, "results": results, "count": n, "xnnpack": delegated}
            for (name, operands, results, delegated), n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0][0]))
        ],
    }


def format_inspect(info: dict[str, Any]) -> str:
    inp, q, cal, sizes, rt = info["input"], info["quantization"], info["calibration"], info["sizes"], info["runtime"]
    labels = info["labels"]
    lines = [
        f"bundle       {info['bundle']}  (schema {info['schema_version']}, edgeq {info['edgeq_version']}, {info['created']})",
        f"model        {info['name']}  sha256 {info['sha256'][:16]}...",
        f"task         {info['task']}, {len(labels)} labels: {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}",
        f"input        {inp['height']}x{inp['width']}x{inp['channels']} {inp['color_order']} {inp['resize']}, "
        f"(p - {inp['mean'][0]:g}) / {inp['std'][0]:g}, {inp['dtype']} scale {inp['scale']:.6g} zero point {inp['zero_point']}",
    ]
    for o in info["outputs"]:
        lines.append(
            f"output       {o.get('role', '')} {o['name']} {o['shape']} {o['dtype']} scale {o['scale']:.6g} zero point {o['zero_point']}"
        )
    lines.append(
        f"quantization {q['scheme']}: weights {q['weights']}, activations {q['activations']}"
        + (f", float ops: {', '.join(q['float_ops'])}" if q.get("float_ops") else "")
    )
    lines.append(f"calibration  {cal.get('count')} samples from {cal.get('source')}")
    lines.extend(format_head(info.get("head") or {}))
    size_parts = [f"model.tflite {sizes['model_tflite'] / 1e6:.3f} MB", f"bundle {sizes['bundle_file'] / 1e6:.3f} MB"]
    if sizes.get("float32_tflite"):
        size_parts.append(f"float32 .tflite {sizes['float32_tflite'] / 1e6:.3f} MB")
        size_parts.append(f"model/float32 {sizes['model_tflite'] / sizes['float32_tflite']:.3f}x")
    lines.append("sizes        " + ", ".join(size_parts))
    xnn = "whole graph" if rt["whole_graph"] else (
        f"{rt['delegated_ops']}/{rt['total_ops']} ops, left: {', '.join(rt['cpu_ops'])}" if rt["xnnpack_applied"] else "not applied"
    )
    lines.append(f"runtime      {rt['runtime']} {rt['runtime_version']}, {rt['threads']} thread(s), XNNPACK: {xnn}")
    det = info.get("detector")
    if det:
        cal = det.get("score_threshold_calibration")
        lines.append(f"detector     grid {det['grid'][0]}x{det['grid'][1]} at stride {det['stride']}, score >= "
                     f"{det['score_threshold']:.3g}" + (f" (F1 {cal['f1']:.3f} on validation)" if cal else "")
                     + f", NMS IoU {det['nms_iou']:g}, COCO category ids {det.get('category_ids')}")
    if info.get("validation") and det:
        v = info["validation"]
        f, q = v["float"], v["quantized"]
        au = lambda m: (m.get("unknown_auroc") or {}).get("mutual_information")  # noqa: E731
        fmt = lambda a: "-" if a is None else f"{a:.4f}"  # noqa: E731
        lines.append(f"validation   {v['images']} images: mAP@0.5 float {f['map50']:.4f}, int8 {q['map50']:.4f}; "
                     f"mAP@[.5:.95] {f['map']:.4f} / {q['map']:.4f}; AUROC unknown (MI) {fmt(au(f))} / {fmt(au(q))}")
    elif info.get("validation"):
        v = info["validation"]
        lines.append(
            f"validation   {v['count']} images: float top-1 {v['float_top1']:.4f}, quantized {v['quantized_top1']:.4f}, "
            f"agreement {v['top1_agreement']:.4f}, mean |logit error| {v['mean_abs_logit_error']:.4f}"
        )
    if info.get("clustering"):
        c = info["clustering"]
        lines.append(f"clustering   {c['clustered']} kernels to {c['clusters']} shared values "
                     f"({'per channel' if c['per_channel'] else 'per tensor'}, {c['init']}), "
                     f"{c['clustered_weights'] / max(c['all_weights'], 1):.0%} of the weights; shipped int8 kernels: "
                     f"at most {c['shipped']['max_distinct_per_channel']} distinct values per channel")
        post = c.get("posterior") or {}
        if post.get("codewords"):
            lines.append(f"posterior    {post['layer']}: {post['weights']:,} (mu, sigma) pairs vector-quantised to "
                         f"{post['codewords']} codewords (relative error mu {post['relative_rmse_mu']:.3f}, sigma "
                         f"{post['relative_rmse_sigma']:.3f}); the {(info.get('head') or {}).get('samples', 'K')} samples "
                         "are drawn from it")
    kernels = info.get("kernels") or []
    if kernels:
        lines.append("kernels      distinct int8 values per channel (max), per layer:")
        for k in kernels:
            lines.append(f"  {k['max_distinct_per_channel']:>4}  {k['op']:<17} {str(k['shape']):<18} {k['name'][-60:]}")
    lines.append("ops")
    width = max((len(o["op"]) for o in info["ops"]), default=2)
    for o in info["ops"]:
        lines.append(
            f"  {o['count']:>4} x {o['op']:<{width}}  {o['operands']} -> {o['results']}"
            + ("" if o["xnnpack"] else "  (not XNNPACK)")
        )
    return "\n".join(lines)


def format_head(head: dict[str, Any]) -> list[str]:
    """The head: its kind, the Monte-Carlo spread before and after quantisation, and the needs_review rule."""
    if not head:
        return []
    if head.get("type") == "bayes":
        out = [f"head         bayes: {head['samples']} posterior samples x {head['classes']} classes in one invoke "
               f"({head.get('layout')}, seed {head.get('seed')}, prior sigma {head.get('prior_sigma')}, "
               f"{head.get('head_macs', 0) / max(head.get('backbone_macs', 1), 1):.1%} of the backbone's MACs)"]
        sp = head.get("spread")
        if sp:
            out.append(f"             logit spread across samples: float {sp['float']:.4f}, int8 {sp['quantized']:.4f} "
                       f"({sp['steps']} output steps), MI correlation float/int8 {sp['mutual_information_correlation']}")
        w = head.get("weights") or {}
        if w.get("per_channel") is not None:
            out.append(f"             sampled weights: per-channel {w['per_channel']}, max relative error "
                       f"{w['max_relative_error']:.4f}")
    else:
        out = [f"head         {head.get('type', 'dense')}: one softmax over {head.get('classes')} classes"]
    r = head.get("review")
    if r:
        rule = (f"{r['measure']} > {r['threshold']:.6g} (keeps {r['coverage']:.1%} of validation at accuracy "
                f"{r['kept_accuracy']:.4f}, target {r['target_accuracy']})" if r["reached"]
                else f"always (no threshold reached accuracy {r['target_accuracy']} on validation)")
        out.append(f"needs_review {rule}")
    else:
        out.append("needs_review not calibrated (convert with --val); set thresholds.review in the device config")
    return out
