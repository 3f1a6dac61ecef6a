"""medseg: medical image segmentation with planned 2D/3D U-Nets and exact evaluation.

The public API, loaded lazily (PEP 562) so ``import medseg`` is fast and never imports torch:

>>> import medseg as ms
>>> img = ms.read_volume("ct.nii.gz")                                       # doctest: +SKIP
>>> table = ms.evaluate(reference="labels/", prediction="out/", labels=...)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

#: the one version source: pyproject.toml reads it (``[tool.setuptools.dynamic]``), and so do
#: checkpoints, evaluation caches and prediction records
__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "Volume": "medseg.core.volume",
    "read_volume": "medseg.io.volumes",
    "read_channels": "medseg.io.volumes",
    "write_volume": "medseg.io.volumes",
    "LabelSet": "medseg.core.labels",
    "Manifest": "medseg.data.manifest",
    "Case": "medseg.data.manifest",
    "load_manifest": "medseg.data.manifest",
    "check_manifest": "medseg.data.check",
    "MedsegUserError": "medseg.errors",
    "environment_report": "medseg.apps.environment",
    "evaluate": "medseg.evaluation.batch",
    "evaluate_pair": "medseg.evaluation.case",
    "Evaluation": "medseg.evaluation.batch",
    "EvaluationSettings": "medseg.evaluation.case",
    "summarize": "medseg.evaluation.summary",
    "write_outputs": "medseg.evaluation.report",
    "write_report": "medseg.evaluation.report",
    "compare": "medseg.evaluation.comparison",
    "resample_to": "medseg.core.resample",
    "majority_vote": "medseg.evaluation.raters",
    "staple": "medseg.evaluation.raters",
    "staple_probability": "medseg.evaluation.raters",
    "matched_lesion_volumes": "medseg.evaluation.agreement",
    "bland_altman": "medseg.evaluation.agreement",
    "Segmenter": "medseg.inference.segmenter",
    "predict_batch": "medseg.inference.batch",
    "export_model": "medseg.inference.export",
    "export_onnx": "medseg.inference.export",
    "run_demo": "medseg.apps.demo",
    "make_synthetic_dataset": "medseg.apps.demo",
    "determine_postprocessing": "medseg.inference.postprocess",
    "plan_dataset": "medseg.planning.plans",
    "load_plans": "medseg.planning.plans",
    "train": "medseg.training.loop",
    "TrainOptions": "medseg.training.options",
    "prompt_segment": "medseg.refine.segment",
    "load_sam": "medseg.refine.loading",
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
