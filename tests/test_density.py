"""The unfamiliarity measure: the fit (converter/stages/density.py), the device's numpy finish (edgeq/density.py),
the review rule and what a payload may carry (never a NaN). The trained-model figures are in test_bayes.py and
test_detect.py; the x86 vs Cortex-A72 check in tests/arm."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgeq.density import DensityModel, finite_or_none
from edgeq.errors import DataError
from edgeq.manifest import Density
from edgeq.uncertainty import review


def _blobs(rng, n_per=60, dims=12, classes=3, spread=6.0):
    centres = rng.normal(0, spread, (classes, dims))
    x = np.concatenate([rng.normal(c, 1.0, (n_per, dims)) for c in centres])
    return x, np.repeat(np.arange(classes), n_per), centres


def _model(fitted, reference):
    block = dict(fitted["block"], reference=sorted(reference))
    return DensityModel.from_block(Density.model_validate(block))


def test_fit_scores_near_points_low_and_far_points_high():
    from edgeq.converter.stages.density import fit_gaussians

    rng = np.random.default_rng(0)
    x, y, centres = _blobs(rng)
    fitted = fit_gaussians(x, y, ["a", "b", "c"], rank=12, where="test")
    m = _model(fitted, [0.0, 1.0])
    near = np.concatenate([rng.normal(c, 1.0, (20, 12)) for c in centres])
    far = rng.normal(0, 1.0, (20, 12)) + 40.0
    s_near, s_far = m.scores(near @ fitted["W"]), m.scores(far @ fitted["W"])
    assert s_near.max() < s_far.min()
    # whitened, full rank, unit within-class covariance: the squared distance to the own mean is about chi2(12)
    assert 6 < np.median(s_near) < 20
    # the same as the Mahalanobis distance to the nearest mean, computed directly from the fitted covariance
    w = fitted["W"].astype(np.float64)
    precision = w @ w.T
    d = near[:, None, :] - np.stack([x[y == c].mean(0) for c in range(3)])[None]
    direct = np.einsum("ncf,fg,ncg->nc", d, precision, d).min(1)
    np.testing.assert_allclose(s_near, direct, rtol=1e-3)  # the device rounds coordinates to 1/4096 (density.GRID)


def test_rank_keeps_the_top_directions_and_the_manifest_block_validates():
    from edgeq.converter.stages.density import fit_gaussians

    x, y, _ = _blobs(np.random.default_rng(1))
    fitted = fit_gaussians(x, y, ["a", "b", "c"], rank=5, where="test")
    b = fitted["block"]
    assert fitted["W"].shape == (12, 5) and b["rank"] == 5 and b["features"] == 12
    assert list(b["eigenvalues"]) == sorted(b["eigenvalues"], reverse=True)
    assert 0.0 <= b["shrinkage"] <= 1.0 and 0 < fitted["explained"] < 1
    Density.model_validate(dict(b, reference=[0.0, 1.0]))


def test_more_features_than_samples_is_shrunk_not_singular():
    from edgeq.converter.stages.density import fit_gaussians

    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (30, 200))  # F > N: the sample covariance is singular
    y = np.repeat(np.arange(3), 10)
    fitted = fit_gaussians(x, y, ["a", "b", "c"], rank=64, where="test")
    assert np.all(np.isfinite(fitted["W"])) and fitted["block"]["shrinkage"] > 0
    assert np.all(np.isfinite(_model(fitted, [0.0, 1.0]).scores(x @ fitted["W"])))


@pytest.mark.parametrize("case, needle", [
    ("few", "class 'b' has 3 usable sample(s)"),
    ("none", "class 'c' has 0 usable sample(s)"),
    ("nan", "NaN or infinite"),
])
def test_fit_refuses_what_it_cannot_fit(case, needle):
    from edgeq.converter.stages.density import fit_gaussians

    x, y, _ = _blobs(np.random.default_rng(3))
    if case == "few":
        keep = (y != 1) | (np.arange(len(y)) < 63)
        x, y = x[keep], y[keep]
    elif case == "none":
        x, y = x[y < 2], y[y < 2]
    else:
        x[5, 3] = np.nan
    with pytest.raises(DataError) as e:
        fit_gaussians(x, y, ["a", "b", "c"], rank=4, where="--density-data d/")
    assert needle in str(e.value) and "--density-data d/" in str(e.value) and "\n" not in str(e.value)


def test_knn_distance_is_sklearns_kth_neighbour_distance_squared():
    from sklearn.neighbors import NearestNeighbors

    from edgeq.density import kth_nearest_squared

    rng = np.random.default_rng(1)
    refs, y = rng.normal(0, 1, (300, 16)), rng.normal(0, 1.5, (40, 16))
    for k in (1, 10):
        want = NearestNeighbors(n_neighbors=k).fit(refs).kneighbors(y)[0][:, -1] ** 2
        np.testing.assert_allclose(kth_nearest_squared(y, refs, k), want, rtol=1e-9, atol=1e-9)
    assert kth_nearest_squared(refs[:5], refs, 1).max() < 1e-9  # a reference is its own nearest
    assert kth_nearest_squared(np.zeros((0, 16)), refs, 3).shape == (0,)


def test_knn_block_round_trips_and_scores_what_the_fit_kept():
    """The converter's references (float16, base64 in the manifest) read back by the device's DensityModel: far
    points score high, points of the fitting data low, and the scores are the k-th neighbour distance computed
    from the fitting data itself (to float16 precision)."""
    from edgeq.converter.stages.density import fit_gaussians, knn_references
    from edgeq.density import kth_nearest_squared

    rng = np.random.default_rng(2)
    x, y, centres = _blobs(rng)
    fitted = fit_gaussians(x, y, ["a", "b", "c"], rank=12, where="test")
    block = dict(fitted["block"], reference=[0.0, 1.0], **knn_references(x, fitted["W"], 5, "test"))
    m = DensityModel.from_block(Density.model_validate(block))
    assert m.references.shape == (180, 12) and m.neighbours == 5
    near = np.concatenate([rng.normal(c, 1.0, (20, 12)) for c in centres]) @ fitted["W"]
    far = (rng.normal(0, 1.0, (20, 12)) + 40.0) @ fitted["W"]
    assert m.scores(near).max() < m.scores(far).min()
    exact = kth_nearest_squared(near, x @ fitted["W"].astype(np.float64), 5)
    np.testing.assert_allclose(m.scores(near), exact, rtol=2e-2)


@pytest.mark.parametrize("change, needle", [
    ({"neighbours": None}, "needs references and neighbours"),
    ({"neighbours": 500}, "neighbours 500 exceeds the 180 references"),
    ({"references": {"dtype": "float16", "shape": [180, 12], "data": "AAAA"}}, "data holds 3 bytes"),
    ({"references": {"dtype": "float16", "shape": [180, 12], "data": "not base64!"}}, "not base64"),
    ({"references": {"dtype": "float16", "shape": [360, 6], "data": None}}, "shape [N, 12]"),
    ({"method": "gda_shared_covariance"}, "belong to method knn_whitened"),
])
def test_a_knn_block_that_does_not_add_up_is_refused(change, needle):
    from edgeq.converter.stages.density import fit_gaussians, knn_references

    rng = np.random.default_rng(3)
    x, y, _ = _blobs(rng)
    fitted = fit_gaussians(x, y, ["a", "b", "c"], rank=12, where="test")
    block = dict(fitted["block"], reference=[0.0, 1.0], **knn_references(x, fitted["W"], 5, "test"))
    if "references" in change and change["references"]["data"] is None:
        change = {"references": dict(change["references"], data=block["references"]["data"])}
    block.update(change)
    with pytest.raises(ValueError, match=re.escape(needle)):
        Density.model_validate(block)


def test_knn_refuses_more_neighbours_than_references():
    from edgeq.converter.stages.density import knn_references

    with pytest.raises(DataError, match="--density-neighbours 50 exceeds the 20 reference samples"):
        knn_references(np.zeros((20, 4)), np.eye(4), 50, "test")


def test_disagreement_is_one_minus_the_gaussian_posterior_of_the_predicted_class():
    """The density's class posterior with equal priors and the identity covariance of whitened coordinates is a
    softmax of -d^2/2 (scipy's softmax here as the reference); far from every mean it stays finite."""
    from scipy.special import softmax

    rng = np.random.default_rng(3)
    means = rng.normal(0, 2.0, (4, 6))
    m = DensityModel(6, means, np.arange(1.0, 11.0))
    y = np.concatenate([means + rng.normal(0, 0.3, means.shape), (means[0] + means[1]) / 2 + 0 * means[:1],
                        rng.normal(0, 3.0, (20, 6))])
    predicted = rng.integers(0, 4, len(y))
    d2 = ((np.rint(y * 4096)[:, None] / 4096 - np.rint(means * 4096)[None] / 4096) ** 2).sum(-1)
    expected = 1.0 - softmax(-d2 / 2, axis=1)[np.arange(len(y)), predicted]
    got = m.disagreement(y, predicted)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert np.all((got >= 0) & (got <= 1))
    # at a class mean and predicting that class: sure; halfway between two means: a coin toss between them
    assert m.disagreement(means[2:3], np.array([2]))[0] < 0.05
    half = m.disagreement(((means[0] + means[1]) / 2)[None], np.array([0]))[0]
    assert half >= 0.5 - 1e-9
    far = m.disagreement(np.full((1, 6), 1e6), np.array([1]))
    assert np.isfinite(far).all() and 0.0 <= far[0] <= 1.0
    assert m.disagreement(np.zeros((0, 6)), np.zeros(0, int)).shape == (0,)


def test_one_pass_gives_the_scores_and_the_disagreement_of_separate_calls():
    """measures(): the device's finish, one pass onto the grid for both values, equal to the two calls alone, for
    the nearest-mean score and the k-NN one."""
    rng = np.random.default_rng(4)
    means = rng.normal(0, 2.0, (3, 5))
    y = rng.normal(0, 2.0, (9, 5))
    predicted = rng.integers(0, 3, len(y))
    for m in (DensityModel(5, means, np.arange(1.0, 11.0)),
              DensityModel(5, means, np.arange(1.0, 11.0), rng.normal(0, 2.0, (40, 5)), neighbours=3)):
        scores, disagreement = m.measures(y, predicted)
        np.testing.assert_array_equal(scores, m.scores(y))
        np.testing.assert_array_equal(disagreement, m.disagreement(y, predicted))
        assert m.measures(y)[1] is None
        assert [a.shape for a in m.measures(np.zeros((0, 5)), np.zeros(0, int))] == [(0,), (0,)]


def test_percentile_reads_the_reference():
    m = DensityModel(2, np.zeros((1, 2)), np.sort(np.arange(1.0, 101.0)))
    np.testing.assert_allclose(m.percentile(np.array([0.5, 1.0, 50.0, 100.0, 1e9])), [0, 1, 50, 100, 100])


def test_non_finite_is_never_published_and_counts_as_flagged():
    assert finite_or_none(float("nan")) is None and finite_or_none(float("inf")) is None
    assert finite_or_none(1.23456789) == 1.234568
    r = review(0.1, 0.5, float("nan"), 10.0)
    assert r.flag is True and r.reason == "unfamiliar"
    assert review(0.9, 0.5, 50.0, 10.0).reason == "unfamiliar+ambiguous"
    assert review(0.9, 0.5, 1.0, 10.0).reason == "ambiguous"
    assert review(0.1, 0.5, 1.0, 10.0) == review(0.1, 0.5, None, None)  # passes both, or the one it has
    assert review(0.1, None, None, None).flag is None


def test_payload_drops_a_nan_unfamiliarity_and_flags_it():
    """What the device publishes for a NaN score: no unfamiliarity key (never NaN in JSON), flagged unfamiliar."""
    import json

    from device.decoders import ReviewPolicy

    class Bound:  # the density part of a bound head: only its percentile table is read here
        density = DensityModel(2, np.zeros((1, 2)), np.array([1.0, 2.0, 3.0]))

    policy = ReviewPolicy("predictive_entropy", 0.5, 2.5)
    bad = policy.apply({"uncertainty": {"predictive_entropy": 0.1}}, 0.1, float("nan"), Bound())
    assert "unfamiliarity" not in bad["uncertainty"] and "unfamiliarity_percentile" not in bad["uncertainty"]
    assert bad["needs_review"] is True and bad["review_reason"] == "unfamiliar"
    json.dumps(bad, allow_nan=False)
    ok = policy.apply({"uncertainty": {"predictive_entropy": 0.1}}, 0.1, 2.0, Bound())
    assert ok["uncertainty"]["unfamiliarity"] == 2.0 and ok["uncertainty"]["unfamiliarity_percentile"] == pytest.approx(66.67)
    assert ok["needs_review"] is False and ok["review_reason"] is None


def test_payload_drops_a_nan_density_disagreement_and_flags_it_ambiguous():
    """A classifier result whose density disagreement is not finite: the key is left out (never NaN or null in
    JSON, which the schema would refuse), and a rule resting on it flags the result ambiguous."""
    import json

    import jsonschema

    from device.decoders import ClassificationDecoder, ReviewPolicy
    from edgeq.bundle import message_schema

    class Head:  # the bound head's parts decode() reads: logits, and the density's two values
        density = None

        def sample_logits(self, raw):
            return np.array([[3.0, 0.0]])

        def density_measures(self, raw, predicted):
            return None, self.value

    head = Head()
    decoder = object.__new__(ClassificationDecoder)  # a decoder without a model: its decode step alone
    decoder.head, decoder.labels, decoder.top_k = head, ["a", "b"], 1
    decoder.policy = ReviewPolicy("density_disagreement", 0.5, None)
    schema = message_schema("detections")
    item_schema = schema["properties"]["detections"]["items"]
    for value, published, flagged in ((float("nan"), False, True), (float("inf"), False, True), (0.25, True, False),
                                      (0.75, True, True)):
        head.value = value
        [d] = decoder.decode({}, None)
        assert ("density_disagreement" in d["uncertainty"]) is published, (value, d)
        assert d["needs_review"] is flagged and d["review_reason"] == ("ambiguous" if flagged else None)
        json.dumps(d, allow_nan=False)
        jsonschema.validate(d, item_schema)


# -- through the real converter and `edgeq run` ---------------------------------------------------------------

def _run(bundle, source, tmp_path, *extra):
    import json

    from conftest import run_edgeq

    r = run_edgeq("run", "--model", str(bundle), "--source", str(source), "--output", "-",
                  "--spool", str(tmp_path / "s.db"), *extra)
    return r, [json.loads(ln) for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]


def test_a_bundle_with_labelled_data_publishes_unfamiliarity(tiny_bundle, shapes_dir, tmp_path):
    import json

    import jsonschema

    from conftest import assert_clean_error, edgeq_here, run_edgeq

    from edgeq.bundle import message_schema, read_bundle

    m = read_bundle(tiny_bundle).manifest
    assert m.density is not None and any(o.role == "density_projection" for o in m.outputs)
    rule = m.head.review
    assert rule.unfamiliar_threshold is not None and rule.mode in ("target", "budget")
    # --review-measure auto: a classifier with a density rests its ambiguous part on the density's disagreement
    assert rule.measure == "density_disagreement" and rule.count == 36 and rule.coverage is not None
    # another measure in the device config needs its own threshold: the bundle's is on the disagreement's scale
    cfg = tmp_path / "device.toml"
    cfg.write_text('[thresholds]\nreview_measure = "predictive_entropy"\n')
    assert_clean_error(edgeq_here("run", "--model", str(tiny_bundle), "--source", str(shapes_dir / "circle"),
                                  "--config", str(cfg), "--output", "-", "--spool", str(tmp_path / "c.db")),
                       "thresholds.review_measure", "density_disagreement", "thresholds.review")
    cfg.write_text('[thresholds]\nreview_measure = "predictive_entropy"\nreview = 0.5\n')
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(shapes_dir / "circle"), "--output", "-",
                  "--spool", str(tmp_path / "e.db"), "--max-frames", "2", "--config", str(cfg))
    msgs = [json.loads(ln) for ln in r.stdout.splitlines() if '"edgeq.detections"' in ln]
    assert r.returncode == 0 and len(msgs) == 2, r.stderr[-2000:]
    assert all(("ambiguous" in (d["review_reason"] or "")) is (d["uncertainty"]["predictive_entropy"] > 0.5)
               for msg in msgs for d in msg["detections"])
    # the device over convert's own --val images (shapes_dir): it flags as ambiguous the share the rule was set to
    # leave out there, and its percentiles rank the images as their unfamiliarity does
    r, msgs = _run(tiny_bundle, shapes_dir, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(msgs) == 36
    tops = []
    for msg in msgs:
        jsonschema.validate(msg, message_schema("detections"))
        for d in msg["detections"]:
            u = d["uncertainty"]
            assert d["needs_review"] is (d["review_reason"] is not None)
            ambiguous = "ambiguous" in (d["review_reason"] or "")
            assert ambiguous is (u["density_disagreement"] > rule.threshold), (u, rule.threshold)
        tops.append((msg["detections"][0]["uncertainty"], "ambiguous" in (msg["detections"][0]["review_reason"] or "")))
    share = sum(a for _, a in tops) / len(tops)
    assert abs(share - (1.0 - rule.coverage)) <= 1.0 / rule.count + 1e-9, (share, rule.coverage)
    order = sorted(u["unfamiliarity"] for u, _ in tops)
    by_score = [u["unfamiliarity_percentile"] for u, _ in sorted(tops, key=lambda t: t[0]["unfamiliarity"])]
    assert order[0] > 0 and by_score == sorted(by_score) and by_score[0] < by_score[-1], by_score


def test_a_bundle_made_before_the_measure_still_runs(tiny_keras_path, shapes_dir, tmp_path):
    """A bundle without a density block and with the edgeq 0.1 review rule (no mode, no unfamiliar threshold):
    results carry no unfamiliarity field (absent, not null, not a crash), and a config that asks for the
    unfamiliarity percentile is refused in one line."""
    import json
    import zipfile

    from conftest import assert_clean_error, edgeq_here
    from edgeq.converter import convert, recipe_from_flags

    made = tmp_path / "made.edgeq"
    convert(recipe_from_flags(str(tiny_keras_path), made, calib=str(shapes_dir), calib_samples=20, val=str(shapes_dir),
                              density="off"), log=lambda s: None)
    old = tmp_path / "old.edgeq"
    with zipfile.ZipFile(made) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "manifest.json":
                m = json.loads(data)
                assert "density" not in m and m["head"]["review"]["measure"] == "predictive_entropy"  # auto
                m["head"]["review"] = {k: m["head"]["review"][k] for k in
                                       ("measure", "threshold", "target_accuracy", "coverage", "kept_accuracy",
                                        "reached", "count")}
                data = json.dumps(m).encode()
            dst.writestr(info, data)
    r, msgs = _run(old, shapes_dir / "square", tmp_path, "--max-frames", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(msgs) == 4
    for d in (d for msg in msgs for d in msg["detections"]):
        assert "unfamiliarity" not in d["uncertainty"] and "unfamiliarity_percentile" not in d["uncertainty"]
        assert "density_disagreement" not in d["uncertainty"]
        assert d["review_reason"] in (None, "ambiguous") and isinstance(d["needs_review"], bool)
    cfg = tmp_path / "device.toml"
    cfg.write_text("[thresholds]\nunfamiliar_percentile = 99\n")
    assert_clean_error(edgeq_here("run", "--model", str(old), "--source", str(shapes_dir / "square"), "--config",
                                 str(cfg), "--output", "-", "--spool", str(tmp_path / "t.db")),
                       "thresholds.unfamiliar_percentile", "no unfamiliarity measure")
    cfg.write_text('[thresholds]\nreview_measure = "density_disagreement"\n')
    assert_clean_error(edgeq_here("run", "--model", str(old), "--source", str(shapes_dir / "square"), "--config",
                                 str(cfg), "--output", "-", "--spool", str(tmp_path / "u.db")),
                       "thresholds.review_measure", "density_disagreement", "predictive_entropy")


def test_a_tap_under_one_int8_step_of_the_projection_is_left_out():
    """A tap whose part of features @ W is below 1/127 of the whole cannot change the int8 output, and summing it
    in would take an ADD that XNNPACK refuses (seen with a random-weight MobileNetV2: the graph fell back to CPU)."""
    from edgeq.converter.stages.density import taps_to_keep

    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (50, 6))
    w = np.eye(6)[:, :3].astype(np.float32)
    x[:, 2:4] *= 1e-4  # the second tap (columns 2-3) contributes almost nothing
    np.testing.assert_array_equal(taps_to_keep(x, w, [2, 2, 2]), [True, False, False])
    np.testing.assert_array_equal(taps_to_keep(rng.normal(0, 1, (50, 6)), w, [2, 2, 2]), [True, True, False])
    assert taps_to_keep(x * 0, w, [2, 2, 2]).sum() == 1  # never none


@pytest.mark.parametrize("method", ["gda", "knn"])
def test_scores_are_exact_whatever_order_the_sums_run_in(method):
    """Coordinates are rounded to 1/GRID before the distances (edgeq/density.py), so every distance is a sum of
    integers under 2^52 and cannot depend on the order BLAS adds in (which differs between the x86 and ARM builds):
    reordering the coordinates, which reorders every sum, gives the same bits."""
    import dataclasses

    from edgeq.converter.stages.density import fit_gaussians, knn_references
    from edgeq.density import GRID

    rng = np.random.default_rng(3)
    x, y, _ = _blobs(rng, dims=24)
    fitted = fit_gaussians(x, y, ["a", "b", "c"], rank=12, where="test")
    block = dict(fitted["block"], reference=[0.0, 1.0])
    if method == "knn":
        block.update(knn_references(x, fitted["W"], 3, "test"))
    density = DensityModel.from_block(Density.model_validate(block))
    coords = rng.normal(0, 3, (50, 12)) * rng.uniform(0.1, 10, 12)
    got = density.scores(coords)
    perm = rng.permutation(12)
    shuffled = dataclasses.replace(density, means=density.means[:, perm], references=(
        None if density.references is None else density.references[:, perm]))
    assert np.array_equal(shuffled.scores(coords[:, perm]), got)
    assert np.array_equal(got * GRID * GRID, np.rint(got * GRID * GRID))  # whole numbers of 1/GRID^2
    if method == "knn":  # the float k-NN distance, without the grid
        from edgeq.density import kth_nearest_squared

        want = kth_nearest_squared(coords, density.references, density.neighbours)
    else:
        want = np.min(np.sum((coords[:, None] - density.means[None]) ** 2, axis=-1), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_far_outside_the_data_is_clipped_not_overflowed():
    """Coordinates are clipped far outside any data before the distances, so the integer sums stay exact; a wild
    input still scores far above everything in the reference."""
    density = DensityModel(4, np.zeros((2, 4)), np.sort(np.arange(1.0, 101.0)))
    scores = density.scores(np.array([[1e12, -1e12, 1e300, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert np.all(np.isfinite(scores)) and scores[0] > 1e6 and scores[1] == 1.0
    assert density.percentile(scores)[0] == 100.0


def test_l2_the_device_projects_the_unit_length_int8_features_exactly():
    """normalise l2: the fit is on unit-length features; the graph outputs the int8 features and the device
    projects them with the manifest's float16 whitening, in integers then one division. It gives the projection of
    the unit-length features, a zero cell stays at 0 (not NaN), scaling a cell's features does not move it, and
    reordering the features (which reorders every sum) gives the same bits."""
    import dataclasses

    from edgeq.converter.stages.density import float16_array
    from edgeq.density import BoundDensity, unit_length
    from edgeq.runtime import TensorInfo

    rng = np.random.default_rng(5)
    q = rng.integers(-128, 127, (6, 16)).astype(np.int8)
    q[2] = -128  # the zero point: an all-zero cell (a ReLU6 neck has them)
    features = TensorInfo("neck", 7, (1, 2, 3, 16), np.dtype(np.int8), 0.05, -128)
    x = 0.05 * (q.astype(np.float64) + 128)  # the features in float64 (dequantize works in float32)
    W = rng.normal(0, 30, (16, 4)).astype(np.float16).astype(np.float64)
    block = Density.model_validate({"features": 16, "rank": 4, "eigenvalues": [1.0] * 4, "class_means": [[0] * 4],
                                    "shrinkage": 0.1, "reference": [0.0, 1.0], "normalise": "l2",
                                    "projection": float16_array(W)})
    density = DensityModel.from_block(block)
    np.testing.assert_array_equal(density.whitening, W)
    bound = BoundDensity(density, None, features)
    assert bound.tensors == [features]
    raw = {7: q.reshape(1, 2, 3, 16)}
    got = bound.whitened(raw)
    np.testing.assert_allclose(got, unit_length(x) @ W, rtol=1e-9, atol=1e-9)  # W's float16 values: exact
    assert np.all(np.isfinite(got)) and np.all(got[2] == 0)
    np.testing.assert_array_equal(bound.whitened(raw, np.array([4, 0])), got[[4, 0]])
    codes = q.astype(np.int64) + 128
    np.testing.assert_allclose(density.project_unit(codes[[0]] * 3), got[[0]], rtol=1e-12)
    perm = rng.permutation(16)
    shuffled = dataclasses.replace(density, whitening=density.whitening[perm])
    assert np.array_equal(shuffled.project_unit(codes[:, perm]), density.project_unit(codes))
    # a float32 bundle's float features: the same coordinates in float
    np.testing.assert_allclose(density.project_unit(x), got, rtol=1e-9, atol=1e-9)


def test_an_l2_density_block_needs_its_features_output_and_its_projection():
    """A manifest whose density says normalise l2 but whose outputs lack density_features, or whose projection is
    missing or of the wrong shape: refused, naming what is missing."""
    from pydantic import ValidationError

    from edgeq.converter.stages.density import float16_array
    from edgeq.density import bind_density
    from edgeq.errors import BundleError
    from edgeq.manifest import OutputSpec

    class _Model:  # bind_density only asks the model for its outputs by name and shape
        def find_output(self, name, shape):
            from edgeq.runtime import TensorInfo

            return TensorInfo(name, 0, tuple(shape), np.dtype(np.int8), 0.1, 0)

    fields = {"features": 8, "rank": 2, "eigenvalues": [1.0, 1.0], "class_means": [[0, 0]], "shrinkage": 0.1,
              "reference": [0.0, 1.0], "normalise": "l2", "projection": float16_array(np.ones((8, 2)))}
    block = Density.model_validate(fields)
    proj = OutputSpec.model_validate({"role": "density_projection", "name": "p", "shape": [1, 2], "dtype": "int8",
                                      "scale": 0.1, "zero_point": 0})
    with pytest.raises(BundleError, match="no 'density_features' entry, which density.normalise l2 needs"):
        bind_density(block, _Model(), [proj])
    feats = OutputSpec.model_validate({"role": "density_features", "name": "f", "shape": [1, 8], "dtype": "int8",
                                       "scale": 0.1, "zero_point": 0})
    bound = bind_density(block, _Model(), [feats])
    assert bound.projection is None and bound.features.name == "f"
    narrow = feats.model_copy(update={"shape": (1, 5)})
    with pytest.raises(BundleError, match="'density_features' has 5 channels; the density block needs 8"):
        bind_density(block, _Model(), [narrow])
    with pytest.raises(ValidationError, match="normalise l2 and projection go together"):
        Density.model_validate({k: v for k, v in fields.items() if k != "projection"})
    with pytest.raises(ValidationError, match=r"projection needs shape \[8, 2\]"):
        Density.model_validate(dict(fields, projection=float16_array(np.ones((2, 8)))))
