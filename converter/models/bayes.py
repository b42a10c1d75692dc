"""The Bayesian classification head and its export to one integer pass.

``BayesDense`` is a mean-field Gaussian variational dense layer (Blundell et al. 2015, "Bayes by Backprop"):
every weight ``w ~ N(mu, sigma^2)`` with ``sigma = softplus(rho)``, a Gaussian prior ``N(prior_mu, prior_sigma^2)``
and the closed-form KL divergence added to the loss, scaled by ``kl_weight`` (1 / training-set size, so the loss
is the per-example negative ELBO). Training samples with the local reparameterisation trick (Kingma et al. 2015):
the pre-activation ``y = x W + b`` is Gaussian with mean ``x mu_W + mu_b`` and variance ``x^2 sigma_W^2 + sigma_b^2``,
so one noise draw per example and output replaces a weight draw per batch, with lower gradient variance.
In inference mode the layer returns the posterior-mean logits.

Priors (shared/FINDINGS.md measured the spread they give):
- without ``--init``: isotropic ``N(0, prior_sigma^2)``, ``prior_sigma = 0.1`` by default. N(0, 1) let the
  logits grow to +-145; 0.1 gave a usable spread.
- with ``--init`` (empirical Bayes, after Bayesian-Torch's MOPED): the prior mean and the posterior mean start at
  the deterministic model's weights, with the same ``prior_sigma``. MOPED's prior width ``delta * |w|`` gave
  almost no spread between samples, so edgeq keeps a fixed width.

``export_model`` draws K weight samples (seeded) and builds a plain Keras model whose head is ordinary Dense
layers, which the TFLite converter quantises to int8 like any other layer:

- ``stacked``: one Dense (features -> K*C), sample-major, which the device views as ``[K, C]`` sample logits;
- ``centred``: a Dense (features -> C) with the posterior mean, plus a Dense (features -> K*C) with each
  sample's deviation from it. The device adds them. Each output gets its own int8 scale, so the spread between
  samples is resolved in steps of the residuals' range instead of the logits' range.

``edgeq convert`` picks ``stacked`` when its output would resolve the spread in at least 4 int8 steps
(:func:`stacked_steps_estimate`, converter/stages/export_head.py), else ``centred``; see docs/bayesian.md. The ``[K, C]``
reshape happens on the device (a numpy view): a Keras Reshape layer converts with a dynamic batch dimension into
SHAPE/STRIDED_SLICE/PACK ops that XNNPACK does not take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import ModelError

from ..recipes import BAYES_LAYOUTS
from ..tf import count_macs, leaf_layers

LAYOUTS = BAYES_LAYOUTS
MAX_SAMPLES = 1024
# the head may cost at most this fraction of the backbone's multiply-accumulates
MAX_HEAD_SHARE = 0.5


def _keras() -> Any:
    import keras

    return keras


def _softplus_inverse(y: float) -> float:
    return float(math.log(math.expm1(y)))


def _make_layer_class() -> type:
    # over 60 lines: the Keras layer class, defined inside a function so that Keras loads only when used; its methods are short
    keras = _keras()
    from keras import ops

    @keras.saving.register_keras_serializable(package="edgeq", name="BayesDense")
    class BayesDense(keras.layers.Layer):
        """Mean-field Gaussian variational dense layer; see the module docstring."""

        def __init__(
            self,
            units: int,
            prior_sigma: float = 0.1,
            posterior_sigma: float = 0.05,
            kl_weight: float = 1.0,
            seed: int | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            if prior_sigma <= 0 or posterior_sigma <= 0:
                raise ValueError("prior_sigma and posterior_sigma must be positive")
            self.units = int(units)
            self.prior_sigma = float(prior_sigma)
            self.posterior_sigma = float(posterior_sigma)
            self.kl_weight = float(kl_weight)
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def build(self, input_shape: Any) -> None:
            features = int(input_shape[-1])
            rho = keras.initializers.Constant(_softplus_inverse(self.posterior_sigma))
            self.kernel_mu = self.add_weight((features, self.units), initializer="glorot_uniform", name="kernel_mu")
            self.kernel_rho = self.add_weight((features, self.units), initializer=rho, name="kernel_rho")
            self.bias_mu = self.add_weight((self.units,), initializer="zeros", name="bias_mu")
            self.bias_rho = self.add_weight((self.units,), initializer=rho, name="bias_rho")
            self.prior_kernel_mu = self.add_weight(
                (features, self.units), initializer="zeros", name="prior_kernel_mu", trainable=False
            )
            self.prior_bias_mu = self.add_weight((self.units,), initializer="zeros", name="prior_bias_mu", trainable=False)

        def call(self, x: Any, training: bool | None = None) -> Any:
            mean = ops.matmul(x, self.kernel_mu) + self.bias_mu
            if not training:
                return mean
            var = ops.matmul(ops.square(x), ops.square(ops.softplus(self.kernel_rho))) + ops.square(
                ops.softplus(self.bias_rho)
            )
            eps = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
            self.add_loss(self.kl_weight * self.kl_divergence())
            return mean + ops.sqrt(var + 1e-12) * eps

        def kl_divergence(self) -> Any:
            """``KL(N(mu, s^2) || N(m0, s0^2)) = log(s0 / s) + (s^2 + (mu - m0)^2) / (2 s0^2) - 1/2``, summed."""
            s0 = self.prior_sigma
            total = 0.0
            for mu, rho, m0 in (
                (self.kernel_mu, self.kernel_rho, self.prior_kernel_mu),
                (self.bias_mu, self.bias_rho, self.prior_bias_mu),
            ):
                s = ops.softplus(rho)
                total = total + ops.sum(
                    math.log(s0) - ops.log(s) + (ops.square(s) + ops.square(mu - m0)) / (2 * s0 * s0) - 0.5
                )
            return total

        def compute_output_shape(self, input_shape: Any) -> tuple:
            return (*input_shape[:-1], self.units)

        def get_config(self) -> dict[str, Any]:
            return {
                **super().get_config(),
                "units": self.units,
                "prior_sigma": self.prior_sigma,
                "posterior_sigma": self.posterior_sigma,
                "kl_weight": self.kl_weight,
                "seed": self.seed,
            }

        def posterior(self) -> dict[str, np.ndarray]:
            """Posterior means and standard deviations as numpy arrays."""
            sp = lambda r: np.logaddexp(0.0, np.asarray(r, dtype=np.float64))  # noqa: E731 (softplus)
            return {
                "kernel_mu": np.asarray(self.kernel_mu.numpy(), dtype=np.float64),
                "kernel_sigma": sp(self.kernel_rho.numpy()),
                "bias_mu": np.asarray(self.bias_mu.numpy(), dtype=np.float64),
                "bias_sigma": sp(self.bias_rho.numpy()),
            }

    return BayesDense


_LAYER_CLASS: type | None = None


def bayes_dense_class() -> type:
    """The Keras layer class, created (and registered for ``.keras`` loading) on first use."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _make_layer_class()
    return _LAYER_CLASS


def register() -> None:
    """Make ``keras.models.load_model`` know ``edgeq>BayesDense``."""
    bayes_dense_class()


def start_at(layer: Any, kernel: np.ndarray, bias: np.ndarray) -> Any:
    """Build a BayesDense ``layer`` for ``kernel``'s input width with its posterior and prior means at the given
    (deterministic) weights, MOPED-style (see the module docstring); returns the layer."""
    layer.build((None, kernel.shape[0]))
    for var, value in ((layer.kernel_mu, kernel), (layer.bias_mu, bias), (layer.prior_kernel_mu, kernel),
                       (layer.prior_bias_mu, bias)):
        var.assign(value)
    return layer


def find_bayes_heads(model: Any) -> list[Any]:
    cls = bayes_dense_class()
    return [layer for layer in leaf_layers(model) if isinstance(layer, cls)]


@dataclass(frozen=True)
class BayesExport:
    """The sampled export model and what the manifest records about it."""

    model: Any
    samples: int
    classes: int
    features: int
    seed: int
    layout: str
    prior_sigma: float
    posterior_sigma_mean: float
    head_macs: int
    backbone_macs: int
    sampled_kernels: np.ndarray  # [K, F, C] the float weights of each sample (for the faithfulness check)
    sampled_biases: np.ndarray  # [K, C]

    def describe(self) -> dict[str, Any]:
        return {
            "type": "bayes",
            "samples": self.samples,
            "classes": self.classes,
            "seed": self.seed,
            "layout": self.layout,
            "features": self.features,
            "prior_sigma": self.prior_sigma,
            "posterior_sigma_mean": round(self.posterior_sigma_mean, 6),
            "head_macs": self.head_macs,
            "backbone_macs": self.backbone_macs,
        }


def export_model(model: Any, samples: int, seed: int = 0, layout: str = "centred", origin: str = "model") -> BayesExport:
    """Replace the model's BayesDense head by K stacked weight samples (see the module docstring)."""
    keras = _keras()
    if layout not in LAYOUTS:
        raise ModelError(f"--bayes-layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    heads = find_bayes_heads(model)
    if not heads:
        raise ModelError(
            f"{origin}: no Bayesian head (BayesDense layer) found, but --bayes-samples was given; "
            "train one with edgeq train --head bayes, or drop --bayes-samples"
        )
    if len(heads) > 1:
        raise ModelError(f"{origin}: {len(heads)} BayesDense layers; edgeq exports one Bayesian head, the last layer")
    head = heads[0]
    if head not in model.layers or head.output is not model.outputs[0]:
        raise ModelError(f"{origin}: the BayesDense layer {head.name!r} is not the model's output layer")
    if samples < 2:
        raise ModelError(f"--bayes-samples {samples}: a Monte-Carlo head needs at least 2 samples (default 32)")
    if samples > MAX_SAMPLES:
        raise ModelError(f"--bayes-samples {samples}: at most {MAX_SAMPLES}; 32 to 64 is usual")
    features_model = keras.Model(model.inputs, head.input, name="features")
    post = head.posterior()
    f, c = post["kernel_mu"].shape
    backbone_macs = count_macs(features_model)
    head_macs = f * c * (samples + (1 if layout == "centred" else 0))
    if backbone_macs and head_macs > MAX_HEAD_SHARE * backbone_macs:
        k_max = int(MAX_HEAD_SHARE * backbone_macs // (f * c)) - (1 if layout == "centred" else 0)
        raise ModelError(
            f"--bayes-samples {samples}: the head would cost {head_macs:,} multiply-accumulates, "
            f"{head_macs / backbone_macs:.0%} of the backbone's {backbone_macs:,}; use at most {max(k_max, 0)} samples"
        )
    rng = np.random.default_rng(seed)
    eps_w = rng.standard_normal((samples, f, c))
    eps_b = rng.standard_normal((samples, c))
    kernels = post["kernel_mu"][None] + post["kernel_sigma"][None] * eps_w  # [K, F, C]
    biases = post["bias_mu"][None] + post["bias_sigma"][None] * eps_b  # [K, C]

    def stacked(k: np.ndarray) -> np.ndarray:  # [K, F, C] -> [F, K*C], sample-major columns
        return np.transpose(k, (1, 0, 2)).reshape(f, samples * c).astype(np.float32)

    x = features_model.outputs[0]
    if layout == "stacked":
        dense = keras.layers.Dense(samples * c, name="sample_logits")
        outputs = [dense(x)]
        dense.set_weights([stacked(kernels), biases.reshape(-1).astype(np.float32)])
    else:
        mean_dense = keras.layers.Dense(c, name="mean_logits")
        mean = mean_dense(x)
        mean_dense.set_weights([post["kernel_mu"].astype(np.float32), post["bias_mu"].astype(np.float32)])
        res_dense = keras.layers.Dense(samples * c, name="sample_residuals")
        outputs = [mean, res_dense(x)]
        res_dense.set_weights([
            stacked(kernels - post["kernel_mu"][None]),
            (biases - post["bias_mu"][None]).reshape(-1).astype(np.float32),
        ])
    exported = keras.Model(features_model.inputs, outputs, name=f"{model.name}_mc{samples}")
    return BayesExport(
        exported, samples, c, f, seed, layout, head.prior_sigma, float(post["kernel_sigma"].mean()),
        head_macs, backbone_macs, kernels, biases,
    )


def weight_faithfulness(sampled_kernels: np.ndarray, quantized: np.ndarray, scales: np.ndarray, layout: str,
                        mean_kernel: np.ndarray | None = None) -> dict[str, Any]:
    """How closely the int8 stacked weights reproduce each float sample.

    quantized: the int8 kernel as stored by TFLite, ``[K*C, F]`` (output channel major); scales: its per-channel
    scales (one per output channel, or one for the tensor). For ``centred`` the float reference is each sample's
    deviation from ``mean_kernel``. Returns the largest and the median relative error ``||W_q - W|| / ||W||`` over
    the K*C output channels, and whether the scales are per channel.
    """
    k, f, c = sampled_kernels.shape
    ref = sampled_kernels - (mean_kernel[None] if layout == "centred" and mean_kernel is not None else 0.0)
    ref = np.transpose(ref, (0, 2, 1)).reshape(k * c, f)  # row = output channel k*C + c
    scales = np.asarray(scales, dtype=np.float64).reshape(-1)
    deq = quantized.astype(np.float64) * (scales[:, None] if scales.size == k * c else scales.reshape(1, 1))
    err = np.linalg.norm(deq - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    return {
        "per_channel": bool(scales.size == k * c),
        "max_relative_error": round(float(err.max()), 6),
        "median_relative_error": round(float(np.median(err)), 6),
    }


def stacked_steps_estimate(exported_stacked: BayesExport, calibration_samples: np.ndarray) -> dict[str, float]:
    """Before converting: run the stacked float model on the calibration images and estimate how many int8 steps
    of its output the spread between samples spans. The converter calibrates the output's scale from the min and
    max it sees, ``(max(0, hi) - min(0, lo)) / 255``; the spread is the mean std of the logits across samples."""
    k, c = exported_stacked.samples, exported_stacked.classes
    out = np.asarray(exported_stacked.model.predict(calibration_samples, batch_size=32, verbose=0), dtype=np.float64)
    step = (max(0.0, float(out.max())) - min(0.0, float(out.min()))) / 255.0
    spread = float(np.mean(np.std(out.reshape(len(out), k, c), axis=1)))
    return {"spread": round(spread, 6), "step": round(step, 8), "steps": round(spread / step, 2) if step else 0.0}
