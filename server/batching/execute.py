"""Executing one batch: concatenate the members' inputs, run, check and split the outputs back per
member; if the run fails, bisect and re-run the halves so only the culprits fail. And the pure
helpers for requests larger than a batch (split into parts, join their outputs).

No asyncio: this runs on an instance's worker thread, or on the event loop for a batch measured
cheaper than a hand-off. Times come from `engine_clock`, read in the executing thread, so they
are the engine's own time (thread CPU time by default), never the hand-off or a GIL wait.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import ExecutionError

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
Clock = Callable[[], float]


RunBatch = Callable[[Arrays], Arrays]


class Runner(Protocol):
    """Executes one batch: input name -> array in, output name -> array out. Called in a worker
    thread (onnxruntime releases the GIL while it runs) or, for cheap batches, on the event loop.

    `engine_clock` is how the engine's own time is read in the executing thread, for the cost
    model: thread CPU time when the engine runs the whole batch on that thread, wall time when
    other threads or a device do the work (`runtime.OnnxModel` chooses)."""

    @property
    def engine_clock(self) -> Clock: ...

    def __call__(self, inputs: Arrays) -> Arrays: ...


@dataclass(slots=True)
class Outcome:
    """One executed batch: each member's outputs or error (in member order), and the engine
    seconds spent concatenating, running and splitting. `clean` is False if any run failed
    (its time then says nothing about the cost of a successful run)."""

    outputs: list[Arrays | BaseException] = field(default_factory=list)
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0
    clean: bool = True


def execution_failure(name: str, exc: Exception) -> ExecutionError:
    """A request's execution failure as its caller will see it: the runtime's summary (op type,
    status; never the engine's text), or for a bug in the runner its type, with the traceback
    logged under the correlation id the caller gets."""
    if isinstance(exc, ExecutionError):
        return ExecutionError(f"model {name}: {exc}", correlation_id=exc.correlation_id)
    error = ExecutionError(f"model {name}: execution failed: {type(exc).__name__}")
    log.error("model %s: runner failed [correlation id %s]", name, error.correlation_id, exc_info=exc)
    return error


@dataclass(frozen=True, slots=True)
class Padding:
    """How a padded model's batch is assembled: `inputs` maps each padded input to (axis, pad
    value); `outputs` maps each output that carries the padded axis to that axis (sliced back
    per member); `lengths[i]` is member i's own length."""

    inputs: Mapping[str, tuple[int, float]]
    outputs: Mapping[str, int]
    lengths: Sequence[int]


def pad_to(array: np.ndarray, axis: int, length: int, value: float) -> np.ndarray:
    """`array` padded with `value` along `axis` to `length`."""
    short = length - array.shape[axis]
    if short <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, short)
    return np.pad(array, widths, constant_values=value)


def concatenate(members: Sequence[Arrays], padding: Padding | None = None) -> dict[str, np.ndarray]:
    """The members' inputs as one batch: concatenated along dim 0, padded inputs first padded to
    the longest member."""
    if len(members) == 1:
        return dict(members[0])
    out = {}
    for n in members[0]:
        arrays = [m[n] for m in members]
        if padding is not None and n in padding.inputs:
            axis, value = padding.inputs[n]
            out[n] = _pad_concatenate(arrays, axis, value)
        else:
            out[n] = np.concatenate(arrays)
    return out


def _pad_concatenate(arrays: Sequence[np.ndarray], axis: int, value: float) -> np.ndarray:
    """`arrays` padded with `value` along `axis` to the longest and concatenated along dim 0, as
    one allocation filled with the pad value and one copy per member (`np.pad` per member costs
    tens of microseconds of Python each, on the thread that holds the batch)."""
    first = arrays[0]
    if axis <= 0 or any(a.dtype != first.dtype or a.ndim != first.ndim or a.ndim <= axis
                        or a.shape[1:axis] + a.shape[axis + 1:] != first.shape[1:axis] + first.shape[axis + 1:]
                        for a in arrays):  # not conformant: numpy's own path, and its error
        longest = max(a.shape[axis] for a in arrays)
        return np.concatenate([pad_to(a, axis, longest, value) for a in arrays])
    shape = list(first.shape)
    shape[0] = sum(a.shape[0] for a in arrays)
    shape[axis] = max(a.shape[axis] for a in arrays)
    out = np.full(shape, value, dtype=first.dtype)
    start = 0
    for a in arrays:
        index: list[slice] = [slice(None)] * a.ndim
        index[0] = slice(start, start + a.shape[0])
        index[axis] = slice(0, a.shape[axis])
        out[tuple(index)] = a
        start += a.shape[0]
    return out


def execute(runner: RunBatch, members: Sequence[Arrays], rows: Sequence[int], name: str, engine_clock: Clock,
            padding: Padding | None = None, chunk_rows: int = 0) -> Outcome:
    """Concatenate (padding where declared), run and split one batch; on failure bisect so only
    culprits fail. `chunk_rows` > 0: a batch of more rows runs as consecutive engine calls of at
    most that many (a background part larger than the model's max_batch_size, in one hand-off)."""
    outcome = Outcome()
    run = runner if chunk_rows <= 0 else _chunked(runner, chunk_rows, sum(rows), name)
    outcome.outputs = _run_group(run, list(members), list(rows), name, engine_clock, outcome, padding)
    return outcome


def _chunked(runner: RunBatch, chunk_rows: int, total: int, name: str) -> RunBatch:
    """`runner` over consecutive slices of at most `chunk_rows` rows, outputs joined."""
    if total <= chunk_rows:
        return runner

    def run(inputs: Arrays) -> Arrays:
        rows = next(iter(inputs.values())).shape[0]
        parts = split_rows(inputs, rows, chunk_rows)
        outputs = [runner(part) for part, _ in parts]
        return join_outputs(outputs, [r for _, r in parts], name)

    return run


def _run_group(
    runner: RunBatch, members: list[Arrays], rows: list[int], name: str, clock: Clock, outcome: Outcome,
    padding: Padding | None = None,
) -> list[Arrays | BaseException]:
    # The engine's clock (a system call when it is the thread's CPU time) only around the
    # engine; the copies before and after are this thread's own work, timed on perf_counter.
    t0 = time.perf_counter()
    # A lone member runs as it came (a copy of it would buy nothing).
    inputs = members[0] if len(members) == 1 and padding is None else concatenate(members, padding)
    t1 = time.perf_counter()
    e1 = clock()
    try:
        outputs = runner(inputs)
    except Exception as exc:  # noqa: BLE001 - isolate the culprit below
        outcome.clean = False
        outcome.infer_s += clock() - e1
        if len(members) == 1:
            return [execution_failure(name, exc)]
        half = len(members) // 2
        first, second = (padding, padding) if padding is None else (
            Padding(padding.inputs, padding.outputs, padding.lengths[:half]),
            Padding(padding.inputs, padding.outputs, padding.lengths[half:]))
        return (_run_group(runner, members[:half], rows[:half], name, clock, outcome, first)
                + _run_group(runner, members[half:], rows[half:], name, clock, outcome, second))
    outcome.infer_s += clock() - e1
    t2 = time.perf_counter()
    outcome.input_s += t1 - t0
    if len(members) == 1:
        result: list[Arrays | BaseException] = [dict(outputs)]
    else:
        total = sum(rows)
        bad = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != total]
        if bad:
            err = ExecutionError(f"model {name}: output {bad[0]!r} has dim 0 != batch rows {total}; cannot split")
            return [err] * len(members)
        bounds = list(itertools.accumulate(rows, initial=0))
        parts = [{n: a[start:end] for n, a in outputs.items()} for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        if padding is not None and padding.outputs:
            parts = [
                {n: _unpad(a, padding.outputs.get(n), length) for n, a in member.items()}
                for member, length in zip(parts, padding.lengths, strict=True)
            ]
        result = list(parts)
    outcome.output_s += time.perf_counter() - t2
    return result


def _unpad(array: np.ndarray, axis: int | None, length: int) -> np.ndarray:
    """An output that carries the padded axis, cut back to its member's own length."""
    if axis is None or array.ndim <= axis:
        return array
    index = [slice(None)] * array.ndim
    index[axis] = slice(0, length)
    return array[tuple(index)]


def split_rows(inputs: Arrays, rows: int, limit: int) -> list[tuple[Arrays, int]]:
    """An oversized request's inputs as consecutive parts of at most `limit` rows (views)."""
    return [
        ({n: a[start : start + limit] for n, a in inputs.items()}, min(limit, rows - start))
        for start in range(0, rows, limit)
    ]


def join_outputs(parts: Sequence[Arrays], rows: Sequence[int], name: str) -> dict[str, np.ndarray]:
    """The outputs of a split request's parts, joined in order along dim 0."""
    joined: dict[str, np.ndarray] = {}
    for out in parts[0]:
        pieces = [p[out] for p in parts]
        if any(a.ndim == 0 or a.shape[0] != r for a, r in zip(pieces, rows, strict=True)):
            raise ExecutionError(f"model {name}: output {out!r} has dim 0 != the part's rows; cannot join the parts")
        joined[out] = np.concatenate(pieces)
    return joined
