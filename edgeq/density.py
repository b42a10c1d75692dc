"""Unfamiliarity: where an input's features land against the feature density of the data a model was fitted on.

The converter fits class-conditional Gaussians with one shared, shrunk covariance to the model's features of
labelled data (GDA / Mahalanobis, as in DDU, Mukhoti et al. 2023; Lee et al. 2018). The score of a feature vector
``x`` is its squared Mahalanobis distance to the nearest class mean in the covariance's top ``d`` directions:

    y = W^T x,  W = V_d diag(lambda_d)^(-1/2)        (whitened coordinates)
    score = min_c ||y - m_c||^2,  m_c = W^T mu_c

The whitening ``W`` is baked into the int8 graph as one more output, ``density_projection`` (``d`` int8 values per
image, or per grid cell for a detector); whitening gives every coordinate the same within-class spread, so one
int8 scale serves them all. The device finishes with the nearest-mean distance in numpy: no TensorFlow.
(benchmarks/unknowns.py scores ranks 64 to 512 and the full covariance side by side; the default, 192, is where
the gains stop paying for the projection's cost.)

The score is published as ``unfamiliarity`` (higher: less like the fitting data) with ``unfamiliarity_percentile``,
its rank among the scores of held-out in-distribution data run through the int8 model, so that a dashboard can
threshold it without knowing its scale. Non-finite values are never published.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import BundleError
from edgeq.manifest import Density
from edgeq.runtime import Model, TensorInfo

PROJECTION_ROLE = "density_projection"


@dataclass(frozen=True)
class DensityModel:
    """The arrays of a :class:`edgeq.manifest.Density` block, ready for numpy."""

    rank: int
    means: np.ndarray  # [C, d] the class means in whitened coordinates
    reference: np.ndarray  # sorted scores of held-out in-distribution data

    @classmethod
    def from_block(cls, block: Density) -> "DensityModel":
        return cls(block.rank, np.asarray(block.class_means, np.float64).reshape(-1, block.rank),
                   np.sort(np.asarray(block.reference, np.float64)))

    def scores(self, projection: np.ndarray) -> np.ndarray:
        """``[N]`` scores from whitened coordinates ``[N, d]``: squared distance to the nearest class mean."""
        y = np.asarray(projection, np.float64).reshape(-1, self.rank)
        diff = y[:, None, :] - self.means[None]
        return np.min(np.sum(diff * diff, axis=-1), axis=1)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percent of the held-out in-distribution scores at or below each score (0 to 100)."""
        return 100.0 * np.searchsorted(self.reference, np.asarray(scores, np.float64), side="right") / len(self.reference)


@dataclass(frozen=True)
class BoundDensity:
    """A density with the model's projection tensor."""

    density: DensityModel
    projection: TensorInfo

    @property
    def tensors(self) -> list[TensorInfo]:
        return [self.projection]

    def scores(self, raw: dict[int, np.ndarray], cells: np.ndarray | None = None) -> np.ndarray:
        """Scores of one image (a classifier: ``[1]``), or of the grid ``cells`` given (a detector)."""
        p = self.projection.dequantize(raw[self.projection.index]).reshape(-1, self.density.rank)
        return self.density.scores(p if cells is None else p[cells])


def bind_density(block: Density | None, model: Model, outputs: list, where: str = "manifest") -> BoundDensity | None:
    """The density of a bundle bound to its model's outputs; None for a bundle made without one."""
    if block is None:
        return None
    spec = next((o for o in outputs if o.role == PROJECTION_ROLE), None)
    if spec is None:
        raise BundleError(f"{where}: outputs have no {PROJECTION_ROLE!r} entry, which the density block needs")
    projection = model.find_output(spec.name, spec.shape)
    if projection.shape[-1] != block.rank:
        raise BundleError(f"{where}: output {PROJECTION_ROLE!r} has {projection.shape[-1]} channels; the density "
                          f"block needs {block.rank}")
    return BoundDensity(DensityModel.from_block(block), projection)


def finite_or_none(value: float, digits: int = 6) -> float | None:
    """A value fit to publish: rounded, or None when NaN or infinite (never a NaN in a payload)."""
    v = float(value)
    return round(v, digits) if np.isfinite(v) else None
