"""`edgeq eval` and `edgeq bench` on real bundles: the figures equal an independent computation, the report page
loads in a real headless browser with every image, and every bad input gets one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, edgeq_here, run_edgeq, write_pngs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ood_dir(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("ood") / "noise", 12, (64, 64, 3), seed=5)


@pytest.fixture(scope="module")
def float_bundle(tmp_path_factory, tiny_keras_path, shapes_dir) -> Path:
    out = tmp_path_factory.mktemp("float") / "tiny_f32.edgeq"
    r = edgeq_here("convert", str(tiny_keras_path), "--quant", "float32", "--val", str(shapes_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def layers_bundle(tiny_keras_path, shapes_dir, tmp_path_factory) -> Path:
    """The tiny model converted like tiny_bundle, plus per-layer errors from TFLite's QuantizationDebugger."""
    out = tmp_path_factory.mktemp("layers") / "tiny.edgeq"
    r = edgeq_here("convert", str(tiny_keras_path), "--calib", str(shapes_dir), "--calib-samples", "30",
                  "--val", str(shapes_dir), "--layer-errors", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layer errors:" in r.stdout
    return out


def test_layer_errors_in_the_bundle_report(layers_bundle):
    from edgeq.bundle import read_bundle

    layers = read_bundle(layers_bundle).report["layers"]
    assert {r["op"] for r in layers} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    ratios = [r["rmse_over_scale"] for r in layers]
    assert ratios == sorted(ratios, reverse=True) and all(x > 0 for x in ratios)
    # int8 cannot beat rounding by much: every layer errs by at least a fraction of a step
    assert max(ratios) > 0.1 and all(r["rmse"] == pytest.approx(r["rmse_over_scale"] * r["scale"]) for r in layers)


@pytest.fixture(scope="module")
def evaluated(layers_bundle, tiny_keras_path, shapes_dir, ood_dir, tmp_path_factory) -> tuple[dict, Path]:
    report_dir = tmp_path_factory.mktemp("report") / "out"
    r = run_edgeq("eval", str(layers_bundle), "--data", str(shapes_dir), "--ood", str(ood_dir),
                  "--reference", str(tiny_keras_path), "--report", str(report_dir), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout), report_dir


def test_eval_figures_match_an_independent_computation(evaluated, layers_bundle, shapes_dir, ood_dir):
    from sklearn.metrics import log_loss, roc_auc_score

    from edgeq.bundle import read_bundle
    from edgeq.converter.data.datasets import class_folder
    from edgeq.converter.evaluation.classify import score_files
    from edgeq.preprocess import list_images
    from edgeq.uncertainty import entropy, softmax

    report, _ = evaluated
    q = report["models"]["quantized"]
    b = read_bundle(layers_bundle)
    data = class_folder(shapes_dir, b.labels)
    model = b.load_model()
    logits = model.find_output(b.manifest.outputs[0].name, b.manifest.outputs[0].shape)  # not the projection
    p = softmax(score_files(model, b.preprocess_spec, data.files, logits))
    p_ood = softmax(score_files(model, b.preprocess_spec, list_images(ood_dir), logits))
    assert report["count"] == len(data.files) == 36 and report["ood_count"] == 12
    assert q["top1"] == pytest.approx(np.mean(p.argmax(1) == data.targets))
    assert q["nll"] == pytest.approx(log_loss(data.targets, p, labels=range(3)), rel=1e-6)
    h, h_ood = entropy(p), entropy(p_ood)
    assert q["ood_auroc"]["predictive_entropy"] == pytest.approx(
        roc_auc_score(np.r_[np.zeros(len(h)), np.ones(len(h_ood))], np.r_[h, h_ood]))
    # the reference is the Keras model itself, converted to float32 by the same code as convert --val
    assert report["models"]["reference"]["top1"] == pytest.approx(b.manifest.to_json()["validation"]["float_top1"])
    assert report["models"]["reference"]["variant"] == "float32 (from Keras)"  # the detector's eval says the same
    # selective prediction by the bundle's review measure, recomputed from what `edgeq run` publishes for each image:
    # refer the most uncertain share r, score the rest
    measure = report["uncertainty_measure"]
    assert measure == "density_disagreement"
    r = run_edgeq("run", "--model", str(layers_bundle), "--source", str(shapes_dir), "--output", "-")
    msgs = [m for m in map(json.loads, r.stdout.splitlines()) if m.get("schema") == "edgeq.detections"]
    files = list_images(shapes_dir)  # a folder source's order; the frame id is the file name
    assert [m["frame"]["id"] for m in msgs] == [f.name for f in files]
    by_file = {f.resolve(): m["detections"][0] for f, m in zip(files, msgs)}
    tops = [by_file[Path(f).resolve()] for f in data.files]
    u = np.array([d["uncertainty"][measure] for d in tops])
    right = np.array([d["label"] == b.labels[t] for d, t in zip(tops, data.targets)])[np.argsort(u, kind="stable")]
    assert right.mean() == pytest.approx(q["top1"])
    kept = [max(1, int(np.ceil((1 - rate) * len(u) - 1e-9))) for rate in np.linspace(0, 1, 21)]
    assert q["selective"]["accuracy"] == pytest.approx([right[:k].mean() for k in kept])
    # the referral rate at the target: the least share whose kept results reach the target accuracy
    target = q["target_accuracy"]
    least = next((1 - k / len(u) for k in range(len(u), 0, -1) if right[:k].mean() >= target), 1.0)
    assert q["referral_at_target"] == pytest.approx(least, abs=1e-9), (q["referral_at_target"], least)
    assert q["runtime"]["runtime"] == "ai-edge-litert" and q["latency_ms_median"] > 0


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_loads_in_headless_chromium_with_every_image(evaluated):
    report, report_dir = evaluated
    page = report_dir / "report.html"
    assert Path(report["report"]) == page and page.is_file()
    text = page.read_text()
    # reliability, uncertainty, referral, OOD ROC, layers, and 6 + 6 sample images of --data and --ood
    assert text.count("data:image/png;base64,") == 5 + 12
    assert "http://" not in text and "https://" not in text  # self-contained
    exe = _chromium()
    assert exe, "chromium is not installed: scripts/setup.sh installs it (apt-get install chromium)"
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'data-images-total="17"' in out.stdout and 'data-images-loaded="17"' in out.stdout, out.stdout[:500]


def test_report_samples_carry_the_verdict_the_device_publishes(evaluated, layers_bundle, ood_dir, tmp_path):
    """Each sample image of the report is framed by the verdict ``edgeq run`` publishes for that image: the same
    rule, the same reason."""
    import re

    _, report_dir = evaluated
    text = (report_dir / "report.html").read_text()
    samples = re.findall(r"data-file='([^']+)' data-verdict='(\w+)'", text)
    ood = {f: v for f, v in samples if (ood_dir / f).is_file()}
    assert len(samples) == 12 and len(ood) == 6, samples
    r = run_edgeq("run", "--model", str(layers_bundle), "--source", str(ood_dir), "--output", "-",
                  "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr[-2000:]
    published = {}
    for ln in r.stdout.splitlines():
        if '"edgeq.detections"' in ln:
            msg = json.loads(ln)
            top = msg["detections"][0]
            verdict = ("review", top["review_reason"]) if top["needs_review"] else ("trusted", None)
            published[msg["frame"]["id"]] = verdict
    assert {f: published[f][0] for f in ood} == ood
    for f, (verdict, reason) in published.items():
        if f in ood and verdict == "review":
            assert f"needs review: {reason}" in text.split(f"data-file='{f}'")[1].split("</figure>")[0]


def test_eval_against_a_float_bundle_and_plain_text(tiny_bundle, float_bundle, shapes_dir, tmp_path):
    r = edgeq_here("eval", str(tiny_bundle), "--data", str(shapes_dir), "--reference", str(float_bundle))
    assert r.returncode == 0, r.stderr
    assert "reference" in r.stdout and "quantized" in r.stdout and "ECE" in r.stdout
    # an aligned table: the header and every figure's row (the runtime's included) are one width
    lines = r.stdout.splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.strip().startswith("reference") and
                        "quantized" in ln):]
    table = [ln for ln in table if not ln.startswith("report:")]
    assert len(table) > 5 and len({len(ln) for ln in table}) == 1, "\n".join(table)
    assert any("ai-edge-litert" in ln for ln in table)
    # a reference for another task is refused, naming it
    other = tmp_path / "other.edgeq"
    assert edgeq_here("convert", "mobilenet_v2", "--density", "off", "--alpha", "0.35",
                     "--input-size", "32", "--classes", "3", "--quant", "float32", "-o", str(other)).returncode == 0
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(shapes_dir), "--reference", str(other)),
                       "--reference", "labels differ")


def test_eval_bad_inputs(tiny_bundle, shapes_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(empty)), "--data", "no class subfolders")
    wrong = tmp_path / "wrong"
    write_pngs(wrong / "hexagon", 2, (32, 32, 3))
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(wrong)),
                       "hexagon", "not among the model's labels")
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(shapes_dir), "--ood", str(empty)),
                       "--ood", "no jpg/png/bmp images")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(shapes_dir), "--report", str(blocker)),
                       "--report", "is a file")
    assert_clean_error(edgeq_here("eval", str(tiny_bundle), "--data", str(shapes_dir), "--report",
                                 str(blocker / "sub")), "--report", "cannot create")


def test_bench_against_baseline(tiny_bundle, float_bundle):
    r = run_edgeq("bench", str(tiny_bundle), "--baseline", str(float_bundle), "--runs", "30", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    b, base = res["models"]["bundle"], res["models"]["baseline"]
    assert b["runtime"]["runtime"] == "ai-edge-litert" and b["runtime"]["xnnpack_applied"]
    assert b["p95_ms"] >= b["median_ms"] > 0 and b["throughput_per_s"] == pytest.approx(1000 / b["median_ms"])
    assert res["speedup_vs_baseline"] == pytest.approx(base["median_ms"] / b["median_ms"])
    # sizes are the models' own (this tiny model's int8 file is not smaller: its quantisation parameters and
    # bias tensors outweigh 700 weights)
    from edgeq.bundle import read_bundle

    assert b["size_bytes"] == read_bundle(tiny_bundle).manifest.to_json()["sizes"]["model_tflite"]
    assert res["size_ratio_vs_baseline"] == pytest.approx(b["size_bytes"] / base["size_bytes"])
    assert 20 < b["peak_rss_mb"] < 2000
    text = run_edgeq("bench", str(tiny_bundle), "--runs", "10")
    assert text.returncode == 0 and "median ms" in text.stdout and "XNNPACK" in text.stdout


def test_bench_pipeline(tiny_bundle, tmp_path):
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    video = write_video(tmp_path / "clip.avi", moving_shapes_frames(30, 120, 160))
    r = run_edgeq("bench", str(tiny_bundle), "--runs", "20", "--pipeline", str(video), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["pipeline"]
    assert p["frames"] == 30 and p["fps"] > 0 and p["ratio_to_raw"] == pytest.approx(p["fps"] / p["raw_invoke_fps"])


def test_bench_bad_inputs(tiny_bundle, tmp_path, shapes_dir):
    other = tmp_path / "other.edgeq"
    r = edgeq_here("convert", "mobilenet_v2", "--density", "off", "--alpha", "0.35", "--input-size", "48", "--classes", "3",
                  "--calib", str(shapes_dir), "--calib-samples", "10", "-o", str(other))
    assert r.returncode == 0, r.stderr
    assert_clean_error(edgeq_here("bench", str(tiny_bundle), "--baseline", str(other)), "--baseline", "input shape",
                       "differs")
    assert_clean_error(edgeq_here("bench", str(tmp_path / "nope.edgeq")), "not found")
    assert_clean_error(edgeq_here("bench", str(tiny_bundle), "--pipeline", str(tmp_path / "none.avi")),
                       "--pipeline", "not found")
