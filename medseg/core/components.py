"""Connected components of binary masks: the one labelling function medseg uses everywhere.

Components use full connectivity by default (26 neighbours in 3D, 8 in 2D, as DESIGN.md defines
instances); ``connectivity=1`` is face connectivity (6 / 4). Keep-largest and remove-small build on
it (scikit-image's ``remove_small_objects`` for the latter). Pure numpy / scipy / scikit-image.

Two pure-numpy helpers serve code that runs on every ``medseg evaluate`` and should not pay scipy.ndimage's
0.2-0.3 s import for a few small arrays: :func:`bounding_box` and :func:`small_grid_components` (the full-
connectivity components of a small grid, numbered as ``scipy.ndimage.label`` numbers them).

Example:
    >>> import numpy as np
    >>> m = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    >>> connected_components(m)[1], connected_components(m, connectivity=1)[1]
    (1, 2)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "as_binary_mask",
    "bounding_box",
    "connected_components",
    "keep_largest_component",
    "remove_small_components",
    "small_grid_components",
]


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


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every true element of ``mask`` (one slice per axis); None for an empty mask.

    The same box as ``scipy.ndimage.find_objects(mask.astype(int))[0]``, from one ``any`` projection per axis.
    """
    mask = np.asarray(mask, dtype=bool)
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def small_grid_components(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Full-connectivity components (8 in 2D, 26 in 3D) of a small boolean grid, and the box of each.

    Numbered ``1..n`` in scan order of their first element (C order), as ``scipy.ndimage.label`` numbers them,
    so ``boxes[k - 1]`` equals ``scipy.ndimage.find_objects(labels)[k - 1]``. Every element starts with its own
    scan index; each sweep takes the minimum over its neighbourhood and then follows pointers (an element's
    value is the index of an element of its component), until nothing changes: each component ends with the
    index of its first element. Cost grows with the grid times the number of sweeps (about the logarithm of a
    component's extent), so this is for coarse grids (the 8-voxel block grids of the surface metrics), not
    for whole volumes: use :func:`connected_components` there.
    """
    mask = np.asarray(mask, dtype=bool)
    beyond = mask.size + 1  # larger than every index: background and the outside never win a minimum
    index = np.arange(1, mask.size + 1, dtype=np.int64).reshape(mask.shape)
    current = np.where(mask, index, beyond)
    offsets = np.stack(np.meshgrid(*([np.arange(3)] * mask.ndim), indexing="ij"), axis=-1).reshape(-1, mask.ndim)
    while True:
        padded = np.pad(current, 1, constant_values=beyond)
        lowest = current.copy()
        for offset in offsets:
            np.minimum(lowest, padded[tuple(slice(o, o + n) for o, n in zip(offset, mask.shape))], out=lowest)
        lowest[~mask] = beyond
        flat = np.append(lowest.ravel(), beyond)  # flat[i - 1]: the value now held by the element of index i
        while True:  # pointer jumping: take the value of the element pointed at, until stable
            jumped = np.where(mask, flat[np.minimum(lowest, beyond) - 1], beyond)
            if np.array_equal(jumped, lowest):
                break
            lowest = jumped
            flat = np.append(lowest.ravel(), beyond)
        if np.array_equal(lowest, current):
            break
        current = lowest
    roots = np.unique(current[mask])
    labels = np.zeros(mask.shape, dtype=np.int32)
    labels[mask] = np.searchsorted(roots, current[mask]) + 1
    boxes = [bounding_box(labels == k) for k in range(1, roots.size + 1)]
    return labels, boxes  # type: ignore[return-value]


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
