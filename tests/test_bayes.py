"""Bayesian heads end to end on real data: the Keras layer, `edgeq train`, the K-sample int8 export, the device
decoder, and every bad input the issue names. No mocks: real TensorFlow, converter, LiteRT and Fashion-MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import FASHION_SPLITS, FMNIST_CLASSES, assert_clean_error, edgeq_here, run_edgeq
from floors import check, seeded

pytestmark = pytest.mark.slow


def _keras():
    import keras

    from edgeq.converter.models.bayes import bayes_dense_class

    return keras, bayes_dense_class()


def _small_bayes_model(features: int = 6, classes: int = 3):
    keras, BayesDense = _keras()
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(features, activation="relu")(x)
    return keras.Model(inp, BayesDense(classes, prior_sigma=0.1, posterior_sigma=0.2, seed=0, name="bayes")(x))


def test_layer_saves_loads_and_samples(tmp_path):
    keras, BayesDense = _keras()
    model = _small_bayes_model()
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    from edgeq.converter.stages.load import load_source_model

    loaded = load_source_model(str(path)).keras_model
    layer = loaded.get_layer("bayes")
    assert isinstance(layer, BayesDense) and layer.prior_sigma == 0.1
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert np.array_equal(a, b)
    # inference: the posterior mean, deterministic; training: samples that differ call to call
    assert np.array_equal(loaded(x, training=False), loaded(x, training=False))
    assert not np.allclose(loaded(x, training=True), loaded(x, training=True))


def test_kl_divergence_closed_form():
    keras, BayesDense = _keras()
    layer = BayesDense(2, prior_sigma=0.1, posterior_sigma=0.1)
    layer.build((None, 3))
    layer.kernel_mu.assign(np.zeros((3, 2), np.float32))  # glorot-initialised: move it onto the prior mean
    assert float(layer.kl_divergence()) == pytest.approx(0.0, abs=1e-4)  # posterior == prior
    layer.kernel_rho.assign(np.full((3, 2), math.log(math.expm1(0.05)), np.float32))  # sigma 0.05 on 6 weights
    layer.kernel_mu.assign(np.full((3, 2), 0.1, np.float32))  # mean 1 sigma away from the prior's
    per_weight = math.log(0.1 / 0.05) + (0.05**2 + 0.1**2) / (2 * 0.1**2) - 0.5
    assert float(layer.kl_divergence()) == pytest.approx(6 * per_weight, rel=1e-4)


@pytest.mark.parametrize("layout", ["stacked", "centred"])
def test_export_computes_each_weight_sample(layout):
    from edgeq.converter.models.bayes import export_model

    model = _small_bayes_model()
    exp = export_model(model, samples=5, seed=3, layout=layout)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    feats = np.asarray(_features(model, x), dtype=np.float64)
    expected = np.einsum("nf,kfc->nkc", feats, exp.sampled_kernels) + exp.sampled_biases[None]
    out = exp.model.predict(x, verbose=0)
    got = out.reshape(4, 5, 3) if layout == "stacked" else out[0][:, None, :] + out[1].reshape(4, 5, 3)
    assert np.allclose(got, expected, atol=1e-4)
    # the samples follow the posterior: their spread matches sigma, and another seed gives other samples
    post = model.get_layer("bayes").posterior()
    assert np.std(exp.sampled_kernels - post["kernel_mu"], axis=0).mean() == pytest.approx(
        post["kernel_sigma"].mean(), rel=0.35)
    assert not np.allclose(export_model(model, 5, seed=4, layout=layout).sampled_kernels, exp.sampled_kernels)


def _features(model, x):
    import keras

    head = model.get_layer("bayes")
    return keras.Model(model.inputs, head.input).predict(x, verbose=0)


# -- real data ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone_train(tmp_path_factory) -> Path:
    """2,400 Fashion-MNIST training images of the same 4 classes, for the backbone only: with the 800 of
    fashion_dirs and 3 epochs its features were too weak to hold a floor from one CPU to another (tests/floors.py
    has the floors and how they were set)."""
    from edgeq.converter.data.datasets import FASHION_MNIST_LABELS, fashion_mnist, write_class_folder

    x, y = fashion_mnist("train")
    idx = np.random.default_rng(5).choice(np.flatnonzero(y < FMNIST_CLASSES), 2400, replace=False)
    return write_class_folder(tmp_path_factory.mktemp("backbone_train"), x[idx], y[idx],
                              FASHION_MNIST_LABELS[:FMNIST_CLASSES])


@pytest.fixture(scope="module")
def trained(fashion_dirs, backbone_train, tmp_path_factory) -> dict[str, Path]:
    """A deterministic MobileNetV2 0.35/48 trained on Fashion-MNIST, then a Bayesian head trained on its frozen
    features with MOPED-style initialisation, both through the real `edgeq train` command."""
    d = tmp_path_factory.mktemp("trained")
    det, bayes = d / "det.keras", d / "bayes.keras"
    r = run_edgeq("train", str(backbone_train), "--head", "dense", "--input-size", "48", "--epochs", "6",
                  "--lr", "3e-3", "--no-augment", "--seed", seeded(1), "-o", str(det))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_edgeq("train", str(fashion_dirs["train"]), "--head", "bayes", "--init", str(det), "--freeze-backbone",
                  "--epochs", "15", "--seed", seeded(1), "--val", str(fashion_dirs["val"]), "-o", str(bayes), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["head"]["type"] == "bayes"
    check("bayes.head.val_accuracy", summary["history"]["val_accuracy"])
    return {"det": det, "bayes": bayes, "dir": d}


@pytest.fixture(scope="module")
def bayes_bundle(trained, fashion_dirs) -> Path:
    out = trained["dir"] / "bayes.edgeq"
    r = run_edgeq("convert", str(trained["bayes"]), "--calib", str(fashion_dirs["train"]), "--calib-samples", "60",
                  "--val", str(fashion_dirs["val"]), "--bayes-samples", "16", "--bayes-seed", "7", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MI correlation" in r.stdout and "needs_review" in r.stdout
    return out


def test_train_writes_labels_and_is_reproducible(trained, fashion_dirs, tmp_path):
    from edgeq.converter.models.info import read_model_info
    from edgeq.converter.training.classifier import TrainOptions, train

    stored = read_model_info(trained["bayes"])
    assert stored["labels"] == sorted(p.name for p in fashion_dirs["train"].iterdir()) and stored["task"] == "classify"
    runs = []
    for seed in (5, 5, 6):
        out = tmp_path / f"b{len(runs)}.keras"
        train(TrainOptions(str(fashion_dirs["train"]), out, head="bayes", init=str(trained["det"]),
                           freeze_backbone=True, epochs=2, seed=seed, augment_copies=1), log=lambda s: None)
        from edgeq.converter.stages.load import load_source_model

        runs.append(load_source_model(str(out)).keras_model.get_layer("bayes_logits").posterior())
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not np.array_equal(runs[0]["kernel_mu"], runs[2]["kernel_mu"])


@pytest.fixture(scope="module")
def evaluated(trained, dense_bundle, bayes_bundle, fashion_dirs) -> dict[str, dict]:
    """`edgeq eval --ood` of each int8 bundle on the test images (none of which convert saw) and the digits; the
    Bayesian bundle beside its float BNN (the source .keras, with the same K weight samples)."""
    out = {}
    for which, bundle, extra in (("dense", dense_bundle, []), ("bayes", bayes_bundle, ["--reference", str(trained["bayes"])])):
        # the console script: in-process, the --reference conversion's "Saved artifact" line reached the caller's
        # stdout in CI's fresh environment (not in the system one; not looked into yet)
        r = run_edgeq("eval", str(bundle), "--data", str(fashion_dirs["test"]), "--ood", str(fashion_dirs["ood"]),
                      *extra, "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        out[which] = json.loads(r.stdout)
    return out


def test_int8_qbnn_keeps_the_float_bnn_uncertainty(bayes_bundle, evaluated):
    """Float BNN vs int8 QBNN: the int8 weights and spread as the converter measured them on --val, and top-1 and
    ECE of both on the 1,000 test images."""
    from edgeq.bundle import read_bundle

    m = read_bundle(bayes_bundle).manifest.to_json()
    head, v = m["head"], m["validation"]
    assert (head["type"], head["samples"], head["classes"], head["seed"]) == ("bayes", 16, FMNIST_CLASSES, 7)
    # --bayes-layout auto: stacked only when its output resolves the spread in enough int8 steps
    choice = head["layout_choice"]
    assert choice["mode"] == "auto"
    assert head["layout"] == ("stacked" if choice["stacked_estimate"]["steps"] >= choice["min_steps"] else "centred")
    # the head's outputs, then the unfamiliarity measure's projection (converted with labelled data: on by default)
    assert [o["role"] for o in m["outputs"]] == (["samples"] if head["layout"] == "stacked" else ["logits", "residuals"]) \
        + ["density_projection"]
    assert m["outputs"][-1]["shape"][-1] == m["density"]["rank"]
    assert all(o["dtype"] == "int8" for o in m["outputs"]) and m["quantization"]["float_ops"] == []
    # each of the K*C stacked output channels has its own scale and reproduces its float sample
    assert head["weights"]["per_channel"] is True
    check("bayes.bayes.weights_max_relative_error", head["weights"]["max_relative_error"])
    # the spread between samples survives the output quantisation
    check("bayes.bayes.spread_steps", head["spread"]["steps"])
    check("bayes.bayes.spread_kept_error", abs(head["spread"]["kept"] - 1))
    assert v["count"] == FASHION_SPLITS["val"]
    check("bayes.bayes.mi_correlation", v["mutual_information_correlation"])
    assert v["quantized_mean_mutual_information"] > 0
    report = evaluated["bayes"]
    q, f = report["models"]["quantized"], report["models"]["reference"]
    assert report["count"] == FASHION_SPLITS["test"]
    check("bayes.bayes.top1_gap", abs(f["top1"] - q["top1"]))
    check("bayes.bayes.ece_gap", abs(f["ece"] - q["ece"]))
    r = head["review"]
    # --review-measure auto: the density (fitted by default with --val) gives the ambiguous part its measure; a model
    # this small cannot reach 99.5% on any share of --val that large, so the rule flags its budget, 10% of --val
    assert r["measure"] == "density_disagreement" and r["count"] == FASHION_SPLITS["val"]
    assert r["mode"] == "budget" and abs(r["coverage"] - 0.9) <= 1 / r["count"], r
    text = run_edgeq("inspect", str(bayes_bundle)).stdout
    assert "16 posterior samples x 4 classes" in text and "needs_review" in text and "XNNPACK: whole graph" in text


def test_device_publishes_what_the_model_computes(bayes_bundle, fashion_dirs, tmp_path):
    """`edgeq run` payloads equal an independent pass of the same bundle through the runtime and the maths."""
    import jsonschema

    from edgeq.bundle import message_schema, read_bundle
    from edgeq.converter.evaluation.classify import head_logits, run_files
    from edgeq.heads import HeadSpec
    from edgeq.preprocess import list_images
    from edgeq.uncertainty import summarize

    folder = fashion_dirs["test"] / "dress"
    r = run_edgeq("run", "--model", str(bayes_bundle), "--source", str(folder), "--output", "-",
                  "--spool", str(tmp_path / "s.db"), "--max-frames", "12")
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(ln) for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]
    assert len(msgs) == 12
    b = read_bundle(bayes_bundle)
    model = b.load_model()
    head = HeadSpec.from_manifest(b.manifest).bind(model, b.manifest.outputs, density=b.manifest.density)
    files = list_images(folder)[:12]
    s = summarize(head_logits(model, b.preprocess_spec, files, head))
    _, unfamiliarity, disagreement = run_files(model, b.preprocess_spec, files, head, "test")
    rule = b.manifest.to_json()["head"]["review"]
    threshold, unfamiliar = rule["threshold"], rule["unfamiliar_threshold"]
    assert unfamiliar is not None and rule["ood_rate"] == 0.05 and rule["measure"] == "density_disagreement"
    for i, msg in enumerate(msgs):
        jsonschema.validate(msg, message_schema("detections"))
        assert msg["schema_version"] == 4 and msg["frame"]["id"] == files[i].name
        top = msg["detections"][0]
        assert top["class_id"] == int(np.argmax(s.mean[i])) and top["score"] == pytest.approx(s.mean[i].max(), abs=1e-6)
        u = top["uncertainty"]
        assert u["method"] == "mc" and u["samples"] == 16
        assert u["predictive_entropy"] == pytest.approx(s.predictive_entropy[i], abs=1e-6)
        assert u["aleatoric"] == pytest.approx(s.aleatoric[i], abs=1e-6)
        assert u["mutual_information"] == pytest.approx(s.mutual_information[i], abs=1e-6)
        assert u["std"] == pytest.approx(s.std[i, top["class_id"]], abs=1e-6)
        assert u["unfamiliarity"] == pytest.approx(unfamiliarity[i], rel=1e-6)
        assert u["unfamiliarity_percentile"] == pytest.approx(
            float(head.density.density.percentile(unfamiliarity[i:i + 1])[0]), abs=0.01)
        assert u["density_disagreement"] == pytest.approx(disagreement[i], abs=1e-6)
        assert 0.0 <= disagreement[i] <= 1.0
        ambiguous, unfamiliar_ = disagreement[i] > threshold, unfamiliarity[i] > unfamiliar
        assert top["needs_review"] is bool(ambiguous or unfamiliar_)
        assert top["review_reason"] == ("+".join(n for n, f in (("unfamiliar", unfamiliar_), ("ambiguous", ambiguous))
                                                 if f) or None)


def test_device_review_override_from_config(bayes_bundle, fashion_dirs, tmp_path):
    cfg = tmp_path / "edgeq.toml"
    cfg.write_text(f'model = "{bayes_bundle}"\nsource = "{fashion_dirs["test"] / "trouser"}"\n'
                   f'spool = {{path = "{tmp_path / "s.db"}"}}\n'
                   '[thresholds]\nreview = 0.0\nreview_measure = "mutual_information"\n')
    r = run_edgeq("run", "--config", str(cfg), "--output", "-", "--max-frames", "4")
    assert r.returncode == 0, r.stderr
    dets = [json.loads(ln)["detections"][0] for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]
    assert len(dets) == 4
    # the config's rule (mutual information > 0) replaced the bundle's: a published MI above 0 is flagged (one
    # published as 0.0 may be a positive value below the 6-decimal rounding, flagged or not), and results that the
    # bundle's own rule (density_disagreement, --review-measure auto) would pass are flagged
    assert all(isinstance(d["needs_review"], bool) for d in dets)
    assert all(d["needs_review"] for d in dets if d["uncertainty"]["mutual_information"] > 0.0), dets
    from edgeq.bundle import read_bundle

    own = read_bundle(bayes_bundle).manifest.to_json()["head"]["review"]
    assert any(d["needs_review"] and d["uncertainty"][own["measure"]] <= own["threshold"] for d in dets), dets


@pytest.fixture(scope="module")
def dense_bundle(trained, fashion_dirs) -> Path:
    out = trained["dir"] / "det.edgeq"
    r = edgeq_here("convert", str(trained["det"]), "--calib", str(fashion_dirs["train"]), "--calib-samples", "60",
                  "--val", str(fashion_dirs["val"]), "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unfamiliarity: class Gaussians on" in r.stdout, r.stdout
    return out


@pytest.mark.parametrize("which", ["dense", "bayes"])
def test_unfamiliarity_catches_digits_with_either_head(which, dense_bundle, bayes_bundle, fashion_dirs, evaluated):
    """`edgeq eval --ood` on the int8 bundle, on test images and digits convert never saw: the unfamiliarity measure
    tells digits from clothing far better than the softmax's entropy, and the bundle's default rule, calibrated on
    --val, flags them while passing most clothing. benchmarks/unknowns.py has the full-size figures."""
    bundle = dense_bundle if which == "dense" else bayes_bundle
    q = evaluated[which]["models"]["quantized"]
    auroc, fpr = q["ood_auroc"], q["ood_fpr_at_95_tpr"]
    check(f"bayes.{which}.digits_auroc_unfamiliarity", auroc["unfamiliarity"])
    check(f"bayes.{which}.digits_auroc_gain_over_entropy", auroc["unfamiliarity"] - auroc["predictive_entropy"])
    check(f"bayes.{which}.digits_fpr95_gain_over_entropy", fpr["predictive_entropy"] - fpr["unfamiliarity"])
    flagged = q["flagged"]
    ind, ood = flagged["in_distribution"], flagged["ood"]
    check(f"bayes.{which}.digits_flagged_unfamiliar", ood["unfamiliar"])
    check(f"bayes.{which}.test_flagged_unfamiliar", ind["unfamiliar"])
    check(f"bayes.{which}.digits_flagged", ood["flagged"])
    check(f"bayes.{which}.test_flagged", ind["flagged"])
    # what the ambiguous part is for: the results it passes are more accurate
    check(f"bayes.{which}.unflagged_accuracy_gain", ind["accuracy_unflagged"] - ind["accuracy_all"])
    from edgeq.bundle import read_bundle

    m = read_bundle(bundle).manifest
    fit = m.density.fit.model_dump()
    assert fit["data"] == str(fashion_dirs["train"]) and fit["held_out"] == str(fashion_dirs["val"])
    check(f"bayes.{which}.density_int8_vs_float_correlation", fit["int8_vs_float_correlation"])


# -- bad input ----------------------------------------------------------------------------------------------

def test_bad_sample_counts(trained, fashion_dirs, tmp_path):
    out = tmp_path / "x.edgeq"
    common = ["--calib", str(fashion_dirs["train"]), "--calib-samples", "10", "-o", str(out)]
    assert_clean_error(edgeq_here("convert", str(trained["bayes"]), "--bayes-samples", "1", *common),
                       "--bayes-samples 1", "at least 2")
    assert_clean_error(edgeq_here("convert", str(trained["bayes"]), "--bayes-samples", "600", *common),
                       "--bayes-samples 600", "of the backbone", "use at most")
    assert not out.exists()


def test_no_bayesian_head_when_asked_for_one(trained, fashion_dirs, tmp_path):
    out = tmp_path / "x.edgeq"
    r = edgeq_here("convert", str(trained["det"]), "--density", "off", "--bayes-samples", "8", "--calib", str(fashion_dirs["train"]),
                  "--calib-samples", "10", "-o", str(out))
    assert_clean_error(r, "det.keras", "no bayesian head", "edgeq train --head bayes")
    assert not out.exists()


def test_labels_that_do_not_match_the_head(trained, fashion_dirs, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    out = tmp_path / "x.edgeq"
    r = edgeq_here("convert", str(trained["bayes"]), "--labels", str(labels), "--calib", str(fashion_dirs["train"]),
                  "--calib-samples", "10", "-o", str(out))
    assert_clean_error(r, str(labels), "3 labels", "4 classes")
    assert not out.exists()


def test_train_bad_inputs(trained, fashion_dirs, tiny_keras_path, tmp_path):
    data = str(fashion_dirs["train"])
    assert_clean_error(edgeq_here("train", data, "-o", str(tmp_path / "m.h5")), "-o", ".keras")
    assert_clean_error(edgeq_here("train", str(tmp_path / "nope"), "-o", str(tmp_path / "m.keras")),
                       "DATA_DIR", "not a folder")
    r = run_edgeq("train", data, "--head", "bayes", "--init", str(tiny_keras_path), "-o", str(tmp_path / "m.keras"))
    assert_clean_error(r, "--init", "3 classes", "4 class folders")
    assert not (tmp_path / "m.keras").exists()


def test_review_measure_needs_a_bayesian_head(tiny_bundle, shapes_dir, tmp_path):
    cfg = tmp_path / "edgeq.toml"
    cfg.write_text(f'model = "{tiny_bundle}"\nsource = "{shapes_dir / "circle"}"\n'
                   '[thresholds]\nreview_measure = "mutual_information"\n')
    assert_clean_error(edgeq_here("run", "--config", str(cfg), "--output", "-"), "review_measure", "deterministic")


def test_float_bnn_and_int8_qbnn_tell_ood_apart_alike(bayes_bundle, trained, fashion_dirs, evaluated):
    """The float BNN (same K samples, float32) and the int8 QBNN on held-out Fashion-MNIST and MNIST digits:
    the same predictions nearly everywhere, per-image MI that tracks, and the same OOD AUROC of MI."""
    from edgeq.converter.evaluation import metrics
    from edgeq.bundle import read_bundle
    from edgeq.converter.reference import classifier_reference as float_reference
    from edgeq.converter.data.datasets import class_folder
    from edgeq.converter.evaluation.classify import head_logits
    from edgeq.heads import HeadSpec
    from edgeq.uncertainty import summarize

    b = read_bundle(bayes_bundle)
    q_model = b.load_model()
    q_head = HeadSpec.from_manifest(b.manifest).bind(q_model, b.manifest.outputs)
    f_model, f_head = float_reference(str(trained["bayes"]), b.manifest)
    data = class_folder(fashion_dirs["test"], b.labels)
    ood = sorted(fashion_dirs["ood"].iterdir())
    res = {}
    for name, model, head in (("float", f_model, f_head), ("int8", q_model, q_head)):
        ind = summarize(head_logits(model, b.preprocess_spec, data.files, head))
        out = summarize(head_logits(model, b.preprocess_spec, ood, head))
        res[name] = (ind, out, metrics.roc_auc(ind.mutual_information, out.mutual_information))
    # the float reference is the one edgeq eval --reference runs: the same top-1 on the same test images
    assert metrics.top1_accuracy(res["float"][0].mean, data.targets) == pytest.approx(
        evaluated["bayes"]["models"]["reference"]["top1"])
    mi_f = np.r_[res["float"][0].mutual_information, res["float"][1].mutual_information]
    mi_q = np.r_[res["int8"][0].mutual_information, res["int8"][1].mutual_information]
    check("bayes.bayes.float_vs_int8_mi_correlation", np.corrcoef(mi_f, mi_q)[0, 1])
    check("bayes.bayes.float_vs_int8_mi_auroc_gap", abs(res["float"][2] - res["int8"][2]))


@pytest.mark.parametrize("layout", ["centred", "stacked"])
def test_both_layouts_convert_and_decode_alike(layout, trained, fashion_dirs, tmp_path):
    """Each explicit layout: the same K float samples, int8 outputs that keep them, and a device that decodes it."""
    from edgeq.bundle import read_bundle

    out = tmp_path / f"{layout}.edgeq"
    r = edgeq_here("convert", str(trained["bayes"]), "--density", "off", "--calib", str(fashion_dirs["train"]), "--calib-samples", "40",
                  "--val", str(fashion_dirs["val"]), "--bayes-samples", "8", "--bayes-layout", layout, "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_bundle(out).manifest.to_json()
    assert m["head"]["layout"] == layout and m["head"]["layout_choice"] == {"mode": layout}
    check(f"bayes.{layout}.mi_correlation", m["validation"]["mutual_information_correlation"])
    check(f"bayes.{layout}.top1_agreement", m["validation"]["top1_agreement"])
    r = run_edgeq("run", "--model", str(out), "--source", str(fashion_dirs["test"] / "dress"), "--output", "-",
                  "--spool", str(tmp_path / "s.db"), "--max-frames", "3")
    assert r.returncode == 0, r.stderr
    dets = [json.loads(ln)["detections"][0] for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]
    assert len(dets) == 3 and all(d["uncertainty"]["samples"] == 8 for d in dets)


def test_clustered_bayesian_bundle_next_to_the_unclustered_one(trained, bayes_bundle, fashion_dirs, tmp_path):
    """--clusters on a Bayesian model: the backbone's kernels are clustered and the head's (mu, sigma) posterior
    vector-quantised; the K samples come from the quantised posterior. edgeq eval --compare shows both bundles
    side by side, in the JSON and in the report."""
    from edgeq.bundle import read_bundle

    out = tmp_path / "bayes_c16.edgeq"
    r = edgeq_here("convert", str(trained["bayes"]), "--density", "off", "--calib", str(fashion_dirs["train"]), "--calib-samples", "60",
                  "--val", str(fashion_dirs["val"]), "--bayes-samples", "16", "--bayes-seed", "7",
                  "--clusters", "16", "--cluster-per-channel", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vector-quantised to 16 codewords" in r.stdout
    b = read_bundle(out)
    post = b.manifest.to_json()["clustering"]["posterior"]
    assert post["layer"] == "bayes_logits" and post["codewords"] == 16 and len(post["codebook"]) == 16
    assert all(s > 0 for _, s in post["codebook"])
    check("bayes.clustered.relative_rmse_mu", post["relative_rmse_mu"])
    assert b.file_size < read_bundle(bayes_bundle).file_size
    # the quantised posterior still gives a spread that int8 keeps
    check("bayes.clustered.mi_correlation", b.manifest.to_json()["validation"]["mutual_information_correlation"])
    assert "vector-quantised to 16 codewords" in run_edgeq("inspect", str(out)).stdout

    report_dir = tmp_path / "report"
    r = edgeq_here("eval", str(out), "--compare", str(bayes_bundle), "--data", str(fashion_dirs["test"]),
                  "--ood", str(fashion_dirs["ood"]), "--report", str(report_dir), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    models = json.loads(r.stdout)["models"]
    assert list(models) == ["quantized", "bayes"]
    assert "16 clusters per channel" in models["quantized"]["variant"] and "posterior VQ 16" in models["quantized"]["variant"]
    assert "clusters" not in models["bayes"]["variant"] and "Bayesian K=16" in models["bayes"]["variant"]
    assert models["quantized"]["bundle_bytes"] < models["bayes"]["bundle_bytes"]
    check("bayes.clustered.top1_gap", abs(models["quantized"]["top1"] - models["bayes"]["top1"]))
    page = (report_dir / "report.html").read_text()
    assert "posterior VQ 16 codewords" in page and "<th>bayes</th>" in page
    # another task's bundle is refused
    assert_clean_error(edgeq_here("eval", str(out), "--compare", str(tmp_path / "nope.edgeq"), "--data",
                                 str(fashion_dirs["test"])), "--compare", "not found")


@pytest.mark.parametrize("layout", ["centred", "stacked"])
def test_qat_of_a_bayesian_head_freezes_its_samples_and_int8_computes_what_training_saw(layout):
    """Pure logic, a few training steps: the fake-quant clone of an exported Bayesian model trains its backbone
    and not its K samples, and the int8 graph converted from its ranges gives the fake-quant model's sample logits
    within one output step, so its mutual information is what training saw."""
    from edgeq.converter.models.bayes import export_model
    from edgeq.converter.recipes import QuantMode, QuantRecipe
    from edgeq.converter.stages import qat
    from edgeq.manifest import Head
    from edgeq.runtime import Model
    from edgeq.uncertainty import summarize

    keras, _ = _keras()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (96, 8, 8, 3)).astype(np.float32)
    exported = export_model(_small_bayes_model(features=6, classes=3), samples=8, seed=1, layout=layout).model
    head = Head(type="bayes", samples=8, classes=3, layout=layout)
    fake = qat.build(exported, x[:32])
    trainer, loss = qat._trainer(fake, head)
    heads = [layer for layer in fake.layers[-1].layers if layer.name in qat.BAYES_HEAD_LAYERS]
    before = [[w.copy() for w in layer.get_weights()] for layer in heads]
    conv = next(layer for layer in fake.layers[-1].layers if type(layer).__name__ == "QuantConv")
    conv_before = conv.get_weights()[0].copy()
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    trainer.fit(x[:64], rng.integers(0, 3, 64), epochs=2, batch_size=16, verbose=0)
    assert len(heads) == (2 if layout == "centred" else 1)
    for layer, weights in zip(heads, before):  # the samples (and the centred mean) as exported
        kernel_and_bias = [w for w in layer.get_weights() if w.ndim and w.size > 1]
        assert all(np.array_equal(a, b) for a, b in zip(kernel_and_bias, [w for w in weights if w.ndim and w.size > 1]))
    assert not np.array_equal(conv.get_weights()[0], conv_before)  # the backbone trained

    m = Model(qat.convert(fake, QuantRecipe(QuantMode.INT8)))
    assert m.input.dtype == np.int8 and not m.delegation.cpu_ops
    out = fake(x[64:])
    sim = [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else [np.asarray(out)]
    got = [[] for _ in sim]
    by_size = sorted(range(len(m.outputs)), key=lambda i: int(np.prod(m.outputs[i].shape)))
    for v in x[64:]:
        out = m.run(m.input.quantize(v[None]))
        for j, i in enumerate(by_size):
            got[j].append(out[m.outputs[i].name].reshape(-1))
    for j, i in enumerate(by_size):
        step = m.outputs[i].scale
        assert np.abs(np.asarray(got[j]) - sim[j]).max() <= step * 1.001, (layout, j)

    def sample_logits(outs):
        return (outs[0].reshape(-1, 8, 3) if layout == "stacked" else
                np.asarray(outs[0])[:, None, :] + np.asarray(outs[1]).reshape(-1, 8, 3))

    mi_sim, mi_int8 = (summarize(sample_logits(o)).mutual_information for o in (sim, [np.asarray(g) for g in got]))
    assert np.corrcoef(mi_sim, mi_int8)[0, 1] > 0.95


@pytest.mark.parametrize("layout", ["centred", "stacked"])
def test_qat_trains_the_backbone_under_the_frozen_samples(layout, trained, fashion_dirs, tmp_path):
    """--qat on a Bayesian model, end to end: the K exported weight samples stay as they were (the int8 head holds
    them within its rounding, as after PTQ), the backbone trains on the mean of their probabilities, and the int8
    bundle keeps the size of the posterior's spread and the float model's top-1."""
    from edgeq.bundle import read_bundle

    common = ("--density", "off", "--calib", str(fashion_dirs["train"]), "--calib-samples", "40", "--val",
              str(fashion_dirs["val"]), "--bayes-samples", "8", "--bayes-layout", layout, "--bias-correction", "off")
    out, ptq = tmp_path / "qat.edgeq", tmp_path / "ptq.edgeq"
    r = edgeq_here("convert", str(trained["bayes"]), *common, "--qat", str(fashion_dirs["train"]), "--qat-epochs", "1",
                   "-o", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "the Bayesian head's 8 weight samples stay as exported" in r.stdout
    r = edgeq_here("convert", str(trained["bayes"]), *common, "-o", str(ptq))
    assert r.returncode == 0, r.stderr[-2000:]
    q, p = (read_bundle(b).manifest.to_json() for b in (out, ptq))
    assert q["head"]["type"] == "bayes" and q["head"]["samples"] == 8 and q["head"]["layout"] == layout
    assert q["quantization"]["qat"]["epochs"] == 1 and q["quantization"]["full_integer"]
    # the samples were not trained: the int8 head's kernel is the exported samples within its rounding
    # the samples were not trained: the int8 head holds the exported samples as closely as PTQ's does (its
    # kernel rounded per tensor, PTQ's per channel: by hand 0.011 vs 0.010 relative error)
    assert q["head"]["weights"]["max_relative_error"] <= 2 * p["head"]["weights"]["max_relative_error"] + 0.005
    # the spread between samples keeps its size; which images have most MI moves with the backbone's training
    # (by hand, MI correlation with the model before training 0.1 after one epoch, 0.996 with none), so that is
    # not asserted here: the pure-logic test above holds int8 to what training saw
    assert 0.8 <= q["head"]["spread"]["kept"] <= 1.25, q["head"]["spread"]
    v = q["validation"]
    assert v["quantized_top1"] >= v["float_top1"] - 0.05, v
