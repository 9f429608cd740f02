"""What the batching policy knows from measurement: the cost of executing a batch (`CostModel`)
and the crowd a batch gathers under the current load (`CrowdEstimate`). Pure Python, no clock:
callers pass what they measured.

Work, not rows: a batch's cost grows with the elements it carries (`work_of`), so one row of a
500-token sequence and 500 rows of one token are told apart, while for fixed-shape models work is
rows times a constant.
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


def work_of(inputs: Mapping[str, np.ndarray]) -> int:
    """The work a request carries: its input elements (every dim, the batch dim included)."""
    return sum(a.size for a in inputs.values()) or 1


class CostModel:
    """Execution seconds by work, learned online: an exponentially weighted mean of (work,
    seconds) per power-of-two bucket of work, interpolated between buckets.

    Seconds are the engine's own time (measured inside the thread that ran the batch), never the
    hand-off to it, so a cheap batch is known to be cheap on any machine. A measurement counts
    at most `outlier` times its bucket's mean: one run that page-faulted or lost its caches (the
    forest's 40 µs one-row run read 300-600 µs of CPU now and then on a 2-core guest) moves the estimate by
    at most `alpha` * (`outlier` - 1), so it alone never sends a cheap model off the event loop
    for the batches after it, while a real slowdown is followed within a few batches (20 % a
    batch at the defaults; a faster run is never clipped). Below the smallest
    measurement the smallest measured time applies (fixed per-call costs dominate there); above
    the largest the time scales with the work, and `measured` says no: the policy never runs
    such a batch on the event loop, where a misjudged long execution would stall every RPC.

        cost = CostModel()
        cost.observe(work=30, seconds=40e-6)      # warm-ups seed it, every batch updates it
        cost.estimate(60), cost.measured(60)      # -> 80e-6 (scaled), False
    """

    def __init__(self, alpha: float = 0.2, outlier: float = 2.0) -> None:
        self._alpha = alpha
        self._outlier = outlier
        self._buckets: list[int] = []  # bucket ids (work.bit_length()), increasing
        self._works: list[float] = []  # each bucket's mean work: increasing too (buckets are disjoint)
        self._seconds: list[float] = []
        self._largest = 0  # the largest work measured

    def observe(self, work: int, seconds: float) -> None:
        bucket = work.bit_length()
        self._largest = max(self._largest, work)
        i = bisect.bisect_left(self._buckets, bucket)
        if i == len(self._buckets) or self._buckets[i] != bucket:
            self._buckets.insert(i, bucket)
            self._works.insert(i, float(work))
            self._seconds.insert(i, seconds)
            return
        self._works[i] += self._alpha * (work - self._works[i])
        mean = self._seconds[i]
        counted = min(seconds, self._outlier * mean) if mean > 0 else seconds
        self._seconds[i] = mean + self._alpha * (counted - mean)

    def measured(self, work: int) -> bool:
        """Whether a batch this large is within what has been measured (so `estimate` is an
        interpolation, not an extrapolation)."""
        return 0 < work <= self._largest

    def estimate(self, work: int) -> float:
        """Seconds to execute a batch of `work`; 0 with no measurement."""
        works, seconds = self._works, self._seconds
        if not works:
            return 0.0
        i = bisect.bisect_left(works, work)
        if i == 0:
            return seconds[0]
        if i == len(works):
            return seconds[-1] * work / works[-1]
        w_lo, w_hi = works[i - 1], works[i]
        return seconds[i - 1] + (seconds[i] - seconds[i - 1]) * (work - w_lo) / (w_hi - w_lo)


@dataclass(slots=True)
class CrowdEstimate:
    """How many rows a batch gathers within the configured delay, learned from recent batches.

    Triton waits the whole `max_queue_delay` unless the row limit or a preferred size is reached.
    On a lightly loaded server every request then pays the whole delay and gathers nobody; under
    steady load a batch waits on after its usual crowd is in. With no preferred sizes
    configured, the batcher instead stops a batch's wait once it holds the rows recent batches
    reached (`target`; requests queued beyond it still join, up to the row limit: see
    `policy._greedy`), and now and then lets a batch wait the whole delay (a probe) so that a rising
    load is noticed: every `probe_every` batches, doubling up to `probe_max` while probes find
    nobody (a quiet server pays for almost none). The delay stays the bound on every wait.
    """

    alpha: float = 0.2
    probe_every: int = 256
    probe_max: int = 4096
    rows: float | None = None  # moving average of batch rows; None until a batch has run
    since_probe: int = 0
    interval: int = field(init=False)  # batches between probes now

    def __post_init__(self) -> None:
        self.interval = self.probe_every

    def target(self) -> int | None:
        """Close a batch at this many rows; None = wait the whole delay (no estimate, or a probe)."""
        if self.rows is None or self.since_probe >= self.interval:
            return None
        return max(1, round(self.rows))

    def observe(self, rows: int) -> None:
        """A batch of `rows` rows ran (in dispatch order, so the batch after a due probe is it).
        A batch that closed short of the target waited the whole delay for a crowd that did not
        come: the estimate drops to it at once, so a falling load costs one long wait, not many."""
        target = self.target()
        if self.rows is None or (target is not None and rows < target):
            self.rows = float(rows)
            if target is not None:
                self.since_probe += 1
            return
        if self.since_probe >= self.interval:
            self.since_probe = 0
            found = rows > 1
            self.interval = self.probe_every if found else min(2 * self.interval, self.probe_max)
        else:
            self.since_probe += 1
        self.rows += self.alpha * (rows - self.rows)


@dataclass(slots=True)
class LoneEstimate:
    """Whether a lone request that would run on the event loop runs at once, inside `submit`, or
    waits for the end of this loop iteration so that requests decoded meanwhile join its batch.

    Waiting costs the request two loop turns (a scheduled pump and its future's wake-up: about
    50 µs of the loop's time per request on a 2-core guest) and buys nothing when nobody joins:
    at low concurrency, or when requests arrive one per loop turn. So it is learned from the
    batches the pump forms for callers: after `settle` of them in a row held one request, a lone
    request runs at once, except one in `probe_every` that waits as before (a probe: under rising
    load, the requests decoded behind it join it); any pumped batch of more than one request
    switches waiting back on. Pure: the driver reports batches and asks.
    """

    settle: int = 8
    probe_every: int = 64
    alone: int = 0  # pumped callers' batches in a row that held one request
    since_probe: int = 0

    def would_run_now(self) -> bool:
        """What `run_now` will answer, without counting the request (a peek: the driver asks
        before it commits to running a request outside `submit`)."""
        return self.alone >= self.settle and self.since_probe + 1 < self.probe_every

    def run_now(self) -> bool:
        """Whether this lone request runs at once (asked only for one that would run inline)."""
        if self.alone < self.settle:
            return False
        self.since_probe += 1
        if self.since_probe >= self.probe_every:
            self.since_probe = 0
            return False
        return True

    def observe(self, requests: int) -> None:
        """The pump started a callers' batch of `requests` requests."""
        self.alone = self.alone + 1 if requests == 1 else 0
