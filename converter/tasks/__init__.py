"""Task adapters: what differs between converting a classifier and a detector (see base.py)."""

from __future__ import annotations

from typing import Any

from edgeq.errors import ModelError

from .base import Task
from .classify import ClassifyTask
from .detect import DetectTask


def task_for(source: Any, info: dict[str, Any], detector: bool) -> Task:
    """The adapter for a loaded source model: a grid detector (edgeq train --task detect), else a classifier.
    A detector's COCO category ids come from what edgeq train stored with it, else 1..C."""
    if not detector:
        return ClassifyTask()
    classes = int(source.keras_model.outputs[2].shape[-1])  # the class head, after objectness and boxes
    ids = info.get("category_ids") or list(range(1, classes + 1))
    if len(ids) != classes:
        raise ModelError(f"{source.origin}: stores {len(ids)} COCO category ids for a {classes}-class detector; "
                         "train it again")
    return DetectTask([int(c) for c in ids], source.origin)


__all__ = ["ClassifyTask", "DetectTask", "Task", "task_for"]
