"""Run a model over labelled files through the core preprocessor and runtime; compare float and quantised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeq import metrics
from edgeq.datasets import LabelledFiles, progress
from edgeq.errors import DataError, SourceError
from edgeq.preprocess import Preprocessor, PreprocessSpec, read_image
from edgeq.runtime import Model, TensorInfo


def model_input_spec(model: Model, spec: PreprocessSpec) -> PreprocessSpec:
    """The preprocessing spec with the dtype and quantisation of ``model``'s own input tensor."""
    t = model.input
    dtype = np.dtype(t.dtype).name
    return spec.with_dtype(dtype, t.scale if t.quantized else 1.0, t.zero_point if t.quantized else 0)


def score_files(
    model: Model, spec: PreprocessSpec, files: list[Path], output: TensorInfo | None = None, desc: str = ""
) -> np.ndarray:
    """Dequantised output rows, one per file, through the one preprocessor; unreadable files are an error."""
    pre = Preprocessor(model_input_spec(model, spec))
    output = output or model.outputs[0]
    rows = []
    for path in progress(files, len(files), desc or "evaluate"):
        try:
            frame = read_image(path)
        except SourceError as exc:
            raise DataError(str(exc) + "; remove or replace it") from None
        tensor, _ = pre(frame)
        model.set_input(tensor)
        model.invoke()
        rows.append(model.get_float(output).reshape(-1).copy())
    return np.stack(rows)


def compare_classifiers(
    float_model: Model, quant_model: Model, spec: PreprocessSpec, data: LabelledFiles
) -> dict[str, Any]:
    """Float vs quantised top-1, top-1 agreement and mean absolute logit error on the same files."""
    if not data.files:
        raise DataError("no validation images")
    float_scores = score_files(float_model, spec, data.files, desc="float")
    quant_scores = score_files(quant_model, spec, data.files, desc="quantized")
    return {
        "count": int(len(data.files)),
        "float_top1": metrics.top1_accuracy(float_scores, data.targets),
        "quantized_top1": metrics.top1_accuracy(quant_scores, data.targets),
        "top1_agreement": metrics.top1_agreement(float_scores, quant_scores),
        "mean_abs_logit_error": metrics.mean_abs_error(float_scores, quant_scores),
    }
