"""The core types every stage shares, with numpy / scipy / SimpleITK / nibabel only (never torch).

``core`` owns what a voxel means: :class:`Volume` (a channel-first array with its 4x4 RAS affine in
mm), :class:`LabelSet` (label ids <-> names, regions), orientation codes and axis permutations
(nibabel's ``io_orientation``), resampling onto another grid (SimpleITK), the one conversion
between SimpleITK's LPS images and RAS volumes, and the one connected-components function. Every
other package builds on it; it imports no other medseg package.
"""

from __future__ import annotations

from medseg.core.components import connected_components, keep_largest_component, remove_small_components
from medseg.core.labels import LabelSet, Structure, as_label_array
from medseg.core.orientation import orientation_code, ras_axis_order
from medseg.core.volume import Volume, VolumeKind

__all__ = [
    "LabelSet",
    "Structure",
    "Volume",
    "VolumeKind",
    "as_label_array",
    "connected_components",
    "keep_largest_component",
    "orientation_code",
    "ras_axis_order",
    "remove_small_components",
]
