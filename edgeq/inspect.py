"""``edgeq inspect BUNDLE``: manifest summary, ops with their tensor dtypes, and sizes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.bundle import read_bundle
from edgeq.density import ordinal
from edgeq.manifest import Head, Manifest
from edgeq.records import DetectValidation
from edgeq.runtime import weight_stats


@dataclass(frozen=True)
class Inspection:
    """A verified bundle's manifest, and what loading it here shows: sizes, runtime and XNNPACK, kernels, ops."""

    path: str
    manifest: Manifest
    sizes: dict[str, Any]
    runtime: dict[str, Any]
    kernels: list[dict[str, Any]]
    ops: list[dict[str, Any]]
    signer: str | None = None  # the key id of the verified signature (edgeq.signing), None: unsigned
    file_sha256: str | None = None
    checked_against: str | None = None  # the --key file the signature was verified with; None: the key it carries

    def to_json(self) -> dict[str, Any]:
        """``edgeq inspect --json``: the manifest's blocks as written, with what was measured here."""
        blocks = self.manifest.to_json()
        return {
            "bundle": self.path, "name": self.manifest.name, "task": self.manifest.task,
            "labels": list(self.manifest.labels), "schema_version": self.manifest.schema_version,
            "edgeq_version": self.manifest.edgeq_version, "created": self.manifest.created,
            "sha256": self.manifest.model.sha256, "bundle_sha256": self.file_sha256, "signer": self.signer,
            "signature_checked_against": self.checked_against, **{k: blocks.get(k) for k in (
                "input", "outputs", "head", "quantization", "calibration", "validation", "clustering", "detector")},
            "sizes": self.sizes, "runtime": self.runtime, "kernels": self.kernels, "ops": self.ops,
        }


def inspect_bundle(path: str | Path, key: str | Path | None = None) -> Inspection:
    """Read and verify a bundle: its files against its manifest and, when signed (or with ``key``), its
    signature (edgeq.signing: against ``key``, else against the key it carries); a failure is one BundleError."""
    bundle = read_bundle(path)
    signer = None
    if key is not None or bundle.signature is not None:
        from edgeq.signing import load_public_key, verify_bundle, verify_own_key

        signer = verify_bundle(path, [load_public_key(key)]) if key is not None else verify_own_key(path)
    model = bundle.load_model()
    ops = Counter(
        (op.name, "/".join(op.operand_types) or "-", "/".join(op.result_types) or "-", op.delegated) for op in model.ops
    )
    recorded = bundle.manifest.sizes
    sizes = dict(recorded.model_dump() if recorded is not None else {})
    sizes["model_tflite"] = len(bundle.model_bytes)
    sizes["bundle_file"] = bundle.file_size
    return Inspection(
        str(path), bundle.manifest, sizes, model.describe(), weight_stats(model),
        [{"op": name, "operands": operands, "results": results, "count": n, "xnnpack": delegated}
         for (name, operands, results, delegated), n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0][0]))],
        signer, bundle.file_sha256, None if key is None else str(key),
    )


def format_inspect(ins: Inspection) -> str:
    m, sizes, rt = ins.manifest, ins.sizes, ins.runtime
    inp, q, cal = m.input, m.quantization, m.calibration
    labels = m.labels
    lines = [
        f"bundle       {ins.path}  (schema {m.schema_version}, edgeq {m.edgeq_version}, {m.created})",
        f"model        {m.name}  sha256 {m.model.sha256[:16]}...",
        f"signed       {_signed(ins)}",
        f"file         sha256 {(ins.file_sha256 or '')[:16]}... (what edgeq push sends and results name)",
        f"task         {m.task}, {len(labels)} labels: {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}",
        f"input        {inp.height}x{inp.width}x{inp.channels} {inp.color_order} {inp.resize}"
        f"{' (' + inp.interpolation + ')' if inp.interpolation not in (None, 'linear') else ''}, "
        f"(p - {inp.mean[0]:g}) / {inp.std[0]:g}, {inp.dtype} scale {inp.scale:.6g} zero point {inp.zero_point}",
    ]
    for o in m.outputs:
        lines.append(f"output       {o.role} {o.name} {list(o.shape)} {o.dtype} scale {o.scale:.6g} zero point "
                     f"{o.zero_point}")
    lines.append(f"quantization {q.scheme}: weights {q.weights}, activations {q.activations}"
                 + (f", float ops: {', '.join(q.float_ops)}" if q.float_ops else ""))
    lines.append(f"calibration  {cal.count} samples from {cal.source}")
    lines.extend(format_head(m.head))
    if m.density is not None:
        fit = m.density.fit
        # a detector converted with --val reads its percentiles against its detections (converter/tasks/detect.py)
        against = (f"the {fit.reference_samples} {fit.reference}" if fit is not None and fit.reference else
                   f"{fit.held_out_samples if fit is not None else None} held-out samples")
        score = (f"distance to the {ordinal(m.density.neighbours)} nearest of {m.density.references.shape[0]} "
                 "fitting samples" if m.density.references is not None else "distance to the nearest class mean")
        unit = ", divided by their length" if m.density.normalise == "l2" else ""
        taps = ", ".join(fit.taps) if fit is not None else ""
        lines.append(f"density      class Gaussians on {m.density.features} features ({taps}{unit}), "
                     f"{m.density.rank} whitened directions, fitted on {fit.samples if fit else None} samples of "
                     f"{fit.data if fit else None}; score: {score}; percentiles from {against}; int8 vs "
                     f"float correlation {fit.int8_vs_float_correlation if fit else None}")
    size_parts = [f"model.tflite {sizes['model_tflite'] / 1e6:.3f} MB", f"bundle {sizes['bundle_file'] / 1e6:.3f} MB"]
    if sizes.get("float32_tflite"):
        size_parts.append(f"float32 .tflite {sizes['float32_tflite'] / 1e6:.3f} MB")
        size_parts.append(f"model/float32 {sizes['model_tflite'] / sizes['float32_tflite']:.3f}x")
    lines.append("sizes        " + ", ".join(size_parts))
    xnn = "whole graph" if rt["whole_graph"] else (
        f"{rt['delegated_ops']}/{rt['total_ops']} ops, left: {', '.join(rt['cpu_ops'])}" if rt["xnnpack_applied"]
        else "not applied")
    lines.append(f"runtime      {rt['runtime']} {rt['runtime_version']}, {rt['threads']} thread(s), XNNPACK: {xnn}")
    det = m.detector
    if det is not None:
        f1 = det.score_threshold_calibration.f1 if det.score_threshold_calibration is not None else None
        lines.append(f"detector     grid {det.grid[0]}x{det.grid[1]} at stride {det.stride}, score >= "
                     f"{det.score_threshold:.3g}" + (f" (F1 {f1:.3f} on validation)" if f1 is not None else "")
                     + f", NMS IoU {det.nms_iou:g}, COCO category ids {list(det.category_ids)}")
    if det is not None:
        lines.append(format_unknown(m))
    v = m.validation
    if isinstance(v, DetectValidation):
        f, qv = v.float_, v.quantized
        au = lambda r: (r.unknown_auroc or {}).get("mutual_information")  # noqa: E731
        fmt = lambda a: "-" if a is None else f"{a:.4f}"  # noqa: E731
        lines.append(f"validation   {v.images} images: mAP@0.5 float {f.map50:.4f}, int8 {qv.map50:.4f}; "
                     f"mAP@[.5:.95] {f.map:.4f} / {qv.map:.4f}; AUROC unknown (MI) {fmt(au(f))} / {fmt(au(qv))}")
    elif v is not None:
        error = "-" if v.mean_abs_logit_error is None else f"{v.mean_abs_logit_error:.4f}"
        lines.append(f"validation   {v.count} images: float top-1 {v.float_top1:.4f}, quantized "
                     f"{v.quantized_top1:.4f}, agreement {v.top1_agreement:.4f}, mean |logit error| {error}")
    c = m.clustering
    if c is not None:
        shipped = c.shipped.max_distinct_per_channel if c.shipped is not None else "?"
        lines.append(f"clustering   {c.clustered} kernels to {c.clusters} shared values "
                     f"({'per channel' if c.per_channel else 'per tensor'}, {c.init}), "
                     f"{c.clustered_weights / max(c.all_weights, 1):.0%} of the weights; shipped int8 kernels: "
                     f"at most {shipped} distinct values per channel")
        post = c.posterior
        if post is not None and post.codewords:
            lines.append(f"posterior    {post.layer}: {post.weights:,} (mu, sigma) pairs vector-quantised to "
                         f"{post.codewords} codewords (relative error mu {post.relative_rmse_mu:.3f}, sigma "
                         f"{post.relative_rmse_sigma:.3f}); the {m.head_or_dense.samples} samples are drawn from it")
    if ins.kernels:
        lines.append("kernels      distinct int8 values per channel (max), per layer:")
        for k in ins.kernels:
            lines.append(f"  {k['max_distinct_per_channel']:>4}  {k['op']:<17} {str(k['shape']):<18} {k['name'][-60:]}")
    lines.append("ops")
    width = max((len(o["op"]) for o in ins.ops), default=2)
    for o in ins.ops:
        lines.append(f"  {o['count']:>4} x {o['op']:<{width}}  {o['operands']} -> {o['results']}"
                     + ("" if o["xnnpack"] else "  (not XNNPACK)"))
    return "\n".join(lines)


def _signed(ins: Inspection) -> str:
    if ins.signer is None:
        return "no (edgeq sign --key KEY)"
    if ins.checked_against:
        return f"by key {ins.signer}: valid, verified with {ins.checked_against}"
    return (f"by key {ins.signer}: valid against the key the bundle carries (intact and signed by that key; "
            "--key PUB checks that it is yours; a device with trusted_keys checks against its own)")


def format_unknown(m: Manifest) -> str:
    """Whether a detector reports objects of no known class, and how it tells them."""
    u, det = m.unknown, m.detector
    if u is None or det is None or det.objectness_threshold is None:
        return ("unknown      no unknown-object score: only objects scored as a known class are reported "
                "(convert with --val to detect unknown objects)")
    return (f"unknown      objects kept at objectness >= {det.objectness_threshold:.3g} too; label 'unknown' when the "
            f"{u.combine} of the percentiles of {', '.join(u.measures)} passes {u.threshold:.4g} (flags "
            f"{u.ood_rate:.0%} of the {u.count} known detections of --val)")


def format_head(head: Head | None) -> list[str]:
    """The head: its kind, the Monte-Carlo spread before and after quantisation, and the needs_review rule."""
    if head is None:
        return []
    if head.type == "bayes":
        share = (head.head_macs or 0) / max(head.backbone_macs or 1, 1)
        out = [f"head         bayes: {head.samples} posterior samples x {head.classes} classes in one invoke "
               f"({head.layout}, seed {head.seed}, prior sigma {head.prior_sigma}, {share:.1%} of the backbone's MACs)"]
        sp = head.spread
        if sp is not None:
            out.append(f"             logit spread across samples: float {sp.float_:.4f}, int8 "
                       f"{sp.quantized:.4f} ({sp.steps} output steps), MI correlation float/int8 "
                       f"{sp.mutual_information_correlation}")
        w = head.weights
        if w is not None and w.per_channel is not None:
            out.append(f"             sampled weights: per-channel {w.per_channel}, max relative error "
                       f"{w.max_relative_error:.4f}")
    else:
        out = [f"head         {head.type}: one softmax over {head.classes} classes"]
    r = head.review
    if r is None:
        out.append("needs_review not calibrated (convert with --val); set thresholds.review in the device config")
        return out
    rules = []
    if r.unfamiliar_threshold is not None:
        rules.append(f"unfamiliarity > {r.unfamiliar_threshold:.4g} (its {r.unfamiliar_percentile:g}th percentile on "
                     "in-distribution data)")
    if r.threshold is not None and r.mode == "budget":
        rules.append(f"{r.measure} > {r.threshold:.6g} (the {r.budget:.0%} most ambiguous; target accuracy "
                     f"{r.target_accuracy} out of reach within that budget)")
    elif r.threshold is not None and r.reached:
        rules.append(f"{r.measure} > {r.threshold:.6g} (keeps {r.coverage:.1%} of validation at accuracy "
                     f"{r.kept_accuracy:.4f}, target {r.target_accuracy})")
    elif r.threshold is not None:
        rules.append(f"always (no threshold reached accuracy {r.target_accuracy} on validation)")
    out.append("needs_review " + " or ".join(rules))
    return out
