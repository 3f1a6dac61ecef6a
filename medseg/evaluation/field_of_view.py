"""Scoring inside a field of view: the pixels a case's mask marks as imaged, and no others.

Fundus photographs (DRIVE, STARE, CHASE) are circular pictures on a black frame, and their
benchmarks score only the pixels inside each image's field-of-view (FOV) mask (Staal et al. 2004).
A manifest gives that mask per case under the key :data:`FOV_KEY`::

    {"image": "images/21_training.tif", "label": "1st_manual/21_manual1.gif",
     "fov_mask": "mask/21_training_mask.gif"}

Before a case is scored, every pixel outside its mask (mask value 0) becomes background (label 0)
in the reference, every further rater, the prediction and a detector's instance map, and
probability 0 in a probability map. For a structure S with reference R and prediction P this is
scoring R ∩ F against P ∩ F, where F is the field of view:

* overlap metrics count only pixels inside F: Dice = 2|R∩P∩F| / (|R∩F| + |P∩F|);
* surface distances are between the boundaries of R ∩ F and P ∩ F;
* lesions are the connected components of R ∩ F and P ∩ F.

Edge cases: a mask of the wrong grid is an ``error`` case naming both files; an empty mask scores
every structure as ``both_empty``; a mask that covers the whole image changes nothing.
"""

from __future__ import annotations

import numpy as np

from medseg.core.volume import Volume
from medseg.errors import InvalidFileError
from medseg.evaluation.case import resampled_onto
from medseg.io.volumes import check_same_grid, read_volume

__all__ = ["FOV_KEY", "read_field_of_view", "outside_to_zero", "restrict_to_field_of_view"]

FOV_KEY = "fov_mask"


def read_field_of_view(path: str, reference: Volume, *, tolerance_mm: float = 1e-3) -> np.ndarray:
    """The boolean field of view (mask value > 0) of ``reference``'s grid, spatial shape.

    Raises:
        InvalidFileError: the mask cannot be read, or has more than one channel.
        GeometryMismatchError: the mask's grid differs from the reference's (both files named).
    """
    mask = read_volume(path, kind="label")
    if mask.num_channels != 1:
        raise InvalidFileError(f"{path}: a field-of-view mask needs one channel, found {mask.num_channels}")
    check_same_grid(reference, mask, tolerance_mm=tolerance_mm)
    return mask.channel(0) > 0


def outside_to_zero(volume: Volume, inside: np.ndarray) -> Volume:
    """``volume`` with every channel set to 0 where ``inside`` is False (memory order kept)."""
    if bool(inside.all()):
        return volume
    array = volume.array.copy(order="K")
    array[:, ~inside] = 0
    return volume.with_array(array)


def restrict_to_field_of_view(
    volume: Volume, reference: Volume, inside: np.ndarray, *, resample: bool, tolerance_mm: float
) -> Volume:
    """A rater's or the prediction's labels inside the reference's field of view.

    With ``resample`` (the evaluation's ``resample_prediction``) a prediction on another grid is
    first resampled onto the reference's (:func:`~medseg.evaluation.case.resampled_onto`, as the
    pair's scoring does). A volume still on another grid is returned as it is: the pair's grid check
    then names both files.
    """
    if resample:
        volume = resampled_onto(reference, volume, tolerance_mm=tolerance_mm)
    if not reference.same_geometry(volume, tolerance_mm=tolerance_mm):
        return volume
    return outside_to_zero(volume, inside)
