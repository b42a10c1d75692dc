"""Bias correction and accuracy-aware quantisation with the real converter: the maths on a tiny model, the
simulation against the kernels TFLite really stores, and a model made hard for int8 on purpose (one outlier
channel) that plain PTQ breaks and the accuracy-aware mode repairs within the bound, naming the layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FMNIST_CLASSES, assert_clean_error, edgeq_here, run_edgeq, save_with_labels
from floors import check, seeded

pytestmark = pytest.mark.slow


def _skewed_conv_model(use_bias: bool):
    """A conv whose every output channel has one large weight and small positive others: int8 rounds the small
    ones towards a few levels, which shifts the output mean (what bias correction removes)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 8))
    conv = keras.layers.Conv2D(6, 3, use_bias=use_bias, name="conv")
    x = conv(inp)
    outs = keras.layers.BatchNormalization(name="bn")(x) if not use_bias else x
    model = keras.Model(inp, outs)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.0, 0.004, (3, 3, 8, 6))
    w[0, 0, 0, :] = 1.0  # the outlier sets the channel's int8 step to 1/127
    conv.set_weights([w.astype(np.float32)] + ([np.zeros(6, np.float32)] if use_bias else []))
    if not use_bias:
        bn = model.get_layer("bn")
        bn.set_weights([np.full(6, 2.0, np.float32), np.full(6, 0.5, np.float32), np.zeros(6, np.float32),
                        np.ones(6, np.float32)])
    x = rng.uniform(0.0, 1.0, (64, 12, 12, 8)).astype(np.float32)
    return model, x


@pytest.mark.parametrize("use_bias", [True, False])
def test_bias_correction_moves_the_mean_error_towards_zero(use_bias):
    import keras

    from edgeq.converter.stages.bias_correct import bias_correction, quantize_weights

    model, x = _skewed_conv_model(use_bias)
    conv = model.get_layer("conv")
    w = conv.get_weights()[0]
    wq = quantize_weights(w, depthwise=False)
    assert np.abs(wq - w).max() <= (np.abs(w).max(axis=(0, 1, 2)) / 127 / 2 + 1e-9).max()

    def simulated(m):
        """The model with the int8-rounded kernel (what the converter ships), float everywhere else."""
        clone = keras.models.clone_model(m)
        clone.set_weights(m.get_weights())
        cw = clone.get_layer("conv").get_weights()
        clone.get_layer("conv").set_weights([quantize_weights(cw[0], False).astype(np.float32), *cw[1:]])
        return np.asarray(clone(x, training=False), dtype=np.float64)

    reference = np.asarray(model(x, training=False), dtype=np.float64)
    before = np.abs((simulated(model) - reference).mean(axis=(0, 1, 2)))
    report = bias_correction(model, x)
    after = np.abs((simulated(model) - reference).mean(axis=(0, 1, 2)))
    assert report[0]["corrected"] == ("bias" if use_bias else "bn.moving_mean")
    assert before.mean() > 1e-3  # the rounding really shifted the mean
    assert (after < before).all() and after.max() < 0.05 * before.max()


def test_simulated_rounding_is_what_tflite_stores(tmp_path, shapes_dir, tiny_keras_path):
    """quantize_weights reproduces the converter's int8 kernels: Conv2D, DepthwiseConv2D and Dense."""
    import keras

    from edgeq.bundle import read_bundle
    from edgeq.converter.stages.bias_correct import quantize_weights
    from edgeq.runtime import weight_kernels

    out = tmp_path / "t.edgeq"
    r = edgeq_here("convert", str(tiny_keras_path), "--density", "off", "--calib", str(shapes_dir), "--calib-samples", "20",
                  "--bias-correction", "off", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    model = keras.models.load_model(tiny_keras_path, compile=False)
    shipped = [(op, w) for op, _, w, _, _ in weight_kernels(read_bundle(out).load_model())]
    checked = 0
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            continue
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        k = layer.get_weights()[0]
        q = quantize_weights(k, depthwise)
        steps = np.round(q / (np.abs(k).max(axis=(0, 1) if depthwise else tuple(range(k.ndim - 1))) / 127))
        op = {"Conv2D": "CONV_2D", "DepthwiseConv2D": "DEPTHWISE_CONV_2D", "Dense": "FULLY_CONNECTED"}[
            layer.__class__.__name__]
        # TFLite layouts: conv [out, h, w, in], depthwise [1, h, w, in*mult], dense [out, in]
        mine = (np.transpose(steps, (3, 0, 1, 2)) if op == "CONV_2D" else
                steps.reshape(1, *steps.shape[:2], -1) if depthwise else steps.T)
        same = [w for o, w in shipped if o == op and w.shape == mine.shape]
        assert len(same) == 1, (op, mine.shape)
        assert np.array_equal(mine.astype(np.int64), same[0].astype(np.int64)), layer.name
        checked += 1
    assert checked == 4


@pytest.fixture(scope="module")
def hard_model(fashion_dirs, tmp_path_factory) -> Path:
    """A small CNN trained on Fashion-MNIST (4 classes, 32 px), then given one outlier channel: same float
    function, broken int8."""
    from edgeq.converter.models.outlier import add_outlier_channel, train_small
    from edgeq.converter.training.classifier import load_folder_arrays
    from edgeq.preprocess import PreprocessSpec

    import keras

    spec = PreprocessSpec(32, 32, 3, "RGB", "stretch", (127.5,), (127.5,))
    x, y, labels = load_folder_arrays(fashion_dirs["train"], spec)
    # fit's shuffle draws from the global generators: seeded here, the model is the seed's whatever ran before it
    # in this worker (it was not, and one seed's model came out barely broken in one run and broken in another)
    keras.utils.set_random_seed(int(seeded(0)))
    model = train_small(x, y, FMNIST_CLASSES, epochs=8, seed=int(seeded(0)))
    before = np.asarray(model(x[:64], training=False))
    # the outlier goes on conv_b's most active channel: on a dead one (a ReLU that never fires, as one seed's channel
    # 0 was) x1000 changes nothing and int8 stays fine
    conv_b = keras.Model(model.inputs, model.get_layer("conv_b").output)
    channel = int(np.asarray(conv_b(x[:256], training=False)).mean(axis=(0, 1, 2)).argmax())
    add_outlier_channel(model, "conv_b", "conv_c", factor=1000.0, channel=channel)
    assert np.allclose(np.asarray(model(x[:64], training=False)), before, atol=1e-3)
    path = tmp_path_factory.mktemp("hard") / "hard.keras"
    return save_with_labels(model, path, labels)


def _convert(model: Path, out: Path, fashion_dirs, *extra: str):
    return edgeq_here("convert", str(model), "--density", "off", "--calib", str(fashion_dirs["train"]), "--calib-samples", "100",
                     "--val", str(fashion_dirs["val"]), "-o", str(out), *extra)


def test_accuracy_aware_mode_repairs_the_outlier_model(hard_model, fashion_dirs, tmp_path):
    from edgeq.bundle import read_bundle

    plain = tmp_path / "plain.edgeq"
    r = _convert(hard_model, plain, fashion_dirs, "--bias-correction", "off")
    assert r.returncode == 0, r.stderr[-2000:]
    v = read_bundle(plain).manifest.to_json()["validation"]
    plain_drop = v["float_top1"] - v["quantized_top1"]
    check("accuracy.hard.plain_drop", plain_drop)  # plain PTQ loses far more than one point

    fixed = tmp_path / "fixed.edgeq"
    # 0.03 on --val's 200 images (6 of them): one training seed in five cannot get under 0.02 with every op of the
    # outlier path in float (the rest of the int8 graph costs it 4 images), so a 0.01 bound held only by luck.
    # Bias correction off, as for the plain bundle: on some seeds it alone brings the drop under the bound, and
    # the loop would have nothing to repair; equalisation off, or the loop would repair it that way (next test)
    r = _convert(hard_model, fixed, fashion_dirs, "--max-drop", "0.03", "--bias-correction", "off", "--equalize", "off")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "accuracy-aware: bound reached" in r.stdout
    b = read_bundle(fixed)
    q = b.manifest.to_json()["quantization"]
    aa = q["accuracy_aware"]
    assert aa["met"] and aa["plain_drop"] > aa["final_drop"]
    check("accuracy.hard.repaired_drop", aa["final_drop"])
    assert q["float_layers"] == aa["float_layers"] and 1 <= len(aa["float_layers"]) <= 10
    # the outlier tensor is produced by conv_b and read by conv_c: the layers kept in float are among those
    assert any("conv_b" in n or "conv_c" in n for n in aa["float_layers"])
    assert aa["ranking"][0]["output_error"] > aa["ranking"][-1]["output_error"]
    # what the repair cost, and the bundle's own validation agrees with the loop's last measurement
    assert aa["cost"]["model_bytes"][1] > aa["cost"]["model_bytes"][0]
    v = b.manifest.to_json()["validation"]
    assert v["float_top1"] - v["quantized_top1"] == pytest.approx(aa["final_drop"], abs=1e-4)
    assert b.manifest.to_json()["input"]["dtype"] == "int8" and all(o["dtype"] == "int8" for o in b.manifest.to_json()["outputs"])
    # the device runs the mixed graph, and inspect/doctor say which ops left the int8 path
    r = run_edgeq("run", "--model", str(fixed), "--source", str(fashion_dirs["test"] / "dress"), "--output", "-",
                  "--spool", str(tmp_path / "s.db"), "--max-frames", "2")
    assert r.returncode == 0 and r.stdout.count('"edgeq.detections"') == 2, r.stderr[-2000:]
    info = json.loads(run_edgeq("inspect", str(fixed), "--json").stdout)
    assert any(op["operands"] and "float32" in op["operands"] for op in info["ops"])
    doctor = {c["name"]: c for c in json.loads(run_edgeq("doctor", "--model", str(fixed), "--json").stdout)["checks"]}
    assert "CONV_2D" in doctor["xnnpack"]["data"]["float_ops"] and "off the int8 path" in doctor["xnnpack"]["detail"]

    # eval shows plain and repaired side by side, each labelled
    r = edgeq_here("eval", str(fixed), "--compare", str(plain), "--data", str(fashion_dirs["test"]), "--json")
    models = json.loads(r.stdout)["models"]
    assert "layer(s) float" in models["quantized"]["variant"] and "float" not in models["plain"]["variant"]
    check("accuracy.hard.compare_gain", models["quantized"]["top1"] - models["plain"]["top1"])


def test_equalize_repairs_the_outlier_model_in_full_int8(hard_model, fashion_dirs, tmp_path):
    """Cross-layer equalisation: the outlier channel's range is shared with conv_c, the float function stays the
    same, and int8 comes back with no op left in float (what --max-drop needed float layers for above)."""
    from edgeq.bundle import read_bundle

    out = tmp_path / "equalized.edgeq"
    r = _convert(hard_model, out, fashion_dirs, "--equalize", "--bias-correction", "off")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "equalize: 2 layer pairs" in r.stdout, r.stdout
    m = read_bundle(out).manifest.to_json()
    eq, q = m["quantization"]["equalization"], m["quantization"]
    assert eq["checked_on"].endswith("--val") and eq["relative_output_change"] < 1e-4, eq
    pairs = {(p["first"], p["second"]): p for p in eq["layers"]}
    assert set(pairs) == {("conv_a", "conv_b"), ("conv_b", "conv_c")}
    outlier = pairs[("conv_b", "conv_c")]
    assert outlier["spread_before"] > 100 and outlier["spread_after"] < 2, outlier
    assert not q["float_ops"] and q["full_integer"]
    v = m["validation"]
    check("accuracy.hard.equalized_drop", v["float_top1"] - v["quantized_top1"])

    # --max-drop tries it before keeping any layer in float (--equalize auto, the default)
    loop = tmp_path / "loop.edgeq"
    r = _convert(hard_model, loop, fashion_dirs, "--max-drop", "0.03", "--bias-correction", "off")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "trying --equalize before any layer in float" in r.stdout and "equalised model kept" in r.stdout
    q = read_bundle(loop).manifest.to_json()["quantization"]
    assert q["equalization"]["reason"].startswith("--max-drop: drop ") and q["equalization"]["pairs"] == 2
    assert q["accuracy_aware"]["met"] and not q["accuracy_aware"]["float_layers"] and not q["float_ops"]


def test_equalize_on_a_model_without_a_pair_warns_and_goes_on(tmp_path, shapes_dir):
    from edgeq.bundle import read_bundle
    from edgeq.converter.tf import import_tensorflow

    import_tensorflow()
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inp))
    model = save_with_labels(keras.Model(inp, keras.layers.Dense(3)(x)), tmp_path / "flat.keras",
                             ["circle", "square", "triangle"])
    out = tmp_path / "flat.edgeq"
    r = edgeq_here("convert", str(model), "--calib", str(shapes_dir), "--density", "off", "--equalize", "-o", str(out))
    assert r.returncode == 0 and r.stdout.count("equalize: warning: ") == 1, r.stdout + r.stderr
    assert "no conv -> ReLU/ReLU6 -> conv pair" in r.stdout
    assert read_bundle(out).manifest.to_json()["quantization"].get("equalization") is None


def test_equalize_leaves_a_batch_norm_without_gamma_alone():
    """Pure logic: a batch norm with scale=False cannot carry a channel's scale (its beta alone would shift, not
    scale), so that pair is not equalised; the plain ReLU pair after it is."""
    from edgeq.converter.stages.equalize import find_pairs
    from edgeq.converter.tf import import_tensorflow

    import_tensorflow()
    import keras

    inp = keras.Input((8, 8, 2))
    x = keras.layers.BatchNormalization(scale=False)(keras.layers.Conv2D(4, 3, name="a")(inp))
    x = keras.layers.Conv2D(4, 1, activation="relu", name="b")(keras.layers.ReLU()(x))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, name="c")(x))
    assert [(p.first.name, p.second.name) for p in find_pairs(model)] == [("b", "c")]


@pytest.mark.parametrize("nested", [False, True])
def test_equalize_keeps_relu6_where_it_clips(nested):
    """Pure logic on a tiny conv -> batch norm -> ReLU6 -> conv model with one channel that reaches 6 on the
    samples: that channel is not rescaled (ReLU6 would clip differently), the others are, and the outputs on the
    samples stay the same; also with the model nested in another behind a layer (as a backbone is)."""
    from edgeq.converter.stages.equalize import equalise
    from edgeq.converter.tf import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inp)
    x = keras.layers.BatchNormalization(name="a_bn")(x)
    x = keras.layers.ReLU(6.0, name="a_relu")(x)
    model = keras.Model(inp, keras.layers.Conv2D(3, 1, name="b")(x))
    bn = model.get_layer("a_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.array([20.0, 0.05, 1.0, 0.5], np.float32), np.array([4.0, 0.0, 0.0, 0.0], np.float32), mean,
                    var])  # channel 0 saturates at 6; channel 1 is narrow and would be scaled up
    samples = np.random.default_rng(0).uniform(-1, 1, (32, 8, 8, 2)).astype(np.float32)
    if nested:  # the maxima are read inside the inner model, from what the outer one gives it
        outer_in = keras.Input((8, 8, 2))
        model = keras.Model(outer_in, model(keras.layers.Rescaling(0.5, name="half")(outer_in)))
    before = np.asarray(model(samples, training=False))
    (pair,) = equalise(model, samples)
    after = np.asarray(model(samples, training=False))
    assert pair.act == "relu6" and pair.scale[0] == 1.0 and 0 in pair.held
    assert np.count_nonzero(np.abs(np.log(pair.scale)) > 1e-6) >= 2  # the others moved
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_qat_int8_computes_what_training_saw():
    """Pure logic, no training: a MobileNetV2 (0.35/32, batch norms given spread) cloned with fake-quant ops and
    converted from their ranges alone is a full-int8 graph whose outputs are the fake-quant model's, within one
    output step (rounding order); the float model differs by more."""
    from edgeq.converter.recipes import QuantMode, QuantRecipe
    from edgeq.converter.stages import qat
    from edgeq.converter.stages.load import build_mobilenet_v2
    from edgeq.converter.tf import import_tensorflow
    from edgeq.runtime import Model

    import_tensorflow()
    import keras

    samples = np.random.default_rng(0).uniform(-1, 1, (48, 32, 32, 3)).astype(np.float32)
    model = build_mobilenet_v2(32, 0.35, 4, seed=1)
    rng = np.random.default_rng(1)
    for layer in model.layers:  # random init leaves every batch norm the identity and the logits near 0
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, mean, var = layer.get_weights()
            layer.set_weights([g * rng.uniform(0.5, 2, g.shape), b + rng.normal(0, 0.5, b.shape), mean, var])
    k, b = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([k * 100, b])
    fake = qat.build(model, samples[:32])
    data = qat.convert(fake, QuantRecipe(QuantMode.INT8))
    m = Model(data)
    assert not m.delegation.cpu_ops and m.input.dtype == np.int8
    ops = {op.name for op in m.ops} - {"DELEGATE"}
    assert ops <= {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "PAD"}, ops
    assert all(t in ("int8", "int32") for op in m.ops if op.name != "DELEGATE" for t in op.result_types), m.ops
    x = samples[32:]
    got = np.concatenate([next(iter(m.run(m.input.quantize(v[None])).values())) for v in x])
    simulated, floating = np.asarray(fake(x)), np.asarray(model(x))
    step = m.outputs[0].scale
    assert np.abs(got - simulated).max() <= step * 1.001, (np.abs(got - simulated).max(), step)
    assert np.abs(floating - simulated).max() > step


@pytest.mark.parametrize("layer,needle", [("swish_conv", "activation 'silu'"), ("leaky", "LeakyReLU")])
def test_qat_names_a_layer_it_cannot_simulate(layer, needle):
    from edgeq.converter.stages import qat
    from edgeq.converter.tf import import_tensorflow
    from edgeq.errors import ModelError

    import_tensorflow()
    import keras

    inp = keras.Input((16, 16, 3))
    if layer == "swish_conv":
        x = keras.layers.Conv2D(4, 3, activation="swish", name="swish_conv")(inp)
    else:
        x = keras.layers.LeakyReLU(name="leaky")(keras.layers.Conv2D(4, 3)(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(ModelError, match=needle) as err:
        qat.build(model, np.zeros((4, 16, 16, 3), np.float32))
    assert layer in str(err.value)


def test_qat_fine_tunes_the_outlier_model_in_int8(hard_model, fashion_dirs, tmp_path):
    """--qat on the model PTQ breaks: two epochs of fake-quant training, recorded in the manifest, and with
    --equalize first (equalisation, then QAT) int8 is back at the float top-1. QAT alone does not repair this
    model in two epochs (by hand: int8 top-1 +6 and +0 points over plain on seeds 0 and 1): the x1000 channel
    still sets its tensor's int8 step, which is equalisation's job; nor does its training loss reliably fall (seeds 1
    and 2 rose), so nothing about QAT alone on this model is asserted beyond what it records."""
    from edgeq.bundle import read_bundle

    def top1(path: Path) -> tuple[float, float]:
        v = read_bundle(path).manifest.to_json()["validation"]
        return v["float_top1"], v["quantized_top1"]

    trained, both = tmp_path / "qat.edgeq", tmp_path / "both.edgeq"
    qat = ("--qat", str(fashion_dirs["train"]), "--qat-epochs", "2", "--bias-correction", "off")
    r = _convert(hard_model, trained, fashion_dirs, *qat)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "qat: epoch 2/2" in r.stdout and "converted with the ranges training learned" in r.stdout
    q = read_bundle(trained).manifest.to_json()["quantization"]
    assert q["qat"]["epochs"] == 2 and len(q["qat"]["history"]) == 2 and q["qat"]["images"] == 800
    assert q["full_integer"] and not q.get("float_ops") and "bias_correction" not in q
    assert all(np.isfinite(h["loss"]) for h in q["qat"]["history"]), q["qat"]  # training did not diverge
    r = _convert(hard_model, both, fashion_dirs, *qat, "--equalize")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    q = read_bundle(both).manifest.to_json()["quantization"]
    assert q["equalization"]["pairs"] == 2 and q["qat"]["epochs"] == 2
    float_top1, int8_top1 = top1(both)
    check("accuracy.hard.equalized_qat_drop", float_top1 - int8_top1)
    # edgeq eval puts them side by side, each saying how it was made
    r = edgeq_here("eval", str(both), "--compare", str(trained), "--data", str(fashion_dirs["test"]), "--json")
    models = json.loads(r.stdout)["models"]
    assert models["quantized"]["variant"] == "int8, equalised (2 pairs), QAT 2 epoch(s)", models["quantized"]
    assert models["qat"]["variant"] == "int8, QAT 2 epoch(s)", models


def test_qat_stopped_with_ctrl_c_leaves_no_bundle(hard_model, fashion_dirs, tmp_path):
    import signal
    import subprocess

    from conftest import edgeq_command

    out = tmp_path / "never.edgeq"
    proc = subprocess.Popen(edgeq_command("convert", str(hard_model), "--density", "off", "--calib",
                                          str(fashion_dirs["train"]), "--calib-samples", "100", "--qat",
                                          str(fashion_dirs["train"]), "--qat-epochs", "500", "-o", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as a terminal gives it: a suite started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("qat: epoch 1/500"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "edgeq: interrupted" in err and "Traceback" not in err, (lines, err)
    assert not out.exists() and not list(tmp_path.glob("*.edgeq*")), list(tmp_path.iterdir())


def test_unmet_bound_keeps_the_best_model_and_fails_unless_best_effort(hard_model, fashion_dirs, tmp_path):
    from edgeq.bundle import read_bundle

    out = tmp_path / "best.edgeq"
    r = _convert(hard_model, out, fashion_dirs, "--max-drop", "0.0", "--max-reverts", "1", "--bias-correction", "off",
                 "--equalize", "off")
    # one float layer cannot repair it: the outlier tensor is written by conv_b and read by conv_c
    assert_clean_error(r, "--max-drop 0", "not reached", "--best-effort")
    assert read_bundle(out).manifest.to_json()["quantization"]["accuracy_aware"]["met"] is False  # kept, complete
    r = _convert(hard_model, out, fashion_dirs, "--max-drop", "0.0", "--max-reverts", "1", "--bias-correction",
                 "off", "--equalize", "off", "--best-effort")
    assert r.returncode == 0 and "NOT reached" in r.stdout


def test_keep_float_by_name_and_bad_inputs(hard_model, fashion_dirs, tmp_path, tiny_keras_path, shapes_dir):
    from edgeq.bundle import read_bundle

    out = tmp_path / "kf.edgeq"
    r = _convert(hard_model, out, fashion_dirs, "--keep-float", "conv_[bc]", "--bias-correction", "off")
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_bundle(out).manifest.to_json()
    assert len(m["quantization"]["float_layers"]) == 2
    check("accuracy.hard.keep_float_drop", m["validation"]["float_top1"] - m["validation"]["quantized_top1"])

    x = tmp_path / "x.edgeq"
    common = ["--calib", str(shapes_dir), "--calib-samples", "10", "-o", str(x)]
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--max-drop", "0.01", *common),
                       "--max-drop", "--val")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--int16", "conv", *common),
                       "--int16", "--keep-float")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--keep-float", "no_such_layer", *common),
                       "--keep-float", "matches none")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--keep-float", "x", "--quant", "float16", *common),
                       "--keep-float", "int8")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--max-drop", "2", "--val", str(shapes_dir),
                                 *common), "--max-drop 2")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--max-drop", "0.01", "--max-reverts", "0", "--val",
                                 str(shapes_dir), *common), "--max-reverts 0", "at least 1")
    assert not x.exists()
