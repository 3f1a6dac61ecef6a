"""medseg: medical image segmentation with planned 2D/3D U-Nets and exact evaluation.

The public API, loaded lazily (PEP 562) so ``import medseg`` is fast and never imports torch:

>>> import medseg as ms
>>> img = ms.read_volume("ct.nii.gz")                                       # doctest: +SKIP
>>> table = ms.evaluate(reference="labels/", prediction="out/", labels=...)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "Volume": "medseg.volume",
    "read_volume": "medseg.io",
    "read_channels": "medseg.io",
    "write_volume": "medseg.io",
    "LabelSet": "medseg.labels",
    "Manifest": "medseg.manifest",
    "Case": "medseg.manifest",
    "load_manifest": "medseg.manifest",
    "check_manifest": "medseg.check",
    "MedsegUserError": "medseg.errors",
    "environment_report": "medseg.environment",
    "evaluate": "medseg.evaluation",
    "evaluate_pair": "medseg.evaluation",
    "Evaluation": "medseg.evaluation",
    "EvaluationSettings": "medseg.evaluation",
    "summarize": "medseg.report",
    "write_outputs": "medseg.report",
    "write_report": "medseg.report",
    "resample_to": "medseg.resample",
    "majority_vote": "medseg.consensus",
    "staple": "medseg.consensus",
    "Segmenter": "medseg.inference",
    "predict_batch": "medseg.predict",
    "run_demo": "medseg.demo",
    "determine_postprocessing": "medseg.postprocess",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
