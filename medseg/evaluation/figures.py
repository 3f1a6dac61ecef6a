"""The pictures of ``report.html`` without matplotlib: box plots as SVG, worst-case overlays as small PNGs.

Both cost what they show, not the size of the volumes: a box plot is a few SVG elements per structure (plus one
per outlier), an overlay is one 2D slice (reference contour green, prediction red) encoded by Pillow. Neither
imports matplotlib, whose import and rendering used to dominate ``medseg evaluate`` on a single large case, and
neither touches a notebook's matplotlib backend. Each returns a ``data:`` URI for an ``<img src=...>``.

Example:
    >>> uri = box_plot_svg({"liver": np.array([0.9, 0.95]), "spleen": np.array([0.8])}, metric="dice")
    >>> uri.startswith("data:image/svg+xml;base64,")
    True
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Mapping

import numpy as np

__all__ = ["box_plot_svg", "overlay_png"]

_WIDTH_PER_BOX = 56
_HEIGHT = 250
_TOP, _BOTTOM, _LEFT = 28, 80, 58


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(low / step - 1e-9) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def box_plot_svg(groups: Mapping[str, np.ndarray], *, metric: str) -> str:
    """Box plots of ``metric`` per structure (NaN excluded), as matplotlib draws them, as an SVG ``data:`` URI.

    Box: quartiles (linear interpolation); line: median; diamond: mean; whiskers: the most extreme values
    within 1.5 IQR of the box; circles: values beyond the whiskers.
    """
    values = {name: np.asarray(v, dtype=float) for name, v in groups.items()}
    values = {name: v[np.isfinite(v)] for name, v in values.items()}
    finite = [v for v in values.values() if len(v)]
    low = min((float(v.min()) for v in finite), default=0.0)
    high = max((float(v.max()) for v in finite), default=1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad
    width = _LEFT + _WIDTH_PER_BOX * max(len(values), 3) + 16
    plot_height = _HEIGHT - _TOP - _BOTTOM

    def y(value: float) -> float:
        return _TOP + plot_height * (high - value) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_HEIGHT}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13">'
        f"{html.escape(metric)} per structure (NaN excluded)</text>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{width - _LEFT - 16}" height="{plot_height}" fill="none" stroke="#444"/>',
    ]
    for tick in _nice_ticks(low, high):
        ty = y(tick)
        parts.append(
            f'<line x1="{_LEFT}" x2="{width - 16}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#ddd"/>'
            f'<text x="{_LEFT - 4}" y="{ty + 4:.1f}" text-anchor="end">{tick:.4g}</text>'
        )
    parts.append(
        f'<text transform="translate(14 {_TOP + plot_height / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(metric)}</text>"
    )
    for index, (name, data) in enumerate(values.items()):
        cx = _LEFT + _WIDTH_PER_BOX * (index + 0.5)
        half = _WIDTH_PER_BOX * 0.25
        label_y = _TOP + plot_height + 12
        parts.append(
            f'<text transform="translate({cx + 4:.1f} {label_y}) rotate(-30)" text-anchor="end">'
            f"{html.escape(str(name))}</text>"
        )
        if not len(data):
            continue
        q1, median, q3 = (float(q) for q in np.percentile(data, [25, 50, 75]))
        iqr = q3 - q1
        inside = data[(data >= q1 - 1.5 * iqr) & (data <= q3 + 1.5 * iqr)]
        whisker_low, whisker_high = float(inside.min()), float(inside.max())
        parts.append(
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(whisker_low):.1f}" y2="{y(q1):.1f}" stroke="#222"/>'
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(q3):.1f}" y2="{y(whisker_high):.1f}" stroke="#222"/>'
            f'<line x1="{cx - half / 2:.1f}" x2="{cx + half / 2:.1f}" y1="{y(whisker_low):.1f}" '
            f'y2="{y(whisker_low):.1f}" stroke="#222"/>'
            f'<line x1="{cx - half / 2:.1f}" x2="{cx + half / 2:.1f}" y1="{y(whisker_high):.1f}" '
            f'y2="{y(whisker_high):.1f}" stroke="#222"/>'
            f'<rect x="{cx - half:.1f}" y="{y(q3):.1f}" width="{2 * half:.1f}" '
            f'height="{max(y(q1) - y(q3), 0.5):.1f}" fill="#cfe0f3" stroke="#222"/>'
            f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{y(median):.1f}" y2="{y(median):.1f}" '
            'stroke="#e07000" stroke-width="2"/>'
        )
        mean_y = y(float(data.mean()))
        parts.append(
            f'<path d="M{cx:.1f} {mean_y - 4:.1f} L{cx + 4:.1f} {mean_y:.1f} L{cx:.1f} {mean_y + 4:.1f} '
            f'L{cx - 4:.1f} {mean_y:.1f} Z" fill="#2a9d2a"><title>mean {data.mean():.4g}</title></path>'
        )
        for outlier in data[(data < whisker_low) | (data > whisker_high)]:
            parts.append(f'<circle cx="{cx:.1f}" cy="{y(float(outlier)):.1f}" r="2.5" fill="none" stroke="#222"/>')
    parts.append("</svg>")
    return "data:image/svg+xml;base64," + base64.b64encode("".join(parts).encode()).decode()


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 8 neighbours are all in ``mask`` (outside the image counts as outside).

    ``scipy.ndimage.binary_erosion(mask, structure=np.ones((3, 3)), border_value=0)``, in numpy: the
    report draws a few small slices and should not import scipy.ndimage for them.
    """
    padded = np.pad(mask, 1)
    rows, columns = mask.shape
    inside = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            inside &= padded[dy : dy + rows, dx : dx + columns]
    return inside


def overlay_png(
    reference: np.ndarray,
    prediction: np.ndarray,
    background: np.ndarray | None = None,
    *,
    size_px: int = 300,
    crop: bool = True,
) -> str:
    """One 2D slice ``(x, y)``: the reference's contour green, the prediction's red, on the image (or black).

    Shown as matplotlib's ``imshow(slice.T, origin="lower")`` would: x to the right, y upwards, one voxel one
    (square) pixel, enlarged by a whole factor to about ``size_px``. With ``crop``, only the box around both
    masks (plus a margin of a quarter of its size, at least 8 voxels) is shown, so a small structure is visible.

    Returns:
        A ``data:image/png;base64`` URI.
    """
    from PIL import Image

    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    either = reference | prediction
    if crop and either.any():
        box = []
        for axis in range(2):
            present = np.flatnonzero(either.any(axis=1 - axis))
            margin = max(8, (present[-1] - present[0] + 1) // 4)
            box.append(slice(max(present[0] - margin, 0), min(present[-1] + margin + 1, either.shape[axis])))
        reference, prediction = reference[tuple(box)], prediction[tuple(box)]
        if background is not None and background.shape == either.shape:
            background = background[tuple(box)]
    rgb = np.zeros((*reference.shape, 3), np.uint8)
    if background is not None and background.shape == reference.shape:
        finite = background[np.isfinite(background)]
        if finite.size:
            low, high = (float(v) for v in np.percentile(finite, [1, 99]))
            scaled = np.clip((np.nan_to_num(background, nan=low) - low) / max(high - low, 1e-12), 0, 1)
            rgb[:] = (scaled * 255).astype(np.uint8)[..., None]
    for mask, colour in ((reference, (0, 255, 0)), (prediction, (255, 0, 0))):
        if mask.any():
            rgb[mask & ~_interior(mask)] = colour
    picture = np.ascontiguousarray(rgb.transpose(1, 0, 2)[::-1])  # rows = y from the top, columns = x
    factor = max(1, size_px // max(picture.shape[:2]))
    image = Image.fromarray(picture).resize((picture.shape[1] * factor, picture.shape[0] * factor), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
