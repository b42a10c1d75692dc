"""Issue 16, part 2: why the Bayesian head's mutual information does not catch the unknown, and what changes it.

On the classifier of benchmarks/unknowns.py (MobileNetV2 0.35/96, 8 Fashion-MNIST classes; the same data and
unknown inputs: MNIST digits, the 2 held-out classes, photo crops), Bayesian heads are trained on the frozen,
cached penultimate features exactly as ``edgeq train --head bayes --init det.keras --freeze-backbone`` does
(BayesDense, local reparameterisation, KL weight 1/N, means started at the deterministic head's weights, 20 epochs),
with one thing changed at a time:

- ``prior_sigma`` 0.01 to 1 (the shipped default is 0.1), and the one the ELBO prefers (empirical Bayes: the prior
  width with the highest evidence lower bound on the training features);
- the KL term weighted x0.1 and x10 (tempering);
- L2-normalised features into the head (each feature vector scaled to the training set's mean norm).

For each head, in float with K=32 posterior samples (int8 keeps MI: benchmarks/bayes_head.py): the mean posterior
sigma against the prior, the ELBO, the sampled and mean-weight training accuracy, the correlation of MI with the
feature norm on the test images, and the OOD AUROC of MI, of predictive entropy and of the samples' vote
disagreement (the fraction of samples whose top class differs from the mean's), for each kind of unknown input.

    python benchmarks/bayes_mi.py [--workdir DIR]     # writes benchmarks/results/bayes_mi.json
                                                      # (--workdir: reuse benchmarks/unknowns.py's data and
                                                      # its model of --seed)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import log, require_clean_tree, write_result  # noqa: E402 (benchmarks/ is the script's folder on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", help="benchmarks/unknowns.py's --workdir: reuse its data and model")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the training seed of unknowns.py's model (and of the heads)")
    args = p.parse_args(argv)
    import unknowns

    require_clean_tree()  # before the slow part: the results must name the commit that ran
    tmp_ctx = tempfile.TemporaryDirectory() if not args.workdir else None
    work = Path(args.workdir or tmp_ctx.name)
    model_path = work / f"seed{args.seed}" / "model.keras"
    if not model_path.is_file():  # unknowns.py's data and its model of this training seed, without its figures
        defaults = unknowns.parser().parse_args([])
        unknowns.train_and_convert(args.seed, unknowns.make_data(work, defaults), work, defaults)
    feats = cached_features(model_path, work)
    x, y = feats["train"]
    variants = {f"prior_{s:g}": {"prior_sigma": s} for s in (0.01, 0.03, 0.1, 0.3, 1.0)}
    variants.update({"kl_x0.1": {"kl_scale": 0.1}, "kl_x10": {"kl_scale": 10.0},
                     "l2_normalised_features": {"normalise": True}})
    result: dict = {"benchmark": "bayes_mi", "command": "python benchmarks/bayes_mi.py",
                    "model": f"benchmarks/unknowns.py's classifier of training seed {args.seed}; heads trained on its frozen "
                             "penultimate features",
                    "train_samples": int(len(y)), "epochs": args.epochs, "samples": args.samples, "heads": {}}
    for name, v in variants.items():
        t0 = time.perf_counter()
        result["heads"][name] = head_figures(feats, args, **v)
        result["heads"][name]["train_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {result['heads'][name]}")
    priors = {k: h["elbo"] for k, h in result["heads"].items() if k.startswith("prior_")}
    result["empirical_bayes_prior"] = max(priors, key=priors.get)
    if tmp_ctx is not None:
        tmp_ctx.cleanup()
    write_result("bayes_mi", result)
    return 0


def cached_features(model_path: Path, work: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Penultimate features and the deterministic head's weights, through the bundle's preprocessing."""
    import keras

    from edgeq.bundle import read_bundle
    from edgeq.converter.data.datasets import class_folder
    from edgeq.preprocess import Preprocessor, list_images, read_image

    m = keras.models.load_model(model_path, compile=False)
    head = next(layer for layer in m.layers if layer.output is m.outputs[0])
    extractor = keras.Model(m.inputs, head.input)
    bundle = read_bundle(model_path.parent / "int8.edgeq")
    pre = Preprocessor(bundle.preprocess_spec.with_dtype("float32"))

    def run(files):
        out = []
        for s in range(0, len(files), 256):
            out.append(extractor.predict(pre.batch([read_image(f) for f in files[s:s + 256]]), verbose=0))
        return np.concatenate(out).astype(np.float32)

    out = {}
    for split in ("train", "test"):
        data = class_folder(work / split, bundle.labels)
        out[split] = (run(data.files), np.asarray(data.targets))
    for kind in ("digits", "held_out", "photos"):
        out[kind] = (run(list_images(work / "report" / kind)), None)
    out["init"] = tuple(np.asarray(w) for w in head.get_weights())
    return out


def head_figures(feats: dict, args: argparse.Namespace, prior_sigma: float = 0.1, kl_scale: float = 1.0,
                 normalise: bool = False) -> dict:
    import keras

    from edgeq.converter.evaluation import metrics
    from edgeq.converter.models import bayes
    from edgeq.uncertainty import summarize

    keras.utils.set_random_seed(args.seed)
    x, y = feats["train"]
    scale = float(np.linalg.norm(x, axis=1).mean())

    def prep(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12) * scale if normalise else a

    kernel, bias = feats["init"]
    n, classes = len(y), kernel.shape[1]
    layer = bayes.bayes_dense_class()(classes, prior_sigma=prior_sigma, kl_weight=kl_scale / n, seed=args.seed)
    bayes.start_at(layer, kernel, bias)
    inp = keras.Input((x.shape[1],))
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(prep(x), y, epochs=args.epochs, batch_size=64, verbose=0)
    post = layer.posterior()
    rng = np.random.default_rng(args.seed)
    k = args.samples
    w = post["kernel_mu"][None] + post["kernel_sigma"][None] * rng.standard_normal((k, *post["kernel_mu"].shape))
    b = post["bias_mu"][None] + post["bias_sigma"][None] * rng.standard_normal((k, classes))

    def summary(a):
        z = np.einsum("nf,kfc->nkc", prep(a).astype(np.float64), w) + b[None]
        return summarize(z), z

    def votes(z):
        mean_top = summarize(z).mean.argmax(-1)
        return (z.argmax(-1) != mean_top[:, None]).mean(1)

    s_train, z_train = summary(x)
    s_test, z_test = summary(feats["test"][0])
    nll = float(hist.history["loss"][-1])
    out = {
        "prior_sigma": prior_sigma, "kl_scale": kl_scale, "normalised_features": normalise,
        "posterior_sigma_mean": round(float(post["kernel_sigma"].mean()), 5),
        "posterior_sigma_p5_p95": [round(float(np.percentile(post["kernel_sigma"], q)), 5) for q in (5, 95)],
        # the training loss is the per-sample NLL plus KL/N (x kl_scale): the negative ELBO per sample at scale 1
        "elbo": round(-nll, 5) if kl_scale == 1.0 else None,
        "train_accuracy_sampled": round(float((z_train.argmax(-1) == y[:, None]).mean()), 4),
        "train_accuracy_mean": round(float((s_train.mean.argmax(-1) == y).mean()), 4),
        "test_accuracy": round(float((s_test.mean.argmax(-1) == feats["test"][1]).mean()), 4),
        "mi_vs_feature_norm_correlation": round(float(np.corrcoef(
            s_test.mutual_information, np.linalg.norm(feats["test"][0], axis=1))[0, 1]), 4),
        "ood_auroc": {},
    }
    for kind in ("digits", "held_out", "photos"):
        s_ood, z_ood = summary(feats[kind][0])
        out["ood_auroc"][kind] = {
            "mutual_information": round(metrics.roc_auc(s_test.mutual_information, s_ood.mutual_information), 4),
            "predictive_entropy": round(metrics.roc_auc(s_test.predictive_entropy, s_ood.predictive_entropy), 4),
            "vote_disagreement": round(metrics.roc_auc(votes(z_test), votes(z_ood)), 4),
            "feature_norm": round(metrics.roc_auc(np.linalg.norm(feats["test"][0], axis=1),
                                                  np.linalg.norm(feats[kind][0], axis=1)), 4),
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
