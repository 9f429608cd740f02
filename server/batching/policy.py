"""The batching policy as pure functions: no event loop, no clock, no futures, no I/O; each
tested with explicit times.

`admit` answers a request's arrival: refused (and why: queue full with a retry hint, a deadline
that cannot be met, a priority out of range, too many rows), or accepted as queue items (the
request, or its parts when it is split), which run at once on an idle batcher or are queued.
`runs_at_once` says ahead of `admit` whether it would run a request inline at once on an idle
batcher (the driver then runs it without a queue item). `decide` answers what happens next to
the queue: which items expire or are dropped (the driver hands it those the callers cancelled),
which group runs now and where (inline on the event loop, or on an instance's worker thread), or
how long to wait. `releasable` says which finished batches may hand their results back
(`preserve_ordering`).

Every outcome of batching is one of these answers; the driver (`driver.py`) only applies them
to its queue, timer, executors and futures.
"""
from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import numpy as np

from ..config import BatchingConfig, QueuePolicy, TimeoutAction
from ..errors import DeadlineExceeded, InvalidInput, QueueFull
from .estimators import work_of
from .execute import split_rows

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


@dataclass(slots=True)
class BatchRequest:
    """One caller's request as the batcher sees it (not frozen: made per request, and a frozen
    dataclass's __init__ costs twice as much; nothing writes to it).

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
    elements: what the cost model is keyed by). Its future is the driver's, never the policy's
    (items compare and hash by identity: the driver maps them to their futures)."""

    request: BatchRequest
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


def has_slot(level: int, free_slots: int, background_in_flight: int) -> bool:
    """Whether a batch of `level` could start now. `free_slots` counts the instances no caller's
    batch holds; a caller's batch needs one (it starts beside a running background part: a
    caller never waits behind the server's own work), a background part a truly free one."""
    if level == BACKGROUND_LEVEL:
        return free_slots - background_in_flight > 0
    return free_slots > 0


def _rank(item: QueuedItem, now: float) -> tuple[bool, int, int]:
    delayed = item.delay_on_timeout and item.timeout_at_s is not None and item.timeout_at_s <= now
    return (delayed, item.level, item.seq)


def _misses_deadline(deadline: float, work: int, now: float, cost: CostEstimate) -> bool:
    """Whether work started now would finish after `deadline` (the rule for refusing a request at
    arrival and for expiring it in the queue)."""
    return now + cost.estimate(work) > deadline


def _must_expire(item: QueuedItem, now: float, cost: CostEstimate) -> bool:
    deadline = item.request.deadline_s
    if deadline is not None and _misses_deadline(deadline, item.work, now, cost):
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
    """Ranked members up to the row limit (up to the largest preferred size, where configured),
    and whether the batch is full (that limit, or the learned crowd, is reached). The learned
    crowd only ends the wait: members already queued beyond it join the batch, since a queue
    longer than the crowd is a rising load, and a batch cut at the crowd would leave the rest to
    wait the whole delay for a crowd of their own."""
    limit = cfg.max_batch_rows
    capped = bool(cfg.preferred_rows)
    batch: list[QueuedItem] = []
    rows = 0
    for item in members:  # background rows never lengthen a caller's batch
        if item.level == BACKGROUND_LEVEL:
            break
        if rows + item.rows > limit:
            return batch, True
        batch.append(item)
        rows += item.rows
        if capped and rows >= close_at:
            return batch, True
    return batch, rows >= limit or 0 < close_at <= rows


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
    cancelled: Collection[QueuedItem] = frozenset(),
) -> Decision:
    """Pure batching policy (see the package docstring for the contract). `close_at_rows` is the
    crowd a batch closes at when no preferred sizes are configured (None: wait for the row
    limit or the delay). `free_slots` counts the instances no caller's batch holds; of those,
    `background_in_flight` run background parts (`has_slot`). `cancelled`: the queued items
    whose callers went away (or that a stop resolved); they are dropped, never run."""
    expire: list[QueuedItem] = []
    drop: list[QueuedItem] = []
    live: list[QueuedItem] = []
    for item in queue:
        if cancelled and item in cancelled:
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

    # A ready batch runs if an instance can take it (a background part may wait for a truly free
    # one: the end of a batch pumps).
    if best is not None and has_slot(best[1][0].level, free_slots, background_in_flight):
        work = batch_work(best[1])
        return Decision(run=tuple(best[1]), inline=runs_inline(work, cfg, cost), expire=tuple(expire),
                        drop=tuple(drop))
    if free_slots <= 0:
        # Nothing can run; wake only to expire what will miss its deadline meanwhile.
        wake_at = min((_start_by(it, it.work, cost) for it in live), default=float("inf"))
    wait = None if wake_at == float("inf") else max(0.0, wake_at - now)
    return Decision(expire=tuple(expire), drop=tuple(drop), wait_s=wait)


# -- admission ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """What `admit` needs of a batcher's configuration, derived once (`BatcherConfig.admission`).

    `batching` None = dynamic batching off (one level, the default queue policy). `split_rows` > 0:
    a caller's request of more rows is queued as parts of at most that many. `batched`: requests
    carry a batch dim (their key ignores it). `padded_axes`: input -> the axis padded batching pads."""

    name: str  # "'sepsis' version 3", for messages
    policy: PolicyConfig
    batching: BatchingConfig | None = None
    instances: int = 1
    max_queue_size: int = 4096
    split_rows: int = 0
    batched: bool = False
    padded_axes: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Snapshot:
    """The batcher as admission sees it when a request arrives: the queue (arrival order), the
    queued items per level, the instances no caller's batch holds and how many of those run
    background parts, the learned crowd (`decide`'s `close_at_rows`) and the next sequence number.
    `admit` only reads it (not frozen: one is made per request, and a frozen one costs more)."""

    queue: Sequence[QueuedItem] = ()
    level_counts: Mapping[int, int] = field(default_factory=dict)
    free_slots: int = 1
    background_in_flight: int = 0
    close_at_rows: int | None = None
    next_seq: int = 0


@dataclass(slots=True)
class Admit:
    """Accepted: `items` (the request, or its parts in order) are the driver's to give futures.
    `run` set: a lone request on an idle batcher runs now as this decision, without a trip
    through the queue; if `deferrable`, the driver may instead queue it with a pump (see
    `estimators.LoneEstimate`). Otherwise the items are queued, and `pump` says a batch of their level
    could start now (else the end of a running batch pumps). Made per request: not frozen."""

    items: tuple[QueuedItem, ...]
    run: Decision | None = None
    pump: bool = False
    deferrable: bool = False  # `run` is an inline batch of a lone request: the driver may queue it instead


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refused at arrival with the error the caller gets; nothing was queued or run."""

    error: InvalidInput | DeadlineExceeded | QueueFull


def admit(snapshot: Snapshot, request: BatchRequest, now: float, config: AdmissionConfig,
          cost: CostEstimate) -> Admit | Refuse:
    """A request's arrival (see the package docstring for the refusals). Checked in this order:
    rows (a caller's request over `split_rows` is split instead), priority, deadline (refused if
    it would be missed even if the request ran now), the padded inputs' length; then an idle
    batcher asks `decide` about the request alone (run now), except one that would run inline on
    a batching model: that is `deferrable` (the driver runs it now or queues it so that requests
    decoded meanwhile join it), or queued outright where preferred sizes and a delay say to wait
    for company; else there must be room in the queue."""
    try:
        if 0 < config.split_rows < request.rows and request.priority != BACKGROUND:
            return _admit_parts(snapshot, request, now, config, cost)
        return _admit_one(snapshot, request, now, config, cost)
    except (InvalidInput, DeadlineExceeded, QueueFull) as error:
        return Refuse(error)


def _admit_one(snapshot: Snapshot, request: BatchRequest, now: float, config: AdmissionConfig,
               cost: CostEstimate) -> Admit:
    limit = config.policy.max_batch_rows
    if limit > 0 and request.rows > limit and request.priority != BACKGROUND:  # a background part runs in chunks
        raise InvalidInput(f"model {config.name}: request has {request.rows} rows, more than max_batch_size {limit}")
    level, queue_policy = queue_level(request.priority, config)
    work = work_of(request.inputs)
    _check_deadline(request, work, now, config.name, cost)
    item = _item(request, snapshot.next_seq, level, queue_policy, now, work, config)
    free, background = snapshot.free_slots, snapshot.background_in_flight
    slot = has_slot(level, free, background)
    if slot and not snapshot.queue:
        # A lone request that would run inline on a batching model is not asked about (its
        # batch is itself: `decide` would answer inline); the driver runs it now or queues it
        # so that requests decoded meanwhile join it (an empty queue has room for one).
        if limit > 0 and runs_inline(work, config.policy, cost):
            if waits_for_company(config.policy):
                return Admit((item,), None, pump=True)
            return Admit((item,), Decision(run=(item,), inline=True), deferrable=True)
        decision = decide((item,), now, config.policy, cost, free, snapshot.close_at_rows, background)
        if decision.run and (not decision.inline or limit <= 0):
            return Admit((item,), decision)
    _check_room(snapshot, level, queue_policy, 1, config, cost)
    return Admit((item,), None, slot)


def waits_for_company(policy: PolicyConfig) -> bool:
    """Configured to wait for requests to join a lone one (preferred sizes and a queue delay)."""
    return bool(policy.preferred_rows) and policy.max_queue_delay_s > 0


def runs_at_once(request: BatchRequest, work: int, now: float, config: AdmissionConfig, cost: CostEstimate) -> bool:
    """Whether `admit` would let this request run inline at once on an idle batcher (nothing
    queued, nothing in flight): a caller's request of the default priority, within the batch
    limit and unsplit, cheap enough for the event loop, on a model that neither pads nor waits
    for company, whose deadline (if any) can be met. `admit` answers such a request with a
    deferrable inline run; asking this first lets the driver run it without a queue item or a
    future (`Batcher.run_now`). False: `admit` decides, refusals included."""
    policy = config.policy
    return (request.priority == 0 and 0 < request.rows <= policy.max_batch_rows
            and not 0 < config.split_rows < request.rows and not config.padded_axes
            and runs_inline(work, policy, cost) and not waits_for_company(policy)
            and (request.deadline_s is None or not _misses_deadline(request.deadline_s, work, now, cost)))


def _admit_parts(snapshot: Snapshot, request: BatchRequest, now: float, config: AdmissionConfig,
                 cost: CostEstimate) -> Admit:
    """An oversized request as parts of at most `split_rows` rows, queued together in order; it
    needs room for all of them (and is refused if the queue could never hold them)."""
    level, queue_policy = queue_level(request.priority, config)
    # The count is checked before any part is made: a request of 2**40 rows of zero elements
    # passes every byte limit, and its parts alone would fill the memory.
    _check_fits(queue_policy, -(-request.rows // config.split_rows), config, request.rows)
    parts = [replace(request, inputs=p, rows=r) for p, r in split_rows(request.inputs, request.rows, config.split_rows)]
    works = [work_of(p.inputs) for p in parts]
    _check_deadline(parts[0], works[0], now, config.name, cost)
    _check_room(snapshot, level, queue_policy, len(parts), config, cost, request.rows)
    items = tuple(_item(p, snapshot.next_seq + i, level, queue_policy, now, w, config)
                  for i, (p, w) in enumerate(zip(parts, works, strict=True)))
    return Admit(items, pump=has_slot(level, snapshot.free_slots, snapshot.background_in_flight))


def queue_level(priority: int, config: AdmissionConfig) -> tuple[int, QueuePolicy]:
    """A request's priority as its queue level (1 = highest) and that level's queue policy.
    Priority 0 is the model's default level; `BACKGROUND` ranks after every caller's level."""
    cfg = config.batching
    if priority == BACKGROUND:
        return BACKGROUND_LEVEL, cfg.default_queue_policy if cfg is not None else QueuePolicy()
    if cfg is None:
        return 0, QueuePolicy()
    levels = cfg.priority_levels
    if levels <= 0:
        return 0, cfg.default_queue_policy
    if priority == 0:
        level = cfg.default_priority_level or levels
    elif priority > levels:
        raise InvalidInput(f"model {config.name}: priority {priority} out of range, expected 1..{levels} (0 = default)")
    else:
        level = priority
    return level, cfg.policy_for(level)


def queue_timeout_us(request: BatchRequest, policy: QueuePolicy) -> int:
    """The request's queue timeout (0 = none): the policy's, which the caller's own `timeout_us`
    may only shorten, and only where the policy allows an override."""
    timeout_us = policy.default_timeout_us
    if request.timeout_us and policy.allow_timeout_override:
        timeout_us = min(timeout_us, request.timeout_us) if timeout_us else request.timeout_us
    return timeout_us


def retry_after_s(queue: Sequence[QueuedItem], cost: CostEstimate, instances: int) -> float:
    """The hint a queue-full refusal carries: about the time the instances need to work off what
    is queued (estimated from at most 64 queued items), between 1 ms and 1 s."""
    sample = queue[:64]
    queued_s = sum(cost.estimate(it.work) for it in sample) * len(queue) / max(1, len(sample)) / max(1, instances)
    return min(1.0, max(0.001, queued_s))


def _check_deadline(request: BatchRequest, work: int, now: float, name: str, cost: CostEstimate) -> None:
    """Refuse a request that would miss its deadline even if it ran now (`decide` would expire it)."""
    deadline = request.deadline_s
    if deadline is not None and _misses_deadline(deadline, work, now, cost):
        estimate = cost.estimate(work)
        raise DeadlineExceeded(
            f"model {name}: deadline cannot be met (estimated execution {estimate * 1e3:.3f} ms, "
            f"time left {max(0.0, deadline - now) * 1e3:.3f} ms); request not executed"
        )


def _check_room(snapshot: Snapshot, level: int, policy: QueuePolicy, items: int, config: AdmissionConfig,
                cost: CostEstimate, rows: int = 0) -> None:
    """Refuse `items` queue entries that do not fit now (QueueFull) or never can (InvalidInput)."""
    _check_fits(policy, items, config, rows)
    server_cap = config.max_queue_size
    level_limit = policy.max_queue_size  # 0: only the server-wide cap (>= 1) applies
    cap = min(server_cap, level_limit or server_cap)
    queue = snapshot.queue
    if len(queue) + items > server_cap or (level_limit and snapshot.level_counts.get(level, 0) + items > level_limit):
        raise QueueFull(f"model {config.name}: queue full ({cap} requests queued); retry later",
                        retry_after_s=retry_after_s(queue, cost, config.instances))


def _check_fits(policy: QueuePolicy, items: int, config: AdmissionConfig, rows: int) -> None:
    """Refuse `items` queue entries that the queue could never hold (InvalidInput)."""
    cap = min(config.max_queue_size, policy.max_queue_size or config.max_queue_size)
    if items > cap:
        raise InvalidInput(
            f"model {config.name}: request has {rows} rows, {items} parts of at most max_batch_size "
            f"{config.split_rows}; the queue holds at most {cap} (send at most {cap * config.split_rows} rows)"
        )


def _item(request: BatchRequest, seq: int, level: int, policy: QueuePolicy, now: float, work: int,
          config: AdmissionConfig) -> QueuedItem:
    timeout_us = queue_timeout_us(request, policy)
    padded = config.padded_axes
    return QueuedItem(
        request=request,
        seq=seq,
        level=level,
        enqueued_s=now,
        timeout_at_s=now + timeout_us / 1e6 if timeout_us else None,
        delay_on_timeout=policy.timeout_action is TimeoutAction.DELAY,
        key=request.key if request.key is not None else compatibility_key(request.inputs, config.batched, padded),
        work=work,
        length=_length(request, padded, config.name) if padded else 0,
    )


def _length(request: BatchRequest, padded_axes: Mapping[str, int], name: str) -> int:
    """The request's length along the padded axis (every padded input must agree)."""
    lengths = {n: request.inputs[n].shape[axis] for n, axis in padded_axes.items() if n in request.inputs}
    if len(set(lengths.values())) > 1:
        raise InvalidInput(f"model {name}: the padded inputs disagree on their length: {lengths}")
    return max(1, next(iter(lengths.values()), 1))


# -- releasing results ----------------------------------------------------------------------------


class Flight(Protocol):
    """A dispatched batch as `releasable` sees it."""

    @property
    def finished(self) -> bool: ...

    @property
    def background(self) -> bool: ...


F = TypeVar("F", bound=Flight)


def releasable(flights: Sequence[F], ordered: bool) -> list[F]:
    """The finished batches (of `flights`, in dispatch order) whose results may be handed back now:
    all of them; with `preserve_ordering` (`ordered`), only those that no caller's batch
    dispatched before and still running holds back. Ordering is among callers' batches only: a
    background part neither waits nor holds anyone back."""
    ready: list[F] = []
    blocked = False
    for flight in flights:
        if not flight.finished:
            blocked = blocked or (ordered and not flight.background)
        elif flight.background or not blocked:
            ready.append(flight)
    return ready
