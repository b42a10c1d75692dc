"""Weight clustering (k-means weight sharing, Deep Compression's first stage), on Keras 3 without tf_keras.

Each Conv2D, DepthwiseConv2D and Dense kernel is replaced by N shared values: scalar k-means over the whole
tensor (default) or over each output channel (``per_channel``), then every weight takes its centroid. The normal
full-int8 PTQ follows. TFLite quantises kernels per output channel, symmetrically: ``q = round(w / s)`` with
``s = max|w| / 127``; N centroids map to at most N int8 values per channel, so the shipped kernels keep at most N
distinct values per quantisation channel (two centroids closer than ``s`` merge, which only lowers the count).
The converter reads the int8 kernels back and records the largest count it finds.

Initialisation: ``linear`` spaces the centroids evenly between the minimum and maximum (Deep Compression found it
keeps the rare large weights best); ``kmeans++`` seeds them with D^2 sampling. Both then run Lloyd's iterations,
vectorised over channels in numpy.

Skipped by default (``--cluster-skip`` replaces the pattern): the first convolution (``Conv1`` in Keras'
MobileNetV2: 3 input channels, few weights, and every later layer depends on it) and any kernel with fewer than
``MIN_WEIGHTS`` weights (tiny layers save nothing and lose the most).

A Bayesian head (``BayesDense``) is vector-quantised instead (:func:`vq_posterior`): each weight's posterior
``(mu, sigma)`` is a 2-D vector, k-means over those vectors gives N ``(mu, sigma)`` codewords, and every weight takes
its codeword. The K weight samples the converter fuses into the head are then drawn from this quantised posterior.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import ModelError

from .models import leaf_layers

INITS = ("linear", "kmeans++")
DEFAULT_SKIP = r"^(Conv1|conv1|stem_conv)$"
MIN_WEIGHTS = 1024
MAX_CLUSTERS = 256


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
        labels = np.abs(v[:, :, None] - c[:, None, :]).argmin(axis=2)
        onehot = labels[:, :, None] == np.arange(k)[None, None, :]
        counts = onehot.sum(axis=1)
        sums = (onehot * v[:, :, None]).sum(axis=1)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.allclose(new, c):
            c = new
            break
        c = new
    labels = np.abs(v[:, :, None] - c[:, None, :]).argmin(axis=2)
    return c, labels


@dataclass(frozen=True)
class ClusterOptions:
    clusters: int
    init: str = "linear"
    per_channel: bool = False
    skip: str | None = None  # None: DEFAULT_SKIP
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= MAX_CLUSTERS:
            raise ModelError(f"--clusters {self.clusters}: give 2 to {MAX_CLUSTERS} (16 is usual: 4-bit indices)")
        if self.init not in INITS:
            raise ModelError(f"--cluster-init {self.init!r}: choose one of {', '.join(INITS)}")
        try:
            re.compile(self.skip_pattern)
        except re.error as exc:
            raise ModelError(f"--cluster-skip {self.skip!r}: not a regular expression ({exc})") from None

    @property
    def skip_pattern(self) -> str:
        return DEFAULT_SKIP if self.skip is None else self.skip


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
    k = int(labels.max()) + 1
    onehot = labels[:, :, None] == np.arange(k)[None, None, :]
    counts = onehot.sum(axis=1)
    means = (onehot * rows[:, :, None]).sum(axis=1) / np.maximum(counts, 1)
    return _ungroup(np.take_along_axis(means, labels, axis=1), kernel.shape, depthwise, per_channel).astype(kernel.dtype)


def finetune(model: Any, x: np.ndarray, y: np.ndarray, assignments: dict[str, np.ndarray], per_channel: bool,
             epochs: int, lr: float = 1e-4, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Train the clustered model on ``(x, y)`` and re-project the clustered kernels onto their clusters after
    every step, so that the weights stay shared."""
    import keras

    from .train import settle_batchnorm

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


def cluster_model(model: Any, opts: ClusterOptions, assignments: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Cluster the model's kernels in place; return what was done to each layer (clustered or why skipped).

    assignments: if given, filled with each clustered layer's cluster index per weight, ``[groups, weights]`` in
    the layout :func:`project` takes (one group per tensor, or one per output channel)."""
    import keras

    skip = re.compile(opts.skip_pattern)
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
        c, labels = kmeans_1d(rows, opts.clusters, opts.init, seed=opts.seed)
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
            raise ModelError(f"--cluster-skip {opts.skip_pattern!r} matches every one of the {len(report)} kernels; "
                             "nothing would be clustered: narrow the pattern")
        raise ModelError(f"--clusters: no layer was clustered ({by_regex} match --cluster-skip "
                         f"{opts.skip_pattern!r}, {len(report) - by_regex} have fewer than {MIN_WEIGHTS} weights)")
    return report
