"""Proof that an ONNX graph answers like the model it came from.

`verify` runs the source model and an onnxruntime CPU session on the same data (the export
sample and, when given, held-out data), compares every graph output, and raises one
`ParityError` that lists each failing output. Values must agree within a tolerance; outputs
with no tolerance (class labels) must be identical. The figures are kept either way and end up
in the report and the model card.

The CPU provider is used on purpose: it is the reference implementation, available everywhere
the exporter runs, and the one a GPU server falls back to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import ParityError
from .figures import OutputParity, Tolerance, parity_table

__all__ = ["OutputParity", "Tolerance", "compare", "cosine_distances", "cpu_session", "parity_table", "verify"]

Arrays = Mapping[str, np.ndarray]


def cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    """An onnxruntime session on the CPU provider, quiet unless something is wrong."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def _is_numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "biuf"


def compare(output: str, expected: Any, actual: Any, tolerance: Tolerance | None) -> OutputParity:
    """Compare one output on one batch; never raises on a disagreement, it reports it."""
    exp = np.asarray(expected)
    act = np.asarray(actual)
    n = int(act.shape[0]) if act.ndim else 1
    if exp.shape != act.shape:
        return OutputParity(output, None, None, tolerance, n, int(act.size), f"shape {act.shape}, expected {exp.shape}")
    if _is_numeric(exp) != _is_numeric(act):
        return OutputParity(
            output, None, None, tolerance, n, int(act.size), f"{act.dtype} values, expected {exp.dtype}"
        )
    if not _is_numeric(exp):
        mismatches = int(np.count_nonzero(exp.astype(str) != act.astype(str)))
        return OutputParity(output, None, None, tolerance, n, mismatches)
    e = exp.astype(np.float64)
    a = act.astype(np.float64)
    both_nan = np.isnan(e) & np.isnan(a)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan, 0.0, np.abs(a - e))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
    floor = max(tolerance.atol, 1e-12) if tolerance is not None else 1e-12
    rel = diff / np.maximum(np.abs(np.nan_to_num(e)), floor)
    if tolerance is None:
        outside = diff != 0
    else:
        outside = diff > tolerance.atol + tolerance.rtol * np.abs(np.nan_to_num(e))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    mismatches = int(np.count_nonzero(outside))
    max_cosine = None
    if tolerance is not None and tolerance.cosine is not None:
        distances = cosine_distances(e.reshape(n, -1), a.reshape(n, -1))
        max_cosine = float(distances.max()) if distances.size else 0.0
        mismatches += int(np.count_nonzero(distances > tolerance.cosine))
    return OutputParity(output, max_abs, max_rel, tolerance, n, mismatches, max_cosine_distance=max_cosine)


def cosine_distances(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """1 - cos between matching rows (float64); 0 for two zero rows, 1 for one, inf for NaN."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1) * np.linalg.norm(a, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        distances = 1.0 - (e * a).sum(axis=1) / norms
    both_zero = (np.abs(e).sum(axis=1) == 0) & (np.abs(a).sum(axis=1) == 0)
    distances = np.where(both_zero, 0.0, np.where(norms == 0, 1.0, distances))
    return np.where(np.isnan(distances), np.inf, np.maximum(distances, 0.0))


def _merge(a: OutputParity, b: OutputParity) -> OutputParity:
    def worst(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else max(x, y)

    return OutputParity(
        a.output,
        worst(a.max_abs_diff, b.max_abs_diff),
        worst(a.max_rel_diff, b.max_rel_diff),
        a.tolerance,
        a.n_samples + b.n_samples,
        a.mismatches + b.mismatches,
        a.problem or b.problem,
        worst(a.max_cosine_distance, b.max_cosine_distance),
    )


def verify(
    model_name: str,
    model_bytes: bytes,
    reference: Callable[[Any], Arrays],
    feeds: Callable[[Any], Arrays],
    datasets: Sequence[Any],
    tolerances: Mapping[str, Tolerance | None],
) -> tuple[OutputParity, ...]:
    """Check every graph output on every dataset; raise one ParityError listing all failures.

    `feeds(data)` gives the graph's inputs and `reference(data)` the source model's answers on
    exactly those values; `tolerances` maps each output to its Tolerance (None: identical).
    Called by `export` before anything is written, and by tests with a deliberately wrong graph."""
    session = cpu_session(model_bytes)
    names = [o.name for o in session.get_outputs()]
    totals: dict[str, OutputParity] = {}
    for data in datasets:
        feed = dict(feeds(data))
        actual = dict(zip(names, session.run(names, feed), strict=True))
        expected = reference(data)
        n = int(next(iter(feed.values())).shape[0])
        for name in names:
            tolerance = tolerances.get(name)
            if name not in expected:
                result = OutputParity(name, None, None, tolerance, n, 0, "the source model has no such output")
            else:
                result = compare(name, expected[name], actual[name], tolerance)
            totals[name] = _merge(totals[name], result) if name in totals else result
        for name in sorted(set(expected) - set(names)):
            totals[name] = OutputParity(name, None, None, tolerances.get(name), n, 0, "missing from the ONNX graph")
    results = tuple(totals.values())
    if any(not r.passed for r in results):
        raise ParityError(model_name, results)
    return results
