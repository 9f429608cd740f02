"""Graph inputs for mixed tables: a ColumnTransformer that one-hot (or ordinal) encodes some
columns and scales others.

Design: one graph input per kind of column, not one per column and not one for the table.

    numeric          FP32   [-1, n_numeric]       every column not fed to a categorical encoder
    categorical      BYTES  [-1, n_string_cats]   encoder columns whose categories are strings
    categorical_int  INT64  [-1, n_int_cats]      encoder columns whose categories are integers

Within an input, columns keep their order in the training table; the model card lists them by
name under `input_columns`, and `infer_records` fills each input from records by those names. A request carries two or three dense tensors, whatever the width of
the table, and rows batch like any other tensor. (One input per column, skl2onnx's default,
would mean dozens of tensors per request; one input for the whole table cannot be typed.)

The model is trained on a 2-D object array (or a DataFrame) with the columns interleaved, so the
exporter converts a copy of it whose ColumnTransformer selects from the inputs concatenated in
the order above, and the parity check feeds both sides the same values: the graph gets the split
inputs, the source model gets the table with its numeric columns rounded through float32, which
is what the FP32 input carries.

A pipeline fitted on a pandas DataFrame (columns selected by name or by `make_column_selector`)
has the same graph inputs: its columns, in the training frame's order, are its feature names.
The exporter accepts the frame (columns looked up by name, `frames.py`) and hands the source
model a frame with those names, so the ColumnTransformer selects as it did in training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from skl2onnx.common.data_types import DataType, FloatTensorType, Int64TensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from . import frames
from .errors import ExportError, UnsupportedModelError

_CATEGORICAL_ENCODERS = (OneHotEncoder, OrdinalEncoder)
_GROUP_ORDER = (("numeric", "FP32"), ("categorical", "BYTES"), ("categorical_int", "INT64"))


@dataclass(frozen=True, slots=True)
class ColumnGroup:
    """One graph input: the table columns (positions) it carries, in table order."""

    name: str
    datatype: str
    columns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TableLayout:
    """How a mixed table maps onto the graph's inputs (see the module docstring)."""

    groups: tuple[ColumnGroup, ...]
    n_columns: int
    column_names: tuple[str, ...] | None = None  # the training DataFrame's columns, when it was one

    def initial_types(self) -> list[tuple[str, DataType]]:
        kinds = {"FP32": FloatTensorType, "BYTES": StringTensorType, "INT64": Int64TensorType}
        return [(g.name, kinds[g.datatype]([None, len(g.columns)])) for g in self.groups]

    def _table(self, table: Any) -> np.ndarray:
        array = frames.as_table(table, self.column_names)
        if array.ndim != 2 or array.shape[1] != self.n_columns:
            raise ExportError(f"expected a table of shape [rows, {self.n_columns}], got {list(array.shape)}")
        return array

    def feeds(self, table: Any) -> dict[str, np.ndarray]:
        """The graph inputs for `table` (rows x columns, columns as in training)."""
        array = self._table(table)
        result: dict[str, np.ndarray] = {}
        for group in self.groups:
            block = array[:, list(group.columns)]
            result[group.name] = _typed(block, group)
        return result

    @property
    def numeric(self) -> list[int]:
        """The table columns the FP32 input carries."""
        return [c for g in self.groups if g.datatype == "FP32" for c in g.columns]

    def given(self, table: Any) -> np.ndarray:
        """`table` in training column order, its numeric columns as float64 as given (unrounded)."""
        self.feeds(table)  # the same checks (and messages) as the graph's inputs
        array = self._table(table).copy()
        if self.numeric:
            array[:, self.numeric] = array[:, self.numeric].astype(np.float64)
        return array

    def to_source(self, array: np.ndarray) -> Any:
        """A training-order table as the source model takes it: a DataFrame with the training
        names when it was fitted on one."""
        if self.column_names is not None:
            return frames.as_frame(array, self.column_names, self.numeric)
        return array

    def source_table(self, table: Any) -> Any:
        """`table` as the source model should see it to match the graph: numeric columns carry
        the float32 values the FP32 input holds."""
        array = self._table(table).copy()
        for group in self.groups:
            if group.datatype == "FP32":
                cols = list(group.columns)
                array[:, cols] = _typed(array[:, cols], group).astype(np.float64)
        return self.to_source(array)


def _typed(block: np.ndarray, group: ColumnGroup) -> np.ndarray:
    """Convert one group's columns; errors name the group, never a value (patient data)."""
    try:
        if group.datatype == "FP32":
            return block.astype(np.float64).astype(np.float32)
        if group.datatype == "INT64":
            if any(isinstance(v, (bool, np.bool_, float, np.floating)) for v in block.flat):
                raise TypeError
            return block.astype(np.int64)
        if not all(isinstance(v, str) for v in block.flat):
            raise TypeError
        return block.astype(object)
    except (TypeError, ValueError):
        raise ExportError(
            f"input {group.name!r} ({group.datatype}) got a value of another kind in one of table columns "
            f"{list(group.columns)}"
        ) from None


def leading_column_transformer(model: Any) -> ColumnTransformer | None:
    """The ColumnTransformer that first sees the raw table, if there is one."""
    while isinstance(model, Pipeline):
        model = model.steps[0][1]
    return model if isinstance(model, ColumnTransformer) else None


def _positions(ct: ColumnTransformer, columns: Any) -> list[int]:
    if isinstance(columns, slice):
        return list(range(ct.n_features_in_))[columns]
    items = [columns] if isinstance(columns, (int, np.integer, str)) else list(columns)
    if items and all(isinstance(c, (bool, np.bool_)) for c in items):
        return [i for i, keep in enumerate(items) if keep]
    names = list(getattr(ct, "feature_names_in_", []))
    return [names.index(c) if isinstance(c, str) else int(c) for c in items]


def _encoder(transformer: Any) -> Any | None:
    steps = [s for _, s in transformer.steps] if isinstance(transformer, Pipeline) else [transformer]
    return next((s for s in steps if isinstance(s, _CATEGORICAL_ENCODERS)), None)


def _category_datatype(categories: np.ndarray, column: int) -> str:
    values = [v for v in categories.tolist() if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if values and all(isinstance(v, str) for v in values):
        return "BYTES"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    raise UnsupportedModelError(
        f"table column {column} is one-hot/ordinal encoded but its categories are neither all strings "
        "nor all integers; encode it as one or the other before training"
    )


def find_layout(model: Any) -> TableLayout | None:
    """The grouped-input layout when the model starts with a ColumnTransformer that encodes
    categorical columns; None when a single FP32 table input will do."""
    ct = leading_column_transformer(model)
    if ct is None:
        return None
    kinds: dict[int, str] = {}
    numeric: set[int] = set()
    for _, transformer, columns in ct.transformers_:
        if isinstance(transformer, str) and transformer == "drop":
            continue
        cols = _positions(ct, columns)
        encoder = None if isinstance(transformer, str) else _encoder(transformer)
        if encoder is None:
            numeric.update(cols)
            continue
        for j, col in enumerate(cols):
            kind = _category_datatype(encoder.categories_[j], col)
            if kinds.setdefault(col, kind) != kind:
                raise UnsupportedModelError(f"table column {col} is encoded as two different kinds of category")
    if not kinds:
        return None
    if numeric & kinds.keys():
        raise UnsupportedModelError(
            f"table columns {sorted(numeric & kinds.keys())} are used both as categories and as numbers"
        )
    groups = []
    for name, datatype in _GROUP_ORDER:
        if datatype == "FP32":
            columns = tuple(sorted(numeric))
        else:
            columns = tuple(c for c in sorted(kinds) if kinds[c] == datatype)
        if columns:
            groups.append(ColumnGroup(name, datatype, columns))
    return TableLayout(tuple(groups), int(ct.n_features_in_), frames.column_names(model))


def numeric_layout(model: Any) -> TableLayout:
    """One FP32 `input` of every column, for a model without categorical encoders; with the
    training frame's column names when it was fitted on a DataFrame."""
    n = int(model.n_features_in_)
    return TableLayout((ColumnGroup("input", "FP32", tuple(range(n))),), n, frames.column_names(model))


def for_conversion(model: Any, layout: TableLayout) -> Any:
    """A copy of `model` whose leading ColumnTransformer selects columns from the graph inputs
    concatenated in layout order (skl2onnx numbers columns across inputs that way)."""
    clone = copy.deepcopy(model)
    ct = leading_column_transformer(clone)
    if ct is None:
        if len(layout.groups) == 1 and layout.groups[0].columns == tuple(range(layout.n_columns)):
            return model  # one table input in training order: nothing selects columns
        raise UnsupportedModelError("the model has no leading ColumnTransformer")
    order = [c for g in layout.groups for c in g.columns]
    position = {c: i for i, c in enumerate(order)}
    remapped = []
    for name, transformer, columns in ct.transformers_:
        if isinstance(transformer, str) and transformer == "drop":
            remapped.append((name, transformer, columns))
        else:
            remapped.append((name, transformer, [position[c] for c in _positions(ct, columns)]))
    ct.transformers_ = remapped
    return clone
