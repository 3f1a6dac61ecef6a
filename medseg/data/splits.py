"""Cross-validation folds: nnU-Net's default 5-fold split, reproduced exactly.

``sorted(case_ids)`` are shuffled with ``numpy.random.RandomState(12345)`` and cut into 5
consecutive folds, the first ``n % 5`` one case larger -- scikit-learn's
``KFold(5, shuffle=True, random_state=12345)``, which nnU-Net v2 uses.

Example:
    >>> kfold_split([f"case_{i}" for i in range(6)], num_folds=3)
    [['case_3', 'case_5'], ['case_0', 'case_4'], ['case_1', 'case_2']]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SPLIT_SEED", "kfold_split"]

#: nnU-Net's seed of the default split
SPLIT_SEED = 12345


def kfold_split(case_ids: Sequence[str], *, num_folds: int = 5, seed: int = SPLIT_SEED) -> list[list[str]]:
    """Validation case ids per fold, identical to nnU-Net's default split.

    ``sorted(case_ids)`` are shuffled with ``numpy.random.RandomState(seed)`` and cut into
    ``num_folds`` consecutive blocks, the first ``n % num_folds`` blocks one case larger
    (scikit-learn's ``KFold(num_folds, shuffle=True, random_state=seed)``). With fewer than
    ``num_folds`` cases each case is its own fold (leave-one-out); with one case there are no folds.
    """
    ordered = sorted(case_ids)
    if len(ordered) < num_folds:
        # too few cases for k folds: leave-one-out, so every fold still has training cases
        return [[case_id] for case_id in ordered] if len(ordered) > 1 else []
    indices = np.arange(len(ordered))
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(num_folds, len(ordered) // num_folds)
    sizes[: len(ordered) % num_folds] += 1
    folds, start = [], 0
    for size in sizes:
        folds.append(sorted(ordered[i] for i in indices[start : start + size]))
        start += size
    return folds
