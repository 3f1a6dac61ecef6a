"""`medseg check`: validate every case of a manifest and report all problems at once.

For each case it checks that every file exists and reads, that every image channel and label
(and further rater / mask files) lies on the image's voxel grid (shape, spacing, origin and
direction within a stated tolerance), that label maps hold whole numbers that the label map
names, and that images hold no NaN/Inf. Problems are collected, never raised, so one run lists
them all.

Example:
    >>> report = check_manifest(load_manifest("data_manifests/msd_hippocampus.json",
    ...                          data_root="../shared/data/msd_hippocampus"))   # doctest: +SKIP
    >>> report.ok, report.summary_line()                                         # doctest: +SKIP
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medseg.core.volume import Volume
from medseg.data.manifest import Case, Manifest
from medseg.errors import MedsegUserError

__all__ = ["Problem", "CheckReport", "check_manifest", "check_case"]


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`check_manifest`.

    Attributes:
        case_id: the case (``"-"`` for problems of the manifest itself).
        file: the file concerned.
        problem: what is wrong, in one line.
    """

    case_id: str
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.case_id}: {self.file}: {self.problem}"


@dataclass
class CheckReport:
    """The result of a check: counts and every problem found."""

    manifest: str
    cases_checked: int = 0
    cases_ok: int = 0
    problems: list[Problem] = field(default_factory=list)
    tolerance_mm: float = 1e-3
    direction_tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        """True when every case passed."""
        return not self.problems and self.cases_checked == self.cases_ok

    def summary_line(self) -> str:
        """``checked 208 cases: 208 OK, 0 problems``."""
        return (
            f"checked {self.cases_checked} cases: {self.cases_ok} OK, "
            f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} "
            f"(geometry tolerance {self.tolerance_mm:g} mm, direction {self.direction_tolerance:g})"
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for ``--json``."""
        return {
            "manifest": self.manifest,
            "ok": self.ok,
            "cases_checked": self.cases_checked,
            "cases_ok": self.cases_ok,
            "tolerance_mm": self.tolerance_mm,
            "direction_tolerance": self.direction_tolerance,
            "problems": [asdict(p) for p in self.problems],
        }


def check_manifest(
    manifest: Manifest,
    *,
    tolerance_mm: float = 1e-3,
    direction_tolerance: float = 1e-4,
    workers: int = 2,
    progress: bool = False,
) -> CheckReport:
    """Check every case of ``manifest``; never raises for a bad case.

    Args:
        manifest: the loaded manifest.
        tolerance_mm: largest allowed spacing/origin difference between files of a case.
        direction_tolerance: largest allowed direction-cosine difference.
        workers: threads reading files in parallel (decompression releases the GIL).
        progress: show a progress bar on stderr.
    """
    report = CheckReport(
        manifest=str(manifest.path or manifest.name),
        tolerance_mm=tolerance_mm,
        direction_tolerance=direction_tolerance,
    )
    cases = list(manifest.cases)

    def run(case: Case) -> list[Problem]:
        return check_case(manifest, case, tolerance_mm=tolerance_mm, direction_tolerance=direction_tolerance)

    results: Iterator[list[Problem]]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(run, cases)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(cases), desc="checking", unit="case", leave=False)
        for problems in results:
            report.cases_checked += 1
            report.cases_ok += not problems
            report.problems.extend(problems)
    return report


def check_case(
    manifest: Manifest,
    case: Case,
    *,
    tolerance_mm: float = 1e-3,
    direction_tolerance: float = 1e-4,
) -> list[Problem]:
    """All problems of one case (empty when it is fine)."""
    problems: list[Problem] = []

    def note(path: Path | str, message: str) -> None:
        problems.append(Problem(case.case_id, str(path), message))

    reference: Volume | None = None
    reference_path: Path | None = None
    for index, path in enumerate(case.images):
        image = _read(path, kind="image", note=note)
        if image is None:
            continue
        finite = np.isfinite(image.array)
        if not finite.all():
            count = int(finite.size - np.count_nonzero(finite))
            note(path, f"image holds {count} NaN/Inf voxel{'s' if count != 1 else ''}")
        if reference is None:
            reference, reference_path = image, path
        else:
            _compare(reference, reference_path, image, path, note, tolerance_mm, direction_tolerance)
        if index == 0 and image.num_channels > 1 and len(case.images) > 1:
            note(path, f"file holds {image.num_channels} channels but the case lists one file per channel")
    if len(case.images) == 1 and reference is not None and len(manifest.channels) not in (1, reference.num_channels):
        if manifest.tensor_image_size.upper() != "2D":
            note(
                case.images[0], f"image has {reference.num_channels} channels, manifest lists {len(manifest.channels)}"
            )

    label_files = [("label", case.label)] if case.label is not None else []
    label_files += [(key, case.extras[key]) for key in manifest.raters if key != "label" and key in case.extras]
    known_ids = set(manifest.labels.ids)
    for key, path in label_files:
        try:
            label = manifest.read_label(case, key=key)
        except MedsegUserError as error:
            note(path, _strip_path(str(error), path))
            continue
        values = _unique(label.array)
        unknown = sorted(set(values.tolist()) - known_ids)
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            note(path, f"label values {shown} are not in the label map {sorted(known_ids)}")
        if reference is not None:
            _compare(reference, reference_path, label, path, note, tolerance_mm, direction_tolerance)

    for key, path in case.extras.items():
        if key in manifest.raters:
            continue
        mask = _read(path, kind="image", note=note)
        if mask is not None and reference is not None:
            _compare(reference, reference_path, mask, path, note, tolerance_mm, direction_tolerance)
    return problems


def _read(path: Path, *, kind: str, note) -> Volume | None:
    from medseg.io.volumes import read_volume

    try:
        return read_volume(path, kind=kind)  # type: ignore[arg-type]
    except MedsegUserError as error:
        note(path, _strip_path(str(error), path))
        return None


def _strip_path(message: str, path: Path | str) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _compare(reference, reference_path, other, other_path, note, tolerance_mm, direction_tolerance) -> None:
    differences = reference.geometry_differences(
        other, tolerance_mm=tolerance_mm, direction_tolerance=direction_tolerance
    )
    if differences:
        note(other_path, f"geometry differs from {Path(reference_path).name}: {'; '.join(differences)}")


def _unique(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)
