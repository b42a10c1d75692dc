"""How a bundle's outputs become ``[K, C]`` sample logits: one implementation for the device decoder,
``convert --val`` and evaluation.

The manifest's ``head`` says what the model computes:

``{"type": "dense", "samples": 1, "layout": "single"}``
    one output with role ``logits``, shape ``[1, C]``; read as K = 1.
``{"type": "bayes", "samples": K, "layout": "stacked"}``
    one output with role ``samples``, shape ``[1, K*C]`` (sample-major): viewed as ``[K, C]``, each row is a
    posterior sample's logits.
``{"type": "bayes", "samples": K, "layout": "centred"}``
    role ``logits`` ``[1, C]`` (the posterior-mean logits) and role ``residuals`` ``[1, K*C]`` (each sample's
    deviation from the mean); sample k's logits are ``logits + residuals[k]``.

``head.review`` (optional) holds the calibrated ``needs_review`` rule: ``{"measure", "threshold", ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import BundleError
from edgeq.runtime import Model, TensorInfo

LAYOUT_ROLES = {"single": ("logits",), "stacked": ("samples",), "centred": ("logits", "residuals")}


@dataclass(frozen=True)
class HeadSpec:
    type: str
    samples: int
    classes: int
    layout: str
    review: dict[str, Any] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str = "manifest") -> "HeadSpec":
        head = manifest.get("head") or {"type": "dense", "samples": 1}
        layout = head.get("layout", "single")
        if layout not in LAYOUT_ROLES:
            raise BundleError(f"{where}: head.layout {layout!r} is not one of {', '.join(LAYOUT_ROLES)}; "
                              "convert the bundle again with this edgeq")
        samples = int(head.get("samples", 1))
        classes = int(head.get("classes", len(manifest.get("labels", []))))
        if (layout == "single") != (samples == 1):
            raise BundleError(f"{where}: head.samples {samples} does not fit head.layout {layout!r}")
        return cls(str(head.get("type", "dense")), samples, classes, layout, head.get("review"))

    @property
    def roles(self) -> tuple[str, ...]:
        return LAYOUT_ROLES[self.layout]

    def bind(self, model: Model, outputs: list[dict[str, Any]], where: str = "manifest") -> "BoundHead":
        return BoundHead(self, bind_roles(model, outputs, self.roles, f"a {self.layout} head", where))


def bind_roles(model: Model, outputs: list[dict[str, Any]], roles: tuple[str, ...], needs: str,
               where: str = "manifest") -> list[TensorInfo]:
    """The model's output tensor for each of ``roles``, found by the manifest's name and shape (never by index
    order); a missing role is refused, naming ``needs`` (what requires it)."""
    by_role = {o.get("role"): o for o in outputs}
    tensors = []
    for role in roles:
        spec = by_role.get(role)
        if spec is None:
            raise BundleError(f"{where}: outputs have no {role!r} entry, which {needs} needs")
        tensors.append(model.find_output(spec.get("name"), spec.get("shape")))
    return tensors


@dataclass(frozen=True)
class BoundHead:
    """A head spec with the model's output tensors it reads, in ``spec.roles`` order."""

    spec: HeadSpec
    tensors: list[TensorInfo]

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
