"""What rounding a table's numbers to float32 does to the source model's own answers.

The graph takes FP32 inputs, so parity feeds the source model the float32-rounded values and
measures the conversion alone. A tree model trained in float64 (scikit-learn's forests and
GBMs, LightGBM, CatBoost on float64 data) can split a feature at a float64 threshold lying
between a client's float64 value and its float32 rounding: that row then takes the other
branch, in the graph and in the source model alike, and its answer moves by a leaf's worth,
not by float32 noise. Such rows are not hidden inside a loose tolerance: this check runs the
source model on the values as given and as rounded, counts the rows whose answer changes beyond
the output's parity tolerance (or whose label changes), and names the features whose rounding
alone changes them (one re-run per changed row and numeric feature). The result goes into the
export report and the card (`parity_float32_inputs`); it never fails an export, since it is a
property of the source model and of float32 clients, not of the conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .figures import Tolerance

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class InputRounding:
    """Rows (of the parity data) whose source answer changes when their numbers become float32."""

    rows: int
    changed_rows: int
    outputs: Mapping[str, int]  # output -> changed rows
    features: Mapping[str, int]  # feature -> changed rows its rounding alone explains
    max_abs_change: Mapping[str, float]  # value outputs: the largest change over all rows

    def describe(self) -> str:
        if not self.changed_rows:
            return f"float32 inputs: no answer of the source model changes on {self.rows} row(s) when rounded"
        named = ", ".join(f"{f!r} ({n})" for f, n in self.features.items()) or "several features together"
        return (f"float32 inputs: {self.changed_rows} of {self.rows} row(s) cross a float64 threshold of the source "
                f"model differently when rounded to float32 (the graph answers as the rounded row); features: {named}")

    def as_card_entry(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "changed_rows": self.changed_rows,
            "outputs": dict(self.outputs),
            "features": dict(self.features),
            "max_abs_change": dict(self.max_abs_change),
        }


def _changed(a: Arrays, b: Arrays, tolerances: Mapping[str, Tolerance | None]) -> dict[str, np.ndarray]:
    """Per output, which rows differ: any difference for exact outputs (labels), beyond the
    tolerance for values."""
    out = {}
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        rows = x.shape[0]
        if x.dtype.kind not in "biuf":
            out[name] = (x.astype(str) != y.astype(str)).reshape(rows, -1).any(axis=1)
            continue
        tolerance = tolerances.get(name)
        xf, yf = x.astype(np.float64).reshape(rows, -1), y.astype(np.float64).reshape(rows, -1)
        diff = np.abs(xf - yf)
        diff = np.where(np.isnan(xf) & np.isnan(yf), 0.0, np.nan_to_num(diff, nan=np.inf))
        bound = 0.0 if tolerance is None else tolerance.atol + tolerance.rtol * np.abs(np.nan_to_num(xf))
        out[name] = (diff > bound).any(axis=1)
    return out


def _round(table: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    out = table.copy()
    if columns:
        cols = list(columns)
        out[:, cols] = out[:, cols].astype(np.float64).astype(np.float32).astype(np.float64)
    return out


def float32_rounding(
    datasets: Sequence[Any],
    given: Callable[[Any], np.ndarray],
    predict: Callable[[np.ndarray], Arrays],
    numeric: Sequence[int],
    tolerances: Mapping[str, Tolerance | None],
    feature_names: Sequence[str] | None,
) -> InputRounding:
    """`given(data)`: the table in training column order with its numbers as float64, unrounded;
    `predict(table)`: the source model's outputs on such a table; `numeric`: the columns the
    graph receives as FP32."""
    rows = changed_rows = 0
    per_output: dict[str, int] = {}
    per_feature: dict[str, int] = {}
    largest: dict[str, float] = {}
    for data in datasets:
        exact_table = given(data)
        exact = predict(exact_table)
        rounded = predict(_round(exact_table, numeric))
        n = exact_table.shape[0]
        rows += n
        flags = _changed(exact, rounded, tolerances)
        for name, values in exact.items():
            if np.asarray(values).dtype.kind == "f":
                change = np.abs(np.asarray(values, np.float64) - np.asarray(rounded[name], np.float64))
                change = change[np.isfinite(change)]
                largest[name] = max(largest.get(name, 0.0), float(change.max()) if change.size else 0.0)
        any_row = np.zeros(n, dtype=bool)
        for name, flag in flags.items():
            if flag.any():
                per_output[name] = per_output.get(name, 0) + int(flag.sum())
            any_row |= flag
        changed = np.flatnonzero(any_row)
        changed_rows += int(changed.size)
        if not changed.size or not numeric:
            continue
        # One row per (changed row, numeric feature): only that feature rounded.
        base = exact_table[changed]
        probes = np.concatenate([_round(base, [c]) for c in numeric])
        answers = predict(probes)
        reference = {k: np.concatenate([np.asarray(v)[changed]] * len(numeric)) for k, v in exact.items()}
        moved = np.zeros(probes.shape[0], dtype=bool)
        for flag in _changed(reference, answers, tolerances).values():
            moved |= flag
        for k, column in enumerate(numeric):
            count = int(moved[k * changed.size:(k + 1) * changed.size].sum())
            if count:
                name = str(feature_names[column]) if feature_names is not None else f"column_{column}"
                per_feature[name] = per_feature.get(name, 0) + count
    return InputRounding(rows, changed_rows, per_output, dict(sorted(per_feature.items())),
                         {k: round(v, 9) for k, v in largest.items()})
