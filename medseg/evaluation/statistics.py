"""Per-structure statistics of an image inside a label map: volumes in ml and intensity summaries.

For every structure (each foreground label of the label map, then each region) and every image
channel, one row of :data:`STATISTICS_COLUMNS`:

==================  ==============================================================================
column              definition
==================  ==============================================================================
``voxel_count``     voxels whose label is one of the structure's label ids
``volume_ml``       ``voxel_count x`` product of the spacing (mm) ``/ 1000`` (pixel area for 2D)
``intensity_mean``  mean of the image values in the structure, as stored after rescaling (CT: HU;
                    DICOM RescaleSlope/Intercept and NIfTI scl_slope/scl_inter are applied on read)
``intensity_sd``    population standard deviation (``ddof=0``) of the same values
``intensity_median``, ``intensity_p5``, ``intensity_p95``: percentiles, linear interpolation
                    between order statistics (numpy's default)
``intensity_min``, ``intensity_max``
==================  ==============================================================================

A structure absent from the label map has ``voxel_count`` 0, ``volume_ml`` 0 and NaN intensities
(``null`` in JSON). Image and label map must share one voxel grid (no resampling happens here):
otherwise :class:`~medseg.errors.GeometryMismatchError`; a label value that the label map does not
name is a :class:`~medseg.errors.LabelValueError`. Without a label map, every non-zero value present
is a structure named by its value.

The voxels are grouped in one pass (one sort of the foreground voxels by label), not one mask per
structure, so a CT with a hundred structures costs about as much as one with two.

Example:
    >>> table = structure_statistics(read_volume("ct.nii.gz"), read_volume("ct_seg.nii.gz", kind="label"),
    ...                              labels=manifest.labels)                     # doctest: +SKIP
    >>> write_statistics(table, "ct_stats.csv")                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import InvalidFileError, LabelValueError, OutputError
from medseg.io.files import atomic_path, write_json
from medseg.io.volumes import check_same_grid

__all__ = [
    "STATISTICS_COLUMNS",
    "structure_statistics",
    "write_statistics",
    "statistics_json",
    "combine_statistics",
    "check_statistics_path",
]

STATISTICS_COLUMNS = (
    "structure",
    "label_ids",
    "channel",
    "voxel_count",
    "volume_ml",
    "intensity_mean",
    "intensity_sd",
    "intensity_median",
    "intensity_p5",
    "intensity_p95",
    "intensity_min",
    "intensity_max",
)


def _intensity_summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {name: math.nan for name in STATISTICS_COLUMNS[5:]}
    values = values.astype(np.float64, copy=False)
    p5, median, p95 = np.percentile(values, [5.0, 50.0, 95.0])
    return {
        "intensity_mean": float(values.mean()),
        "intensity_sd": float(values.std()),
        "intensity_median": float(median),
        "intensity_p5": float(p5),
        "intensity_p95": float(p95),
        "intensity_min": float(values.min()),
        "intensity_max": float(values.max()),
    }


def structure_statistics(
    image: Volume,
    segmentation: Volume,
    *,
    labels: LabelSet | None = None,
    include_regions: bool = True,
    tolerance_mm: float = 1e-3,
) -> pd.DataFrame:
    """Volume and intensity statistics of every structure (see the module docstring).

    Args:
        image: the intensity Volume (any number of channels; one row per channel).
        segmentation: a single-channel label Volume on the image's grid.
        labels: names of the label values; default: every non-zero value present, named by its value.
        include_regions: also summarise the label set's regions (several labels as one structure).
        tolerance_mm: allowed spacing/origin difference between image and label map.

    Returns:
        One row per structure and channel, columns :data:`STATISTICS_COLUMNS`; ``label_ids`` is a
        string such as ``"1"`` or ``"1+2"``.

    Raises:
        GeometryMismatchError: image and label map lie on different grids (naming both files).
        LabelValueError: the label map holds values ``labels`` does not name.
        InvalidFileError: the label map has several channels.
    """
    if segmentation.num_channels != 1:
        raise InvalidFileError(
            f"{segmentation.meta.get('path', 'label map')}: a label map has one channel, got {segmentation.num_channels}"
        )
    check_same_grid(segmentation, image, tolerance_mm=tolerance_mm)
    label_array = np.asarray(segmentation.array[0]).ravel()
    present = [int(v) for v in np.unique(label_array)]
    if labels is None:
        names = {0: "background"} | {v: str(v) for v in present if v != 0}
        labels = LabelSet(names)
    unknown = [v for v in present if v not in labels.names]
    if unknown:
        raise LabelValueError(
            f"{segmentation.meta.get('path', 'label map')}: label values {unknown[:10]} are not in the label map "
            f"(known: {list(labels.names)})"
        )
    foreground = np.flatnonzero(label_array != 0)
    order = foreground[np.argsort(label_array[foreground], kind="stable")]
    sorted_labels = label_array[order]
    bounds = {
        int(v): (int(np.searchsorted(sorted_labels, v, "left")), int(np.searchsorted(sorted_labels, v, "right")))
        for v in labels.foreground_ids
    }
    voxel_ml = segmentation.voxel_volume_ml
    rows: list[dict[str, Any]] = []
    for structure in labels.structures(include_regions=include_regions):
        members = [order[slice(*bounds[i])] for i in structure.label_ids]
        indices = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
        for channel in range(image.num_channels):
            values = np.asarray(image.array[channel]).ravel()[indices]
            rows.append(
                {
                    "structure": structure.name,
                    "label_ids": "+".join(str(i) for i in structure.label_ids),
                    "channel": channel,
                    "voxel_count": int(indices.size),
                    "volume_ml": float(indices.size * voxel_ml),
                    **_intensity_summary(values),
                }
            )
    return pd.DataFrame(rows, columns=list(STATISTICS_COLUMNS))


def statistics_json(table: pd.DataFrame, **context: Any) -> dict[str, Any]:
    """Plain JSON of a statistics table: ``context`` (image, labels, ...) and ``structures`` (NaN -> null)."""
    records = [
        {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()}
        for row in table.to_dict(orient="records")
    ]
    return {**context, "columns": list(table.columns), "structures": records}


def check_statistics_path(path: str | os.PathLike[str]) -> Path:
    """``path`` when it ends in ``.csv`` or ``.json``; otherwise an :class:`InvalidFileError` naming it."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise InvalidFileError(f"{path}: statistics are written as .csv or .json")
    return path


def write_statistics(table: pd.DataFrame, path: str | os.PathLike[str], **context: Any) -> Path:
    """Write a statistics table atomically: ``.csv`` (one row per structure) or ``.json`` (:func:`statistics_json`).

    Raises:
        InvalidFileError: ``path`` ends in neither ``.csv`` nor ``.json``.
        OutputError: the file cannot be written.
    """
    path = check_statistics_path(path)
    if path.suffix.lower() == ".json":
        return write_json(statistics_json(table, **context), path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot create folder ({error.strerror or error})") from error
    with atomic_path(path) as temporary:
        table.to_csv(temporary, index=False)
    return path


def combine_statistics(files: Mapping[str, str | os.PathLike[str]]) -> pd.DataFrame:
    """One table of several cases' statistics CSV files, ``case_id`` first (``{case_id: csv path}``)."""
    tables = [pd.read_csv(path, dtype={"label_ids": str}).assign(case_id=case_id) for case_id, path in files.items()]
    if not tables:
        return pd.DataFrame(columns=["case_id", *STATISTICS_COLUMNS])
    combined = pd.concat(tables, ignore_index=True)
    return combined[["case_id", *STATISTICS_COLUMNS]]
