"""Loading a Segment-Anything checkpoint from local files: which family, which class, which backend.

``load_sam(path)`` accepts

* a Hugging Face folder (``config.json`` + weights, as ``save_pretrained`` writes it): the family
  is config.json's ``model_type`` -- ``sam`` (SAM and MedSAM ports), ``sam_hq``, ``sam2``,
  ``sam2_video`` or ``sam3`` -- loaded with ``local_files_only=True``;
* an original segment-anything / MedSAM ``.pth`` (:mod:`medseg.refine.sam_pth`).

Pixels go in as each model was trained (:func:`pth_transform`, :func:`_transform`): SAM resizes the
longest side to 1024, pads, and normalises by ImageNet's mean and std; MedSAM (a ``.pth`` whose
file name contains "medsam", as ``medsam_vit_b.pth``) resizes to 1024 x 1024 and takes [0, 1]
pixels with no mean/std, as MedSAM's own inference script does. A Hugging Face folder follows its
``preprocessor_config.json`` (``do_normalize``, ``image_mean``/``image_std``, and medseg's
``medseg_resize_mode`` that ``medseg train-sam`` writes).

Nothing is ever downloaded. A missing path, an unreadable or truncated file, a folder of another
model, or weights that do not fit the configuration are one-line
:class:`~medseg.errors.CheckpointError` messages naming the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from medseg.errors import CheckpointError
from medseg.refine.backends import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, SamImageBackend

__all__ = ["SAM_MODEL_TYPES", "SamBackend", "load_sam", "pth_transform", "sam_kind"]

#: config.json model_type -> transformers class name
SAM_MODEL_TYPES: dict[str, str] = {
    "sam": "SamModel",
    "sam_hq": "SamHQModel",
    "sam2": "Sam2Model",
    "sam2_video": "Sam2VideoModel",
    "sam3": "Sam3Model",
}
_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

SamBackend = Union[SamImageBackend, Any]  # SamImageBackend | Sam2VideoBackend | Sam3TextBackend


def sam_kind(path: str | os.PathLike[str]) -> str:
    """The family of a checkpoint: a ``SAM_MODEL_TYPES`` key, or ``"sam_pth"`` for an original ``.pth``.

    Raises:
        CheckpointError: missing path, unreadable ``config.json``, or not a Segment-Anything model.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: SAM checkpoint not found (give a Hugging Face folder or a .pth file)")
    if path.is_file():
        if path.name.lower().endswith(_PTH_SUFFIXES):
            return "sam_pth"
        raise CheckpointError(
            f"{path}: not a SAM checkpoint (expected a Hugging Face folder with config.json, or a segment-anything .pth)"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: folder has no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: unreadable config.json ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SAM_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: config.json model_type {model_type!r} is not a Segment-Anything model "
            f"(expected one of {', '.join(SAM_MODEL_TYPES)})"
        )
    return str(model_type)


def load_sam(path: str | os.PathLike[str], *, device: str = "auto") -> SamBackend:
    """Load a SAM-family checkpoint from local files as a prompt backend.

    Args:
        path: a Hugging Face folder or an original ``.pth`` (see the module docstring).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        A :class:`~medseg.refine.backends.SamImageBackend` (``sam``, ``sam_hq``, ``sam2``, ``.pth``),
        a :class:`~medseg.refine.video.Sam2VideoBackend` (``sam2_video``) or a
        :class:`~medseg.refine.sam3.Sam3TextBackend` (``sam3``).

    Raises:
        CheckpointError: see :func:`sam_kind`; also unreadable, truncated or mismatched weights.
    """
    from medseg.model.device import select_device

    path = Path(path)
    kind = sam_kind(path)
    torch_device = select_device(device)
    if kind == "sam_pth":
        from medseg.refine.sam_pth import load_sam_pth

        model = load_sam_pth(path)
        transform = pth_transform(path, size=int(model.config.vision_config.image_size))
        return SamImageBackend(model, kind="sam", transform=transform, device=torch_device, source=str(path))
    model = _from_pretrained(path, kind)
    transform = _transform(path, kind, model.config)
    if kind == "sam2_video":
        from medseg.refine.video import Sam2VideoBackend

        return Sam2VideoBackend(model, transform=transform, device=torch_device, source=str(path))
    if kind == "sam3":
        from medseg.refine.sam3 import Sam3TextBackend

        return Sam3TextBackend(model, _tokenizer(path), transform=transform, device=torch_device, source=str(path))
    return SamImageBackend(model, kind=kind, transform=transform, device=torch_device, source=str(path))


def _from_pretrained(path: Path, kind: str) -> Any:
    import transformers
    from transformers.utils import logging as hf_logging

    model_class = getattr(transformers, SAM_MODEL_TYPES[kind])
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the command line
    try:
        model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as error:  # OSError (no weights), safetensors/torch errors (corrupt), config errors
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: cannot load {kind} weights ({first[:200]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = []
    for key in ("missing_keys", "mismatched_keys"):
        found = sorted(str(k) for k in (info.get(key) or ()))
        if found:
            problems.append(f"{len(found)} {key.replace('_', ' ')} (e.g. {found[0]})")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the {kind} config: {'; '.join(problems)}")
    return model.eval()


def _input_size(config: Any) -> int:
    """The encoder's square input size from a SAM-family config."""
    candidates = [
        getattr(config, "image_size", None),
        getattr(getattr(config, "vision_config", None), "image_size", None),
        getattr(getattr(getattr(config, "vision_config", None), "backbone_config", None), "image_size", None),
    ]
    for value in candidates:
        if value is None:
            continue
        return int(value[0] if isinstance(value, (list, tuple)) else value)
    raise CheckpointError("config has no image_size")


def pth_transform(path: Path, *, size: int) -> ImageTransform:
    """The input transform of an original ``.pth``: MedSAM's when its file name says "medsam", else SAM's."""
    if "medsam" in path.name.lower():
        return ImageTransform(size=size, mode="square", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ImageTransform(size=size, mode="longest_side")


def _transform(path: Path, kind: str, config: Any) -> ImageTransform:
    """Resize mode from the family; mean/std from preprocessor_config.json when the folder has one."""
    mode = "longest_side" if kind in ("sam", "sam_hq") else "square"
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if kind == "sam3" else (IMAGENET_MEAN, IMAGENET_STD)
    if kind == "sam3":
        size = int(config.vision_config.backbone_config.image_size)
    elif kind in ("sam", "sam_hq"):
        size = int(config.vision_config.image_size)
    else:
        size = _input_size(config)
    processor_file = path / "preprocessor_config.json"
    if processor_file.is_file():
        try:
            settings = json.loads(processor_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{processor_file}: unreadable ({error})") from None
        settings = settings.get("image_processor", settings) if isinstance(settings, dict) else {}
        if settings.get("do_normalize") is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # type: ignore[assignment]
        elif settings.get("image_mean") is not None and settings.get("image_std") is not None:
            mean = tuple(float(v) for v in settings["image_mean"])  # type: ignore[assignment]
            std = tuple(float(v) for v in settings["image_std"])  # type: ignore[assignment]
        if settings.get("medseg_resize_mode") in ("square", "longest_side"):
            mode = settings["medseg_resize_mode"]
    return ImageTransform(size=size, mode=mode, mean=mean, std=std)  # type: ignore[arg-type]


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise CheckpointError(
            f"{path}: SAM3 folder has no usable tokenizer files (tokenizer.json or vocab.json + merges.txt; "
            "save the SAM3 processor or tokenizer into the folder)"
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{path}: SAM3 folder has no usable tokenizer files (save the processor or tokenizer there; {first[:160]})"
        ) from None
