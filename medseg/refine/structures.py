"""Finding a structure by the name a user types: case-, spelling- and synonym-tolerant.

``find_structure("hippocampus head", labels)`` finds the label ``Anterior`` of the MSD hippocampus
map. A name matches a structure (label or region) when, after normalising both (lower case;
``_``/``-`` as spaces; British spellings "tumour", "oedema" as American ones), it equals

1. the structure's own name,
2. a synonym the dataset declares: a manifest may carry ``"synonyms": {"Anterior":
   ["hippocampus head", "pes hippocampi"]}``, found through the run folder's
   ``resolved_config.json`` (the manifest it was trained on) or given directly, or
3. a synonym from the small built-in anatomy table below, used only for structures the label map has.

No match, or a name that matches two structures, is a one-line
:class:`~medseg.refine.prompts.PromptError` listing the known names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from medseg.core.labels import LabelSet, Structure
from medseg.refine.prompts import PromptError

__all__ = ["BUILTIN_SYNONYMS", "find_structure", "normalise_name", "synonyms_from_run"]

#: canonical structure name -> other names clinicians use (only applied when the label map has the structure)
BUILTIN_SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "anterior": (
            "hippocampus head",
            "hippocampal head",
            "head of hippocampus",
            "head of the hippocampus",
            "pes hippocampi",
        ),
        "posterior": (
            "hippocampus body",
            "hippocampus tail",
            "hippocampus body and tail",
            "hippocampal body",
            "hippocampal tail",
        ),
        "whole tumor": ("wt", "complete tumor", "tumor"),
        "tumor core": ("tc", "core"),
        "enhancing tumor": ("et", "active tumor", "enhancing"),
        "edema": ("peritumoral edema", "ed"),
        "necrosis": ("necrotic core", "ncr", "necrotic"),
        "liver": ("hepar",),
        "kidney left": ("left kidney",),
        "kidney right": ("right kidney",),
        "lesion": ("lesions", "ms lesion", "white matter lesion"),
        "vessel": ("vessels", "retinal vessels", "blood vessels"),
    }
)

_SPELLINGS = (("tumour", "tumor"), ("oedema", "edema"), ("haem", "hem"), ("oesophag", "esophag"))


def normalise_name(name: str) -> str:
    """Lower case, ``_``/``-`` as spaces, single spaces, American spellings."""
    text = re.sub(r"[\s_\-]+", " ", str(name).strip().lower())
    for british, american in _SPELLINGS:
        text = text.replace(british, american)
    return text


def synonyms_from_run(run: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The ``synonyms`` a run was trained with: its resolved config's manifest, or the manifest file it names.

    A run folder, a folder of ``fold_*`` runs or a checkpoint file inside one; an absent or
    unreadable manifest simply gives no synonyms.
    """
    path = Path(run)
    folders = [path.parent] if path.is_file() else [path, *sorted(path.glob("fold_*"))]
    for folder in folders:
        config_file = folder / "resolved_config.json"
        if not config_file.is_file():
            continue
        try:
            manifest = json.loads(config_file.read_text(encoding="utf-8")).get("manifest", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(manifest.get("synonyms"), Mapping):
            return {str(k): [str(v) for v in vs] for k, vs in manifest["synonyms"].items()}
        manifest_path = manifest.get("path")
        if manifest_path and Path(manifest_path).is_file():
            try:
                content = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            found = content.get("synonyms") if isinstance(content, Mapping) else None
            if isinstance(found, Mapping):
                return {str(k): [str(v) for v in ([vs] if isinstance(vs, str) else vs)] for k, vs in found.items()}
        return {}
    return {}


def find_structure(
    name: str,
    labels: LabelSet,
    *,
    synonyms: Mapping[str, Iterable[str]] | None = None,
) -> Structure:
    """The label or region ``name`` refers to (see the module docstring for the rules).

    Args:
        name: what the user typed.
        labels: the model's label map.
        synonyms: structure name -> other names, e.g. from :func:`synonyms_from_run`.

    Raises:
        PromptError: an unknown name, or one that fits several structures.
    """
    wanted = normalise_name(name)
    structures = labels.structures()
    by_name = {normalise_name(s.name): s for s in structures}
    if wanted in by_name:
        return by_name[wanted]
    matches: dict[str, Structure] = {}
    for source in (synonyms or {}, BUILTIN_SYNONYMS):
        for canonical, others in source.items():
            structure = by_name.get(normalise_name(canonical))
            if structure is not None and wanted in {normalise_name(o) for o in others}:
                matches[structure.name] = structure
        if matches:
            break
    if len(matches) == 1:
        return next(iter(matches.values()))
    known = ", ".join(s.name for s in structures)
    if matches:
        raise PromptError(
            f"structure name {name!r} fits several structures ({', '.join(matches)}); use one of: {known}"
        )
    raise PromptError(f"unknown structure name {name!r}; the model's label map has: {known}")
