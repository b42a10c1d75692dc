"""Unfamiliarity: where an input's features land against the feature density of the data a model was fitted on.

The converter fits class-conditional Gaussians with one shared, shrunk covariance to the model's features of
labelled data (GDA / Mahalanobis, as in DDU, Mukhoti et al. 2023; Lee et al. 2018). The score of a feature vector
``x`` is its squared Mahalanobis distance to the nearest class mean in the covariance's top ``d`` directions:

    y = W^T x,  W = V_d diag(lambda_d)^(-1/2)        (whitened coordinates)
    score = min_c ||y - m_c||^2,  m_c = W^T mu_c

A detector's default is the distance to the ``k``-th nearest of a few hundred fitting samples in the same
whitened coordinates (``knn_whitened``, k-NN distance as in Sun et al. 2022, here in whitened rather than
L2-normalised coordinates): its known objects are not one Gaussian per class, and on the detection benchmark's
detections it separates never-seen objects from known ones better than the nearest mean (docs/detection.md).

The whitening ``W`` is baked into the int8 graph as one more output, ``density_projection`` (``d`` int8 values per
image, or per grid cell for a detector); whitening gives every coordinate the same within-class spread, so one
int8 scale serves them all. The device finishes with the distances in numpy: no TensorFlow. It rounds the
whitened coordinates to multiples of ``1/GRID`` (clipped far outside any data, :attr:`DensityModel.limit`), so that
every squared distance is a sum of integers below 2^52: float64 holds such sums exactly whatever order BLAS adds
them in, and the x86 and ARM builds give the same bits (tests/arm).
(benchmarks/unknowns.py scores ranks 64 to 512 and the full covariance side by side; the default, 192, is where
the gains stop paying for the projection's cost.)

With ``normalise: l2`` (a detector's option, ``--density-normalise``) the density is fitted on the features divided by their length. No
int8 op divides well, so the graph outputs the int8 features themselves (``density_features``) and the device
projects each detection's cell: integer codes times the whitening scaled to integers, summed exactly, then one
division by the length (:meth:`DensityModel.project_unit`), the same bits on x86 and ARM.

The score is published as ``unfamiliarity`` (higher: less like the fitting data) with ``unfamiliarity_percentile``,
its rank among the scores of held-out in-distribution data run through the int8 model, so that a dashboard can
threshold it without knowing its scale. Non-finite values are never published.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from edgeq.errors import BundleError
from edgeq.manifest import Array, Density
from edgeq.runtime import Model, TensorInfo

PROJECTION_ROLE = "density_projection"
FEATURES_ROLE = "density_features"  # normalise: l2, the features the device projects (instead of the projection)
# whitened coordinates are rounded to multiples of 1/GRID (a power of two: scaling by it is exact); within-class
# coordinates are about 1, so this moves a distance by about 1e-4 of itself
GRID = 4096.0
EXACT = 2.0 ** 52  # integer sums stay below this, a factor of two under float64's 2^53


@dataclass(frozen=True)
class DensityModel:
    """The arrays of a :class:`edgeq.manifest.Density` block, ready for numpy."""

    rank: int
    means: np.ndarray  # [C, d] the class means in whitened coordinates
    reference: np.ndarray  # sorted scores of held-out in-distribution data
    references: np.ndarray | None = None  # [N, d] knn_whitened: fitting samples in whitened coordinates
    neighbours: int = 0
    whitening: np.ndarray | None = None  # [F, d] normalise l2: the device projects the unit-length features

    @classmethod
    def from_block(cls, block: Density) -> "DensityModel":
        references = None
        if block.references is not None:
            references = _float16_array(block.references)
        whitening = None if block.projection is None else _float16_array(block.projection)
        return cls(block.rank, np.asarray(block.class_means, np.float64).reshape(-1, block.rank),
                   np.sort(np.asarray(block.reference, np.float64)), references, block.neighbours or 0, whitening)

    @cached_property
    def _whitening_grid(self) -> tuple[np.ndarray, float]:
        """The whitening as integers ``rint(W * S)`` and ``S``, a power of two that puts its largest entry near 2^40:
        a sum of 96 to a few thousand products with int8 codes (below 2^8) stays far inside int64."""
        assert self.whitening is not None
        _, exponent = np.frexp(np.max(np.abs(self.whitening)) or 1.0)
        scale = float(np.ldexp(1.0, 40 - int(exponent)))
        return np.rint(self.whitening * scale).astype(np.int64), scale

    def project_unit(self, codes: np.ndarray) -> np.ndarray:
        """``[N, d]`` whitened coordinates of features divided by their length, from ``[N, F]`` int8 codes minus
        their zero point (integers: the scale cancels), or from float features (a float32 bundle). From codes the
        products and sums are integers (numpy's integer matmul, exact in any order), then one correctly rounded
        division by ``S * sqrt(sum of squares)``: x86 and ARM give the same bits (tests/arm)."""
        if np.issubdtype(codes.dtype, np.integer):
            w, scale = self._whitening_grid
            v = np.asarray(codes, np.int64)
            length = np.sqrt(np.sum(v * v, axis=1).astype(np.float64))
            return (v @ w).astype(np.float64) / (scale * np.where(length > 0, length, 1.0))[:, None]
        return unit_length(codes) @ self.whitening

    @cached_property
    def limit(self) -> float:
        """The largest grid coordinate kept: every squared distance of ``rank`` terms is then an integer under 2^52
        (about 590 whitened units at rank 192, where in-distribution data lie within a few units)."""
        return float(np.floor(np.sqrt(EXACT / self.rank) / 2.0))

    def on_grid(self, y: np.ndarray) -> np.ndarray:
        """Whitened coordinates -> integers (in float64): times ``GRID``, clipped to ``limit``, rounded."""
        out = np.multiply(y, GRID, dtype=np.float64)  # one new array (float32 in, float64 out): then in place
        np.clip(out, -self.limit, self.limit, out=out)
        return np.rint(out, out=out)

    @cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Means, references and the references' squared norms on the grid (computed once)."""
        refs = None if self.references is None else self.on_grid(self.references)
        return self.on_grid(self.means), refs, None if refs is None else np.sum(refs * refs, axis=1)

    def scores(self, projection: np.ndarray) -> np.ndarray:
        """``[N]`` scores from whitened coordinates ``[N, d]``: the squared distance to the nearest class mean, or
        with references to the ``neighbours``-th nearest of them. Sums of integers (exact in any order), then one
        exact scaling by a power of two."""
        return self.measures(projection)[0]

    def measures(self, projection: np.ndarray, predicted: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`scores`, and with ``predicted`` classes :meth:`disagreement` too, from one pass onto the grid and
        (for the nearest-mean score) one set of distances to the class means: what a classifier's device finish
        publishes for every image."""
        y = self.on_grid(np.reshape(projection, (-1, self.rank)))
        _, refs, norms = self._grid
        if not len(y):
            return np.zeros(0), None if predicted is None else np.zeros(0)
        to_means = self._mean_distances(y) if refs is None or predicted is not None else None
        if refs is not None:
            scores = kth_nearest_squared(y, refs, self.neighbours, norms) / (GRID * GRID)
        else:
            scores = np.min(to_means, axis=1)
        return scores, None if predicted is None else _one_minus_posterior(to_means, predicted)

    def _mean_distances(self, y_grid: np.ndarray) -> np.ndarray:
        """``[N, C]`` squared distances from grid coordinates to every class mean (exact integer sums, scaled)."""
        diff = y_grid[:, None, :] - self._grid[0][None]
        return np.sum(diff * diff, axis=-1) / (GRID * GRID)

    def disagreement(self, projection: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """``[N]`` one minus the density's own probability of each ``predicted`` class: the posterior of the fitted
        class-conditional Gaussians (equal priors, shared covariance, which whitening makes the identity),
        ``q_c = softmax(-||y - m_c||^2 / 2)``. It is near 0 when the features sit with the predicted class, and
        grows when they sit between classes or with another one: an ambiguity the head's softmax misses (on
        benchmarks/unknowns.py's classifier it ranks the wrong results above the right ones better than the
        predictive entropy). Computed in log space, so far-off classes never overflow."""
        y = self.on_grid(np.reshape(projection, (-1, self.rank)))
        return _one_minus_posterior(self._mean_distances(y), predicted) if len(y) else np.zeros(0)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percent of the held-out in-distribution scores at or below each score (0 to 100)."""
        return 100.0 * np.searchsorted(self.reference, np.asarray(scores, np.float64), side="right") / len(self.reference)


def _one_minus_posterior(mean_distances: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """``1 - softmax(-d^2 / 2)[predicted]`` per row of ``[N, C]`` squared distances, in log space."""
    logits = -0.5 * mean_distances
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.sum(np.exp(logits - top), axis=1))
    log_q = logits[np.arange(len(logits)), np.asarray(predicted, np.int64).reshape(-1)] - log_norm
    return -np.expm1(log_q)


def ordinal(k: int) -> str:
    """``1st``, ``2nd``, ``10th``: how inspect and convert name the neighbour a knn score is the distance to."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def kth_nearest_squared(y: np.ndarray, references: np.ndarray, k: int, norms: np.ndarray | None = None
                        ) -> np.ndarray:
    """``[N]`` squared Euclidean distance from each row of ``y`` to its ``k``-th nearest row of ``references``.

    Our own numpy rather than scikit-learn's NearestNeighbors because the device does not install scikit-learn;
    one matrix product and a partial sort, the same distances sklearn gives (tests/test_density.py checks)."""
    if len(y) == 0:
        return np.zeros(0)
    norms = np.sum(references * references, axis=1) if norms is None else norms
    d2 = np.sum(y * y, axis=1)[:, None] - 2.0 * (y @ references.T) + norms[None]
    return np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0.0)


def unit_length(features: np.ndarray) -> np.ndarray:
    """``[N, F]`` features divided by their length (a zero vector stays zero): what a ``normalise: l2`` density is
    fitted on, and what the device projects (:meth:`DensityModel.project_unit`)."""
    x = np.asarray(features, np.float64)
    length = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(length > 0, length, 1.0)


@dataclass(frozen=True)
class BoundDensity:
    """A density with the model's tensor it reads: the projection (whitened coordinates computed in the graph), or
    for ``normalise: l2`` the features, which the device projects (:meth:`DensityModel.project_unit`)."""

    density: DensityModel
    projection: TensorInfo | None
    features: TensorInfo | None = None

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for t in (self.projection, self.features) if t is not None]

    def scores(self, raw: dict[int, np.ndarray], cells: np.ndarray | None = None) -> np.ndarray:
        """Scores of one image (a classifier: ``[1]``), or of the grid ``cells`` given (a detector)."""
        return self.density.scores(self.whitened(raw, cells))

    def measures(self, raw: dict[int, np.ndarray], predicted: np.ndarray | None = None,
                 cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`DensityModel.measures` of one image (``[1]``), or of the grid ``cells`` given."""
        return self.density.measures(self.whitened(raw, cells), predicted)

    def whitened(self, raw: dict[int, np.ndarray], cells: np.ndarray | None = None) -> np.ndarray:
        """``[N, rank]`` whitened coordinates of one image, or of the grid ``cells`` given."""
        if self.projection is not None:
            p = self.projection.dequantize(raw[self.projection.index]).reshape(-1, self.density.rank)
            return p if cells is None else p[cells]
        t = self.features
        assert t is not None
        q = np.asarray(raw[t.index]).reshape(-1, t.shape[-1])
        q = q if cells is None else q[cells]
        codes = q.astype(np.int64) - int(t.zero_point) if t.quantized else q.astype(np.float64)
        return self.density.project_unit(codes)


def bind_density(block: Density | None, model: Model, outputs: list, where: str = "manifest") -> BoundDensity | None:
    """The density of a bundle bound to its model's outputs; None for a bundle made without one."""
    if block is None:
        return None
    role, width = (FEATURES_ROLE, block.features) if block.normalise == "l2" else (PROJECTION_ROLE, block.rank)
    spec = next((o for o in outputs if o.role == role), None)
    if spec is None:
        need = "density.normalise l2" if block.normalise == "l2" else "the density block"
        raise BundleError(f"{where}: outputs have no {role!r} entry, which {need} needs")
    tensor = model.find_output(spec.name, spec.shape)
    if tensor.shape[-1] != width:
        raise BundleError(f"{where}: output {role!r} has {tensor.shape[-1]} channels; the density block needs "
                          f"{width}")
    if role == FEATURES_ROLE:
        return BoundDensity(DensityModel.from_block(block), None, tensor)
    return BoundDensity(DensityModel.from_block(block), tensor)


def _float16_array(array: Array) -> np.ndarray:
    """A manifest :class:`~edgeq.manifest.Array` as float64 values of its shape."""
    import base64

    return np.frombuffer(base64.b64decode(array.data), "<f2").astype(np.float64).reshape(array.shape)


def finite_or_none(value: float, digits: int = 6) -> float | None:
    """A value fit to publish: rounded, or None when NaN or infinite (never a NaN in a payload)."""
    v = float(value)
    return round(v, digits) if np.isfinite(v) else None
