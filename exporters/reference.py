"""What explanations and drift monitoring need from the training data, without patient rows:

- `reference`: a few rows per graph input for the explainers' baselines. Tables get cluster
  centroids (k-means over the rows the export saw: each a mean of several patients) or, for
  tables with text columns, quantile-built rows (every numeric column at the same quantile, text
  columns at their most frequent value); images, signals and sequences get the mean input.
- `feature_deciles`: the 10th..90th percentile of every numeric feature (the drift bins).
- `feature_limits`: clinical limits given by the data scientist (`feature_limits={"heart_rate":
  (0, 300)}`), checked against the feature names; the server refuses values outside them.

All of it goes into the model card (the card's hash covers it).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ExportError

MAX_CENTROIDS = 16


def reference_rows(feeds: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, list[Any]]:
    """Reference rows per graph input (see the module docstring), JSON-ready."""
    if not feeds:
        return {}
    arrays = {n: np.asarray(a) for n, a in feeds.items()}
    rows = next(iter(arrays.values())).shape[0]
    if not all(a.ndim == 2 for a in arrays.values()):
        return {n: [a.mean(axis=0).tolist() if a.dtype.kind == "f" else a[0].tolist()] for n, a in arrays.items()}
    numeric = all(a.dtype.kind in "fiub" for a in arrays.values())
    if numeric and rows >= 8:
        from sklearn.cluster import KMeans

        joined = np.concatenate([a.astype(np.float64) for a in arrays.values()], axis=1)
        missing = ~np.isfinite(joined)
        if missing.any():  # centroids of the observed values: a gap takes its column's median
            medians = np.nan_to_num(np.nanmedian(np.where(missing, np.nan, joined), axis=0))
            joined = np.where(missing, medians[None, :], joined)
        k = min(MAX_CENTROIDS, max(2, rows // 4))
        centroids = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(joined).cluster_centers_
        out, start = {}, 0
        for n, a in arrays.items():
            width = a.shape[1]
            out[n] = centroids[:, start:start + width].astype(a.dtype).tolist()
            start += width
        return out
    levels = np.linspace(0.1, 0.9, min(MAX_CENTROIDS, max(2, rows)))
    out = {}
    for n, a in arrays.items():
        if a.dtype.kind in "fiub":
            out[n] = np.nan_to_num(np.nanquantile(a.astype(np.float64), levels, axis=0, method="nearest")).astype(
                a.dtype).tolist()
        else:
            modes = [max(set(col.tolist()), key=col.tolist().count) for col in a.T]
            out[n] = [modes for _ in levels]
    return out


def numeric_columns(feature_names: Sequence[str] | None, table: Any,
                    only: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
    """Each feature's column as float64, for a plain numeric table; with `only` (a mixed table's
    numeric columns, by name) those columns of a table or DataFrame whose others hold text codes."""
    if feature_names is None or table is None or isinstance(table, Mapping):
        return None
    from .frames import as_table, is_frame

    if is_frame(table):  # columns by name, in the feature order
        table = as_table(table, feature_names)
    if only is None:
        try:
            array = np.asarray(table, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if array.ndim != 2 or array.shape[1] != len(feature_names):
            return None
        return {str(n): c for n, c in zip(feature_names, array.T, strict=True)}
    objects = np.asarray(table, dtype=object)
    if objects.ndim != 2 or objects.shape[1] != len(feature_names):
        return None
    position = {str(n): i for i, n in enumerate(feature_names)}
    try:
        return {str(n): objects[:, position[str(n)]].astype(np.float64) for n in only}
    except (TypeError, ValueError, KeyError):
        return None


def feature_deciles(feature_names: Sequence[str] | None, table: Any,
                    only: Sequence[str] | None = None) -> dict[str, list[float]] | None:
    """The 10th..90th percentile of each numeric feature of a plain table, or of the `only`
    columns (a mixed table's numeric input) of a table or DataFrame; None otherwise."""
    columns = numeric_columns(feature_names, table, only)
    if columns is None:
        return None
    out = {}
    for name, column in columns.items():
        column = column[np.isfinite(column)]
        if column.size:
            out[str(name)] = [round(float(v), 6) for v in np.percentile(column, np.arange(10, 100, 10))]
    return out or None


def check_limits(limits: Mapping[str, Sequence[float]] | None, feature_names: Sequence[str] | None
                 ) -> dict[str, list[float]] | None:
    """Clinical limits as the card stores them, refusing unknown features and reversed bounds."""
    if not limits:
        return None
    if feature_names is None:
        raise ExportError("feature_limits need feature_names (the limits are given per named feature)")
    out = {}
    for name, bounds in limits.items():
        if name not in feature_names:
            raise ExportError(f"feature_limits names {name!r}, which is not one of the feature_names")
        low, high = (float(b) for b in bounds)
        if not low <= high:
            raise ExportError(f"feature_limits[{name!r}] = ({low}, {high}): the lower limit must not exceed the upper")
        out[str(name)] = [low, high]
    return out
