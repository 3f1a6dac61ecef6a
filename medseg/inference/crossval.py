"""Postprocessing chosen on cross-validation predictions of trained runs (after ``medseg train``).

Each fold's model predicts its own validation cases (in their input geometry, with the same
checkpoint ``medseg predict`` uses by default: ``last``), and
:func:`medseg.inference.postprocess.determine_postprocessing` keeps a rule only where it raises
the mean validation Dice of a label. The rules go to ``postprocessing.json`` beside the runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.data.manifest import load_manifest
from medseg.errors import MedsegUserError
from medseg.inference.postprocess import POSTPROCESSING_FILE, determine_postprocessing, save_postprocessing
from medseg.inference.segmenter import Segmenter
from medseg.io.files import read_json

__all__ = ["determine_postprocessing_for_runs"]


def determine_postprocessing_for_runs(
    runs: Sequence[str | os.PathLike[str]],
    *,
    manifest: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    device: str = "auto",
    tta: bool = False,
    which: str = "last",
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict each fold's validation cases with that fold's model, choose rules, save them.

    Args:
        runs: fold run folders (each holds its checkpoints and ``resolved_config.json``).
        manifest: the manifest (default: the path recorded in the run's resolved_config.json).
        data_root: its data root (default: the recorded one).
        device: where to predict.
        tta: mirroring TTA while predicting the validation cases.
        which: the checkpoint of each run (``"last"``, as ``medseg predict`` uses by default).
        out: where to write ``postprocessing.json`` (default: the run folder for one fold, the
            folder holding the folds otherwise).
        progress: progress bar.

    Returns:
        The rules written.
    """
    from tqdm.auto import tqdm

    references: list[Volume] = []
    predictions: list[Volume] = []
    things: tuple[str, ...] = ()
    labels: LabelSet | None = None
    run_dirs = [Path(r) for r in runs]
    for run in run_dirs:
        config_path = run / "resolved_config.json"
        if not config_path.is_file():
            raise MedsegUserError(f"{run}: no resolved_config.json (not a medseg run folder)")
        resolved = read_json(config_path, what="run configuration")
        recorded = resolved.get("manifest", {})
        loaded = load_manifest(manifest or recorded.get("path"), data_root=data_root or recorded.get("data_root"))
        segmenter = Segmenter.from_checkpoint(run, which=which, device=device, tta=tta, postprocessing=None)
        labels, things = segmenter.labels, tuple(loaded.things)
        validation = [loaded.case(c) for c in resolved.get("validation_cases", [])]
        for case in tqdm(validation, desc=f"postprocessing {run.name}", disable=not progress):
            predictions.append(segmenter.predict(loaded.read_image(case), postprocess=False))
            references.append(loaded.read_label(case))
    assert labels is not None
    rules = determine_postprocessing(references, predictions, labels=labels, things=things)
    rules["runs"] = [str(r) for r in run_dirs]
    rules["checkpoint"] = which
    target = Path(out) if out is not None else (run_dirs[0] if len(run_dirs) == 1 else run_dirs[0].parent)
    save_postprocessing(rules, target / POSTPROCESSING_FILE if target.suffix != ".json" else target)
    return rules
