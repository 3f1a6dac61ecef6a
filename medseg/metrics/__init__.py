"""Segmentation metrics: overlap (confusion matrix), surface distances, instances (lesions), detection (AP).

Pure numpy / scipy (and pandas for the per-lesion table); never imports torch. Every metric's formula, units,
empty cases and source are in its module's docstring (DESIGN.md section 6 is the contract).
"""

from __future__ import annotations

from medseg.core.components import connected_components
from medseg.metrics.detection import average_precision, detections_record, pooled_average_precision
from medseg.metrics.instances import LESION_COLUMNS, InstanceMatch, lesion_metrics, match_instances
from medseg.metrics.overlap import (
    OVERLAP_KEYS,
    confusion_matrix,
    iou_per_class,
    miou_from_confusion,
    overlap_from_confusion,
    overlap_from_counts,
    overlap_metrics,
)
from medseg.metrics.surface import (
    SURFACE_KEYS,
    mask_boundary,
    surface_distances,
    surface_element_areas,
    surface_metrics,
    surface_metrics_multi,
)

__all__ = [
    "LESION_COLUMNS",
    "OVERLAP_KEYS",
    "SURFACE_KEYS",
    "InstanceMatch",
    "average_precision",
    "confusion_matrix",
    "connected_components",
    "detections_record",
    "iou_per_class",
    "lesion_metrics",
    "mask_boundary",
    "match_instances",
    "miou_from_confusion",
    "overlap_from_confusion",
    "overlap_from_counts",
    "overlap_metrics",
    "pooled_average_precision",
    "surface_distances",
    "surface_element_areas",
    "surface_metrics",
    "surface_metrics_multi",
]
