"""The ``fast`` plans: a coarse target spacing (3 mm, as TotalSegmentator's ``--fast`` models).

``medseg plan MANIFEST --fast`` plans as usual from a fingerprint in which every case is seen at
no finer than :data:`FAST_SPACING_MM` per axis (its physical extent kept), so the target spacing,
the median shape, the patch, the topology and the batch size all follow nnU-Net's rules at that
resolution. A 512x512x300 CT at 0.78x0.78x1.5 mm is 133x133x150 voxels at 3 mm instead of
266x266x300 at 1.5 mm: 8x fewer voxels through the network and the resampling. The model must be
trained on these plans (a network trained at 1.5 mm does not segment 3 mm images well); the
``fingerprint.json`` written beside the plans stays the dataset's real one.

Example:
    >>> fast = fast_fingerprint({"spacings_mm": [[0.8, 0.8, 1.5]], "shapes": [[512, 512, 300]]})
    >>> fast["spacings_mm"], fast["shapes"]
    ([[3.0, 3.0, 3.0]], [[136.533333, 136.533333, 150.0]])
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping

__all__ = ["FAST_SPACING_MM", "fast_fingerprint"]

#: the finest spacing of ``fast`` plans, per axis (TotalSegmentator's ``--fast`` models: 3 mm)
FAST_SPACING_MM = 3.0


def fast_fingerprint(fingerprint: Mapping[str, Any], *, spacing_mm: float = FAST_SPACING_MM) -> dict[str, Any]:
    """The fingerprint with every case's spacing coarsened to at least ``spacing_mm`` and its shape scaled to match.

    Only ``spacings_mm``, ``shapes`` and their medians change; intensities and classes are kept.
    """
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    spacings, shapes = [], []
    for spacing, shape in zip(fingerprint["spacings_mm"], fingerprint["shapes"]):
        coarse = [max(float(s), spacing_mm) for s in spacing]
        spacings.append(coarse)
        shapes.append([round(float(n) * float(s) / c, 6) for n, s, c in zip(shape, spacing, coarse)])
    result = {**dict(fingerprint), "spacings_mm": spacings, "shapes": shapes}
    for key, values in (("median_spacing_mm", spacings), ("median_shape", shapes)):
        if key in fingerprint and values:
            result[key] = [float(statistics.median(column)) for column in zip(*values)]
    return result
