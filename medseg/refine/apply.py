"""``medseg predict --sam``: apply the refinement settings the gate accepted, fall back everywhere else.

:func:`predict_refined` builds the U-Net :class:`~medseg.inference.Segmenter`, reads the run's
``refinement.json``, checks that it was fitted for exactly these U-Net checkpoint(s) and this SAM
file (a mismatch is an error: a gate measured on other weights says nothing about these; run
``medseg refine fit`` again), and hands :func:`medseg.inference.batch.predict_batch` a
:class:`SamRefiner` that post-processes each case's label map. Inference never imports this
package; it only calls the refiner it is given.

Per case and structure, ``medseg_predict.json`` records ``applied`` or ``skipped: <reason>``:
rejected by the gate (and why), not fitted, SAM failed, SAM returned no mask, or SAM changed
more than the stated fraction of the structure. Skipped structures keep the U-Net's voxels
bit-identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import CheckpointError, MedsegUserError
from medseg.io.files import read_json
from medseg.refine.fit import REFINEMENT_FILE, REFINEMENT_FORMAT, sam_fingerprint
from medseg.refine.protocol import PromptBackend
from medseg.refine.refine import CostMeter, RefineSetting, refine_case

__all__ = ["load_backend", "load_refinement", "SamRefiner", "predict_refined"]


def load_backend(sam: str | os.PathLike[str], *, device: str = "auto") -> PromptBackend:
    """The SAM backend of a local checkpoint (:func:`medseg.refine.loading.load_sam`: a Hugging Face
    folder, e.g. one ``medseg train-sam`` wrote, or an original ``.pth``).

    Raises:
        CheckpointError: missing, corrupt or not a SAM checkpoint (one line naming the path).
    """
    from medseg.refine.loading import load_sam

    return load_sam(sam, device=device)


def _short(sha: str) -> str:
    return sha[:12]


def load_refinement(
    path: str | os.PathLike[str], *, checkpoints: Sequence[tuple[str, str]], sam_sha256: str
) -> dict[str, Any]:
    """Read ``refinement.json`` and check it is bound to these U-Net checkpoints and this SAM file.

    Args:
        path: the file, or the run folder holding it.
        checkpoints: ``(path, sha256)`` of the U-Net checkpoint(s) in use.
        sam_sha256: :func:`~medseg.refine.fit.sam_fingerprint` of the SAM checkpoint in use.

    Raises:
        MedsegUserError: no such file (run ``medseg refine fit`` first), or not a refinement file.
        CheckpointError: it was fitted for other U-Net or SAM weights.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REFINEMENT_FILE
    if not path.is_file():
        raise MedsegUserError(f"{path}: no refinement fitted; run `medseg refine fit` for this model and SAM first")
    content = read_json(path, what="refinement")
    if not isinstance(content, Mapping) or content.get("format") != REFINEMENT_FORMAT:
        raise MedsegUserError(f"{path}: not a medseg refinement file")
    fitted = sorted(c["sha256"] for c in content.get("checkpoints", []))
    used = sorted(sha for _, sha in checkpoints)
    if fitted != used:
        raise CheckpointError(
            f"{path}: fitted for U-Net checkpoint(s) {[_short(s) for s in fitted]}, but the model is "
            f"{[_short(s) for s in used]}; run `medseg refine fit` again for these weights"
        )
    fitted_sam = content.get("sam", {}).get("sha256")
    if fitted_sam != sam_sha256:
        raise CheckpointError(
            f"{path}: fitted for SAM {_short(str(fitted_sam))} ({content.get('sam', {}).get('path')}), but the SAM "
            f"given is {_short(sam_sha256)}; run `medseg refine fit` again for this SAM"
        )
    return dict(content)


class SamRefiner:
    """The predict-time post-processing: accepted structures refined, all others untouched.

    Call it as ``refiner(image, unet_labels) -> (labels, {structure: "applied" | "skipped: ..."})``;
    ``key`` identifies the refinement for resuming a batch.

    Args:
        refinement: the content of ``refinement.json``.
        backend: the SAM backend.
        labels: the model's label map.
        max_change_fraction: override the fitted change limit.
    """

    def __init__(
        self,
        refinement: Mapping[str, Any],
        backend: PromptBackend,
        *,
        labels: LabelSet,
        max_change_fraction: float | None = None,
    ) -> None:
        self.backend = backend
        self.labels = labels
        self.max_change_fraction = float(
            max_change_fraction if max_change_fraction is not None else refinement.get("max_change_fraction", 0.5)
        )
        channels = refinement.get("rgb_channels")
        self.rgb_channels = list(channels) if channels is not None else None
        self.plan: dict[str, RefineSetting] = {}
        self.skipped: dict[str, str] = {}
        fitted = refinement.get("structures", {})
        for structure in labels.structures(include_regions=True):
            decision = fitted.get(structure.name)
            if decision is None:
                self.skipped[structure.name] = "not fitted"
            elif decision.get("decision") == "accepted":
                self.plan[structure.name] = RefineSetting.from_json(decision["parameters"])
            else:
                self.skipped[structure.name] = f"rejected by the gate ({decision.get('reason', 'no reason recorded')})"
        self.meter = CostMeter()
        identity = {
            "sam": refinement.get("sam", {}).get("sha256"),
            "plan": {k: v.to_json() for k, v in self.plan.items()},
            "max_change_fraction": self.max_change_fraction,
            "rgb_channels": self.rgb_channels,
        }
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def __call__(self, image: Volume, unet_labels: Volume) -> tuple[Volume, dict[str, str]]:
        """Refine one case (see :func:`medseg.refine.refine.refine_case`)."""
        if not self.plan:
            return unet_labels, {name: f"skipped: {reason}" for name, reason in self.skipped.items()}
        return refine_case(
            image,
            unet_labels,
            labels=self.labels,
            plan=self.plan,
            backend=self.backend,
            max_change_fraction=self.max_change_fraction,
            rgb_channels=self.rgb_channels,
            skipped=self.skipped,
            meter=self.meter,
        )


def predict_refined(
    model: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    sam: str | os.PathLike[str],
    refinement: str | os.PathLike[str] | None = None,
    backend: PromptBackend | None = None,
    which: str = "last",
    device: str = "auto",
    tta: bool = True,
    overlap: float = 0.5,
    postprocessing: str | os.PathLike[str] | None = "auto",
    max_change_fraction: float | None = None,
    **batch_options: Any,
) -> Any:
    """``predict_batch`` with the run's accepted SAM refinement applied to every case.

    Args:
        model: the run folder (or checkpoint) the refinement was fitted for.
        input: as :func:`medseg.inference.batch.predict_batch`.
        output: as :func:`medseg.inference.batch.predict_batch`.
        sam: the SAM checkpoint the refinement was fitted with.
        refinement: ``refinement.json`` (default: the run folder's).
        backend: the SAM backend (default: loaded from ``sam``).
        which: ``"last"`` or ``"best"`` checkpoint.
        device: where the U-Net and SAM run.
        tta: mirroring TTA.
        overlap: sliding-window overlap.
        postprocessing: the U-Net's postprocessing (``"auto"``: the run's).
        max_change_fraction: override the fitted change limit.
        **batch_options: further options of ``predict_batch`` (``data_root``, ``subset``, ``progress`` ...);
            ``runtime``, ``threads`` and ``precision`` go to the U-Net's :meth:`Segmenter.from_checkpoint`.

    Returns:
        The :class:`~medseg.inference.batch.BatchResult`.

    Raises:
        CheckpointError: ``refinement.json`` was fitted for other weights.
    """
    from medseg.inference.batch import predict_batch
    from medseg.inference.segmenter import Segmenter
    from medseg.model.bundle import is_bundle, open_bundle

    network_options = {k: batch_options.pop(k) for k in ("runtime", "threads", "precision") if k in batch_options}
    segmenter = Segmenter.from_checkpoint(
        model, which=which, device=device, tta=tta, overlap=overlap, postprocessing=postprocessing, **network_options
    )
    if refinement is not None:
        place = Path(refinement)
    elif is_bundle(model):  # a model zip carries its refinement.json: read it from the verified extraction
        place = open_bundle(model)
    else:
        place = Path(model).parent if Path(model).is_file() else Path(model)
    content = load_refinement(place, checkpoints=segmenter.checkpoints, sam_sha256=sam_fingerprint(sam)["sha256"])
    fitted_unet = content.get("unet", {})
    for option, value in (("tta", segmenter.tta), ("postprocessing", segmenter.postprocessing)):
        if option in fitted_unet and fitted_unet[option] != value:  # the gate measured other U-Net output
            raise CheckpointError(
                f"{place}: refinement fitted with the U-Net's {option}={fitted_unet[option]!r}, but this prediction "
                f"uses {value!r}; predict with the same options or run `medseg refine fit` again"
            )
    if backend is None:
        backend = load_backend(sam, device=device)
    refiner = SamRefiner(content, backend, labels=segmenter.labels, max_change_fraction=max_change_fraction)
    return predict_batch(segmenter, input, output, refine=refiner, **batch_options)
