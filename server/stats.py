"""Statistics of one model version, in Triton's ModelStatistics terms: cumulative counts and
nanosecond totals since load, so a client diffs two snapshots.

All updates happen on the event loop thread (the batcher reports a batch after its worker thread
returns), so no lock is needed.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field


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

    def on_batch(
        self, rows: int, queue_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """Called by the batcher for each executed batch (the BatchObserver protocol)."""
        members = len(queue_ns)
        self.queue.add(sum(queue_ns), members)
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

    def on_request(self, ok: bool, ns: int) -> None:
        (self.success if ok else self.fail).add(ns)
