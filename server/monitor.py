"""What a tabular model's card knows about its training data, used on every request:

- clinical limits (`feature_limits`, given by the data scientist: a heart rate of 900 is an
  error, not a patient): a value outside them is refused, INVALID_ARGUMENT naming the feature
  and never the value;
- the training 1st-99th percentile range (`feature_ranges`): a value outside it is scored but
  flagged (response parameter `out_of_range_features`, a counter per feature);
- the training deciles (`feature_deciles`): a population stability index (PSI) per feature over a
  sliding window of recent rows, against the decile bins' 10 % each.

Vectorised over the request's rows; features are the card's `feature_names`, as the columns of
the model's numeric 2-D input (`input_columns` for mixed tables).
"""
from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

import numpy as np

from .card import CardError, ModelCard
from .errors import InvalidInput

PSI_WINDOW_ROWS = 10_000  # the sliding window's size ...
PSI_CHUNKS = 10  # ... kept as this many chunks (the window slides by a tenth)


class _Window:
    """Decile-bin counts of the last rows, per feature, as PSI_CHUNKS chunks of
    PSI_WINDOW_ROWS / PSI_CHUNKS rows. Rows are copied into a buffer and binned a whole chunk at
    a time: binning one request's row costs more in numpy's per-call overhead than the row itself."""

    def __init__(self, cuts: np.ndarray) -> None:
        self._cuts = np.sort(cuts, axis=1)  # [features, 9]; a value's bin is the count of cuts below it
        self._features = cuts.shape[0]
        self._buffer = np.empty((PSI_WINDOW_ROWS // PSI_CHUNKS, self._features), np.float64)
        self._filled = 0
        self.chunks: collections.deque[np.ndarray] = collections.deque()

    def add(self, values: np.ndarray) -> None:
        """`values`: [rows, features]."""
        start, rows = 0, values.shape[0]
        if self._filled + rows < len(self._buffer):  # the usual case: the chunk is not complete
            self._buffer[self._filled:self._filled + rows] = values
            self._filled += rows
            return
        while start < rows:
            take = min(rows - start, len(self._buffer) - self._filled)
            self._buffer[self._filled:self._filled + take] = values[start:start + take]
            self._filled += take
            start += take
            if self._filled == len(self._buffer):
                self.chunks.append(self._bin(self._buffer))
                if len(self.chunks) > PSI_CHUNKS:
                    self.chunks.popleft()
                self._filled = 0

    def _bin(self, values: np.ndarray) -> np.ndarray:
        """[features, 10] counts of `values` [rows, features] per decile bin (rows with a
        non-finite value left out). A value's bin is the number of cuts below it: one
        searchsorted per feature (comparing every value with every cut and summing cost 5x more,
        a 1.5 ms stall of the event loop per chunk)."""
        columns = values[np.isfinite(values).all(axis=1)].T
        bins = np.empty(columns.shape, np.intp)  # [features, rows], 0..9
        for feature, (cuts, column) in enumerate(zip(self._cuts, columns, strict=True)):
            bins[feature] = np.searchsorted(cuts, column, side="left")
        bins += 10 * np.arange(self._features)[:, None]
        return np.bincount(bins.ravel(), minlength=10 * self._features).reshape(self._features, 10)

    def counts(self) -> np.ndarray:
        return sum(self.chunks, self._bin(self._buffer[:self._filled]))


Bounds = tuple[np.ndarray, np.ndarray]


def _float32_bounds(bounds: Bounds) -> Bounds:
    """`bounds` as float32, rounded outward-exact: for any float32 v, v < lo32 exactly when v < lo
    (lo32: the smallest float32 >= lo) and v > hi32 exactly when v > hi (the largest <= hi)."""
    lo, hi = (b.astype(np.float32) for b in bounds)
    lo = np.where(lo.astype(np.float64) < bounds[0], np.nextafter(lo, np.float32(np.inf)), lo)
    hi = np.where(hi.astype(np.float64) > bounds[1], np.nextafter(hi, np.float32(-np.inf)), hi)
    return lo.astype(np.float32), hi.astype(np.float32)


def _in_dtype(bounds: tuple[Bounds, Bounds], dtype: np.dtype) -> Bounds:
    """The float32 copy for float32 inputs (a mixed-dtype comparison costs twice as much)."""
    return bounds[1] if dtype == np.float32 else bounds[0]


def _unclamped(low: np.ndarray, high: np.ndarray, bounds: Bounds) -> bool:
    """True when clamping to `bounds` leaves the columns' minima and maxima bit for bit as they
    are: every value is inside (or NaN, which no check flags). One or two ufunc passes and a
    bytes comparison, a quarter of the cost of comparing both sides and reducing. False only
    sends the row to the exact comparisons (a -0.0 against a bound of 0.0 may read as clamped)."""
    lo, hi = bounds
    if low is high:  # one row
        return bool(np.minimum(np.maximum(low, lo), hi).tobytes() == low.tobytes())
    return bool(np.maximum(low, lo).tobytes() == low.tobytes() and np.minimum(high, hi).tobytes() == high.tobytes())


class FeatureMonitor:
    """Limits, range flags and drift of one model version's numeric input columns."""

    def __init__(self, label: str, input_name: str, names: Sequence[str], columns: Sequence[int],
                 limits: Mapping[str, tuple[float, float]], ranges: Mapping[str, tuple[float, float]],
                 deciles: Mapping[str, Sequence[float]]) -> None:
        self._label = label
        self.input = input_name
        self._names = list(names)
        self._columns = np.array(columns, np.intp)
        self._identity = list(columns) == list(range(len(columns)))  # no column selection needed

        def bounds(table: Mapping[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
            lo = np.array([table.get(n, (-math.inf, math.inf))[0] for n in self._names], np.float64)
            hi = np.array([table.get(n, (-math.inf, math.inf))[1] for n in self._names], np.float64)
            return lo, hi

        def both(table: Mapping[str, tuple[float, float]]) -> tuple[Bounds, Bounds] | None:
            if not table:
                return None
            exact = bounds(table)
            return exact, _float32_bounds(exact)

        self._limits = both(limits)
        self._ranges = both(ranges)
        # The tightest bounds that settle a row: inside them it is neither refused nor flagged.
        self._screen = self._limits or self._ranges
        if self._limits is not None and self._ranges is not None:
            (limit_lo, limit_hi), (range_lo, range_hi) = self._limits[0], self._ranges[0]
            inside = np.maximum(limit_lo, range_lo), np.minimum(limit_hi, range_hi)
            self._screen = inside, _float32_bounds(inside)
        self._decile_names = [n for n in self._names if n in deciles]
        self._decile_index = np.array([self._names.index(n) for n in self._decile_names], np.intp)
        self._all_deciles = self._decile_names == self._names
        cuts = np.array([list(deciles[n]) for n in self._decile_names], np.float64)  # [features, 9]
        self._window = _Window(cuts) if self._decile_names else None
        self.out_of_range = {n: 0 for n in self._names}

    @classmethod
    def from_card(cls, label: str, card: ModelCard | Mapping[str, object] | None,
                  inputs: Mapping[str, tuple[int, ...]]) -> FeatureMonitor | None:
        """The monitor a card supports: None when it gives no feature names or none of the three
        tables. `inputs`: the model's inputs and their dims (after the batch dim). Tables the
        model's input cannot carry raise CardError naming the table: a clinical limit that
        would never be applied refuses the load rather than switching off in silence."""
        if card is None:
            return None
        if not isinstance(card, ModelCard):
            card = ModelCard.from_dict(card)
        names = card.feature_names
        tables: dict[str, Mapping[str, object]] = {
            "feature_limits": card.feature_limits or {}, "feature_ranges": card.feature_ranges or {},
            "feature_deciles": card.feature_deciles or {}}
        if names is None or not any(tables.values()):
            return None
        given = next(k for k, t in tables.items() if t)
        groups = card.input_columns
        if groups is not None and "numeric" in groups and "numeric" in inputs:
            input_name, wanted = "numeric", list(groups["numeric"])
            if len(inputs["numeric"]) != 1 or inputs["numeric"][0] not in (-1, len(wanted)):
                raise CardError(given, f"input_columns['numeric'] lists {len(wanted)} columns; the model's input "
                                       f"'numeric' has dims {list(inputs['numeric'])}")
        elif len(inputs) == 1 and next(iter(inputs.values())) == (len(names),):
            input_name, wanted = next(iter(inputs)), list(names)
        else:
            raise CardError(given, f"the model has no input whose columns are the card's {len(names)} feature_names "
                                   f"(a 2-D input of that width, or 'numeric' with input_columns); inputs: "
                                   f"{ {n: list(d) for n, d in inputs.items()} }")
        for key, table in tables.items():
            outside = [n for n in table if n not in wanted]
            if outside:
                raise CardError(f"{key}[{outside[0]!r}]", f"names no numeric column of input {input_name!r}")
        columns = list(range(len(wanted)))
        limits, ranges = ({n: (b.low, b.high) for n, b in (t or {}).items()}
                          for t in (card.feature_limits, card.feature_ranges))
        return cls(label, input_name, wanted, columns, limits, ranges, card.feature_deciles or {})

    def check(self, inputs: Mapping[str, np.ndarray]) -> tuple[str, ...]:
        """Refuse values outside a clinical limit; count and return the features with a value
        outside the training range; feed the drift window. About 3-4 µs for a one-row request:
        the bounds are compared with the columns' minimum and maximum, and drift rows are binned
        a chunk at a time."""
        array = inputs.get(self.input)
        if array is None or array.ndim != 2 or array.shape[0] == 0:
            return ()
        x = array if self._identity else array[:, self._columns]
        if x.shape[0] == 1:
            low = high = x[0]
        else:
            low, high = np.fmin.reduce(x, axis=0), np.fmax.reduce(x, axis=0)  # a NaN hides no other row
        if self._screen is not None and _unclamped(low, high, _in_dtype(self._screen, x.dtype)):
            self._feed(x)
            return ()
        if self._limits is not None:
            names = self._outside(low, high, _in_dtype(self._limits, x.dtype))
            if names:
                raise InvalidInput(
                    f"model {self._label}: input {self.input!r}: feature {names[0]!r} is outside its clinical limits "
                    f"(model_card.json feature_limits){f'; so are {list(names[1:])}' if len(names) > 1 else ''}"
                )
        flagged: tuple[str, ...] = ()
        if self._ranges is not None:
            flagged = self._outside(low, high, _in_dtype(self._ranges, x.dtype))
            for n in flagged:
                self.out_of_range[n] += 1
        self._feed(x)
        return flagged

    def _outside(self, low: np.ndarray, high: np.ndarray, bounds: Bounds) -> tuple[str, ...]:
        """The features whose column minimum or maximum lies outside `bounds` (NaN: neither)."""
        lo, hi = bounds
        flagged = np.flatnonzero((low < lo) | (high > hi))
        if not flagged.size:
            return ()
        names = self._names
        return tuple(names[i] for i in flagged.tolist())

    def _feed(self, x: np.ndarray) -> None:
        if self._window is not None:
            self._window.add(x if self._all_deciles else x[:, self._decile_index])

    def psi(self) -> dict[str, float]:
        """PSI per feature over the window against the training deciles (10 % per bin); empty
        until the window holds a chunk of rows."""
        if self._window is None or not self._window.chunks:
            return {}
        counts = self._window.counts().astype(np.float64)
        observed = np.clip(counts / counts.sum(axis=1, keepdims=True), 1e-4, None)
        expected = 0.1
        values = ((observed - expected) * np.log(observed / expected)).sum(axis=1)
        return {n: float(v) for n, v in zip(self._decile_names, values, strict=True)}
