"""2D images (PNG, TIFF, GIF, JPEG, BMP) through Pillow.

Axes are ``(x = column, y = row)``; such files carry no physical spacing, so pixels are 1 mm and
``meta["spacing_known"] = False``. Palette images (GIF) read as labels keep their palette indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.core.labels import as_label_array
from medseg.core.volume import Volume, VolumeKind
from medseg.errors import InvalidFileError
from medseg.io.files import suffix_of

__all__ = ["read_2d", "write_2d"]


def read_2d(path: Path, *, kind: VolumeKind) -> tuple[np.ndarray, np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if kind == "label":
            # Palette images (GIF) keep their palette *indices*: those are the stored labels.
            if mode not in ("1", "L", "P", "I", "I;16", "F"):
                raise InvalidFileError(
                    f"{path}: colour ({mode}) image cannot be a label map; save labels as greyscale or palette"
                )
            data = np.asarray(image)
        else:
            if mode in ("1", "LA"):
                image = image.convert("L")
            elif mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "RGBA"):
                image = image.convert("RGB")
            data = np.asarray(image)
    if data.ndim == 2:
        array = data.T[None]  # (rows, cols) -> (1, x=cols, y=rows)
    else:
        array = np.transpose(data, (2, 1, 0))  # (rows, cols, c) -> (c, x, y)
    meta = {"format": suffix_of(path).lstrip("."), "spacing_known": False, "pil_mode": mode}
    return np.ascontiguousarray(array), np.eye(4), meta


def write_2d(volume: Volume, path: Path) -> None:
    from PIL import Image

    if volume.spatial_ndim != 2:
        raise InvalidFileError(f"{path}: only 2D volumes can be written as {suffix_of(path)}")
    array = as_label_array(volume.array) if volume.kind == "label" else volume.array
    if array.shape[0] not in (1, 3, 4):
        raise InvalidFileError(f"{path}: {array.shape[0]} channels cannot be written as an image")
    if array.min() < 0 or array.max() > 65535 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidFileError(
            f"{path}: 2D image files hold integers 0..65535; got dtype {array.dtype} "
            f"range {array.min()}..{array.max()} (write NIfTI instead)"
        )
    if array.shape[0] == 1:
        pixels = array[0].T
        pixels = pixels.astype(np.uint8) if pixels.max() <= 255 else pixels.astype(np.uint16)
    else:
        if array.max() > 255:
            raise InvalidFileError(f"{path}: colour images must hold values 0..255")
        pixels = np.transpose(array, (2, 1, 0)).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
