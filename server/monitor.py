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
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidInput

PSI_WINDOW_ROWS = 10_000  # the sliding window's size ...
PSI_CHUNKS = 10  # ... kept as this many chunks (the window slides by a tenth)


@dataclass(slots=True)
class _Window:
    """Bin counts of the last rows, per feature: chunks of PSI_WINDOW_ROWS / PSI_CHUNKS rows."""

    features: int
    chunks: collections.deque[np.ndarray] = field(default_factory=collections.deque)
    current: np.ndarray = field(init=False)
    current_rows: int = 0

    def __post_init__(self) -> None:
        self.current = np.zeros((self.features, 10), np.int64)

    def add(self, bins: np.ndarray) -> None:
        """`bins`: [rows, features] decile bin (0..9) of each value."""
        rows = bins.shape[0]
        np.add.at(self.current, (np.broadcast_to(np.arange(self.features), bins.shape), bins), 1)
        self.current_rows += rows
        if self.current_rows >= PSI_WINDOW_ROWS // PSI_CHUNKS:
            self.chunks.append(self.current)
            if len(self.chunks) > PSI_CHUNKS:
                self.chunks.popleft()
            self.current = np.zeros((self.features, 10), np.int64)
            self.current_rows = 0

    def counts(self) -> np.ndarray:
        return sum(self.chunks, self.current.copy())


class FeatureMonitor:
    """Limits, range flags and drift of one model version's numeric input columns."""

    def __init__(self, label: str, input_name: str, names: Sequence[str], columns: Sequence[int],
                 limits: Mapping[str, tuple[float, float]], ranges: Mapping[str, tuple[float, float]],
                 deciles: Mapping[str, Sequence[float]]) -> None:
        self._label = label
        self.input = input_name
        self._names = list(names)
        self._columns = np.array(columns, np.intp)

        def bounds(table: Mapping[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
            lo = np.array([table.get(n, (-math.inf, math.inf))[0] for n in self._names], np.float64)
            hi = np.array([table.get(n, (-math.inf, math.inf))[1] for n in self._names], np.float64)
            return lo, hi

        self._limits = bounds(limits) if limits else None
        self._ranges = bounds(ranges) if ranges else None
        self._decile_names = [n for n in self._names if n in deciles]
        self._decile_index = np.array([self._names.index(n) for n in self._decile_names], np.intp)
        self._cuts = np.array([list(deciles[n]) for n in self._decile_names], np.float64)  # [features, 9]
        self._window = _Window(len(self._decile_names)) if self._decile_names else None
        self.out_of_range = {n: 0 for n in self._names}

    @classmethod
    def from_card(cls, label: str, card: Mapping[str, object] | None, inputs: Mapping[str, tuple[int, ...]]
                  ) -> FeatureMonitor | None:
        """The monitor a card supports (None without feature names or any of the three tables).
        `inputs`: the model's inputs and their dims (after the batch dim)."""
        if not card:
            return None
        names = card.get("feature_names")
        limits, ranges, deciles = (card.get(k) or {} for k in ("feature_limits", "feature_ranges", "feature_deciles"))
        if not isinstance(names, list) or not (limits or ranges or deciles):
            return None
        groups = card.get("input_columns")
        if isinstance(groups, dict) and "numeric" in groups and "numeric" in inputs:
            input_name, wanted = "numeric", [str(n) for n in groups["numeric"]]
        elif len(inputs) == 1 and next(iter(inputs.values())) == (len(names),):
            input_name, wanted = next(iter(inputs)), [str(n) for n in names]
        else:
            return None
        columns = list(range(len(wanted)))

        def table(raw: object) -> dict[str, tuple[float, float]]:
            return {str(k): (float(v[0]), float(v[1])) for k, v in raw.items()} if isinstance(raw, dict) else {}

        return cls(label, input_name, wanted, columns, table(limits), table(ranges),
                   {str(k): [float(x) for x in v] for k, v in deciles.items()} if isinstance(deciles, dict) else {})

    def check(self, inputs: Mapping[str, np.ndarray]) -> tuple[str, ...]:
        """Refuse values outside a clinical limit; count and return the features with a value
        outside the training range; feed the drift window."""
        array = inputs.get(self.input)
        if array is None or array.ndim != 2:
            return ()
        x = array[:, self._columns].astype(np.float64, copy=False)
        if self._limits is not None:
            bad = np.asarray(((x < self._limits[0]) | (x > self._limits[1])).any(axis=0))
            if bad.any():
                names = [n for n, b in zip(self._names, bad.tolist(), strict=True) if b]
                raise InvalidInput(
                    f"model {self._label}: input {self.input!r}: feature {names[0]!r} is outside its clinical limits "
                    f"(model_card.json feature_limits){f'; so are {names[1:]}' if len(names) > 1 else ''}"
                )
        flagged: tuple[str, ...] = ()
        if self._ranges is not None:
            out = np.asarray(((x < self._ranges[0]) | (x > self._ranges[1])).any(axis=0))
            if out.any():
                flagged = tuple(n for n, o in zip(self._names, out.tolist(), strict=True) if o)
                for n in flagged:
                    self.out_of_range[n] += 1
        if self._window is not None:
            values = x[:, self._decile_index]
            finite = np.isfinite(values).all(axis=1)
            if finite.any():
                bins = (values[finite][:, :, None] > self._cuts[None, :, :]).sum(axis=2)
                self._window.add(bins)
        return flagged

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
