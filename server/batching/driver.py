"""The asyncio driver of one model version's batcher: it owns the queue, the timer, the executors
and the futures, and applies the policy's answers (`policy.admit` when a request arrives,
`policy.decide` for the queue, `policy.releasable` for finished batches): it starts batches
(inline, or on an instance's worker thread through `executor`), records what they cost, and
resolves every future. No task of its own: it runs as short callbacks (a "pump") scheduled when
something arrives, finishes, or a timer the policy asked for fires.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from ..config import BatchingConfig, PadSpec
from ..errors import DeadlineExceeded, ExecutionError, ModelNotReady
from .estimators import CostModel, CrowdEstimate, LoneEstimate, work_of
from .execute import Outcome, Padding, Runner, execute, join_outputs
from .policy import (
    BACKGROUND_LEVEL,
    AdmissionConfig,
    Arrays,
    BatchRequest,
    Decision,
    PolicyConfig,
    QueuedItem,
    Refuse,
    Snapshot,
    admit,
    batch_work,
    decide,
    releasable,
    runs_at_once,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


# timer(delay_s, callback) -> handle: asyncio's `loop.call_later` in production, a fake in tests.
Timer = Callable[[float, Callable[[], None]], TimerHandle]


class BatchObserver(Protocol):
    """Receives what happened to each executed batch (statistics)."""

    def on_batch(
        self, rows: int, queue_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    """Everything a batcher is built with, validated before it is built.

    `batching` None = dynamic batching off (each request runs alone). `split_rows`: a request of
    more rows runs as parts of at most this many (0 = never split). `warmups`: (work, engine
    seconds) pairs measured at load; they seed the cost model. `inline_below_s`: a batch measured
    to execute faster than this runs on the event loop (a hand-off would cost more). The engine
    clock the costs are measured with is the runner's own (`Runner.engine_clock`)."""

    name: str  # "'sepsis' version 3", for messages
    batching: BatchingConfig | None = None
    instances: int = 1
    max_queue_size: int = 4096
    split_rows: int = 0
    inline_below_s: float = 100e-6
    warmups: tuple[tuple[int, float], ...] = ()
    # Padded batching: inputs whose axis may be padded, and the outputs that carry that axis
    # (output name, axis), sliced back to each request's own length.
    padding: tuple[PadSpec, ...] = ()
    padded_outputs: tuple[tuple[str, int], ...] = ()

    def policy(self) -> PolicyConfig:
        cfg = self.batching
        if cfg is None:
            return PolicyConfig(max_batch_rows=0, inline_below_s=self.inline_below_s)
        return PolicyConfig(
            max_batch_rows=cfg.max_batch_rows,
            max_queue_delay_s=cfg.max_queue_delay_us / 1e6,
            preferred_rows=tuple(sorted(p for p in cfg.preferred_batch_sizes if p > 0)),
            inline_below_s=self.inline_below_s,
        )

    def admission(self) -> AdmissionConfig:
        policy = self.policy()
        return AdmissionConfig(
            name=self.name,
            policy=policy,
            batching=self.batching,
            instances=max(1, self.instances),
            max_queue_size=self.max_queue_size,
            split_rows=self.split_rows,
            batched=policy.max_batch_rows > 0 or self.split_rows > 0,
            padded_axes={p.input: p.axis for p in self.padding},
        )


@dataclass(slots=True)
class BatcherStats:
    """A snapshot of the batcher, for health, metrics and tests."""

    queued: int
    in_flight: int  # batches executing now
    in_flight_requests: int  # requests in those batches
    executed_batches: int
    close_at_rows: int | None = None  # the learned crowd a batch stops waiting at (None: the configured policy)
    inline_batches: int = 0  # of `executed_batches`, those run on the event loop
    work_requested: int = 0  # input elements the executed requests carried ...
    work_executed: int = 0  # ... and the batches ran (more with padding: the waste is the difference)


@dataclass(slots=True, eq=False)
class _Flight:
    """A dispatched batch, until its results are released."""

    items: list[QueuedItem]
    started_s: float
    outcome: Outcome | BaseException | None = None
    work: int = 0
    background: bool = False

    @property
    def finished(self) -> bool:
        return self.outcome is not None


@dataclass(slots=True)
class _Counters:
    in_flight: int = 0
    in_flight_requests: int = 0
    background_in_flight: int = 0  # of `in_flight`, background parts (they hold no caller's slot)
    executed: int = 0
    inline: int = 0
    work_requested: int = 0
    work_executed: int = 0
    level_counts: dict[int, int] = field(default_factory=dict)


class Batcher:
    """Queues requests for one model version and executes them in batches on `instances`
    concurrent runners.

        batcher = Batcher(runner, BatcherConfig("'sepsis' version 3", batching), executor=pool)
        batcher.start()                       # on the running event loop
        outputs = await batcher.submit(BatchRequest(inputs, rows=1, key=key))
        await batcher.stop(grace_s=5)
    """

    def __init__(
        self,
        runner: Runner,
        config: BatcherConfig,
        clock: Clock = time.monotonic,
        timer: Timer | None = None,
        *,
        executor: Executor,
        background_executor: Executor | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._runner = runner
        self._config = config
        self._name = config.name
        self._admission = config.admission()
        self._policy = self._admission.policy
        self._clock = clock
        self._timer_factory = timer
        self._executor = executor
        self._background_executor = background_executor
        self._observer = observer
        # The engine's own time, read in the thread that executes (see `execute`).
        self._engine_clock: Clock = runner.engine_clock
        self._instances = self._admission.instances
        policy = self._policy
        learns = policy.max_queue_delay_s > 0 and not policy.preferred_rows and policy.max_batch_rows > 0
        self._crowd = CrowdEstimate() if learns else None
        self._lone = LoneEstimate()
        self._cost = CostModel()
        for work, seconds in config.warmups:
            self._cost.observe(work, seconds)
        self._background_chunk_rows = policy.max_batch_rows or config.split_rows  # engine calls of a background part
        self._pad_values = {p.input: (p.axis, p.value) for p in config.padding}
        self._padded_outputs = dict(config.padded_outputs)
        self._queue: list[QueuedItem] = []
        # Every item's future, from admission until it is resolved (queued, running or released).
        self._futures: dict[QueuedItem, asyncio.Future[Arrays]] = {}
        self._next_seq = 0
        self._n = _Counters()
        self._flights: collections.deque[_Flight] = collections.deque()  # dispatch order (preserve_ordering)
        self._ordered = config.batching is not None and config.batching.preserve_ordering
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._pumping = False  # inside `_pump`, whose loop re-decides anyway: no need to schedule it
        self._timer: TimerHandle | None = None
        self._stopping = False
        self._drained: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind to the running event loop (asyncio objects are made here, never at import)."""
        self._loop = asyncio.get_running_loop()
        if self._timer_factory is None:
            self._timer_factory = self._loop.call_later

    async def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to `grace_s`, then
        fail whatever is still queued with ModelNotReady (it never runs); running batches are
        waited for up to `grace_s` again and always answer their callers."""
        self._stopping = True
        if self._loop is None:
            return
        if self._queue or self._n.in_flight:
            self._drained = self._loop.create_future()
            self._schedule_pump()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), grace_s)
            except TimeoutError:
                pass
        for item in self._queue:
            self._fail(item, ModelNotReady(f"model {self._name} was unloaded before the request ran"))
            del self._futures[item]
        self._settle(self._queue)
        self._queue.clear()
        self._cancel_timer()
        if self._n.in_flight:
            self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), grace_s)
            except TimeoutError:
                log.warning("model %s: %d batches still running after the grace period", self._name, self._n.in_flight)

    def stats(self) -> BatcherStats:
        return BatcherStats(
            queued=len(self._queue),
            in_flight=self._n.in_flight,
            in_flight_requests=self._n.in_flight_requests,
            executed_batches=self._n.executed,
            close_at_rows=self._crowd.target() if self._crowd is not None else None,
            inline_batches=self._n.inline,
            work_requested=self._n.work_requested,
            work_executed=self._n.work_executed,
        )

    def estimate_s(self, work: int) -> float:
        """The cost model's estimate for a batch of `work` (input elements), in seconds."""
        return self._cost.estimate(work)

    # -- submit ----------------------------------------------------------------------------

    def submit(self, request: BatchRequest) -> asyncio.Future[Arrays]:
        """Queue a request; the future resolves to its outputs (views into the batch's outputs)
        or to one of the errors in the package docstring (raised here if refused at arrival)."""
        loop = self._loop
        if self._stopping or loop is None:
            raise ModelNotReady(f"model {self._name} is not accepting requests (unloading or stopped)")
        verdict = admit(self._snapshot(), request, self._clock(), self._admission, self._cost)
        if isinstance(verdict, Refuse):
            raise verdict.error
        items = verdict.items
        self._next_seq += len(items)
        if request.timing is not None:
            request.timing.queued_ns = time.time_ns()
        if verdict.run is not None and (not verdict.deferrable or self._lone.run_now()):
            # An idle batcher's lone request runs now, without a trip through the queue and the
            # pump (what arrives meanwhile batches behind it). One that would run inline waits
            # in the queue for the pump at the end of this loop iteration, so that requests
            # decoded meanwhile join it, unless recent waits found nobody to join (`_lone`).
            if verdict.run.inline and not self._flights and items[0].level != BACKGROUND_LEVEL:
                return self._run_alone(items[0], loop)
            future = self._futures[items[0]] = loop.create_future()
            self._count_level(items[0].level, +1)
            self._start(verdict.run)
            return future
        futures = []
        for item in items:
            future = self._futures[item] = loop.create_future()
            futures.append(future)
            self._queue.append(item)
            self._count_level(item.level, +1)
        if verdict.pump or verdict.deferrable:  # otherwise the end of a batch pumps
            self._schedule_pump()
        if len(futures) == 1:
            return futures[0]
        return join_parts(futures, [it.rows for it in items], self._name, loop)

    def run_now(self, request: BatchRequest) -> Arrays | None:
        """A caller's request run inline and answered here, when the batcher is idle and
        admission would run it at once alone (`runs_at_once`): the common request of a fast
        model under steady load, without a queue item, a future or admission's records. The
        same execution, counters and statistics as through `submit`. None: `submit` it."""
        if self._flights or self._queue or self._stopping or self._loop is None or request.timing is not None:
            return None
        work = work_of(request.inputs)
        if not (runs_at_once(request, work, self._clock(), self._admission, self._cost)
                and self._lone.would_run_now()):
            return None  # `submit` asks the lone estimate itself: a peek leaves its count alone
        self._lone.run_now()
        self._next_seq += 1
        outcome = self._execute_alone(request.inputs, request.rows)
        failure = self._account(request.rows, work, work, (0,), outcome)
        if failure is not None:
            raise failure
        assert isinstance(outcome, Outcome)
        (result,) = outcome.outputs
        if isinstance(result, BaseException):
            raise result
        return result

    def _snapshot(self) -> Snapshot:
        n = self._n
        return Snapshot(self._queue, n.level_counts, self._instances - n.in_flight + n.background_in_flight,
                        n.background_in_flight, self._close_at(), self._next_seq)

    def _callers_in_flight(self) -> int:
        return self._n.in_flight - self._n.background_in_flight

    def _count_level(self, level: int, delta: int) -> None:
        counts = self._n.level_counts
        counts[level] = counts.get(level, 0) + delta

    def cancel(self, future: asyncio.Future[Arrays]) -> None:
        """The caller went away: cancel its request so the pump drops it now (it never runs)."""
        future.cancel()  # (asyncio has usually cancelled it already, with the awaiting task)
        self._schedule_pump()

    # -- the pump --------------------------------------------------------------------------

    def _close_at(self) -> int | None:
        return self._crowd.target() if self._crowd is not None else None

    def _schedule_pump(self) -> None:
        if not (self._pump_scheduled or self._pumping) and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Apply the policy's answers until it says wait; then arm a timer if it asked for one."""
        self._pump_scheduled = False
        self._pumping = True
        try:
            self._pump_until_wait()
        finally:
            self._pumping = False

    def _pump_until_wait(self) -> None:
        futures = self._futures
        while True:
            now = self._clock()
            cancelled = {it for it in self._queue if futures[it].done()}  # by the caller, or a joined part's failure
            decision = decide(
                self._queue, now, self._policy, self._cost,
                self._instances - self._callers_in_flight(), self._close_at(),
                self._n.background_in_flight, cancelled,
            )
            settled = decision.expire + decision.drop + decision.run
            if settled:
                gone = set(map(id, settled))
                self._queue = [it for it in self._queue if id(it) not in gone]
                self._settle(decision.expire + decision.drop)
            for item in decision.expire:
                self._fail(item, DeadlineExceeded(f"model {self._name}: request expired in the queue; not executed"))
            for item in decision.expire + decision.drop:
                del futures[item]
            if decision.run:
                if decision.run[0].level != BACKGROUND_LEVEL:
                    self._lone.observe(len(decision.run))
                self._start(decision)
                if not self._queue:  # nothing left to decide about (the timer, if any, is for no one)
                    self._cancel_timer()
                    self._check_drained()
                    return
                continue
            self._arm_timer(decision.wait_s)
            self._check_drained()
            return

    def _arm_timer(self, wait_s: float | None) -> None:
        self._cancel_timer()
        if wait_s is not None and self._timer_factory is not None:
            self._timer = self._timer_factory(wait_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _settle(self, items: Sequence[QueuedItem]) -> None:
        for it in items:
            self._count_level(it.level, -1)

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done() and not self._n.in_flight and not self._queue:
            drained.set_result(None)

    # -- running batches -------------------------------------------------------------------

    def _start(self, decision: Decision) -> None:
        """Run one batch the policy chose: now, on this thread, if inline; else on an instance."""
        items = list(decision.run)
        self._settle(items)
        if self._crowd is not None and items[0].level != BACKGROUND_LEVEL:  # callers' crowds only
            self._crowd.observe(sum(it.rows for it in items))
        flight = _Flight(items, self._clock(), work=batch_work(items), background=items[0].level == BACKGROUND_LEVEL)
        self._flights.append(flight)
        self._n.in_flight += 1
        self._n.background_in_flight += flight.background
        self._n.in_flight_requests += len(items)
        members = [it.request.inputs for it in items]
        rows = [it.rows for it in items]
        for it in items:
            if it.request.timing is not None:
                it.request.timing.started_ns = time.time_ns()
        padding = (Padding(self._pad_values, self._padded_outputs, [it.length for it in items])
                   if self._pad_values else None)
        chunk = self._background_chunk_rows if flight.background else 0
        if decision.inline:
            self._n.inline += 1
            try:
                flight.outcome = execute(self._runner, members, rows, self._name, self._engine_clock, padding, chunk)
            except BaseException as exc:  # noqa: BLE001 - every future must be resolved
                flight.outcome = exc
            self._finished()
            return
        assert self._loop is not None
        executor = self._background_executor if flight.background and self._background_executor else self._executor
        done = self._loop.run_in_executor(
            executor, execute, self._runner, members, rows, self._name, self._engine_clock, padding, chunk
        )
        done.add_done_callback(lambda f: self._on_executed(flight, f))

    def _run_alone(self, item: QueuedItem, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Arrays]:
        """`_start` and `_release` for a caller's batch of one run inline with nothing in flight:
        the same execution, accounting and statistics, without the flight a batch that may
        finish out of order needs (the common request of a fast model under steady load)."""
        future: asyncio.Future[Arrays] = loop.create_future()
        request = item.request
        started_s = self._clock()
        if request.timing is not None:
            request.timing.started_ns = time.time_ns()
        padding = Padding(self._pad_values, self._padded_outputs, [item.length]) if self._pad_values else None
        self._resolve([item], [future], started_s, item.work, self._execute_alone(request.inputs, item.rows, padding))
        return future

    def _execute_alone(self, inputs: Arrays, rows: int, padding: Padding | None = None) -> Outcome | BaseException:
        """A caller's request executed alone on the event loop (`run_now`, `_run_alone`): counted
        in the crowd and as an inline batch; its outcome, or what the execution raised."""
        if self._crowd is not None:
            self._crowd.observe(rows)
        self._n.inline += 1
        try:
            return execute(self._runner, [inputs], [rows], self._name, self._engine_clock, padding)
        except BaseException as exc:  # noqa: BLE001 - every caller is answered
            return exc

    def _on_executed(self, flight: _Flight, done: asyncio.Future[Outcome]) -> None:
        if done.cancelled():
            flight.outcome = asyncio.CancelledError()
        else:
            flight.outcome = done.exception() or done.result()
        self._finished()

    def _finished(self) -> None:
        """Release finished batches (in dispatch order with preserve_ordering) and pump."""
        for flight in releasable(self._flights, self._ordered):  # at most two per instance
            self._flights.remove(flight)
            self._release(flight)
        if self._queue:
            self._schedule_pump()
        self._check_drained()

    def _release(self, flight: _Flight) -> None:
        items, outcome = flight.items, flight.outcome
        assert outcome is not None
        self._n.in_flight -= 1
        self._n.background_in_flight -= flight.background
        self._n.in_flight_requests -= len(items)
        self._resolve(items, [self._futures.pop(it) for it in items], flight.started_s, flight.work, outcome)

    def _account(self, rows: int, requested: int, work: int, queue_ns: Sequence[int],
                 outcome: Outcome | BaseException) -> ExecutionError | None:
        """An executed batch's counters, cost model and statistics; the error its members get
        when it failed outside the runtime (None when it ran)."""
        self._n.executed += 1
        if not isinstance(outcome, Outcome):
            log.error("model %s: batch of %d requests failed outside the runtime", self._name, len(queue_ns),
                      exc_info=outcome)
            return ExecutionError(f"model {self._name}: batch failed: {type(outcome).__name__}")
        self._n.work_requested += requested
        self._n.work_executed += work
        if outcome.clean:
            self._cost.observe(work, outcome.infer_s)
        if self._observer is not None:
            self._observer.on_batch(rows, queue_ns, int(outcome.input_s * 1e9), int(outcome.infer_s * 1e9),
                                    int(outcome.output_s * 1e9))
        return None

    def _resolve(self, items: Sequence[QueuedItem], futures: Sequence[asyncio.Future[Arrays]], started_s: float,
                 work: int, outcome: Outcome | BaseException) -> None:
        """An executed batch's accounting (cost model, statistics) and every member's answer."""
        rows = requested = 0
        for it in items:
            rows += it.rows
            requested += it.work
        failure = self._account(rows, requested, work, [int((started_s - it.enqueued_s) * 1e9) for it in items],
                                outcome)
        if failure is not None:
            for future in futures:
                if not future.done():
                    future.set_exception(failure)
            return
        assert isinstance(outcome, Outcome)
        for item, future, result in zip(items, futures, outcome.outputs, strict=True):
            if item.request.timing is not None:
                item.request.timing.finished_ns = time.time_ns()
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _fail(self, item: QueuedItem, error: BaseException) -> None:
        future = self._futures[item]
        if not future.done():
            future.set_exception(error)


def join_parts(
    futures: Sequence[asyncio.Future[Arrays]], rows: Sequence[int], name: str, loop: asyncio.AbstractEventLoop
) -> asyncio.Future[Arrays]:
    """One future for a split request: its parts' outputs joined in order, or the first error of
    any part (the other parts are then cancelled: the pump drops them unexecuted). Cancelling
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
