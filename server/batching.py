"""Dynamic batching for one model version. Knows numpy and the standard library, nothing of
protobuf or gRPC.

What a batch is: requests whose inputs have the same names, datatypes and non-batch dims (their
`key`), concatenated along dim 0. A batch never holds more than `max_batch_rows` rows (the sum of
dim 0, Triton's `max_batch_size`). A single request of more than `split_rows` rows (the model's
`max_batch_size`) is split into parts of at most that many rows, queued together in order (each
part may share a batch with other requests); its outputs are joined in order, and it fails as a
whole, with the first error of any part, if any part fails.

Groups without head-of-line blocking: every key has its own group and its own delay clock, so a
request of another shape never closes or delays the batch that is forming.

When a batch closes (`decide`, a pure function of the queue and `now`), as soon as an instance is
free and, for one group, any of:
  * the rows waiting reach `max_batch_rows` or the largest preferred batch size;
  * the oldest member has waited `max_queue_delay_us` (0 = run at once: batches still grow while
    every instance is busy, which is where most batching comes from);
  * with a delay but no preferred sizes configured: the group holds as many rows as recent
    batches reached (`CrowdEstimate`; now and then a batch waits the whole delay to notice
    rising load). A lone request on a quiet server is then not held back for company that never comes,
    and under load a batch closes when its usual crowd is in rather than when the delay ends;
  * waiting longer would make a member miss its deadline, given the measured cost of executing a
    batch of that size (`CostModel`), or its queue-policy timeout would pass.
Among ready groups the one whose best member has the highest priority (level 1 first), then the
earliest arrival, runs first. Requests whose queue timeout passed under `timeout_action: DELAY`
rank after all others.

Worst-case queueing delay for a request while an instance is free: `max_queue_delay_us`; while
all instances are busy it also waits for one to finish (bounded by its deadline).

Where a batch runs: on a worker thread of `executor` (onnxruntime releases the GIL), except a
batch whose measured cost is under `inline_below_s` (100 µs), which runs on the event loop
itself: the thread hand-off would cost more than the execution. A lone such request on an idle
batcher with no queue delay skips the queue and the driver altogether — the policy's own
answer ("run it now, alone") without the round trips. While an instance is busy, requests
queue and batch as described above.

Ordering: FIFO within a priority level and key. With `preserve_ordering`, batches release their
results in the order they were dispatched.

Refusals at `submit`: queue full (`QueueFull`, naming the model and the limit; a split request
needs room for all its parts); a deadline that cannot be met even if the request ran now
(`DeadlineExceeded`, never executed); a split request with more parts than the queue can ever
hold (`InvalidInput`). Before a batch runs, expired requests fail with `DeadlineExceeded` and cancelled
ones are dropped; neither ever runs. If a batch fails, it is bisected and re-run so only the
requests that cause the failure fail. Every future is resolved exactly once on every path.
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .config import BatchingConfig, QueuePolicy, TimeoutAction
from .errors import DeadlineExceeded, ExecutionError, InvalidInput, ModelNotReady, QueueFull

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Arrays = Mapping[str, np.ndarray]


class Runner(Protocol):
    """Executes one batch: input name -> array in, output name -> array out. Called in a worker
    thread; onnxruntime releases the GIL while it runs."""

    def __call__(self, inputs: Arrays) -> Arrays: ...


class BatchObserver(Protocol):
    """Receives what happened to each executed batch (statistics)."""

    def on_batch(
        self, rows: int, queue_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One caller's request as the batcher sees it.

    `deadline_s` is absolute on the batcher's clock (None = no deadline). `priority` 0 means the
    model's default level. `timeout_us` is the caller's queue timeout (Triton's `timeout`
    parameter); it may only shorten the policy's timeout, and only where the policy allows."""

    inputs: Arrays
    rows: int
    key: Hashable | None = None  # None: derived from the inputs (`compatibility_key`) if it queues
    deadline_s: float | None = None
    priority: int = 0
    timeout_us: int | None = None


@dataclass(slots=True, eq=False)
class QueuedItem:
    """A request in the queue. `start_by_s` is when it must start running at the latest (its
    deadline less the estimated execution time, or its REJECT queue timeout)."""

    request: BatchRequest
    future: asyncio.Future[Arrays]
    seq: int
    level: int
    enqueued_s: float
    timeout_at_s: float | None
    delay_on_timeout: bool
    key: Hashable = None  # the compatibility key: requests of one key may share a batch

    @property
    def rows(self) -> int:
        return self.request.rows


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The parts of the batching configuration that `decide` needs. `max_batch_rows` 0 means
    batching is off: every request is a batch of its own."""

    max_batch_rows: int
    max_queue_delay_s: float = 0.0
    preferred_rows: tuple[int, ...] = ()

    @classmethod
    def from_batching(cls, cfg: BatchingConfig | None) -> PolicyConfig:
        if cfg is None:
            return cls(max_batch_rows=0)
        return cls(
            max_batch_rows=cfg.max_batch_rows,
            max_queue_delay_s=cfg.max_queue_delay_us / 1e6,
            preferred_rows=tuple(sorted(p for p in cfg.preferred_batch_sizes if p > 0)),
        )


@dataclass(slots=True)
class CrowdEstimate:
    """How many rows a batch gathers within the configured delay, learned from recent batches.

    Triton waits the whole `max_queue_delay` unless the row limit or a preferred size is reached.
    On a lightly loaded server every request then pays the whole delay and gathers nobody; under
    steady load a batch waits on after its usual crowd is in. With no preferred sizes
    configured, the batcher instead closes a batch once it holds the rows recent batches reached
    (`target`), and now and then lets a batch wait the whole delay (a probe) so that a rising
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


@dataclass(frozen=True, slots=True)
class Decision:
    """What the driver does next: fail `expire` with DeadlineExceeded, forget `drop` (cancelled),
    run `run` as one batch (in that order), then wait at most `wait_s` (None = until an event)."""

    run: tuple[QueuedItem, ...] = ()
    expire: tuple[QueuedItem, ...] = ()
    drop: tuple[QueuedItem, ...] = ()
    wait_s: float | None = None


class CostModel:
    """Measured execution time per batch size (exponentially weighted), used to refuse requests
    that cannot meet their deadline and to close batches before a member would miss it."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._sizes: list[int] = []
        self._seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        old = self._seconds.get(rows)
        if old is None:
            bisect.insort(self._sizes, rows)
            self._seconds[rows] = seconds
        else:
            self._seconds[rows] = old + self._alpha * (seconds - old)

    def estimate(self, rows: int) -> float:
        """Seconds to execute `rows` rows: interpolated between measured sizes, scaled linearly
        past the largest, the smallest measurement below it; 0 with no measurement."""
        sizes = self._sizes
        if not sizes:
            return 0.0
        exact = self._seconds.get(rows)
        if exact is not None:
            return exact
        i = bisect.bisect_left(sizes, rows)
        if i == 0:
            return self._seconds[sizes[0]]
        if i == len(sizes):
            top = sizes[-1]
            return self._seconds[top] * rows / top
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = self._seconds[lo], self._seconds[hi]
        return t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)


def compatibility_key(inputs: Arrays, batched: bool) -> Hashable:
    """Requests share a batch only if input names, dtypes and non-batch dims all match."""
    return tuple((name, a.dtype.str, a.shape[1:] if batched else a.shape) for name, a in sorted(inputs.items()))


def _rank(item: QueuedItem, now: float) -> tuple[bool, int, int]:
    delayed = item.delay_on_timeout and item.timeout_at_s is not None and item.timeout_at_s <= now
    return (delayed, item.level, item.seq)


def _must_expire(item: QueuedItem, now: float, estimate: Callable[[int], float]) -> bool:
    deadline = item.request.deadline_s
    if deadline is not None and now + estimate(item.rows) > deadline:
        return True
    return (not item.delay_on_timeout) and item.timeout_at_s is not None and item.timeout_at_s <= now


def _start_by(item: QueuedItem, batch_rows: int, estimate: Callable[[int], float]) -> float:
    latest = float("inf")
    deadline = item.request.deadline_s
    if deadline is not None:
        latest = deadline - estimate(batch_rows)
    if not item.delay_on_timeout and item.timeout_at_s is not None:
        latest = min(latest, item.timeout_at_s)
    return latest


def _candidate(members: list[QueuedItem], cfg: PolicyConfig) -> tuple[list[QueuedItem], bool]:
    """The batch this group would run now (ranked members, up to the row limit) and whether it
    is full (the row limit or the largest preferred size is reached)."""
    limit = cfg.max_batch_rows
    preferred_top = cfg.preferred_rows[-1] if cfg.preferred_rows else 0
    batch: list[QueuedItem] = []
    rows = 0
    for item in members:
        if rows + item.rows > limit:
            return batch, True
        batch.append(item)
        rows += item.rows
        if preferred_top and rows >= preferred_top:
            return batch, True
    return batch, rows >= limit


def decide(
    queue: Sequence[QueuedItem],
    now: float,
    cfg: PolicyConfig,
    estimate: Callable[[int], float],
    free_slots: int,
) -> Decision:
    """Pure batching policy: which items expire or are dropped, which batch runs now (only if an
    instance is free), and otherwise how long to wait before something changes."""
    expire: list[QueuedItem] = []
    drop: list[QueuedItem] = []
    live: list[QueuedItem] = []
    for item in queue:
        if item.future.done():  # cancelled by the caller (or resolved by a stop)
            drop.append(item)
        elif _must_expire(item, now, estimate):
            expire.append(item)
        else:
            live.append(item)
    if not live:
        return Decision(expire=tuple(expire), drop=tuple(drop))

    # The queue is in arrival order; only priorities or delayed timeouts reorder it.
    first_level = live[0].level
    if any(it.level != first_level or it.delay_on_timeout for it in live):
        live.sort(key=lambda it: _rank(it, now))
    groups: dict[Hashable, list[QueuedItem]] = {}
    for item in live:
        groups.setdefault(item.key, []).append(item)

    best: tuple[tuple[bool, int, int], list[QueuedItem]] | None = None
    wake_at = float("inf")
    for members in groups.values():
        if cfg.max_batch_rows <= 0:  # batching off: the best-ranked request runs alone, now
            batch, ready_at = members[:1], now
        else:
            batch, full = _candidate(members, cfg)
            rows = sum(it.rows for it in batch)
            oldest = min(it.enqueued_s for it in batch)
            ready_at = now if full else oldest + cfg.max_queue_delay_s
            for it in batch:
                ready_at = min(ready_at, _start_by(it, rows, estimate))
        if ready_at <= now:
            rank = _rank(batch[0], now)
            if best is None or rank < best[0]:
                best = (rank, batch)
        else:
            wake_at = min(wake_at, ready_at)

    if best is not None and free_slots > 0:
        return Decision(run=tuple(best[1]), expire=tuple(expire), drop=tuple(drop))
    if free_slots <= 0:
        # Nothing can run; wake only to expire what will miss its deadline meanwhile.
        wake_at = min((_start_by(it, it.rows, estimate) for it in live), default=float("inf"))
    wait = None if wake_at == float("inf") else max(0.0, wake_at - now)
    return Decision(expire=tuple(expire), drop=tuple(drop), wait_s=wait)


def execution_failure(name: str, exc: Exception) -> ExecutionError:
    """A request's execution failure as its caller will see it: the runtime's summary (op type,
    status; never the engine's text), or for a bug in the runner its type, with the traceback
    logged under the correlation id the caller gets."""
    if isinstance(exc, ExecutionError):
        return ExecutionError(f"model {name}: {exc}", correlation_id=exc.correlation_id)
    error = ExecutionError(f"model {name}: execution failed: {type(exc).__name__}")
    log.error("model %s: runner failed [correlation id %s]", name, error.correlation_id, exc_info=exc)
    return error


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


def join_parts(
    futures: Sequence[asyncio.Future[Arrays]], rows: Sequence[int], name: str, loop: asyncio.AbstractEventLoop
) -> asyncio.Future[Arrays]:
    """One future for a split request: its parts' outputs joined in order, or the first error of
    any part (the other parts are then cancelled: the driver drops them unexecuted). Cancelling
    it cancels every part."""
    joined: asyncio.Future[Arrays] = loop.create_future()

    def part_done(part: asyncio.Future[Arrays]) -> None:
        error = None if part.cancelled() else part.exception()  # retrieved either way
        if joined.done():
            return
        if part.cancelled() or error is not None:
            joined.set_exception(error or ModelNotReady(f"model {name}: part of the request was cancelled"))
            for f in futures:
                f.cancel()
        elif all(f.done() for f in futures):
            try:
                joined.set_result(join_outputs([f.result() for f in futures], rows, name))
            except ExecutionError as exc:
                joined.set_exception(exc)

    def joined_done(_: asyncio.Future[Arrays]) -> None:
        if joined.cancelled():
            for f in futures:
                f.cancel()

    for f in futures:
        f.add_done_callback(part_done)
    joined.add_done_callback(joined_done)
    return joined


@dataclass(slots=True)
class BatcherStats:
    """A snapshot of the queue, for health and metrics."""

    queued: int
    in_flight: int  # batches executing now
    in_flight_requests: int  # requests in those batches
    executed_batches: int
    close_at_rows: int | None = None  # the learned crowd a batch closes at (None: the configured policy)


@dataclass(slots=True)
class _Outcome:
    outputs: list[Arrays | BaseException]
    input_ns: int
    infer_ns: int
    output_ns: int
    failed_runs: int


class Batcher:
    """Queues requests for one model version and executes them in batches on `instances`
    concurrent runners.

        batcher = Batcher(runner, name="sepsis v3", config=cfg, executor=pool, instances=1)
        batcher.start()                       # on the running event loop
        outputs = await batcher.submit(BatchRequest(inputs, rows=1, key=key))
        await batcher.stop(grace_s=5)
    """

    def __init__(
        self,
        runner: Runner,
        *,
        name: str,
        config: BatchingConfig | None,
        executor: Executor,
        instances: int = 1,
        max_queue_size: int = 4096,
        observer: BatchObserver | None = None,
        clock: Clock = time.monotonic,
        cost_model: CostModel | None = None,
        inline_below_s: float = 100e-6,
        split_rows: int = 0,
    ) -> None:
        self._runner = runner
        self._split_rows = split_rows  # a request of more rows runs in parts of at most this (0 = never)
        self._name = name
        self._config = config
        self._policy = PolicyConfig.from_batching(config)
        learns = self._policy.max_queue_delay_s > 0 and not self._policy.preferred_rows and self._policy.max_batch_rows > 0
        self.crowd = CrowdEstimate() if learns else None
        self._learned: dict[int, PolicyConfig] = {}  # target rows -> policy closing there
        self._executor = executor
        self._instances = max(1, instances)
        self._max_queue_size = max_queue_size
        self._observer = observer
        self._clock = clock
        self.cost = cost_model or CostModel()
        # A batch estimated to run faster than this executes on the event loop thread: handing
        # it to a worker thread would cost more than the execution itself.
        self._inline_below_s = inline_below_s
        self._queue: list[QueuedItem] = []
        self._level_counts: dict[int, int] = {}
        self._seq = itertools.count()
        self._in_flight = 0
        self._in_flight_requests = 0
        self._executed = 0
        self._stopping = False
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._last_release: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the asyncio primitives on the running loop and start the driver."""
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._drive(), name=f"batcher {self._name}")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to `grace_s`, then
        fail whatever is left with ModelNotReady."""
        self._stopping = True
        self._wake()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), grace_s)
            except TimeoutError:
                self._loop_task.cancel()
        for item in self._queue:
            self._fail(item, ModelNotReady(f"model {self._name} was unloaded before the request ran"))
        self._queue.clear()
        if self._batch_tasks:
            await asyncio.wait(self._batch_tasks, timeout=grace_s)

    def stats(self) -> BatcherStats:
        return BatcherStats(
            queued=len(self._queue),
            in_flight=self._in_flight,
            in_flight_requests=self._in_flight_requests,
            executed_batches=self._executed,
            close_at_rows=self.crowd.target() if self.crowd is not None else None,
        )

    # -- submit ----------------------------------------------------------------------------

    def submit(self, request: BatchRequest) -> asyncio.Future[Arrays]:
        """Queue a request; the future resolves to its outputs (views into the batch's outputs)
        or to one of the errors in the module docstring."""
        if self._stopping or self._wakeup is None:
            raise ModelNotReady(f"model {self._name} is not accepting requests (unloading or stopped)")
        if 0 < self._split_rows < request.rows:
            return self._submit_parts(request)
        limit = self._policy.max_batch_rows
        if limit > 0 and request.rows > limit:
            raise InvalidInput(
                f"model {self._name}: request has {request.rows} rows, more than max_batch_size {limit}"
            )
        level, policy = self._level(request.priority)
        now = self._clock()
        estimate = self._check_deadline(request, now)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        if self._runs_now(estimate):
            self._run_inline(request, future)
            return future
        self._check_room(level, policy, 1)
        self._enqueue(request, future, level, policy, now)
        return future

    def _submit_parts(self, request: BatchRequest) -> asyncio.Future[Arrays]:
        """Queue an oversized request as parts of at most `split_rows` rows; one joined future."""
        parts = [replace(request, inputs=p, rows=r) for p, r in split_rows(request.inputs, request.rows, self._split_rows)]
        level, policy = self._level(request.priority)
        now = self._clock()
        self._check_deadline(parts[0], now)
        self._check_room(level, policy, len(parts), request.rows)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Arrays]] = []
        for part in parts:
            futures.append(loop.create_future())
            self._enqueue(part, futures[-1], level, policy, now)
        return join_parts(futures, [p.rows for p in parts], self._name, loop)

    def _check_deadline(self, request: BatchRequest, now: float) -> float:
        """Refuse a request that would miss its deadline even if it ran now; return the estimate."""
        estimate = self.cost.estimate(request.rows)
        if request.deadline_s is not None and now + estimate > request.deadline_s:
            raise DeadlineExceeded(
                f"model {self._name}: deadline cannot be met (estimated execution {estimate * 1e3:.3f} ms, "
                f"time left {max(0.0, request.deadline_s - now) * 1e3:.3f} ms); request not executed"
            )
        return estimate

    def _check_room(self, level: int, policy: QueuePolicy, items: int, rows: int = 0) -> None:
        """Refuse `items` queue entries that do not fit now (QueueFull) or never can (InvalidInput)."""
        level_limit = policy.max_queue_size  # 0: only the server-wide cap (>= 1) applies
        cap = min(self._max_queue_size, level_limit or self._max_queue_size)
        if items > cap:
            raise InvalidInput(
                f"model {self._name}: request has {rows} rows, {items} parts of at most max_batch_size "
                f"{self._split_rows}; the queue holds at most {cap} (send at most {cap * self._split_rows} rows)"
            )
        if len(self._queue) + items > self._max_queue_size or (
            level_limit and self._level_counts.get(level, 0) + items > level_limit
        ):
            raise QueueFull(f"model {self._name}: queue full ({cap} requests queued); retry later")

    def _enqueue(
        self, request: BatchRequest, future: asyncio.Future[Arrays], level: int, policy: QueuePolicy, now: float
    ) -> None:
        timeout_us = policy.default_timeout_us
        if request.timeout_us and policy.allow_timeout_override:  # may only shorten the policy's
            timeout_us = min(timeout_us, request.timeout_us) if timeout_us else request.timeout_us
        item = QueuedItem(
            request=request,
            future=future,
            seq=next(self._seq),
            level=level,
            enqueued_s=now,
            timeout_at_s=now + timeout_us / 1e6 if timeout_us else None,
            delay_on_timeout=policy.timeout_action is TimeoutAction.DELAY,
            key=request.key if request.key is not None else compatibility_key(
                request.inputs, self._policy.max_batch_rows > 0 or self._split_rows > 0
            ),
        )
        self._queue.append(item)
        self._level_counts[level] = self._level_counts.get(level, 0) + 1
        if self._in_flight < self._instances:  # otherwise the end of a batch wakes the driver
            self._wake()

    def _runs_now(self, estimate_s: float) -> bool:
        """The policy's answer for a lone request on an idle batcher with no delay is "run it
        now, alone"; when it would also run on the event loop (cheap), skip the queue and the
        driver altogether. While anything is queued or running, requests queue and batch."""
        if self._queue or self._in_flight:
            return False
        if self._policy.max_queue_delay_s > 0 and (self.crowd is None or self.crowd.target() != 1):
            return False
        return 0 < estimate_s < self._inline_below_s

    def _current_policy(self) -> PolicyConfig:
        """The configured policy, closing batches at the learned crowd size when there is one."""
        target = self.crowd.target() if self.crowd is not None else None
        if target is None:
            return self._policy
        policy = self._learned.get(target)
        if policy is None:
            policy = self._learned[target] = replace(self._policy, preferred_rows=(target,))
        return policy

    def _run_inline(self, request: BatchRequest, future: asyncio.Future[Arrays]) -> None:
        """A lone request, run now on the event loop: the batch path minus concatenation,
        splitting and bisection (there is nothing to isolate)."""
        start = time.perf_counter_ns()
        try:
            outputs = self._runner(request.inputs)
        except Exception as exc:  # noqa: BLE001 - the caller gets it as its result
            future.set_exception(execution_failure(self._name, exc))
            return
        infer_ns = time.perf_counter_ns() - start
        self.cost.observe(request.rows, infer_ns / 1e9)
        if self.crowd is not None:
            self.crowd.observe(request.rows)
        if self._observer is not None:
            self._observer.on_batch(request.rows, (0,), 0, infer_ns, 0)
        self._executed += 1
        future.set_result(outputs)

    def _record(self, requests: Sequence[BatchRequest], queue_ns: list[int], outcome: _Outcome) -> None:
        if outcome.failed_runs == 0:
            self.cost.observe(sum(r.rows for r in requests), outcome.infer_ns / 1e9)
        if self._observer is not None:
            self._observer.on_batch(
                sum(r.rows for r in requests), queue_ns, outcome.input_ns, outcome.infer_ns, outcome.output_ns
            )
        self._executed += 1

    def _level(self, priority: int) -> tuple[int, QueuePolicy]:
        cfg = self._config
        if cfg is None:
            return 0, QueuePolicy()
        levels = cfg.priority_levels
        if levels <= 0:
            return 0, cfg.default_queue_policy
        if priority == 0:
            level = cfg.default_priority_level or levels
        elif priority > levels:
            raise InvalidInput(
                f"model {self._name}: priority {priority} out of range, expected 1..{levels} (0 = default)"
            )
        else:
            level = priority
        return level, cfg.policy_for(level)

    def cancel(self, future: asyncio.Future[Arrays]) -> None:
        """The caller went away: cancel its request so the driver drops it now (it never runs)."""
        future.cancel()  # (asyncio has usually cancelled it already, with the awaiting task)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # -- driver ----------------------------------------------------------------------------

    def _remove(self, items: Sequence[QueuedItem]) -> None:
        gone = set(map(id, items))
        self._queue = [it for it in self._queue if id(it) not in gone]
        for it in items:
            self._level_counts[it.level] -= 1

    def _fail(self, item: QueuedItem, error: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(error)

    async def _drive(self) -> None:
        assert self._wakeup is not None
        while True:
            now = self._clock()
            decision = decide(
                self._queue, now, self._current_policy(), self.cost.estimate, self._instances - self._in_flight
            )
            settled = decision.expire + decision.drop + decision.run
            if settled:
                self._remove(settled)
            for item in decision.expire:
                self._fail(item, DeadlineExceeded(f"model {self._name}: request expired in the queue; not executed"))
            if decision.run:
                self._dispatch(list(decision.run))
                continue
            if self._stopping and not self._queue and not self._in_flight:
                return
            self._wakeup.clear()
            timer = None
            if decision.wait_s is not None:  # a timer, not wait_for: no Task per wait
                timer = asyncio.get_running_loop().call_later(decision.wait_s, self._wakeup.set)
            await self._wakeup.wait()
            if timer is not None:
                timer.cancel()

    def _dispatch(self, items: list[QueuedItem]) -> None:
        if self.crowd is not None:
            self.crowd.observe(sum(it.rows for it in items))
        self._in_flight += 1
        self._in_flight_requests += len(items)
        previous = self._last_release
        release: asyncio.Future[None] | None = None
        if self._config is not None and self._config.preserve_ordering:
            release = asyncio.get_running_loop().create_future()
            self._last_release = release
        task = asyncio.get_running_loop().create_task(self._run_batch(items, previous, release))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _run_batch(
        self,
        items: list[QueuedItem],
        previous: asyncio.Future[None] | None,
        release: asyncio.Future[None] | None,
    ) -> None:
        start = self._clock()
        outcome: _Outcome | None = None
        try:
            requests = [it.request for it in items]
            rows = sum(it.rows for it in items)
            measured = self.cost.estimate(rows)
            if 0 < measured < self._inline_below_s:
                outcome = self._execute(requests)
            else:
                outcome = await asyncio.get_running_loop().run_in_executor(self._executor, self._execute, requests)
            if previous is not None:
                await previous
            self._record(requests, [int((start - it.enqueued_s) * 1e9) for it in items], outcome)
            for item, result in zip(items, outcome.outputs, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        except BaseException as exc:  # noqa: BLE001 - every future must be resolved
            log.exception("model %s: batch of %d requests failed outside the runtime", self._name, len(items))
            for item in items:
                self._fail(item, ExecutionError(f"model {self._name}: batch failed: {type(exc).__name__}"))
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in items:
                self._fail(item, ExecutionError(f"model {self._name}: batch produced no result"))
            if release is not None and not release.done():
                release.set_result(None)
            self._in_flight -= 1
            self._in_flight_requests -= len(items)
            self._wake()

    # -- execution (worker thread) ---------------------------------------------------------

    def _execute(self, requests: list[BatchRequest]) -> _Outcome:
        """Concatenate, run and split one batch; on failure bisect so only culprits fail."""
        outcome = _Outcome(outputs=[], input_ns=0, infer_ns=0, output_ns=0, failed_runs=0)
        outcome.outputs = self._run_group(requests, outcome)
        return outcome

    def _run_group(self, requests: list[BatchRequest], outcome: _Outcome) -> list[Arrays | BaseException]:
        clock = time.perf_counter_ns
        t0 = clock()
        if len(requests) == 1:
            inputs = requests[0].inputs
        else:
            names = requests[0].inputs.keys()
            inputs = {n: np.concatenate([r.inputs[n] for r in requests]) for n in names}
        t1 = clock()
        try:
            outputs = self._runner(inputs)
        except Exception as exc:  # noqa: BLE001 - isolate the culprit below
            outcome.failed_runs += 1
            outcome.infer_ns += clock() - t1
            if len(requests) == 1:
                return [execution_failure(self._name, exc)]
            half = len(requests) // 2
            return self._run_group(requests[:half], outcome) + self._run_group(requests[half:], outcome)
        t2 = clock()
        outcome.input_ns += t1 - t0
        outcome.infer_ns += t2 - t1
        if len(requests) == 1:
            result: list[Arrays | BaseException] = [dict(outputs)]
        else:
            rows = [r.rows for r in requests]
            total = sum(rows)
            bad = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != total]
            if bad:
                err = ExecutionError(
                    f"model {self._name}: output {bad[0]!r} has dim 0 != batch rows {total}; cannot split"
                )
                return [err] * len(requests)
            bounds = list(itertools.accumulate(rows, initial=0))
            result = [
                {n: a[start:end] for n, a in outputs.items()}
                for start, end in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        outcome.output_ns += clock() - t2
        return result
