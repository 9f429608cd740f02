"""Statistics of one model version, in Triton's ModelStatistics terms: cumulative counts and
nanosecond totals since load, so a client diffs two snapshots.

All updates happen on the event loop thread (the batcher reports a batch after its worker thread
returns), so no lock is needed.
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# Histogram bucket bounds: seconds for latencies, rows for batch sizes (Prometheus `le`).
LATENCY_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
BATCH_BOUNDS = tuple(float(1 << i) for i in range(13))  # 1 .. 4096 rows


@dataclass(slots=True)
class Histogram:
    """Counts per bucket (the last one: above every bound) and their sum; observing is a
    bisect and two additions, and Prometheus reads it at scrape time."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, "+Inf" last: Prometheus' histogram buckets."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        if ns > 0:
            self.ns += ns


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Counters of one model version. `success`/`fail` are end-to-end server times per request;
    `queue` and `compute_*` are per request (a batch's compute time counts once per member, as
    Triton does); `batches` is keyed by executed batch size in rows."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    # For service-level objectives (Prometheus histograms), and failures by the error's class
    # (metrics maps each to its gRPC status code); `in_flight`: requests being served now.
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_S))
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_S))
    compute_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS_S))
    batch_rows: Histogram = field(default_factory=lambda: Histogram(BATCH_BOUNDS))
    failures: dict[type[BaseException], int] = field(default_factory=dict)
    in_flight: int = 0

    def on_batch(
        self, rows: int, queue_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """Called by the batcher for each executed batch (the BatchObserver protocol)."""
        members = len(queue_ns)
        self.queue.add(sum(queue_ns), members)
        for ns in queue_ns:
            self.queue_seconds.observe(ns / 1e9)
        self.compute_seconds.observe((input_ns + infer_ns + output_ns) / 1e9)
        self.batch_rows.observe(rows)
        self.compute_input.add(input_ns * members, members)
        self.compute_infer.add(infer_ns * members, members)
        self.compute_output.add(output_ns * members, members)
        size = self.batches.get(rows)
        if size is None:
            size = self.batches[rows] = BatchSizeStats()
        size.compute_input.add(input_ns)
        size.compute_infer.add(infer_ns)
        size.compute_output.add(output_ns)
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000  # wall clock: a timestamp, not a latency

    def on_request(self, error: type[BaseException] | None, ns: int) -> None:
        """A request was answered: successfully (`error` None) or with that error."""
        (self.fail if error else self.success).add(ns)
        self.request_seconds.observe(ns / 1e9)
        if error is not None:
            self.failures[error] = self.failures.get(error, 0) + 1
