"""The batching policy as a pure step function: given the queue, `now`, the measured costs and the
free instances, `decide` answers what happens next — which items expire or are dropped, which
group runs now and where (inline on the event loop, or on an instance's worker thread), or how
long to wait. No event loop, no clock, no I/O: tested with explicit times.

Every outcome of batching is one of `decide`'s answers, including the one for a lone request on
an idle batcher (the driver asks `decide` about a queue of one before queueing it).
"""
from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Arrays = Mapping[str, np.ndarray]

# The priority of the server's own work (an explanation's perturbed rows): its requests rank
# after every caller's, so explanations never starve predictions.
BACKGROUND = -1
BACKGROUND_LEVEL = 1 << 20


@dataclass(slots=True)
class RequestTiming:
    """Wall-clock nanoseconds of a request's phases in the batcher, filled in by the driver when
    the caller asks (a traced request): queued, its batch started, its batch finished."""

    queued_ns: int = 0
    started_ns: int = 0
    finished_ns: int = 0


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One caller's request as the batcher sees it.

    `deadline_s` is absolute on the batcher's clock (None = no deadline). `priority` 0 means the
    model's default level, `BACKGROUND` after everything else. `timeout_us` is the caller's queue timeout (Triton's `timeout`
    parameter); it may only shorten the policy's timeout, and only where the policy allows."""

    inputs: Arrays
    rows: int
    key: Hashable | None = None  # None: derived from the inputs (`compatibility_key`) if it queues
    deadline_s: float | None = None
    priority: int = 0
    timeout_us: int | None = None
    timing: RequestTiming | None = None  # filled in by the driver when given


@dataclass(slots=True, eq=False)
class QueuedItem:
    """A request in the queue: its level (1 = highest priority), arrival time, REJECT/DELAY queue
    timeout, compatibility key (requests of one key may share a batch) and work (input
    elements: what the cost model is keyed by)."""

    request: BatchRequest
    future: asyncio.Future[Arrays]
    seq: int
    level: int
    enqueued_s: float
    timeout_at_s: float | None
    delay_on_timeout: bool
    key: Hashable
    work: int
    length: int = 0  # the padded axis' length (padded batching); 0 = the model does not pad

    @property
    def rows(self) -> int:
        return self.request.rows


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The parts of the batching configuration that `decide` needs. `max_batch_rows` 0 means
    batching is off: every request is a batch of its own. A batch estimated to execute in less
    than `inline_below_s` runs on the event loop (a thread hand-off would cost more)."""

    max_batch_rows: int
    max_queue_delay_s: float = 0.0
    preferred_rows: tuple[int, ...] = ()
    inline_below_s: float = 100e-6


class CostEstimate(Protocol):
    """The measured cost of executing work (see `estimators.CostModel`)."""

    def estimate(self, work: int) -> float: ...

    def measured(self, work: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What the driver does next: fail `expire` with DeadlineExceeded, forget `drop` (cancelled),
    run `run` as one batch — on the event loop if `inline`, else on a free instance — then wait
    at most `wait_s` (None = until something arrives or finishes)."""

    run: tuple[QueuedItem, ...] = ()
    inline: bool = False
    expire: tuple[QueuedItem, ...] = ()
    drop: tuple[QueuedItem, ...] = ()
    wait_s: float | None = None


WAIT = Decision()


def compatibility_key(inputs: Arrays, batched: bool, padded: Mapping[str, int] | None = None) -> Hashable:
    """Requests share a batch only if input names, dtypes and non-batch dims all match — except
    a padded axis (`padded`: input -> axis), whose length may differ."""
    def dims(name: str, a: np.ndarray) -> tuple[int, ...]:
        shape = a.shape
        if padded and name in padded:
            axis = padded[name]
            shape = shape[:axis] + (-1,) + shape[axis + 1 :]
        return shape[1:] if batched else shape

    return tuple((name, a.dtype.str, dims(name, a)) for name, a in sorted(inputs.items()))


def batch_work(batch: Sequence[QueuedItem]) -> int:
    """The work a batch carries as executed: with padding, every member at the longest length."""
    longest = max((it.length for it in batch), default=0)
    if not longest:
        return sum(it.work for it in batch)
    return round(sum(it.work * longest / it.length for it in batch))


def runs_inline(work: int, cfg: PolicyConfig, cost: CostEstimate) -> bool:
    """Cheap enough for the event loop: measured work (never an extrapolation) below the bound."""
    return cost.measured(work) and cost.estimate(work) < cfg.inline_below_s


def _rank(item: QueuedItem, now: float) -> tuple[bool, int, int]:
    delayed = item.delay_on_timeout and item.timeout_at_s is not None and item.timeout_at_s <= now
    return (delayed, item.level, item.seq)


def _must_expire(item: QueuedItem, now: float, cost: CostEstimate) -> bool:
    deadline = item.request.deadline_s
    if deadline is not None and now + cost.estimate(item.work) > deadline:
        return True
    return (not item.delay_on_timeout) and item.timeout_at_s is not None and item.timeout_at_s <= now


def _start_by(item: QueuedItem, batch_work: int, cost: CostEstimate) -> float:
    """When `item` must start at the latest, in a batch of `batch_work`."""
    latest = float("inf")
    deadline = item.request.deadline_s
    if deadline is not None:
        latest = deadline - cost.estimate(batch_work)
    if not item.delay_on_timeout and item.timeout_at_s is not None:
        latest = min(latest, item.timeout_at_s)
    return latest


def _greedy(members: Sequence[QueuedItem], cfg: PolicyConfig, close_at: int) -> tuple[list[QueuedItem], bool]:
    """Ranked members up to the row limit, and whether the batch is full (the row limit, the
    largest preferred size, or the learned crowd is reached)."""
    limit = cfg.max_batch_rows
    batch: list[QueuedItem] = []
    rows = 0
    for item in members:  # background rows never lengthen a caller's batch
        if item.level == BACKGROUND_LEVEL:
            break
        if rows + item.rows > limit:
            return batch, True
        batch.append(item)
        rows += item.rows
        if close_at and rows >= close_at:
            return batch, True
    return batch, rows >= limit


def _cost_per_work(batch: Sequence[QueuedItem], cost: CostEstimate) -> float:
    """Estimated seconds per element of real (unpadded) work."""
    return cost.estimate(batch_work(batch)) / max(1, sum(it.work for it in batch))


def _candidate(members: list[QueuedItem], cfg: PolicyConfig, close_at: int,
               cost: CostEstimate) -> tuple[list[QueuedItem], bool]:
    """The batch this group would run now and whether the group is full.

    Padded models: the batch padded to its longest member, or only the members of the oldest
    one's length bucket (lengths within the same power of two), whichever the cost model says
    costs less per element of real work (the bucket's estimate an interpolation of measured
    batches; the padded batch's may scale past them, as its padding is real work): one long note
    does not pad a whole batch of short ones when that costs more than running them apart."""
    if members[0].level == BACKGROUND_LEVEL:  # background parts are sized to run briefly: one at a time
        return members[:1], True
    batch, full = _greedy(members, cfg, close_at)
    head = batch[0].length if batch else 0
    if head and len(batch) > 1:
        bucket = (head - 1).bit_length()  # lengths in (2^(b-1), 2^b] share bucket b
        alone, _ = _greedy([it for it in members if (it.length - 1).bit_length() == bucket], cfg, close_at)
        if (len(alone) < len(batch) and cost.measured(batch_work(alone))
                and _cost_per_work(alone, cost) < _cost_per_work(batch, cost)):
            return alone, full
    return batch, full


def decide(
    queue: Sequence[QueuedItem],
    now: float,
    cfg: PolicyConfig,
    cost: CostEstimate,
    free_slots: int,
    close_at_rows: int | None = None,
    background_in_flight: int = 0,
) -> Decision:
    """Pure batching policy (see the package docstring for the contract). `close_at_rows` is the
    crowd a batch closes at when no preferred sizes are configured (None: wait for the row
    limit or the delay). `free_slots` counts the instances no caller's batch holds; of those,
    `background_in_flight` run background parts: a caller's batch may start beside one (a
    caller never waits behind the server's own work), a background part only on a truly free
    instance."""
    expire: list[QueuedItem] = []
    drop: list[QueuedItem] = []
    live: list[QueuedItem] = []
    for item in queue:
        if item.future.done():  # cancelled by the caller (or resolved by a stop)
            drop.append(item)
        elif _must_expire(item, now, cost):
            expire.append(item)
        else:
            live.append(item)
    if not live:
        return Decision(expire=tuple(expire), drop=tuple(drop)) if expire or drop else WAIT

    # The queue is in arrival order; only priorities or delayed timeouts reorder it.
    first_level = live[0].level
    if any(it.level != first_level or it.delay_on_timeout for it in live):
        live.sort(key=lambda it: _rank(it, now))
    groups: dict[Hashable, list[QueuedItem]] = {}
    for item in live:
        groups.setdefault(item.key, []).append(item)

    close_at = cfg.preferred_rows[-1] if cfg.preferred_rows else (close_at_rows or 0)
    best: tuple[tuple[bool, int, int], list[QueuedItem]] | None = None
    wake_at = float("inf")
    for members in groups.values():
        if cfg.max_batch_rows <= 0:  # batching off: the best-ranked request runs alone, now
            batch, ready_at = members[:1], now
        else:
            batch, full = _candidate(members, cfg, close_at, cost)
            work = batch_work(batch)
            oldest = min(it.enqueued_s for it in batch)
            ready_at = now if full else oldest + cfg.max_queue_delay_s
            for it in batch:
                ready_at = min(ready_at, _start_by(it, work, cost))
        if ready_at <= now:
            rank = _rank(batch[0], now)
            if best is None or rank < best[0]:
                best = (rank, batch)
        else:
            wake_at = min(wake_at, ready_at)

    if best is not None and best[1][0].level == BACKGROUND_LEVEL and free_slots - background_in_flight <= 0:
        best = None  # a background part waits for a truly free instance (a finished batch pumps)
    if best is not None and free_slots > 0:
        work = batch_work(best[1])
        return Decision(run=tuple(best[1]), inline=runs_inline(work, cfg, cost), expire=tuple(expire),
                        drop=tuple(drop))
    if free_slots <= 0:
        # Nothing can run; wake only to expire what will miss its deadline meanwhile.
        wake_at = min((_start_by(it, it.work, cost) for it in live), default=float("inf"))
    wait = None if wake_at == float("inf") else max(0.0, wake_at - now)
    return Decision(expire=tuple(expire), drop=tuple(drop), wait_s=wait)
