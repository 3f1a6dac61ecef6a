"""Connected components of binary masks: the one labelling function medseg uses everywhere.

Components use full connectivity by default (26 neighbours in 3D, 8 in 2D, as DESIGN.md defines
instances); ``connectivity=1`` is face connectivity (6 / 4). Keep-largest and remove-small build on
it (scikit-image's ``remove_small_objects`` for the latter). Pure numpy / scipy / scikit-image.

Example:
    >>> import numpy as np
    >>> m = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    >>> connected_components(m)[1], connected_components(m, connectivity=1)[1]
    (1, 2)
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_binary_mask", "connected_components", "keep_largest_component", "remove_small_components"]


def as_binary_mask(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as a boolean mask; ValueError naming the values unless it holds only 0 and 1 (checked in O(n))."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.integer):
        binary = array.size == 0 or (int(array.min()) >= 0 and int(array.max()) <= 1)
    elif np.issubdtype(array.dtype, np.floating):
        binary = bool(np.all((array == 0) | (array == 1)))
    else:
        raise ValueError(f"{name} must be a boolean or 0/1 array, got dtype {array.dtype}")
    if not binary:
        raise ValueError(f"{name} must be binary (0/1), found values {np.unique(array)[:10].tolist()}")
    return array != 0


def connected_components(mask: np.ndarray, *, connectivity: int | None = None) -> tuple[np.ndarray, int]:
    """Label the connected components of a binary mask.

    Args:
        mask: Boolean (or 0/1) array, 2D or 3D.
        connectivity: Neighbourhood: 1 = faces (4 in 2D, 6 in 3D) up to ``ndim`` = full (8 / 26, the default).

    Returns:
        ``(instances, n)``: int32 map with components ``1..n`` in scan order, 0 for background.

    Raises:
        ValueError: a non-binary mask, or a connectivity outside ``1..ndim``.
    """
    mask = as_binary_mask(mask, "mask")
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {mask.shape}")
    conn = mask.ndim if connectivity is None else connectivity
    if isinstance(conn, bool) or not isinstance(conn, (int, np.integer)) or not 1 <= conn <= mask.ndim:
        raise ValueError(f"connectivity must be an integer in 1..{mask.ndim} for a {mask.ndim}D mask, got {conn!r}")
    from scipy import ndimage  # here, not at the top: `import medseg` and the CLI start fast

    structure = ndimage.generate_binary_structure(mask.ndim, int(conn))
    instances, n = ndimage.label(mask, structure=structure, output=np.int32)
    return instances, int(n)


def keep_largest_component(mask: np.ndarray, *, connectivity: int | None = None) -> np.ndarray:
    """The largest connected component of ``mask`` (ties: the first in scan order; empty stays empty)."""
    components, count = connected_components(mask, connectivity=connectivity)
    if count <= 1:
        return np.asarray(mask).astype(bool, copy=True)
    sizes = np.bincount(components.ravel())[1:]
    return components == (int(np.argmax(sizes)) + 1)


def remove_small_components(mask: np.ndarray, *, min_voxels: float, connectivity: int | None = None) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_voxels`` voxels.

    scikit-image's ``remove_small_objects`` on the components labelled by
    :func:`connected_components` (a component of exactly ``min_voxels`` voxels is kept).
    """
    from skimage.morphology import remove_small_objects

    components, count = connected_components(mask, connectivity=connectivity)
    if count == 0:
        return np.asarray(mask).astype(bool, copy=True)
    # skimage >= 0.26 removes objects of size <= max_size; a size below min_voxels is removed
    threshold = int(np.ceil(min_voxels)) - 1
    if threshold < 1:
        return components > 0
    if count == 1:  # one label: skimage would warn that it expected a boolean mask
        return components > 0 if int(np.count_nonzero(components)) > threshold else np.zeros(components.shape, bool)
    return remove_small_objects(components, max_size=threshold) > 0
