"""Stage: cluster. Weight clustering (k-means weight sharing, Deep Compression's first stage), on Keras 3 without
tf_keras.

Each Conv2D, DepthwiseConv2D and Dense kernel is replaced by N shared values: scalar k-means over the whole
tensor (default) or over each output channel (``per_channel``), then every weight takes its centroid. The normal
full-int8 PTQ follows. TFLite quantises kernels per output channel, symmetrically: ``q = round(w / s)`` with
``s = max|w| / 127``; N centroids map to at most N int8 values per channel, so the shipped kernels keep at most N
distinct values per quantisation channel (two centroids closer than ``s`` merge, which only lowers the count).
The converter reads the int8 kernels back and records the largest count it finds.

Initialisation: ``linear`` spaces the centroids evenly between the minimum and maximum (Deep Compression found it
keeps the rare large weights best); ``kmeans++`` seeds them with D^2 sampling. Both then run Lloyd's iterations,
vectorised over channels in numpy, in blocks of bounded size (``BLOCK`` elements of temporaries, whatever the
kernel and N). scikit-learn's ``KMeans`` (used below for the 2-D posterior) fits one group per call; per-channel
clustering of a MobileNetV2 1.0 is some 17,000 small fits, which its per-call overhead makes minutes instead of
seconds, and its k-means++ differs from the ``linear`` init Deep Compression recommends.

Skipped by default (``--cluster-skip`` replaces the pattern): the first convolution (``Conv1`` in Keras'
MobileNetV2: 3 input channels, few weights, and every later layer depends on it) and any kernel with fewer than
``MIN_WEIGHTS`` weights (tiny layers save nothing and lose the most).

A Bayesian head (``BayesDense``) is vector-quantised instead (:func:`vq_posterior`): each weight's posterior
``(mu, sigma)`` is a 2-D vector, k-means over those vectors gives N ``(mu, sigma)`` codewords, and every weight takes
its codeword. The K weight samples the converter fuses into the head are then drawn from this quantised posterior.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from edgeq import records
from edgeq.errors import ModelError, QuantizationError
from edgeq.runtime import weight_kernels, weight_stats

from ..context import ConvertContext
from ..products import Clustering, Converted, SourceModel
from ..recipes import CLUSTER_INITS as INITS
from ..recipes import ClusterRecipe
from ..tf import leaf_layers

DEFAULT_SKIP = r"^(Conv1|conv1|stem_conv)$"
MIN_WEIGHTS = 1024
# elements of the [groups, values, clusters] temporaries per block: 4M float64 = 32 MB, whatever the kernel
BLOCK = 1 << 22


def _nearest(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of each value's nearest centroid (the first of equally near ones), ``[R, M]``, in blocks."""
    rows, m = v.shape
    k = c.shape[1]
    labels = np.empty((rows, m), dtype=np.int64)
    if m * k <= BLOCK:
        step = max(1, BLOCK // (m * k))
        for r in range(0, rows, step):
            labels[r:r + step] = np.abs(v[r:r + step, :, None] - c[r:r + step, None, :]).argmin(axis=2)
        return labels
    step = max(1, BLOCK // k)
    for r in range(rows):
        for j in range(0, m, step):
            labels[r, j:j + step] = np.abs(v[r, j:j + step, None] - c[r, None, :]).argmin(axis=1)
    return labels


def _cluster_means(v: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: each cluster's value count and the mean of its values (0 where empty), ``[R, k]``, in blocks."""
    rows, m = v.shape
    counts = np.zeros((rows, k), dtype=np.int64)
    sums = np.zeros((rows, k), dtype=np.float64)
    if m * k <= BLOCK:
        step = max(1, BLOCK // (m * k))
        for r in range(0, rows, step):
            onehot = labels[r:r + step, :, None] == np.arange(k)[None, None, :]
            counts[r:r + step] = onehot.sum(axis=1)
            sums[r:r + step] = (onehot * v[r:r + step, :, None]).sum(axis=1)
    else:  # one group larger than a block: accumulate by label
        for r in range(rows):
            counts[r] = np.bincount(labels[r], minlength=k)
            sums[r] = np.bincount(labels[r], weights=v[r], minlength=k)
    return counts, sums / np.maximum(counts, 1)


def kmeans_1d(values: np.ndarray, n: int, init: str = "linear", iterations: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scalar k-means of each row of ``values`` ``[R, M]`` into ``n`` clusters: ``(centroids [R, n], labels [R, M])``.

    Lloyd's algorithm: assign each value to its nearest centroid, move each centroid to the mean of its values;
    a centroid that loses all its values stays where it is. Rows are independent and run together.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError("kmeans_1d takes a 2-D array, one row per group")
    rows, m = v.shape
    k = min(n, m)
    if init == "linear":
        lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
        c = lo + (hi - lo) * np.linspace(0.0, 1.0, k)[None, :]
    elif init == "kmeans++":
        rng = np.random.default_rng(seed)
        c = np.empty((rows, k))
        c[:, 0] = v[np.arange(rows), rng.integers(0, m, rows)]
        d2 = (v - c[:, :1]) ** 2
        for j in range(1, k):
            total = d2.sum(axis=1, keepdims=True)
            p = np.where(total > 0, d2 / np.where(total > 0, total, 1.0), 1.0 / m)
            pick = (p.cumsum(axis=1) < rng.random((rows, 1))).sum(axis=1).clip(0, m - 1)
            c[:, j] = v[np.arange(rows), pick]
            d2 = np.minimum(d2, (v - c[:, j:j + 1]) ** 2)
    else:
        raise ModelError(f"--cluster-init {init!r}: choose one of {', '.join(INITS)}")
    for _ in range(iterations):
        counts, means = _cluster_means(v, _nearest(v, c), k)
        new = np.where(counts > 0, means, c)
        if np.allclose(new, c):
            c = new
            break
        c = new
    return c, _nearest(v, c)


def _groups(kernel: np.ndarray, depthwise: bool, per_channel: bool) -> np.ndarray:
    """The kernel as ``[groups, weights]``: one group, or one per output channel (depthwise: in x multiplier)."""
    if not per_channel:
        return kernel.reshape(1, -1)
    k = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1]) if depthwise else kernel.reshape(-1, kernel.shape[-1])
    return k.T


def _ungroup(rows: np.ndarray, shape: tuple[int, ...], depthwise: bool, per_channel: bool) -> np.ndarray:
    return rows.reshape(shape) if not per_channel else rows.T.reshape(shape)


def project(kernel: np.ndarray, labels: np.ndarray, depthwise: bool, per_channel: bool) -> np.ndarray:
    """Put weights back on their clusters after a training step: each cluster's value becomes the mean of its
    weights (the weights keep their assignment). Averaging after the step is what averaging the gradients of a
    cluster's weights does to a shared value under plain SGD."""
    rows = _groups(kernel, depthwise, per_channel).astype(np.float64)
    _, means = _cluster_means(rows, labels, int(labels.max()) + 1)
    return _ungroup(np.take_along_axis(means, labels, axis=1), kernel.shape, depthwise, per_channel).astype(kernel.dtype)


def finetune(model: Any, x: np.ndarray, y: np.ndarray, assignments: dict[str, np.ndarray], per_channel: bool,
             epochs: int, lr: float = 1e-4, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Train the clustered model on ``(x, y)`` and re-project the clustered kernels onto their clusters after
    every step, so that the weights stay shared."""
    import keras

    from ..training.common import settle_batchnorm

    layers = {layer.name: layer for layer in leaf_layers(model) if layer.name in assignments}

    class Project(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            for name, layer in layers.items():
                w = layer.get_weights()
                depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                layer.set_weights([project(w[0], assignments[name], depthwise, per_channel), *w[1:]])

    keras.utils.set_random_seed(seed)
    settle_batchnorm(model)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[Project()])
    return {k: float(v[-1]) for k, v in history.history.items()}


def vq_posterior(layer: Any, n: int, seed: int = 0) -> dict[str, Any]:
    """Vector quantisation of a ``BayesDense`` layer's kernel posterior, in place: k-means (scikit-learn, k-means++,
    4 restarts) over the ``(mu, sigma)`` pairs of its weights, and every weight takes its cluster's mean pair.

    The distance is plain Euclidean in ``(mu, sigma)``: for Gaussians that is the 2-Wasserstein distance,
    ``W2^2 = (mu1 - mu2)^2 + (sigma1 - sigma2)^2``, so k-means minimises the summed squared W2 between each weight's
    posterior and its codeword (whitening the two axes instead spent the codewords on sigma's small spread and
    lost 30 % of mu on the benchmark model, against 12 % here). The bias (C values) is left as it is. Returns the
    codebook and the relative errors of mu and sigma."""
    from sklearn.cluster import KMeans

    post = layer.posterior()
    mu, sigma = post["kernel_mu"], post["kernel_sigma"]
    points = np.stack([mu.reshape(-1), sigma.reshape(-1)], axis=1)
    k = min(n, len(np.unique(points, axis=0)))
    km = KMeans(n_clusters=k, init="k-means++", n_init=4, random_state=seed).fit(points)
    labels = km.labels_
    codebook = np.stack([np.bincount(labels, points[:, d], k) / np.maximum(np.bincount(labels, minlength=k), 1)
                         for d in range(2)], axis=1)
    q_mu = codebook[labels, 0].reshape(mu.shape)
    q_sigma = codebook[labels, 1].reshape(sigma.shape)
    layer.kernel_mu.assign(q_mu.astype(np.float32))
    layer.kernel_rho.assign(np.log(np.expm1(np.maximum(q_sigma, 1e-8))).astype(np.float32))  # softplus^-1

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return round(float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12)), 5)

    return {
        "layer": layer.name, "type": "BayesDense", "weights": int(mu.size), "codewords": int(k),
        "relative_rmse_mu": rel(q_mu, mu), "relative_rmse_sigma": rel(q_sigma, sigma),
        "codebook": [[round(float(m), 6), round(float(s), 6)] for m, s in codebook],
    }


def cluster_model(model: Any, opts: ClusterRecipe, assignments: dict[str, np.ndarray] | None = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Cluster the model's kernels in place; return what was done to each layer (clustered or why skipped).

    assignments: if given, filled with each clustered layer's cluster index per weight, ``[groups, weights]`` in
    the layout :func:`project` takes (one group per tensor, or one per output channel)."""
    import keras

    skip_pattern = skip_pattern_of(opts)
    skip = re.compile(skip_pattern)
    report = []
    for layer in leaf_layers(model):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            continue
        weights = layer.get_weights()
        kernel = weights[0]
        entry: dict[str, Any] = {"layer": layer.name, "type": layer.__class__.__name__, "weights": int(kernel.size)}
        if skip.search(layer.name):
            report.append({**entry, "skipped": "matches --cluster-skip"})
            continue
        if kernel.size < MIN_WEIGHTS:
            report.append({**entry, "skipped": f"fewer than {MIN_WEIGHTS} weights"})
            continue
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        rows = _groups(kernel, depthwise, opts.per_channel)
        c, labels = kmeans_1d(rows, opts.clusters, opts.init, seed=seed)
        new = _ungroup(np.take_along_axis(c, labels, axis=1), kernel.shape, depthwise, opts.per_channel)
        if assignments is not None:
            assignments[layer.name] = labels
        err = float(np.sqrt(np.mean((new - kernel) ** 2)) / (np.sqrt(np.mean(kernel ** 2)) + 1e-12))
        layer.set_weights([new.astype(kernel.dtype), *weights[1:]])
        report.append({**entry, "clusters": int(c.shape[1]), "relative_rmse": round(err, 5)})
    if not report:
        raise ModelError("--clusters: the model has no Conv2D, DepthwiseConv2D or Dense kernel to cluster")
    if not any("clusters" in r for r in report):
        by_regex = sum(1 for r in report if r["skipped"].startswith("matches"))
        if by_regex == len(report):
            raise ModelError(f"--cluster-skip {skip_pattern!r} matches every one of the {len(report)} kernels; "
                             "nothing would be clustered: narrow the pattern")
        raise ModelError(f"--clusters: no layer was clustered ({by_regex} match --cluster-skip "
                         f"{skip_pattern!r}, {len(report) - by_regex} have fewer than {MIN_WEIGHTS} weights)")
    return report


def skip_pattern_of(recipe: ClusterRecipe) -> str:
    return DEFAULT_SKIP if recipe.skip is None else recipe.skip


def run(recipe: ClusterRecipe, ctx: ConvertContext, source: SourceModel, seed: int) -> Clustering:
    """k-means weight sharing of the source model's kernels, in place, before PTQ, optionally fine-tuned with the
    weights kept on their clusters; a Bayesian head's posterior is vector-quantised (with ``seed``, the weight
    samples' seed)."""
    if not recipe.enabled:
        return Clustering(source)
    if source.keras_model is None:
        raise ModelError(f"{source.origin}: --clusters needs a Keras model (.keras/.h5 or built in), not a SavedModel")
    data = None
    if recipe.finetune is not None:  # check the folder before the slow part
        from ..training.classifier import load_folder_arrays

        data = load_folder_arrays(recipe.finetune, ctx.spec, list(ctx.labels), flag="--finetune")
    t0 = time.perf_counter()
    assignments: dict[str, np.ndarray] = {}
    layers = cluster_model(source.keras_model, recipe, assignments, seed)
    done = [r for r in layers if "clusters" in r]
    ctx.log(f"clustering: {len(done)} of {len(layers)} kernels to {recipe.clusters} values "
            f"({'per channel' if recipe.per_channel else 'per tensor'}, {recipe.init} init), "
            f"{time.perf_counter() - t0:.1f} s")
    tuned = _finetune(recipe, ctx, source, data, assignments, seed) if data is not None else None
    posterior = None
    from ..models.bayes import find_bayes_heads

    for head in find_bayes_heads(source.keras_model):  # after fine-tuning, which moves the posterior
        if re.search(skip_pattern_of(recipe), head.name):
            posterior = records.PosteriorVQ(layer=head.name, skipped="matches --cluster-skip")
            continue
        posterior = records.PosteriorVQ(**vq_posterior(head, recipe.clusters, seed))
        ctx.log(f"posterior: {head.name}'s {posterior.weights:,} (mu, sigma) pairs vector-quantised to "
                f"{posterior.codewords} codewords (relative error mu {posterior.relative_rmse_mu:.3f}, sigma "
                f"{posterior.relative_rmse_sigma:.3f}); samples are drawn from it")
    record = records.Clustering(
        clusters=recipe.clusters, init=recipe.init, per_channel=recipe.per_channel, skip=skip_pattern_of(recipe),
        clustered=len(done), skipped=len(layers) - len(done), clustered_weights=int(sum(r["weights"] for r in done)),
        all_weights=int(sum(r["weights"] for r in layers)), finetune=tuned, posterior=posterior)
    return Clustering(source, record, tuple(layers))


def _finetune(recipe: ClusterRecipe, ctx: ConvertContext, source: SourceModel, data: Any,
              assignments: dict[str, np.ndarray], seed: int) -> records.Finetune:
    from ..tf import quiet_output

    t0 = time.perf_counter()
    with quiet_output():
        history = finetune(source.keras_model, data[0], data[1], assignments, recipe.per_channel,
                           recipe.finetune_epochs, seed=seed)
    out = records.Finetune(data=str(recipe.finetune), images=int(len(data[0])), epochs=recipe.finetune_epochs,
                           train_accuracy=round(history.get("accuracy", float("nan")), 4))
    ctx.log(f"fine-tuning: {recipe.finetune_epochs} epoch(s) on {len(data[0])} images, weights kept on their "
            f"clusters, train accuracy {out.train_accuracy}, {time.perf_counter() - t0:.1f} s")
    return out


def check_shipped(ctx: ConvertContext, clustering: Clustering, quantised: Converted) -> records.Clustering:
    """Read the int8 kernels back: the clustered layers must hold at most N values per channel. A shipped kernel
    belongs to a clustered layer when its name contains the layer's (TensorFlow may add ``_N`` to it) and it has
    as many weights: the name alone is ambiguous (Keras' ``conv2d_1`` is also TensorFlow's second ``conv2d``)."""
    n = clustering.record.clusters
    done = [r for r in clustering.layers if "clusters" in r]
    patterns = [(re.compile(rf"(^|/){re.escape(r['layer'])}(_\d+)?/"), r["weights"]) for r in done]
    matched = [w for w in weight_stats(quantised.model)
               if any(p.search(w["name"]) and int(np.prod(w["shape"])) == size for p, size in patterns)]
    worst = max((w["max_distinct_per_channel"] for w in matched), default=0)
    if worst > n:
        raise QuantizationError(f"clustered kernels came out of the converter with {worst} distinct values in a "
                                f"channel (more than --clusters {n}); this is a bug, please report it")
    ctx.log(f"clustering: {clustering.record.clustered} layers to {n} values, shipped int8 kernels hold at most "
            f"{worst} distinct values per channel")
    shipped = records.Shipped(kernels_checked=len(matched), max_distinct_per_channel=int(worst))
    return clustering.record.model_copy(update={"shipped": shipped})


def pack(record: records.Clustering | None, quantised: Converted
         ) -> tuple[tuple[bytes, bytes, list[dict[str, Any]]] | None, records.Clustering | None]:
    """With N <= 16, clustered kernels ship as 4-bit indices and per-channel codebooks (edgeq/packing.py): the
    packed parts, and the record with how many kernels were packed."""
    from edgeq.packing import MAX_CODEBOOK, pack_model

    if record is None or record.clusters > MAX_CODEBOOK:
        return None, record
    kernels = [(n, w, a) for _, n, w, a, per_channel in weight_kernels(quantised.model) if per_channel]
    packed = pack_model(quantised.data, kernels)
    return packed, record.model_copy(update={"packed_kernels": len(packed[2])})
