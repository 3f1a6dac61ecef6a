"""Agreement of two measurements of the same things: matched lesion volumes and Bland–Altman limits.

* :func:`matched_lesion_volumes` turns the ``lesions`` table of an evaluation (one row per
  reference and per predicted lesion, see :mod:`medseg.metrics.instances`) into one row per
  *matched* reference lesion with its volume and its partner's volume, in ml. Unmatched lesions
  (misses and false positives) have no partner and are left out; the lesion-wise counts
  (``tp``/``fp``/``fn`` in ``lesion_summary``) account for them.
* :func:`bland_altman` (Bland & Altman, Lancet 1986): for pairs ``(a_i, b_i)`` with differences
  ``d_i = b_i - a_i``, the bias ``mean(d)``, the sample standard deviation ``sd(d)`` (``ddof=1``)
  and the 95 % limits of agreement ``bias -+ 1.96 sd(d)``; the x-axis of the plot is the pair
  mean ``(a_i + b_i) / 2``. Pairs with a NaN in either value are dropped and counted.

Example:
    >>> pairs = matched_lesion_volumes(evaluation.lesions)                        # doctest: +SKIP
    >>> bland_altman(pairs["ref_ml"], pairs["pred_ml"])                           # doctest: +SKIP
    {'n': 41, 'n_dropped': 0, 'bias': 0.012, 'sd': 0.05, 'loa_low': -0.086, 'loa_high': 0.11}
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medseg.errors import MedsegUserError

__all__ = ["MATCHED_LESION_COLUMNS", "matched_lesion_volumes", "bland_altman"]

MATCHED_LESION_COLUMNS = ["case_id", "structure", "ref_lesion_id", "pred_lesion_id", "ref_ml", "pred_ml", "dice"]

_NEEDED = ("case_id", "structure", "source", "lesion_id", "volume_ml", "matched", "matched_id")


def matched_lesion_volumes(lesions: pd.DataFrame | Any) -> pd.DataFrame:
    """One row per matched reference lesion: its volume and its matched prediction's volume (ml).

    Args:
        lesions: the ``lesions`` table of an :class:`~medseg.evaluation.result.Evaluation` (or the
            Evaluation itself, or a ``lesions.csv`` read with pandas).

    Returns:
        A DataFrame with :data:`MATCHED_LESION_COLUMNS` (``dice``: the pair's Dice), in the order
        of the reference lesions; empty when nothing matched. With ``match="overlap"`` several
        reference lesions may share one predicted partner: each is a row with that partner's volume.

    Raises:
        MedsegUserError: the table lacks a needed column (named).
    """
    table = getattr(lesions, "lesions", lesions)
    if not isinstance(table, pd.DataFrame):
        raise MedsegUserError(
            f"matched_lesion_volumes needs the lesions table (a DataFrame), got {type(table).__name__}"
        )
    if table.empty:
        return pd.DataFrame(columns=MATCHED_LESION_COLUMNS)
    missing = [c for c in _NEEDED if c not in table.columns]
    if missing:
        raise MedsegUserError(f"lesions table: missing column(s) {', '.join(missing)}")
    matched = table[(table["source"] == "reference") & table["matched"].astype(bool)]
    predicted = table.loc[table["source"] == "prediction", ["case_id", "structure", "lesion_id", "volume_ml"]]
    pairs = matched.merge(
        predicted.rename(columns={"lesion_id": "matched_id", "volume_ml": "pred_ml"}),
        on=["case_id", "structure", "matched_id"],
        how="inner",
    )
    dice = pairs["dice"] if "dice" in pairs.columns else np.nan
    return pd.DataFrame(
        {
            "case_id": pairs["case_id"],
            "structure": pairs["structure"],
            "ref_lesion_id": pairs["lesion_id"].astype(int),
            "pred_lesion_id": pairs["matched_id"].astype(int),
            "ref_ml": pairs["volume_ml"].astype(float),
            "pred_ml": pairs["pred_ml"].astype(float),
            "dice": dice,
        },
        columns=MATCHED_LESION_COLUMNS,
    ).reset_index(drop=True)


def bland_altman(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, z: float = 1.96
) -> dict[str, float]:
    """Bias and limits of agreement of ``b`` against ``a`` (see the module docstring).

    Args:
        a: the reference measurements (e.g. reference lesion volumes, ml).
        b: the other measurements of the same things, in the same order.
        z: the normal quantile of the limits (1.96: 95 %).

    Returns:
        ``n`` (pairs used), ``n_dropped`` (pairs with a NaN), ``bias``, ``sd``, ``loa_low``,
        ``loa_high``; the statistics are NaN without pairs, and ``sd`` and the limits with one pair.

    Raises:
        MedsegUserError: the sequences differ in length.
    """
    va, vb = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if va.shape != vb.shape:
        raise MedsegUserError(f"bland_altman needs two sequences of equal length, got {va.size} and {vb.size}")
    used = ~(np.isnan(va) | np.isnan(vb))
    d = vb[used] - va[used]
    n = int(d.size)
    bias = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    return {
        "n": n,
        "n_dropped": int((~used).sum()),
        "bias": bias,
        "sd": sd,
        "loa_low": bias - z * sd,
        "loa_high": bias + z * sd,
    }
