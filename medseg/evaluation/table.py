"""Result tables as plain rows: what ``medseg evaluate`` writes, without importing pandas.

An evaluation's tables (one row per case x structure, per case, per lesion...) are lists of dicts.
The command line writes them to CSV and summarises them from those rows; pandas (0.3 s to import,
a fifth of a whole ``medseg evaluate`` on one pair) is loaded only when Python code asks for a
DataFrame (:meth:`Table.frame`, e.g. ``evaluation.per_case``).

:meth:`Table.write_csv` writes what ``DataFrame.to_csv(index=False)`` writes for the same rows:
the same header, quoting and line ends; NaN and None as empty fields; numbers of a column that
holds a float or an empty field written as floats (``3.0``), as pandas' float64 column would be.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from medseg.io.files import write_text

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Table"]


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (``np.float64(0.5)`` -> ``0.5``)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class Table:
    """Rows (dicts) with an ordered set of columns.

    Attributes:
        rows: one dict per row; a key absent from a row is an empty field.
        columns: the column order; by default every key in order of first appearance (as
            ``pandas.DataFrame(rows)`` orders them).
    """

    rows: list[dict[str, Any]]
    columns: tuple[str, ...] = ()
    _frame: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.columns:
            self.columns = tuple(dict.fromkeys(key for row in self.rows for key in row))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:  # a batch's table has thousands of rows: say its size, not its content
        return f"Table({len(self.rows)} rows x {len(self.columns)} columns: {', '.join(self.columns[:6])}...)"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def column(self, name: str) -> list[Any]:
        """The values of one column, row by row (None where a row lacks it)."""
        return [_plain(row.get(name)) for row in self.rows]

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (built once; pandas is imported here, not before)."""
        if self._frame is None:
            import pandas as pd

            self._frame = pd.DataFrame(self.rows, columns=list(self.columns)) if self.columns else pd.DataFrame()
        return self._frame

    def csv_text(self) -> str:
        """The table as ``DataFrame.to_csv(index=False)`` writes it (see the module docstring)."""
        as_float = {name: self._float_column(name) for name in self.columns}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        if not self.columns:
            return "\n"  # pandas' CSV of a table without columns
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([self._field(row.get(name), float_column=as_float[name]) for name in self.columns])
        return buffer.getvalue()

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`csv_text` atomically (temporary file, fsync, rename)."""
        return write_text(self.csv_text(), Path(path))

    def _float_column(self, name: str) -> bool:
        """True when pandas would hold the column as float64: numbers only, with a float or a gap."""
        values = [_plain(row.get(name)) for row in self.rows]
        present = [v for v in values if not _is_missing(v)]
        numbers = all(isinstance(v, Real) and not isinstance(v, bool) for v in present)
        return bool(present) and numbers and (len(present) < len(values) or any(isinstance(v, float) for v in present))

    @staticmethod
    def _field(value: Any, *, float_column: bool) -> str:
        value = _plain(value)
        if _is_missing(value):
            return ""
        if float_column and isinstance(value, Integral):
            return repr(float(value))
        if isinstance(value, float):
            return repr(value)
        return str(value)


def scored_values(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """The float values of one column over ``rows``, NaN and missing values left out (``dropna``)."""
    values = np.array([np.nan if row.get(key) is None else row[key] for row in rows], dtype=float)
    return values[~np.isnan(values)]


def rows_by(rows: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """The rows grouped by one column, groups in order of first appearance (``groupby(sort=False)``)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get(key), []).append(row)
    return groups
