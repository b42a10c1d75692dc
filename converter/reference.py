"""The float32 counterpart of a bundle, built from its source ``.keras`` model: ``edgeq eval --reference``.

A Bayesian head gets the same K weight samples (seed and layout from the manifest), so float and int8 differ only
by quantisation.
"""

from __future__ import annotations

import dataclasses

from edgeq.detection import BoundGrid, GridSpec, describe_grid_outputs, signature_outputs
from edgeq.errors import ModelError
from edgeq.heads import BoundHead, HeadSpec, describe_outputs
from edgeq.manifest import Manifest
from edgeq.runtime import Model

from .models.bayes import export_model
from .models.detector import export_detector, is_detector
from .recipes import QuantMode, QuantRecipe
from .stages.load import SourceModel, load_source_model
from .tflite import convert_model
from .tf import import_tensorflow, quiet_output


def classifier_reference(model_path: str, manifest: Manifest, threads: int = 1) -> tuple[Model, BoundHead]:
    """The float32 counterpart of a classification bundle, built from its source model: for a Bayesian head the
    same K weight samples (seed and layout from the manifest), so float and int8 differ only by quantisation."""
    source = load_source_model(model_path)
    head = manifest.head_or_dense
    if head.type == "bayes":
        if source.keras_model is None:
            raise ModelError(f"{model_path}: a SavedModel cannot hold the bundle's Bayesian head; give the .keras file")
        exported = export_model(source.keras_model, head.samples, int(head.seed or 0), head.layout, model_path)
        source = dataclasses.replace(source, keras_model=exported.model)
    spec = HeadSpec.from_manifest(manifest)
    if source.num_classes != spec.classes and head.type != "bayes":
        raise ModelError(f"{model_path}: {source.num_classes} classes, but the bundle has {spec.classes}")
    with quiet_output():
        model = Model(convert_model(source, QuantRecipe(QuantMode.FLOAT32), None), num_threads=threads)
    return model, spec.bind(model, describe_outputs(model, spec))


def detector_reference(model_path: str, manifest: Manifest, threads: int = 1) -> tuple[Model, BoundGrid]:
    """The float32 counterpart of a detection bundle from its source ``.keras``: the same K weight samples (seed
    from the manifest), so float and int8 differ only by quantisation."""
    import_tensorflow()
    source = load_source_model(model_path)
    if not is_detector(source.keras_model):
        raise ModelError(f"--reference {model_path}: not an edgeq detector (edgeq train --task detect)")
    head = manifest.head_or_dense
    samples = head.samples if head.type == "bayes" else None
    exported, _ = export_detector(source.keras_model, samples, int(head.seed or 0),
                                  layout=head.layout if samples else "stacked")
    src = SourceModel(exported, None, source.input_shape, int(exported.outputs[2].shape[-1]), source.name, model_path)
    with quiet_output():
        model = Model(convert_model(src, QuantRecipe(QuantMode.FLOAT32), None), num_threads=threads)
    spec = GridSpec.from_manifest(manifest)
    return model, spec.bind(model, describe_grid_outputs(model, signature_outputs(model), spec.layout))
