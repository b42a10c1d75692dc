"""What edgeq keeps with a trained model: its class names and, for a detector, the COCO category ids and stride.

``edgeq train`` writes them into the ``.keras`` file itself, as ``edgeq.json`` beside Keras's own entries
(Keras ignores files it does not know), so the names travel with the model when it is copied. Models from
edgeq 0.1 kept them in sidecar files (``MODEL.labels.txt``, ``MODEL.detect.json``), which are still read.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from edgeq.errors import ModelError

INFO_NAME = "edgeq.json"


def add_model_info(keras_path: str | Path, info: dict[str, Any]) -> None:
    """Add ``edgeq.json`` to a freshly saved ``.keras`` file (before it is moved into place)."""
    with zipfile.ZipFile(keras_path, "a") as zf:
        zf.writestr(INFO_NAME, json.dumps(info, indent=2) + "\n")


def read_model_info(model_path: str | Path) -> dict[str, Any]:
    """The stored info of a model (``labels``, ``task``, ``category_ids``, ...), or ``{}`` when it has none."""
    p = Path(model_path)
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            if INFO_NAME in zf.namelist():
                try:
                    info = json.loads(zf.read(INFO_NAME))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ModelError(f"{p}: its {INFO_NAME} is not valid JSON ({exc.__class__.__name__}); "
                                     "train it again") from None
                if not isinstance(info, dict):
                    raise ModelError(f"{p}: its {INFO_NAME} is not a JSON object; train it again")
                return info
    return _sidecars(p)


def _sidecars(p: Path) -> dict[str, Any]:
    """edgeq 0.1's files beside the model."""
    info: dict[str, Any] = {}
    labels = p.with_name(p.stem + ".labels.txt")
    if labels.is_file():
        try:
            info["labels"] = [ln.strip() for ln in labels.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{labels}: cannot read ({exc.__class__.__name__})") from None
    detect = p.with_name(p.stem + ".detect.json")
    if detect.is_file():
        try:
            info.update({k: v for k, v in json.loads(detect.read_text(encoding="utf-8")).items()
                         if k in ("category_ids", "stride")})
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{detect}: not readable JSON ({exc.__class__.__name__}); train again or delete "
                             "it") from None
        info["task"] = "detect"
    return info
