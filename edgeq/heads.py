"""How a bundle's outputs become ``[K, C]`` sample logits: one implementation for the device decoder,
``convert --val`` and evaluation.

The manifest's ``head`` (:class:`edgeq.manifest.Head`) says what the model computes:

``{"type": "dense", "samples": 1, "layout": "single"}``
    one output with role ``logits``, shape ``[1, C]``; read as K = 1.
``{"type": "bayes", "samples": K, "layout": "stacked"}``
    one output with role ``samples``, shape ``[1, K*C]`` (sample-major): viewed as ``[K, C]``, each row is a
    posterior sample's logits.
``{"type": "bayes", "samples": K, "layout": "centred"}``
    role ``logits`` ``[1, C]`` (the posterior-mean logits) and role ``residuals`` ``[1, K*C]`` (each sample's
    deviation from the mean); sample k's logits are ``logits + residuals[k]``.

``head.review`` (optional) holds the calibrated ``needs_review`` rule (:class:`edgeq.manifest.ReviewRule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgeq.density import BoundDensity, bind_density
from edgeq.errors import BundleError
from edgeq.manifest import LAYOUT_ROLES, Density, Manifest, OutputSpec, ReviewRule
from edgeq.runtime import Model, TensorInfo


@dataclass(frozen=True)
class HeadSpec:
    """The head's shape as the decoders need it: its kind, K samples, C classes, the layout and its review rule."""

    type: str
    samples: int
    classes: int
    layout: str
    review: ReviewRule | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "HeadSpec":
        head = manifest.head_or_dense
        return cls(head.type, head.samples, head.classes or len(manifest.labels), head.layout, head.review)

    @property
    def roles(self) -> tuple[str, ...]:
        return LAYOUT_ROLES[self.layout]

    def bind(self, model: Model, outputs: Sequence[OutputSpec], where: str = "manifest",
             density: Density | None = None) -> "BoundHead":
        """The head's tensors, and the density's when the bundle has one."""
        return BoundHead(self, bind_roles(model, outputs, self.roles, f"a {self.layout} head", where),
                         bind_density(density, model, list(outputs), where))


def bind_roles(model: Model, outputs: Sequence[OutputSpec], roles: tuple[str, ...], needs: str,
               where: str = "manifest") -> list[TensorInfo]:
    """The model's output tensor for each of ``roles``, found by the manifest's name and shape (never by index
    order); a missing role is refused, naming ``needs`` (what requires it)."""
    by_role = {o.role: o for o in outputs}
    tensors = []
    for role in roles:
        spec = by_role.get(role)
        if spec is None:
            raise BundleError(f"{where}: outputs have no {role!r} entry, which {needs} needs")
        tensors.append(model.find_output(spec.name, spec.shape))
    return tensors


@dataclass(frozen=True)
class BoundOutputs:
    """A decoder's spec with the model's output tensors it reads (in ``spec.roles`` order), and the density's
    tensors when the bundle has one: what :class:`BoundHead` and :class:`edgeq.detection.BoundGrid` share."""

    spec: Any
    tensors: list[TensorInfo]
    density: BoundDensity | None = None

    @property
    def all_tensors(self) -> list[TensorInfo]:
        """Every output the device copies after an invoke: the decoder's, and the density's."""
        return self.tensors + (self.density.tensors if self.density is not None else [])

    def raw(self, model: Model) -> dict[int, np.ndarray]:
        """The raw values of every output of the model's last invoke that :attr:`all_tensors` names."""
        return {t.index: model.get(t) for t in self.all_tensors}


@dataclass(frozen=True)
class BoundHead(BoundOutputs):
    """A head spec with the model's output tensors it reads."""

    spec: HeadSpec

    def density_measures(self, raw: dict[int, np.ndarray], predicted: int) -> tuple[float | None, float | None]:
        """The image's unfamiliarity and its disagreement with the ``predicted`` class, from one pass of the
        density's numpy finish; ``(None, None)`` without a density."""
        if self.density is None:
            return None, None
        scores, disagreement = self.density.measures(raw, np.array([predicted]))
        return float(scores[0]), float(disagreement[0])

    def sample_logits(self, raw: dict[int, np.ndarray]) -> np.ndarray:
        """``[K, C]`` float logits from the raw (possibly quantised) output values, keyed by tensor index."""
        values = [t.dequantize(raw[t.index]) for t in self.tensors]
        c = self.spec.classes
        if self.spec.layout == "single":
            return values[0].reshape(1, -1)
        if self.spec.layout == "stacked":
            return values[0].reshape(self.spec.samples, c)
        return values[0].reshape(1, c) + values[1].reshape(self.spec.samples, c)

    def read(self, model: Model) -> np.ndarray:
        """``[K, C]`` logits of the model's last invoke."""
        return self.sample_logits({t.index: model.get(t) for t in self.tensors})


def describe_outputs(model: Model, spec: HeadSpec) -> list[OutputSpec]:
    """The outputs of a converted classifier with their roles, told apart by size (never by order): ``logits``
    has C values, ``samples`` and ``residuals`` K*C."""
    sizes = {"logits": spec.classes, "samples": spec.samples * spec.classes, "residuals": spec.samples * spec.classes}
    out = []
    for role in spec.roles:
        found = [t for t in model.outputs if int(np.prod(t.shape)) == sizes[role]]
        if len(found) != 1:
            have = ", ".join(f"{t.name} {list(t.shape)}" for t in model.outputs)
            raise BundleError(f"converted model outputs ({have}) do not fit a {spec.layout} head")
        out.append(OutputSpec(role=role, **found[0].to_dict()))
    return out
