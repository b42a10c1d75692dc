"""The spread check of a Bayesian head, one skeleton for every task: the logits' spread across the K samples,
float vs int8, on calibration images, how many output quantisation steps it spans, and how closely int8 keeps
each sample's mutual information."""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgeq.records import Spread
from edgeq.runtime import quantize_values
from edgeq.uncertainty import summarize

from .products import Converted


def spread_check(reference: Converted, quantised: Converted, samples: np.ndarray, of: str,
                 read: Callable[[Converted], np.ndarray],
                 choose: Callable[[Converted], np.ndarray] | None = None) -> Spread:
    """``read(converted)``: the ``[U, K, C]`` sample logits of the last invoke (U: 1 for a classifier, the grid's
    cells for a detector); ``choose(reference)``: which of the U to compare, picked from the float model's last
    invoke (all of them when None)."""
    from .evaluation.classify import correlation

    ref, quant = [], []
    for x in samples:
        reference.model.set_input(x[None].astype(np.float32))
        reference.model.invoke()
        keep = choose(reference) if choose is not None else slice(None)
        ref.append(read(reference)[keep])
        t = quantised.model.input
        quantised.model.set_input(quantize_values(x[None], t.scale, t.zero_point, t.dtype) if t.quantized else x[None])
        quantised.model.invoke()
        quant.append(read(quantised)[keep])
    ref_a, quant_a = np.concatenate(ref), np.concatenate(quant)
    spread_f = float(np.mean(np.std(ref_a.astype(np.float64), axis=1)))
    spread_q = float(np.mean(np.std(quant_a.astype(np.float64), axis=1)))
    last = quantised.bound.tensors[-1]  # the stacked samples, or the centred residuals
    step = float(last.scale) if last.quantized else 0.0
    corr = correlation(summarize(ref_a).mutual_information, summarize(quant_a).mutual_information)
    return Spread(of=of, count=int(len(ref_a)), float_=round(spread_f, 6), quantized=round(spread_q, 6),
                  kept=round(spread_q / spread_f, 4) if spread_f > 0 else None, output_step=round(step, 8),
                  steps=round(spread_f / step, 2) if step else None,
                  mutual_information_correlation=None if corr is None else round(corr, 4))
