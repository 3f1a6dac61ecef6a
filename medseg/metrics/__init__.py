"""Segmentation metrics: overlap (confusion matrix), surface distances, instances (lesions), detection (AP).

``metrics`` owns the metric definitions (DESIGN.md section 6 is the contract): one module per family,
each docstring stating formulas, units, empty cases and sources. Pure numpy / scipy (and pandas for
the per-lesion table); never imports torch. The names below load lazily (PEP 562), so importing one
module of the package does not load scipy's spatial and image modules for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "connected_components": "medseg.core.components",
    "average_precision": "medseg.metrics.detection",
    "detections_record": "medseg.metrics.detection",
    "pooled_average_precision": "medseg.metrics.detection",
    "LESION_COLUMNS": "medseg.metrics.instances",
    "InstanceMatch": "medseg.metrics.instances",
    "lesion_metrics": "medseg.metrics.instances",
    "match_instances": "medseg.metrics.instances",
    "OVERLAP_KEYS": "medseg.metrics.overlap",
    "confusion_matrix": "medseg.metrics.overlap",
    "dice_per_structure": "medseg.metrics.overlap",
    "iou_per_class": "medseg.metrics.overlap",
    "miou_from_confusion": "medseg.metrics.overlap",
    "overlap_from_confusion": "medseg.metrics.overlap",
    "overlap_from_counts": "medseg.metrics.overlap",
    "overlap_metrics": "medseg.metrics.overlap",
    "SURFACE_KEYS": "medseg.metrics.surface",
    "mask_boundary": "medseg.metrics.surface",
    "surface_distances": "medseg.metrics.surface",
    "surface_element_areas": "medseg.metrics.surface",
    "surface_metrics": "medseg.metrics.surface",
    "surface_metrics_multi": "medseg.metrics.surface",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
