"""Several raters: their agreement (the human baseline), the prediction against each, and their consensus.

Consensus of several raters' label maps: majority vote and STAPLE (SimpleITK).

* **Majority vote** (``LabelVotingImageFilter``): each voxel takes the label most raters gave it;
  a tie (e.g. two raters who disagree) becomes background 0, so the consensus never claims more
  than a strict majority saw.
* **STAPLE** (Warfield et al., IEEE TMI 2004; ``MultiLabelSTAPLEImageFilter``): an EM estimate of
  each rater's performance and of the true segmentation; voxels whose estimate is undecided
  become background 0.
* **Binary STAPLE of one structure** (:func:`staple_probability`; ``STAPLEImageFilter``): the
  posterior probability of the structure at every voxel, and each rater's estimated sensitivity
  and specificity. Thresholded at 0.5 it is the consensus; with two raters of similar estimated
  performance a voxel only one of them marked gets a probability just under 0.5, which is why a
  two-rater STAPLE consensus can equal what both marked.

Both need every rater on the same grid; the result carries the first rater's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medseg.core.itk import to_sitk
from medseg.core.labels import LabelSet, as_label_array
from medseg.core.volume import Volume
from medseg.errors import GeometryMismatchError
from medseg.evaluation.case import EvaluationSettings, evaluate_pair

__all__ = ["StapleEstimate", "majority_vote", "staple", "staple_probability", "inter_rater_rows", "per_rater_rows"]


def _prepare(raters: Sequence[Volume]) -> list:
    import SimpleITK as sitk

    if len(raters) < 2:
        raise ValueError(f"a consensus needs at least 2 raters, got {len(raters)}")
    first = raters[0]
    for other in raters[1:]:
        differences = first.geometry_differences(other)
        if differences:
            raise GeometryMismatchError(
                f"{other.meta.get('path', 'rater')} vs {first.meta.get('path', 'rater')}: "
                f"geometry differs: {'; '.join(differences)}"
            )
    return [sitk.Cast(to_sitk(r.with_array(r.array.astype(np.uint16), kind="label")), sitk.sitkUInt16) for r in raters]


def _result(image, first: Volume, method: str) -> Volume:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    array = np.transpose(array, list(range(array.ndim))[::-1])[None]
    meta = {"consensus": method, "path": f"{method} consensus"}
    return Volume(as_label_array(array), first.affine, kind="label", meta=meta)


def majority_vote(raters: Sequence[Volume], *, labels: LabelSet | None = None) -> Volume:
    """Voxel-wise majority label of ``raters``; ties become 0 (background).

    Args:
        raters: label Volumes on one grid.
        labels: unused except for validation symmetry with :func:`staple`.
    """
    import SimpleITK as sitk

    images = _prepare(raters)
    vote = sitk.LabelVotingImageFilter()
    vote.SetLabelForUndecidedPixels(0)
    return _result(vote.Execute(images), raters[0], "majority")


def staple(raters: Sequence[Volume], *, labels: LabelSet | None = None) -> Volume:
    """Multi-label STAPLE consensus of ``raters``; undecided voxels become 0 (background)."""
    import SimpleITK as sitk

    images = _prepare(raters)
    estimator = sitk.MultiLabelSTAPLEImageFilter()
    estimator.SetLabelForUndecidedPixels(0)
    return _result(estimator.Execute(images), raters[0], "staple")


@dataclass(frozen=True)
class StapleEstimate:
    """Binary STAPLE of one structure (:func:`staple_probability`).

    Attributes:
        probability: float32 Volume: the posterior probability of the structure at each voxel,
            on the first rater's grid.
        sensitivity: each rater's estimated sensitivity, in the order the raters were given.
        specificity: each rater's estimated specificity, same order.
        iterations: EM iterations run.
    """

    probability: Volume
    sensitivity: tuple[float, ...]
    specificity: tuple[float, ...]
    iterations: int

    def consensus(self, *, threshold: float = 0.5) -> Volume:
        """The consensus mask (1 where the probability exceeds ``threshold``) as a label Volume."""
        mask = (self.probability.array > threshold).astype(np.uint8)
        return self.probability.with_array(mask, kind="label")


def staple_probability(raters: Sequence[Volume], *, label_id: int) -> StapleEstimate:
    """Binary STAPLE (``SimpleITK.STAPLEImageFilter``) of the structure ``label_id`` marked by ``raters``.

    Args:
        raters: label Volumes on one grid (2 or more).
        label_id: the label whose mask each rater contributes.

    Raises:
        GeometryMismatchError: the raters' grids differ (the message names the files).
    """
    import SimpleITK as sitk

    masks = [r.with_array((r.array == label_id).astype(np.uint8), kind="label") for r in raters]
    images = _prepare(masks)
    estimator = sitk.STAPLEImageFilter()
    estimator.SetForegroundValue(1)
    probability = estimator.Execute(images)
    array = sitk.GetArrayFromImage(probability).astype(np.float32)
    array = np.transpose(array, list(range(array.ndim))[::-1])[None]
    meta = {"consensus": "staple_probability", "path": "STAPLE probability"}
    return StapleEstimate(
        probability=Volume(array, raters[0].affine, kind="image", meta=meta),
        sensitivity=tuple(float(v) for v in estimator.GetSensitivity()),
        specificity=tuple(float(v) for v in estimator.GetSpecificity()),
        iterations=int(estimator.GetElapsedIterations()),
    )


def inter_rater_rows(
    case_id: str, raters: list[tuple[str, Volume]], settings: EvaluationSettings
) -> list[dict[str, Any]]:
    rows = []
    for a in range(len(raters)):
        for b in range(a + 1, len(raters)):
            pair = evaluate_pair(raters[a][1], raters[b][1], settings=settings, case_id=case_id)
            for row in pair.rows:
                rows.append({"rater_a": raters[a][0], "rater_b": raters[b][0], **row})
    return rows


def per_rater_rows(
    case_id: str, raters: list[tuple[str, Volume]], prediction: Volume, settings: EvaluationSettings
) -> list[dict[str, Any]]:
    rows = []
    references = list(raters)
    references.append(("majority", majority_vote([v for _, v in raters], labels=settings.labels)))
    references.append(("staple", staple([v for _, v in raters], labels=settings.labels)))
    for name, reference in references:
        pair = evaluate_pair(reference, prediction, settings=settings, case_id=case_id)
        rows += [{"rater": name, **row} for row in pair.rows]
    return rows
