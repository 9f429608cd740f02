"""pandas DataFrames at the exporters' edge. A model fitted on a DataFrame knows its columns by
name (`feature_names_in_`); the exporter takes frames (columns picked by name, in any order) or
plain 2-D tables (columns in training order), and gives the source model a frame with the
training names back, so a ColumnTransformer that selects by name or by dtype does as in training.

pandas is imported only when a frame is involved: the server and the client never need it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ExportError


def column_names(model: Any) -> tuple[str, ...] | None:
    """The training DataFrame's column names, when the model (or pipeline) was fitted on one."""
    names = getattr(model, "feature_names_in_", None)
    if names is None and type(model).__module__.startswith("catboost"):
        # CatBoost keeps a frame's columns in feature_names_ and names an array's '0', '1', ...
        names = getattr(model, "feature_names_", None)
        if names is not None and list(names) == [str(i) for i in range(len(names))]:
            names = None
    if names is None or not all(isinstance(n, str) for n in names):
        return None
    return tuple(str(n) for n in names)


def is_frame(data: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(data, pandas.DataFrame)


def as_table(data: Any, names: Sequence[str] | None) -> np.ndarray:
    """A 2-D object array with the columns in training order: a frame's columns are looked up by
    name (errors list missing column names, never values)."""
    if is_frame(data) and names is not None:
        missing = [n for n in names if n not in data.columns]
        if missing:
            raise ExportError(f"the DataFrame lacks the model's columns {missing}")
        data = data[list(names)]
    return np.asarray(data, dtype=object)


def as_frame(table: np.ndarray, names: Sequence[str], numeric: Sequence[int]) -> Any:
    """`table` (rows x columns, training order) as a DataFrame with the training names; the
    `numeric` columns as float64, the others as Python objects (text codes, integer codes)."""
    import pandas as pd

    frame = pd.DataFrame(table, columns=list(names), dtype=object)
    for position in numeric:
        frame[names[position]] = frame[names[position]].astype(np.float64)
    return frame
