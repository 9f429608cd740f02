"""Choose a tabular model's `max_batch_size` by timing its graph, instead of a fixed 64.

Why: max_batch_size is the most rows one execution runs (the server splits bigger requests
into parts of at most that many rows and joins the answers), so it trades per-execution
overhead against how long one execution holds its session. A logistic regression runs 64 rows
in microseconds: at 64 the server pays its per-execution costs (queueing, one Python call,
concatenating and splitting inputs) far more often than the model needs, under exactly the
load where that matters. A larger batch is only worth it while one execution stays short, so
the exporter measures: the graph on an onnxruntime CPU session configured like the server's
(one intra-op and one inter-op thread, no spinning, all graph optimizations) runs the sample
rows tiled to 64, 128, 256, ... rows, and the largest size whose median execution stays within
`BUDGET_S` becomes max_batch_size. Doubling stops at the first size past the budget (a slower
batch is not timed any further) and at `CEILING`; the result is never below `FLOOR`, so a cheap
model only ever gets a larger batch than before and a slow one keeps 64.

Only tabular graphs are measured (`is_tabular`): the sample's rows say what a row costs only
when every row is a fixed-width table row. Images, signals, token sequences and other
variable-length inputs keep `FLOOR`, as does a caller's explicit max_batch_size (0 = no
batching). `choose` is the pure decision, separate from the timing in `measure`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort

from .specs import TensorSpec

FLOOR = 64  # the exporter's long-standing default; measuring never lowers it
CEILING = 4096  # beyond this a batch's input and output buffers outgrow the benefit on a CPU
# One execution may hold its session this long: a request queued behind a full batch waits
# about this much more, small next to a network round trip, while per-execution overhead is
# amortized over as many rows as fit.
BUDGET_S = 0.002
RUNS = 5  # timed runs per size after one warm-up run; their median is what counts

ChosenBy = Literal["measured", "default", "caller"]


@dataclass(frozen=True, slots=True)
class BatchingChoice:
    """The max_batch_size written to config.pbtxt, and how it was arrived at. `medians_s` maps
    each timed batch size (rows) to its median execution time in seconds; None unless measured."""

    max_batch_size: int
    chosen_by: ChosenBy
    budget_s: float | None = None
    medians_s: Mapping[int, float] | None = None

    def as_card_entry(self) -> dict[str, object]:
        measured = self.chosen_by == "measured"
        return {
            "max_batch_size": self.max_batch_size,
            "chosen_by": self.chosen_by,
            "budget_ms": round(self.budget_s * 1e3, 6) if measured and self.budget_s is not None else None,
            "median_ms_by_rows": (
                {str(rows): round(s * 1e3, 4) for rows, s in sorted(self.medians_s.items())}
                if measured and self.medians_s is not None
                else None
            ),
        }


def choose(
    measurements: Mapping[int, float], budget_s: float = BUDGET_S, *, floor: int = FLOOR, ceiling: int = CEILING
) -> int:
    """The largest batch size (rows) whose median time (seconds) is within `budget_s`, walking
    sizes upwards and stopping at the first one past the budget (a larger size that happens to
    look fast after a slow one is noise, not capacity); sizes above `ceiling` are ignored and
    the result is never below `floor`."""
    chosen = floor
    for rows in sorted(measurements):
        if rows > ceiling:
            break
        if measurements[rows] > budget_s:
            break
        chosen = max(chosen, rows)
    return chosen


def is_tabular(inputs: Sequence[TensorSpec]) -> bool:
    """Every graph input is a table: rank 2, a variable batch dim and a fixed width. Token id
    sequences are rank 2 too but have a variable second dim, so they are not tables."""
    return bool(inputs) and all(len(s.shape) == 2 and s.shape[0] == -1 and s.shape[1] > 0 for s in inputs)


def session_options() -> ort.SessionOptions:
    """Options like the server's sessions (server/runtime.py): one intra-op thread (the
    server's default), one inter-op thread (sequential execution runs no parallel nodes
    anyway), no spinning, all graph optimizations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def server_like_session(model_bytes: bytes) -> ort.InferenceSession:
    """A CPU session on `model_bytes` with `session_options()`."""
    return ort.InferenceSession(model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])


def tile(feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The sample's rows repeated (in order) to exactly `rows` rows, for every input."""
    return {name: np.ascontiguousarray(np.take(a, np.arange(rows) % len(a), axis=0)) for name, a in feeds.items()}


def measure(
    model_bytes: bytes,
    feeds: Mapping[str, np.ndarray],
    budget_s: float = BUDGET_S,
    *,
    floor: int = FLOOR,
    ceiling: int = CEILING,
    runs: int = RUNS,
) -> dict[int, float]:
    """Median execution time (seconds) of the graph on `feeds` tiled to floor, 2*floor, ...
    rows, up to `ceiling`, stopping after the first size whose median passes `budget_s`."""
    if not feeds or any(len(a) == 0 for a in feeds.values()):
        raise ValueError("measuring needs at least one sample row for every input")
    session = server_like_session(model_bytes)
    names = [o.name for o in session.get_outputs()]
    medians: dict[int, float] = {}
    rows = floor
    while rows <= ceiling:
        batch = tile(feeds, rows)
        session.run(names, batch)  # warm-up: first-run allocations and caches are not the steady state
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(names, batch)
            times.append(time.perf_counter() - started)
        medians[rows] = statistics.median(times)
        if medians[rows] > budget_s:
            break
        rows *= 2
    return medians


def decide(
    requested: int | None,
    inputs: Sequence[TensorSpec],
    model_bytes: bytes,
    feeds: Mapping[str, np.ndarray],
    budget_s: float = BUDGET_S,
) -> BatchingChoice:
    """The caller's max_batch_size when given; else measured for a tabular graph; else FLOOR."""
    if requested is not None:
        return BatchingChoice(requested, "caller")
    if not is_tabular(inputs):
        return BatchingChoice(FLOOR, "default")
    medians = measure(model_bytes, feeds, budget_s)
    return BatchingChoice(choose(medians, budget_s), "measured", budget_s, medians)
