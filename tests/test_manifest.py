"""The typed bundle manifest (edgeq/manifest.py) both ways: what convert writes validates (typed and against the
shipped JSON Schema), bundles of edgeq 0.1 still load, and a broken field is refused naming its dotted path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.errors import BundleError
from edgeq.manifest import Manifest, json_schema, parse_manifest, schema_path

V1 = Path(__file__).parent / "data" / "manifests_v1"


def test_shipped_schema_is_generated_from_the_models():
    assert json.loads(schema_path().read_text()) == json.loads(json.dumps(json_schema())), \
        "edgeq/schemas/manifest.schema.json is stale: run python -m edgeq.manifest"


@pytest.mark.parametrize("name", sorted(p.stem for p in V1.glob("*.json")))
def test_manifests_edgeq_wrote_before_load(name):
    """Manifests of every kind that edgeq wrote before: edgeq 0.1, before the typed contract (dense, Bayesian,
    clustered + packed, detector), and main at 343725d, before the closed measured blocks (a classifier with a
    density, Bayesian stacked and centred, clustered Bayesian, accuracy-aware, a detector with a k-NN and with an
    l2 density). What they say reads the same, in the current shape, which the shipped schema describes."""
    import jsonschema

    data = json.loads((V1 / f"{name}.json").read_text())
    m = parse_manifest(data)
    assert m.labels and m.input.dtype == "int8" and m.model.sha256 == data["model"]["sha256"]
    jsonschema.validate(m.to_json(), json_schema())
    assert parse_manifest(m.to_json()) == m  # the current shape reads back the same
    spread = data.get("head", {}).get("spread")
    if spread:  # written as {"images": N} or {"cells": N}; read as one shape
        assert m.head.spread.of in spread and m.head.spread.count == spread[m.head.spread.of]
        assert m.head.spread.float_ == spread["float"]
    if name == "det":
        assert m.detector.stride == 16 and m.head.samples == 32 and m.head.layout == "stacked"
    if name.startswith("main_343725d_detect"):
        assert m.detector.stride == 16 and m.head.samples == 8 and m.density.method == "knn_whitened"
        assert (m.density.normalise == "l2") is name.endswith("l2")
    if name == "dense_c16":
        assert m.model.packed is not None and m.model.packed.kernels[0].values <= 16


def test_every_bundle_convert_writes_validates(tiny_bundle):
    """A bundle from the real converter: typed, and against the shipped JSON Schema."""
    import zipfile

    import jsonschema

    data = json.loads(zipfile.ZipFile(tiny_bundle).read("manifest.json"))
    jsonschema.validate(data, json.loads(schema_path().read_text()))
    m = parse_manifest(data)
    assert isinstance(m, Manifest) and m.head.review is not None and m.validation.count == 36


def _v1(name: str = "bayes") -> dict:
    return json.loads((V1 / f"{name}.json").read_text())


def _set(d: dict, dotted: str, value: object) -> dict:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


# (field to break, value (KeyError: remove it), what the error line must name)
BROKEN = [
    ("input.height", 0, "'input.height'"),
    ("input.dtype", "int4", "'input.dtype'"),
    ("input.channels", 4, "'input.channels'"),
    ("outputs.0.role", KeyError, "'outputs[0].role' is missing"),
    ("head.layout", "single", "'head'"),  # single does not fit 32 samples
    ("head.samples", 0, "'head.samples'"),
    ("head.review.measure", "loudness", "'head.review.measure'"),
    ("model.sha256", "xyz", "'model.sha256'"),
    ("labels", [], "'labels'"),
    ("task", "segment", "'task'"),
    ("quantization.scheme", "int3", "'quantization.scheme'"),
    ("head.classes", 7, "head.classes is 7"),
    ("surprise", 1, "'surprise'"),
]


@pytest.mark.parametrize("field,value,needle", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_field_is_named_by_its_dotted_path(field, value, needle):
    with pytest.raises(BundleError) as err:
        parse_manifest(_set(_v1(), field, value), "b.edgeq: manifest.json")
    line = str(err.value)
    assert needle in line and line.startswith("b.edgeq: manifest.json: ") and "\n" not in line


DETECTOR = [
    ("detector.stride", KeyError, "'detector.stride' is missing"),
    ("detector.category_ids", [1, 2], "category_ids has 2 ids for 8 labels"),
    ("detector.score_threshold", 1.5, "'detector.score_threshold'"),
    ("detector.type", "yolo", "'detector.type'"),
    ("head.layout", "diagonal", "'head.layout'"),
    ("task", "classify", "a detector block needs task 'detect'"),
]


@pytest.mark.parametrize("field,value,needle", DETECTOR, ids=[b[0] for b in DETECTOR])
def test_broken_detector_block_is_named(field, value, needle):
    parse_manifest(_v1("det"))  # the unbroken one reads
    with pytest.raises(BundleError, match=needle.replace("(", r"\(")):
        parse_manifest(_set(_v1("det"), field, value), "det.edgeq")


def test_unknown_schema_version_says_what_to_do():
    with pytest.raises(BundleError, match="unknown schema version 3 .*reads 1 and 2.*upgrade edgeq or re-convert"):
        parse_manifest({**_v1(), "schema_version": 3})
    with pytest.raises(BundleError, match="not an edgeq manifest"):
        parse_manifest({"schema": "other"})
