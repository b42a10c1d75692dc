"""k-means weight sharing: the maths on hand-made data, and the real converter keeping at most N int8 values per
channel in the kernels it ships."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHAPE_LABELS, assert_clean_error, edgeq_here, run_edgeq, save_with_labels


def test_kmeans_1d_hand_case_and_inits():
    from edgeq.converter.stages.cluster import kmeans_1d

    v = np.array([[0.0, 0.1, 0.2, 10.0, 10.1, 10.2, -5.0, -5.2]])
    for init in ("linear", "kmeans++"):
        c, labels = kmeans_1d(v, 3, init, seed=1)
        assert sorted(np.round(c[0], 6)) == pytest.approx([-5.1, 0.1, 10.1])
        assert len(set(labels[0][:3])) == 1 and len(set(labels[0][3:6])) == 1 and labels[0][0] != labels[0][3]
    # rows are independent; a row with fewer distinct values than clusters keeps them exactly
    c, labels = kmeans_1d(np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 6.0, 6.0]]), 2)
    assert np.allclose(np.take_along_axis(c, labels, 1)[1], [5, 5, 6, 6])


def test_cluster_model_per_tensor_and_per_channel():
    import keras

    from edgeq.converter.recipes import ClusterRecipe
    from edgeq.converter.stages.cluster import cluster_model

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, name="Conv1")(inp)
    x = keras.layers.DepthwiseConv2D(3, name="dw_small")(x)  # 3*3*8 = 72 weights
    x = keras.layers.Conv2D(64, 3, name="big")(x)  # 3*3*8*64 = 4608
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)  # 3*3*64*2 = 1152
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(40, name="fc")(x))  # 128*40 = 5120
    before = model.get_layer("Conv1").get_weights()[0].copy()
    report = {r["layer"]: r for r in cluster_model(model, ClusterRecipe(8))}
    assert report["Conv1"]["skipped"] == "matches --cluster-skip"
    assert "fewer than" in report["dw_small"]["skipped"]
    assert np.array_equal(model.get_layer("Conv1").get_weights()[0], before)
    for name in ("big", "dw", "fc"):
        assert report[name]["clusters"] == 8 and len(np.unique(model.get_layer(name).get_weights()[0])) <= 8
    cluster_model(model, ClusterRecipe(4, per_channel=True, skip="^$"))
    k = model.get_layer("big").get_weights()[0]
    assert max(len(np.unique(k[..., c])) for c in range(k.shape[-1])) <= 4
    d = model.get_layer("dw").get_weights()[0].reshape(9, -1)  # channels = in x multiplier
    assert max(len(np.unique(d[:, c])) for c in range(d.shape[1])) <= 4


def test_convert_with_clusters_ships_at_most_n_values(tmp_path, shapes_dir):
    import keras

    from edgeq.bundle import read_bundle
    from edgeq.runtime import weight_stats

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="Conv1")(inp)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="big")(x)  # 4,608 weights
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = save_with_labels(keras.Model(inp, keras.layers.Dense(3, name="logits")(x)), tmp_path / "m.keras",
                            SHAPE_LABELS)
    out = tmp_path / "c.edgeq"
    r = edgeq_here("convert", str(path), "--density", "off", "--calib", str(shapes_dir), "--calib-samples", "20",
                  "--clusters", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    b = read_bundle(out)
    c = b.manifest.to_json()["clustering"]
    assert c["clusters"] == 4 and c["clustered"] == 1 and c["skipped"] == 2
    assert c["shipped"] == {"kernels_checked": 1, "max_distinct_per_channel": 4}
    # read the shipped kernels independently: the clustered one has <= 4 values per channel, Conv1 (skipped) more
    stats = {w["name"].split("/")[-2]: w for w in weight_stats(b.load_model())}
    big = next(v for k, v in stats.items() if k.startswith("big"))
    first = next(v for k, v in stats.items() if k.startswith("Conv1"))
    assert big["max_distinct_per_channel"] <= 4 < first["max_distinct_per_channel"]
    info = json.loads(run_edgeq("inspect", str(out), "--json").stdout)
    assert info["clustering"]["clusters"] == 4 and info["kernels"]


def test_cluster_bad_inputs(tmp_path, tiny_keras_path, shapes_dir):
    common = ["--calib", str(shapes_dir), "--calib-samples", "10", "-o", str(tmp_path / "x.edgeq")]
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--clusters", "1", *common),
                       "--clusters 1", "2 to 256")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--clusters", "8", "--cluster-skip", "(", *common),
                       "--cluster-skip", "not a regular expression")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--clusters", "8", "--cluster-skip", ".*", *common),
                       "--cluster-skip '.*' matches every one of the", "narrow the pattern")
    # the tiny model's kernels are all below the size worth clustering: nothing to target
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--clusters", "8", "--cluster-skip", "^$", *common),
                       "no layer was clustered", "fewer than 1024 weights")
    assert not (tmp_path / "x.edgeq").exists()


def test_no_kernel_to_cluster():
    import keras

    from edgeq.converter.recipes import ClusterRecipe
    from edgeq.converter.stages.cluster import cluster_model
    from edgeq.errors import ModelError

    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(inp))
    with pytest.raises(ModelError, match="no Conv2D, DepthwiseConv2D or Dense kernel"):
        cluster_model(model, ClusterRecipe(16))


def test_vq_posterior_recovers_a_known_codebook():
    """(mu, sigma) pairs drawn around 3 known codewords: 2-D k-means finds them, every weight takes one, and the
    layer's sigma (through softplus) is the codeword's."""
    import keras

    from edgeq.converter.models.bayes import bayes_dense_class
    from edgeq.converter.stages.cluster import vq_posterior

    layer = bayes_dense_class()(32, name="bayes")
    keras.Sequential([keras.Input((64,)), layer])
    rng = np.random.default_rng(0)
    truth = np.array([[-0.3, 0.02], [0.0, 0.2], [0.4, 0.05]])
    pick = rng.integers(0, 3, (64, 32))
    mu = truth[pick, 0] + rng.normal(0, 0.01, pick.shape)
    sigma = truth[pick, 1] * rng.uniform(0.95, 1.05, pick.shape)
    layer.kernel_mu.assign(mu.astype(np.float32))
    layer.kernel_rho.assign(np.log(np.expm1(sigma)).astype(np.float32))
    info = vq_posterior(layer, 3)
    assert info["codewords"] == 3 and info["weights"] == 64 * 32
    assert np.allclose(sorted(map(tuple, info["codebook"])), truth, atol=0.01)
    post = layer.posterior()
    pairs = np.unique(np.round(np.stack([post["kernel_mu"].ravel(), post["kernel_sigma"].ravel()], 1), 5), axis=0)
    assert len(pairs) == 3
    assert info["relative_rmse_mu"] < 0.05 and info["relative_rmse_sigma"] < 0.05


def test_packed_bundle_rebuilds_the_exact_model(tmp_path, shapes_dir):
    """4-bit indices and per-channel codebooks in weights.npz, zeros in model.tflite; the device rebuilds the
    model and the manifest's sha256 of the full model proves it bit-identical. Tampering is refused."""
    import zipfile

    import keras

    from edgeq.bundle import read_bundle
    from edgeq.packing import pack_kernel, unpack_kernel

    rng = np.random.default_rng(0)
    w = rng.choice(np.arange(-8, 8, dtype=np.int8), size=(5, 3, 3, 7))
    codebook, packed, k = pack_kernel(w, 0)
    assert k <= 16 and packed.nbytes == (w.size + 1) // 2
    assert np.array_equal(unpack_kernel(codebook, packed, list(w.shape), 0), w)

    keras.utils.set_random_seed(1)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="Conv1")(inp)
    x = keras.layers.Conv2D(96, 3, padding="same", activation="relu", name="big")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = save_with_labels(keras.Model(inp, keras.layers.Dense(3, name="logits")(x)), tmp_path / "m.keras",
                            SHAPE_LABELS)
    plain, clustered = tmp_path / "plain.edgeq", tmp_path / "c.edgeq"
    common = ["--calib", str(shapes_dir), "--calib-samples", "20"]
    assert edgeq_here("convert", str(path), "--density", "off", *common, "-o", str(plain)).returncode == 0
    r = edgeq_here("convert", str(path), "--density", "off", *common, "--clusters", "16", "--cluster-per-channel", "-o", str(clustered))
    assert r.returncode == 0, r.stderr[-2000:]
    b = read_bundle(clustered)  # verifies size and sha256 of the rebuilt model
    entries = b.manifest.to_json()["model"]["packed"]["kernels"]
    assert len(entries) == 1 and entries[0]["values"] <= 16 and entries[0]["bytes"] == 96 * 3 * 3 * 16
    with zipfile.ZipFile(clustered) as zf:
        stored = zf.read("model.tflite")
    assert len(stored) == len(b.model_bytes) and stored != b.model_bytes
    assert stored.count(bytes(entries[0]["bytes"])) >= 1  # the kernel's place is zeros on disk
    assert clustered.stat().st_size < plain.stat().st_size
    r = run_edgeq("run", "--model", str(clustered), "--source", str(shapes_dir / "circle"), "--output", "-",
                  "--spool", str(tmp_path / "s.db"), "--max-frames", "2")
    assert r.returncode == 0 and r.stdout.count('"edgeq.detections"') == 2, r.stderr
    # flip one packed index: the rebuilt model no longer matches the manifest's sha256
    tampered = tmp_path / "t.edgeq"
    with zipfile.ZipFile(clustered) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "weights.npz":
                import io

                arrays = dict(np.load(io.BytesIO(data)))
                arrays["indices_0"] = arrays["indices_0"].copy()
                arrays["indices_0"][0] ^= 0x11
                buf = io.BytesIO()
                np.savez(buf, **arrays)
                data = buf.getvalue()
            dst.writestr(item, data)
    assert_clean_error(edgeq_here("inspect", str(tampered)), "sha256", "does not match")


def test_finetune_keeps_weights_on_their_clusters(tmp_path, shapes_dir):
    import keras

    from edgeq.bundle import read_bundle
    from edgeq.converter.recipes import ClusterRecipe
    from edgeq.converter.stages.cluster import cluster_model, finetune, project

    # projection: each cluster takes the mean of its weights
    k = np.array([[1.0, 2.0], [3.0, 10.0]])
    assert np.allclose(project(k, np.array([[0, 0, 0, 1]]), False, False), [[2.0, 2.0], [2.0, 10.0]])

    keras.utils.set_random_seed(2)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="Conv1")(inp)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="big")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="logits")(x))
    path = save_with_labels(model, tmp_path / "m.keras", SHAPE_LABELS)
    assignments: dict = {}
    cluster_model(model, ClusterRecipe(8), assignments)
    before = model.get_layer("big").get_weights()[0].copy()
    x_train = np.random.default_rng(0).uniform(-1, 1, (64, 32, 32, 3)).astype(np.float32)
    finetune(model, x_train, np.arange(64) % 3, assignments, False, epochs=1, lr=1e-2)
    after = model.get_layer("big").get_weights()[0]
    assert not np.allclose(after, before) and len(np.unique(after)) <= 8  # it trained, and stayed shared

    out = tmp_path / "ft.edgeq"
    r = edgeq_here("convert", str(path), "--density", "off", "--calib", str(shapes_dir), "--calib-samples", "20", "--clusters", "8",
                  "--finetune", str(shapes_dir), "--val", str(shapes_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    c = read_bundle(out).manifest.to_json()["clustering"]
    assert c["finetune"]["images"] == 36 and c["shipped"]["max_distinct_per_channel"] <= 8


def test_finetune_bad_inputs(tmp_path, tiny_keras_path, shapes_dir):
    common = ["--calib", str(shapes_dir), "--calib-samples", "10", "-o", str(tmp_path / "x.edgeq")]
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--finetune", str(shapes_dir), *common),
                       "--finetune", "--clusters")
    assert_clean_error(edgeq_here("convert", str(tiny_keras_path), "--clusters", "8", "--cluster-skip", "^$",
                                 "--finetune", str(tmp_path / "missing"), *common), "--finetune", "not a folder")
    assert not (tmp_path / "x.edgeq").exists()
