"""Inference: trained networks -> label maps in each input's exact geometry, one case or a batch.

``inference`` owns ``medseg predict``: the :class:`Segmenter` (a network or fold ensemble:
preprocessing, the shared sliding-window engine, fold averaging; :mod:`~medseg.inference.segmenter`),
the mapping of probabilities back onto the input grid (:mod:`~medseg.inference.invert`), batch
prediction that skips finished cases and records what it did (:mod:`~medseg.inference.batch`; one case:
:mod:`~medseg.inference.case`; on a Dask cluster: :mod:`~medseg.inference.dask_predict`),
postprocessing rules and instance maps (:mod:`~medseg.inference.postprocess`) and choosing those
rules on cross-validation predictions (:mod:`~medseg.inference.crossval`).
"""

from __future__ import annotations

from medseg.inference.batch import RECORD_FILE, BatchResult, collect_inputs, predict_batch
from medseg.inference.crossval import determine_postprocessing_for_runs
from medseg.inference.postprocess import (
    apply_postprocessing,
    determine_postprocessing,
    instance_maps,
    load_postprocessing,
    save_postprocessing,
)
from medseg.inference.segmenter import Prediction, Segmenter

__all__ = [
    "RECORD_FILE",
    "BatchResult",
    "Prediction",
    "Segmenter",
    "apply_postprocessing",
    "collect_inputs",
    "determine_postprocessing",
    "determine_postprocessing_for_runs",
    "instance_maps",
    "load_postprocessing",
    "predict_batch",
    "save_postprocessing",
]
