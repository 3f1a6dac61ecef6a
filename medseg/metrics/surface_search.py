"""The search engine behind :mod:`medseg.metrics.surface`: boundaries, surface elements, nearest distances.

Internal to the surface metrics (the definitions and the public functions live there). One pass
over a volume records which labels occur in each 8x8(x8) block; a mask is split into clusters of
occupied blocks, each cropped with a one-voxel zero margin; nearest-boundary distances test integer
voxel offsets in increasing length against a scratch grid and send the rest to a k-d tree; NSD
tests the offsets within the tolerance the same way. ``benchmarks/bench_surface.py`` measures it
against bounding-box-cropped ``scipy.ndimage.distance_transform_edt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from medseg.core.components import as_binary_mask, bounding_box, small_grid_components
from medseg.metrics.overlap import fortran_ordered

#: the keys of every surface-metric result
SURFACE_KEYS: tuple[str, ...] = ("hd_mm", "hd95_mm", "assd_mm", "nsd")

# Surface normals of the 3D neighbourhood codes 0..127 (code 255 - c has the same surface as c, mirrored), in
# units of 1/8 of a voxel face: one string per code, three letters per triangle, "a".."i" = -4..4 eighths,
# "-" = no surface. The length of each normal is the area of its triangle on the unit grid. Table of DeepMind's
# surface-distance (Apache-2.0), as also shipped by MONAI (`monai.metrics.utils`); a test checks it against MONAI.
_NORMALS_3D = """
- fff ddf ccegge fdf cecgeg fdfddf ieegggfff dff fffdff cegceg ieeccgddf gcegce ieegcgdfd aeecggdff ieeiee fdd
eccegg ddffdd eaegggfff fdffdd eeagggddd ddffdffdd dddcccgggfff dfffdd ecceggdff cegcegfdd fffhhhecgceg
fddgcegce hhhegcdddcge aeedddcccfff aeedddccc fdf ffffdf ecgegc eaeffdggc fdffdf fdfcecgeg ecgegcfdf
bbheggffdcec dfffdf ffffdfdff eeiccgddf ggcggcffdddf fdfgcegce ieegcgdfdfdf egchbbdffgge aeeccgddf gcecge
eiecggfdd eiefdfcgc eieeae gcecgefdf bbbcegdddcge fffeaecccddd eaecccddd dffgcecge eieggcddfddf bhbccedfdceg
eieggcddf gcecgegcegce ccecceddf fffccecce ccecce ddf fffddf ddfddf ddfccegge ecgecg eeigcgfdf ecgecgddf
hbheccdfdgge ddfdff fffddfdff ddfcegceg ieeccgddfddf eiecgcfdf cgccgcdfddfd cechbbegcdff ieecgcfdf ceggec
eeicggdff ddfceggec cecbhhccedff eeaggcddf eeieei ffffffgggeei fffgggeei ceggecdff eeigcgfdffdf cegcegceggec
fdfgeggeg gegbbhcgeddf eeigcgfdf fffgeggeg geggeg ddffdf fffddffdf ddfecgegc eaeffdggcddf ecgecgfdf
eeigcgfdffdf ecgecgecgegc eggeggfdd dfffdfddf dfffdfddffff eeiccgddfddf ffffdffdd eiecgcfdffdf fffddffdd
ecceggfff ffffdd ieegccfdd cggdffcggfdd hbheggdfdceg eaecggdff bbhgceeggddf dffcggeei fffeggegg eggegg
ieegggffffff fdfddffff cecgegfff ffffdf cceggefff fffddf ffffff fff
"""


def _decode_normals() -> np.ndarray:
    rows = _NORMALS_3D.split()
    if len(rows) != 128:  # pragma: no cover - guards the literal above
        raise RuntimeError(f"corrupt surface-normal table: {len(rows)} rows, expected 128")
    table = np.zeros((256, 4, 3), dtype=np.float64)
    for code, row in enumerate(rows):
        if row == "-":
            continue
        values = [(ord(ch) - ord("e")) / 8.0 for ch in row]
        triangles = np.asarray(values, dtype=np.float64).reshape(-1, 3)
        table[code, : len(triangles)] = triangles
        table[255 - code, : len(triangles)] = triangles
    table.flags.writeable = False
    return table


_NORMALS_TABLE = _decode_normals()


def _validate_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64)))
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm={tuple(spacing_mm)} has {len(spacing)} values but the arrays are {ndim}D")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm={spacing} must be finite and > 0")
    return spacing


def _validate_pair(reference: np.ndarray, prediction: np.ndarray, *, names: tuple[str, str]) -> None:
    if reference.shape != prediction.shape:
        raise ValueError(f"{names[0]} shape {reference.shape} != {names[1]} shape {prediction.shape}")
    if reference.ndim not in (2, 3):
        raise ValueError(f"{names[0]} must be 2D or 3D (spatial only, no channel axis), got shape {reference.shape}")


def _validate_tolerance(tolerance_mm: float, label: int | None = None) -> float:
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        where = "" if label is None else f" for label {label}"
        raise ValueError(f"nsd_tolerance_mm={tolerance_mm!r}{where} must be finite and >= 0")
    return tol


def surface_element_areas(spacing_mm: Sequence[float]) -> np.ndarray:
    """Area (3D, mm^2) or contour length (2D, mm) of the surface element of every neighbourhood code.

    A neighbourhood code is the integer ``sum_k mask[corner_k] * 2**(2**ndim - 1 - k)`` over the ``2**ndim``
    corners of a 2x2(x2) cell in C order (DeepMind's encoding kernel ``[[8, 4], [2, 1]]`` in 2D,
    ``[[[128, 64], [32, 16]], [[8, 4], [2, 1]]]`` in 3D).

    Args:
        spacing_mm: Voxel spacing, 2 or 3 values.

    Returns:
        float64 array of 16 (2D) or 256 (3D) values. Source: DeepMind ``surface-distance``
        ``create_table_neighbour_code_to_surface_area`` / ``..._contour_length``.

    Example:
        >>> float(surface_element_areas((1.0, 1.0))[0b0011])
        1.0
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.ndim != 1 or spacing.size not in (2, 3) or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm={tuple(np.atleast_1d(spacing))} must be 2 or 3 positive values")
    if spacing.size == 3:
        scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
        return np.linalg.norm(_NORMALS_TABLE * scale, axis=-1).sum(axis=-1)
    first, second = spacing
    diag = 0.5 * math.hypot(first, second)
    lengths = np.zeros(16, dtype=np.float64)
    for code in (0b0001, 0b0010, 0b0100, 0b0111, 0b1000, 0b1011, 0b1101, 0b1110):
        lengths[code] = diag
    lengths[0b0110] = lengths[0b1001] = 2 * diag
    lengths[0b0011] = lengths[0b1100] = second
    lengths[0b0101] = lengths[0b1010] = first
    return lengths


_BLOCK = 8  # edge of the coarse blocks used to find the parts of each structure
_MAX_SHELL_OFFSETS = 400  # above this many offsets within the NSD tolerance, use the k-d tree instead
_MAX_DISTANCE_OFFSETS = 200  # offsets tried per boundary voxel before the k-d tree
_MAX_FRAME_VOXELS = 1 << 31  # larger scratch grids (virtual, lazily zeroed) are not made: k-d tree only
_BRUTE_FORCE_PAIRS = 4_000_000  # nearest-point searches up to this many pairs compare every pair


def _inner(ndim: int) -> tuple[slice, ...]:
    return (slice(1, -1),) * ndim


def _pad_crop(mask_crop: np.ndarray) -> np.ndarray:
    padded = np.zeros(tuple(s + 2 for s in mask_crop.shape), dtype=bool)
    padded[_inner(mask_crop.ndim)] = mask_crop
    return padded


def _padded_boundary(padded: np.ndarray) -> np.ndarray:
    """Boundary (face-connectivity erosion) of a mask that has a one-voxel zero margin; returns the inner part."""
    ndim = padded.ndim
    inner = _inner(ndim)
    centre = padded[inner]
    interior = centre.copy()
    for axis in range(ndim):
        for lo, hi in ((None, -2), (2, None)):
            sl = list(inner)
            sl[axis] = slice(lo, hi)
            interior &= padded[tuple(sl)]
    return centre & ~interior


def _neighbour_codes(padded: np.ndarray) -> np.ndarray:
    """2x2(x2) neighbourhood codes on the voxel-corner grid (shape ``padded.shape - 1``), built axis by axis."""
    codes = padded.view(np.uint8)
    bits = 1
    for axis in reversed(range(padded.ndim)):
        lo = [slice(None)] * padded.ndim
        hi = [slice(None)] * padded.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        codes = (codes[tuple(lo)] << np.uint8(bits)) | codes[tuple(hi)]
        bits *= 2
    return codes


def _reduce_blocks(bits_of: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, dtype: type) -> np.ndarray:
    """OR-reduce per-voxel bit sets over blocks of ``_BLOCK`` voxels, one row of blocks at a time."""
    coarse = np.zeros(tuple(-(-n // _BLOCK) for n in labels.shape), dtype=dtype)
    for block_row, row in enumerate(range(0, labels.shape[0], _BLOCK)):
        plane = np.bitwise_or.reduce(bits_of(labels[row : row + _BLOCK]), axis=0)
        for axis in range(plane.ndim):
            plane = np.bitwise_or.reduceat(plane, np.arange(0, plane.shape[axis], _BLOCK), axis=axis)
        coarse[block_row] = plane
    return coarse


def _label_blocks(labels: np.ndarray, wanted: Sequence[int]) -> dict[int, np.ndarray | None]:
    """Occupancy of every wanted label on a grid of ``_BLOCK``-voxel blocks, in one pass over the volume.

    Each voxel becomes a bit set, OR-reduced over each block: ``1 << value`` when every value is below 64 (the
    common case, no lookup), else a lookup table with one bit per wanted label, 64 labels a pass. ``None`` for
    labels absent from the volume; negative values count as background.
    """
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if fortran_ordered(labels):
        # a Fortran-ordered map (NIfTI): reduce its transpose, walking memory in order, and transpose back
        return {lab: None if grid is None else grid.T for lab, grid in _label_blocks(labels.T, wanted).items()}
    wanted = sorted({int(w) for w in wanted})
    out: dict[int, np.ndarray | None] = dict.fromkeys(wanted)
    if labels.size == 0:
        return out
    low = int(labels.min()) if np.issubdtype(labels.dtype, np.signedinteger) else 0
    high = int(labels.max())
    layers: list[tuple[np.ndarray, dict[int, int]]] = []  # (block bit sets, label -> bit)
    if low >= 0 and high < 64:
        dtype = _bit_type(high + 1)
        one = dtype(1)
        # every value is in 0..63 here, so the unsafe cast of the shift amount to the bit type is exact
        coarse = _reduce_blocks(lambda chunk: np.left_shift(one, chunk, dtype=dtype, casting="unsafe"), labels, dtype)
        layers.append((coarse, {w: w for w in wanted if w <= high}))
    else:
        for first in range(0, len(wanted), 64):
            group = wanted[first : first + 64]
            dtype = _bit_type(len(group))
            lut = np.zeros(max(group) + 2, dtype=dtype)  # the last entry (0) takes every value above max(group)
            for bit, lab in enumerate(group):
                lut[lab] = dtype(1) << dtype(bit)
            bits_of = partial(np.take, lut, mode="clip")  # negative values clip onto lut[0] = 0
            layers.append((_reduce_blocks(bits_of, labels, dtype), {lab: bit for bit, lab in enumerate(group)}))
    for coarse, bits in layers:
        for lab, bit in bits.items():
            occupied = (coarse & coarse.dtype.type(1 << bit)) != 0
            out[lab] = occupied if occupied.any() else None
    return out


def label_boxes(labels: np.ndarray, wanted: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """A box holding every voxel of each wanted label, from one pass over the volume; None for absent labels.

    The boxes are those of the labels' occupied 8-voxel blocks, clipped to the volume: they may be up to 7
    voxels larger than the tightest box on each side, never smaller. (The report uses them to search a
    structure's largest slice without another full pass per label.)
    """
    boxes: dict[int, tuple[slice, ...] | None] = {}
    for lab, occupied in _label_blocks(np.asarray(labels), wanted).items():
        coarse = None if occupied is None else bounding_box(occupied)
        boxes[lab] = (
            None
            if coarse is None
            else tuple(slice(b.start * _BLOCK, min(b.stop * _BLOCK, n)) for b, n in zip(coarse, labels.shape))
        )
    return boxes


def _bit_type(n_bits: int) -> type:
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.dtype(t).itemsize * 8 >= n_bits)


@dataclass(frozen=True)
class _Surface:
    """Surface of one mask in image coordinates: boundary voxels, and surface cells with their areas.

    Cell ``c`` is the 2x2(x2) cell whose corners are the voxels ``c - 1 .. c`` along every axis.
    """

    voxels: np.ndarray
    cells: np.ndarray
    areas: np.ndarray


def _coords(flat: np.ndarray, shape: tuple[int, ...], start: np.ndarray) -> np.ndarray:
    return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64) + start


def _mask_surface(labels: np.ndarray, label: int, occupied: np.ndarray, areas: np.ndarray) -> _Surface:
    """Boundary voxels and surface cells of ``labels == label``, one crop per cluster of occupied blocks.

    Blocks of different clusters are not adjacent, so their voxels are more than one voxel apart and each
    cluster's boundary and cells can be computed alone on its crop (plus a one-voxel zero margin).
    """
    ndim = labels.ndim
    box = bounding_box(occupied)
    assert box is not None, "only occupied labels are searched"
    clusters, cluster_boxes = small_grid_components(occupied[box])
    voxels, cells, cell_areas = [], [], []
    full = len(areas) - 1
    for cluster, local in enumerate(cluster_boxes, start=1):
        blocks = tuple(slice(b.start + o.start, b.stop + o.start) for b, o in zip(local, box))
        crop = tuple(slice(b.start * _BLOCK, min(b.stop * _BLOCK, n)) for b, n in zip(blocks, labels.shape))
        mask = labels[crop] == label
        owner = clusters[local]
        if np.any((owner != 0) & (owner != cluster)):  # another cluster's blocks inside this box
            keep = owner == cluster
            for axis in range(ndim):
                keep = np.repeat(keep, _BLOCK, axis=axis)
            mask &= keep[tuple(slice(0, n) for n in mask.shape)]
        padded = _pad_crop(mask)
        start = np.array([c.start for c in crop], dtype=np.int64)
        boundary = _padded_boundary(padded)
        voxels.append(_coords(np.flatnonzero(boundary), boundary.shape, start))
        codes = _neighbour_codes(padded).reshape(-1)
        edge = np.flatnonzero((codes != 0) & (codes != full))
        cells.append(_coords(edge, tuple(n + 1 for n in mask.shape), start))
        cell_areas.append(areas[codes[edge]])
    return _Surface(np.concatenate(voxels), np.concatenate(cells), np.concatenate(cell_areas))


def _sorted_offsets(spacing: np.ndarray, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All integer offsets with ``|o_k| <= reach_k``, sorted by their length in mm (stable)."""
    axes = [np.arange(-r, r + 1) for r in reach]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(reach))
    dists = np.sqrt(((offsets * spacing) ** 2).sum(axis=1))
    order = np.argsort(dists, kind="stable")
    return offsets[order], dists[order]


def _distance_offsets(spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets searched before the k-d tree, sorted by length: all offsets shorter than a bound.

    Every integer offset shorter than the returned maximum is included, so the first hit is the exact nearest
    distance; points with no hit are at least that far and go to the k-d tree.
    """
    reach = np.floor(2.0 * spacing.max() / spacing).astype(int)
    offsets, dists = _sorted_offsets(spacing, reach)
    bound = float(((reach + 1) * spacing).min())  # any offset outside the box is at least this long
    if np.count_nonzero(dists < bound) > _MAX_DISTANCE_OFFSETS:  # strongly anisotropic grid: fewer shells
        bound = float(dists[_MAX_DISTANCE_OFFSETS])
    keep = dists < bound
    return offsets[keep], dists[keep]


def _tolerance_offsets(spacing: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Offsets within ``tolerance`` mm (compared in float32 as MONAI does, so exact ties count as within);
    ``None`` when there are more than ``_MAX_SHELL_OFFSETS`` of them (the k-d tree is then faster)."""
    reach = np.floor(tolerance * (1 + 1e-6) / spacing).astype(int)
    if int(np.prod(2 * reach + 1)) > 8 * _MAX_SHELL_OFFSETS:  # the ball alone would exceed the limit
        return None
    offsets, dists = _sorted_offsets(spacing, reach)
    keep = dists.astype(np.float32) <= np.float32(tolerance)
    if np.count_nonzero(keep) > _MAX_SHELL_OFFSETS:
        return None
    return offsets[keep], dists[keep]


@dataclass(frozen=True)
class _Frame:
    """A box of image coordinates holding every point of a structure plus a margin, with C-order strides."""

    origin: np.ndarray
    shape: tuple[int, ...]
    strides: np.ndarray

    @staticmethod
    def around(points: Sequence[np.ndarray], offsets: np.ndarray) -> _Frame:
        """The frame of ``points`` with a margin of the largest ``offsets`` along each axis."""
        stacked = np.concatenate([p for p in points if len(p)])
        margin = np.abs(offsets).max(axis=0) if len(offsets) else np.zeros(stacked.shape[1], np.int64)
        origin = stacked.min(axis=0) - margin
        shape = tuple(int(v) for v in stacked.max(axis=0) + margin + 1 - origin)
        strides = np.array([int(np.prod(shape[k + 1 :], dtype=np.int64)) for k in range(len(shape))], np.int64)
        return _Frame(origin, shape, strides)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def flat(self, points: np.ndarray) -> np.ndarray:
        flat = (points[:, -1] - self.origin[-1]).copy()
        for axis in range(points.shape[1] - 1):
            flat += (points[:, axis] - self.origin[axis]) * self.strides[axis]
        return flat


def _shell_search(
    source: np.ndarray,
    target: np.ndarray,
    frame: _Frame,
    grid: np.ndarray,
    offsets: np.ndarray,
    dists: np.ndarray,
) -> np.ndarray:
    """Distance from each source point to the first target point met at ``source + offset`` (offsets sorted by
    length); inf when none. ``grid`` is a scratch boolean array of ``frame`` (all False on entry and exit)."""
    out = np.full(len(source), np.inf, dtype=np.float64)
    if len(source) == 0 or len(target) == 0 or len(offsets) == 0:
        return out
    target_flat = frame.flat(target)
    grid[target_flat] = True
    remaining = np.arange(len(source))
    position = frame.flat(source)
    for delta, dist in zip(offsets @ frame.strides, dists):
        hit = grid[position + delta]
        if hit.any():
            out[remaining[hit]] = dist
            miss = ~hit
            remaining, position = remaining[miss], position[miss]
            if remaining.size == 0:
                break
    grid[target_flat] = False
    return out


def _tree_nearest(
    source: np.ndarray, target: np.ndarray, spacing: np.ndarray, *, upper_bound: float = math.inf
) -> np.ndarray:
    """Exact distance (mm) from each ``source`` point to the nearest ``target`` point; inf past ``upper_bound``.

    Up to :data:`_BRUTE_FORCE_PAIRS` source x target pairs (a false-positive island far from the
    reference, say) every pair is compared directly; beyond, a k-d tree (scipy.spatial, imported
    only then: it costs 0.17 s to import) answers. Either way the distance is then computed from
    the integer voxel offset to the point found.
    """
    out = np.full(len(source), np.inf, dtype=np.float64)
    if len(source) == 0 or len(target) == 0:
        return out
    if len(source) * len(target) <= _BRUTE_FORCE_PAIRS:
        scaled_target = target * spacing
        idx = np.empty(len(source), dtype=np.intp)
        rows = max(1, _BRUTE_FORCE_PAIRS // (4 * len(target)))  # at most ~_BRUTE_FORCE_PAIRS / 4 pairs at once
        for start in range(0, len(source), rows):
            chunk = source[start : start + rows] * spacing
            difference = chunk[:, None, :] - scaled_target[None, :, :]
            idx[start : start + rows] = np.argmin(np.einsum("ijk,ijk->ij", difference, difference), axis=1)
        offsets = (source - target[idx]) * spacing
        nearest = np.sqrt(np.einsum("ij,ij->i", offsets, offsets))
        found = nearest <= upper_bound
        out[found] = nearest[found]
        return out
    from scipy.spatial import cKDTree

    tree = cKDTree(target * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
    _, idx = tree.query(source * spacing, k=1, distance_upper_bound=upper_bound)
    found = idx < len(target)
    offsets = (source[found] - target[idx[found]]) * spacing  # from integer offsets: independent of the origin
    out[found] = np.sqrt(np.einsum("ij,ij->i", offsets, offsets))
    return out


def _nan_result() -> dict[str, float]:
    return {key: math.nan for key in SURFACE_KEYS}


def _directed_distances(ref: _Surface, pred: _Surface, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d(R->P)`` and ``d(P->R)`` for all boundary voxels: offset shells first, the k-d tree for the rest."""
    offsets, dists = _distance_offsets(spacing)
    frame = _Frame.around([ref.voxels, pred.voxels], offsets)
    if frame.size > _MAX_FRAME_VOXELS:  # no scratch grid that large: the k-d tree does everything
        offsets, dists = offsets[:0], dists[:0]
    grid = np.zeros(frame.size if len(offsets) else 0, dtype=bool)  # lazily zeroed pages
    out = []
    for source, target in ((ref.voxels, pred.voxels), (pred.voxels, ref.voxels)):
        dist = _shell_search(source, target, frame, grid, offsets, dists)
        far = np.isinf(dist)
        if far.any():
            dist[far] = _tree_nearest(source[far], target, spacing)
        out.append(dist)
    return out[0], out[1]


def _surface_dice(ref: _Surface, pred: _Surface, spacing: np.ndarray, tolerance: float) -> float:
    """NSD: area of surface cells within ``tolerance`` mm of the other surface's cells over the total area."""
    shells = _tolerance_offsets(spacing, tolerance)
    frame = None if shells is None else _Frame.around([ref.cells, pred.cells], shells[0])
    if frame is not None and frame.size > _MAX_FRAME_VOXELS:  # no scratch grid that large
        shells = frame = None
    grid = None if frame is None else np.zeros(frame.size, dtype=bool)  # lazily zeroed pages
    within = 0.0
    for source, target, areas in ((ref.cells, pred.cells, ref.areas), (pred.cells, ref.cells, pred.areas)):
        if shells is not None and frame is not None and grid is not None:
            dist = _shell_search(source, target, frame, grid, *shells)
        else:
            dist = _tree_nearest(source, target, spacing, upper_bound=tolerance * (1 + 1e-6) + 1e-9)
        within += float(areas[dist.astype(np.float32) <= np.float32(tolerance)].sum())
    total = float(ref.areas.sum() + pred.areas.sum())
    return within / total if total > 0 else math.nan


def _structure_metrics(ref: _Surface, pred: _Surface, spacing: np.ndarray, tolerance: float) -> dict[str, float]:
    if len(ref.voxels) == 0 or len(pred.voxels) == 0:
        return _nan_result()
    d_rp, d_pr = _directed_distances(ref, pred, spacing)
    return {
        "hd_mm": max(float(d_rp.max()), float(d_pr.max())),
        "hd95_mm": max(float(np.percentile(d_rp, 95)), float(np.percentile(d_pr, 95))),
        "assd_mm": float((d_rp.sum() + d_pr.sum()) / (d_rp.size + d_pr.size)),
        "nsd": _surface_dice(ref, pred, spacing, tolerance),
    }


def _mask_pair(
    reference_mask: np.ndarray, prediction_mask: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[_Surface | None, _Surface | None, np.ndarray]:
    ref = as_binary_mask(reference_mask, "reference_mask")
    pred = as_binary_mask(prediction_mask, "prediction_mask")
    _validate_pair(ref, pred, names=("reference_mask", "prediction_mask"))
    spacing = np.asarray(_validate_spacing(spacing_mm, ref.ndim))
    areas = surface_element_areas(spacing)
    surfaces = []
    for mask in (ref, pred):
        occupied = _label_blocks(mask, [1])[1]
        surfaces.append(None if occupied is None else _mask_surface(mask.view(np.uint8), 1, occupied, areas))
    return surfaces[0], surfaces[1], spacing
