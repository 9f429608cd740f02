"""The asyncio batcher with plain runner functions: results split back correctly, batches form
while an instance is busy, refusals, cancellation, failure isolation, every future resolved.
No sleeps: a runner blocked on an event decides what is in flight."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medserve.server.batching import Batcher, BatcherConfig, BatchRequest, RequestTiming
from medserve.server.config import BatchingConfig, QueuePolicy
from medserve.server.errors import DeadlineExceeded, ExecutionError, InvalidInput, ModelNotReady, QueueFull
from medserve.server.stats import ModelStats

KEY = ("x", "<f4", (2,))


class GatedRunner:
    """Doubles x; records each batch's rows; blocks while the gate is closed; fails on NaN."""

    engine_clock = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.entered.set()
        self.gate.wait(30)
        if np.isnan(x).any():
            raise RuntimeError("poisoned input")
        self.batches.append(x.shape[0])
        return {"y": x * 2, "rows": np.arange(x.shape[0])}


def request(value: float, rows: int = 1, **kw: object) -> BatchRequest:
    return BatchRequest(inputs={"x": np.full((rows, 2), value, np.float32)}, rows=rows, key=KEY, **kw)  # type: ignore[arg-type]


CONFIG_FIELDS = ("instances", "max_queue_size", "split_rows", "inline_below_s", "warmups")


async def started(runner: GatedRunner, config: BatchingConfig | None, **kw: object) -> Batcher:
    """A started batcher; `kw` holds BatcherConfig fields and Batcher keywords (clock, observer, ...).
    Nothing runs inline unless a test asks: a gated runner blocks, and on the event loop it
    would block the test itself (its measured CPU time is tiny, so it would count as cheap)."""
    fields = {k: kw.pop(k) for k in CONFIG_FIELDS if k in kw}
    fields.setdefault("inline_below_s", 0.0)
    batcher = Batcher(
        runner, BatcherConfig("'m' version 1", config, **fields),  # type: ignore[arg-type]
        executor=ThreadPoolExecutor(2), **kw,  # type: ignore[arg-type]
    )
    batcher.start()
    return batcher


class FakeTimer:
    """The batcher's timer in tests: callbacks fire only when the test advances the clock."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.pending: list[tuple[float, object, list[bool]]] = []

    def clock(self) -> float:
        return self.now

    def __call__(self, delay_s: float, callback):  # type: ignore[no-untyped-def]
        cancelled = [False]
        self.pending.append((self.now + delay_s, callback, cancelled))

        class Handle:
            def cancel(self) -> None:
                cancelled[0] = True

        return Handle()

    def armed(self) -> list[float]:
        return sorted(due for due, _, cancelled in self.pending if not cancelled[0])

    def advance(self, seconds: float) -> None:
        """Move the clock and fire every timer now due (in due order)."""
        self.now += seconds
        due = sorted((t for t in self.pending if t[0] <= self.now and not t[2][0]), key=lambda t: t[0])
        self.pending = [t for t in self.pending if t not in due]
        for _, callback, _ in due:
            callback()  # type: ignore[operator]


async def hold_first_batch(batcher: Batcher, runner: GatedRunner) -> asyncio.Future:
    """Submit one request and wait until the runner is executing it with the gate closed."""
    runner.gate.clear()
    runner.entered.clear()
    first = batcher.submit(request(100.0))
    await asyncio.to_thread(runner.entered.wait, 30)
    return first


async def test_concurrent_requests_form_one_batch_and_get_their_own_rows() -> None:
    runner = GatedRunner()
    stats = ModelStats()
    batcher = await started(runner, BatchingConfig(max_batch_rows=16), observer=stats)
    first = await hold_first_batch(batcher, runner)
    futures = [batcher.submit(request(float(i), rows=1 + i % 3)) for i in range(6)]
    runner.gate.set()
    results = await asyncio.gather(first, *futures)
    for i, out in enumerate(results[1:]):
        assert np.array_equal(out["y"], np.full((1 + i % 3, 2), 2.0 * i, np.float32))
    assert runner.batches == [1, sum(1 + i % 3 for i in range(6))]
    assert stats.execution_count == 2 and stats.inference_count == 13
    assert stats.queue.count == 7 and sorted(stats.batches) == [1, 12]
    await batcher.stop()


async def test_without_preferred_sizes_a_batch_closes_at_the_learned_crowd_not_the_delay() -> None:
    """Fake clock and timer, a 60 s delay: nothing waits in real time. The first batch waits the
    whole delay (no estimate yet); then batches close at the crowd recent batches reached, and a
    crowd that does not come drops the estimate to what came."""
    runner = GatedRunner()
    fake = FakeTimer()
    batcher = await started(runner, BatchingConfig(max_batch_rows=16, max_queue_delay_us=60_000_000),
                            clock=fake.clock, timer=fake)
    futures = [batcher.submit(request(float(i))) for i in range(3)]
    await asyncio.sleep(0)  # the pump runs: it arms the delay's timer
    assert fake.armed() == [160.0] and runner.batches == []
    fake.advance(60.0)
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert runner.batches == [3] and batcher.stats().close_at_rows == 3
    futures = [batcher.submit(request(float(i))) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*futures), 10)  # closed at 3: no timer fired
    assert runner.batches == [3, 3]
    lone = batcher.submit(request(7.0))
    await asyncio.sleep(0)
    assert fake.armed() == [220.0]
    fake.advance(60.0)  # the crowd did not come
    await asyncio.wait_for(lone, 10)
    assert batcher.stats().close_at_rows == 1
    await asyncio.wait_for(batcher.submit(request(8.0)), 10)  # a lone request now runs at once
    assert runner.batches == [3, 3, 1, 1]
    await batcher.stop()


async def test_requests_queued_beyond_the_learned_crowd_join_its_batch_instead_of_waiting_the_delay() -> None:
    """Three requests arrive together where the crowd is 2: one batch of 3, no timer. Cut at
    the crowd, the third would wait the whole 60 s delay for a companion."""
    runner = GatedRunner()
    fake = FakeTimer()
    batcher = await started(runner, BatchingConfig(max_batch_rows=16, max_queue_delay_us=60_000_000),
                            clock=fake.clock, timer=fake)
    futures = [batcher.submit(request(float(i))) for i in range(2)]
    await asyncio.sleep(0)
    fake.advance(60.0)  # the first batch waits the whole delay: no estimate yet
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert batcher.stats().close_at_rows == 2
    futures = [batcher.submit(request(float(i))) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert runner.batches == [2, 3] and fake.armed() == []
    await batcher.stop()


async def test_preferred_sizes_keep_the_configured_policy() -> None:
    batcher = await started(GatedRunner(), BatchingConfig(max_batch_rows=16, max_queue_delay_us=1000,
                                                          preferred_batch_sizes=(4,)))
    assert batcher.stats().close_at_rows is None
    await batcher.stop()


async def test_batching_off_executes_requests_one_by_one() -> None:
    runner = GatedRunner()
    batcher = await started(runner, None)
    first = await hold_first_batch(batcher, runner)
    futures = [batcher.submit(request(float(i))) for i in range(3)]
    runner.gate.set()
    await asyncio.gather(first, *futures)
    assert runner.batches == [1, 1, 1, 1]
    await batcher.stop()


async def test_rows_limit_refuses_a_too_large_request() -> None:
    batcher = await started(GatedRunner(), BatchingConfig(max_batch_rows=4))
    with pytest.raises(InvalidInput, match="5 rows, more than max_batch_size 4"):
        batcher.submit(request(1.0, rows=5))
    await batcher.stop()


async def test_a_background_part_past_max_batch_size_runs_in_chunks_on_one_hand_off() -> None:
    """An explanation's part may hold more rows than a caller may send: it is one queue entry and
    one flight (one hand-off), run as engine calls of at most max_batch_size rows, its rows back
    in order (a caller's request of that size is refused, or split into queued parts)."""
    from medserve.server.batching import BACKGROUND

    runner = GatedRunner()
    stats = ModelStats()
    batcher = await started(runner, BatchingConfig(max_batch_rows=4), split_rows=4, observer=stats)
    part = ramp(10)
    out = await batcher.submit(BatchRequest(part.inputs, rows=10, key=KEY, priority=BACKGROUND))
    assert np.array_equal(out["y"], part.inputs["x"] * 2)
    assert np.array_equal(out["rows"], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # each chunk's own row numbers
    assert runner.batches == [4, 4, 2]
    assert stats.execution_count == 1
    await batcher.stop()


def ramp(rows: int, start: float = 0.0) -> BatchRequest:
    """`rows` rows whose values are their row numbers (from `start`): order is visible in outputs."""
    x = np.repeat(np.arange(start, start + rows, dtype=np.float32)[:, None], 2, axis=1)
    return BatchRequest(inputs={"x": x}, rows=rows, key=KEY)


async def test_an_oversized_request_runs_in_parts_that_share_batches_and_joins_in_order() -> None:
    runner = GatedRunner()
    stats = ModelStats()
    batcher = await started(runner, BatchingConfig(max_batch_rows=4), split_rows=4, observer=stats)
    first = await hold_first_batch(batcher, runner)
    big = batcher.submit(ramp(10))  # parts of 4, 4 and 2 rows
    small = batcher.submit(ramp(2, start=100))  # joins the last part's batch
    runner.gate.set()
    _, out, other = await asyncio.gather(first, big, small)
    assert np.array_equal(out["y"], ramp(10).inputs["x"] * 2)
    assert np.array_equal(out["rows"], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # each part's own row numbers
    assert np.array_equal(other["y"], ramp(2, start=100).inputs["x"] * 2)
    assert runner.batches == [1, 4, 4, 4]
    assert stats.execution_count == 4
    await batcher.stop()


async def test_a_failing_part_fails_the_whole_request_and_only_it() -> None:
    runner = GatedRunner()
    batcher = await started(runner, BatchingConfig(max_batch_rows=4), split_rows=4)
    first = await hold_first_batch(batcher, runner)
    poisoned = ramp(9)
    poisoned.inputs["x"][5] = np.nan  # in the second part
    big = batcher.submit(poisoned)
    bystander = batcher.submit(request(3.0))
    runner.gate.set()
    await first
    with pytest.raises(ExecutionError):
        await big
    assert np.array_equal((await bystander)["y"], np.full((1, 2), 6.0, np.float32))
    await batcher.stop()


async def test_cancelling_a_split_request_drops_its_queued_parts() -> None:
    runner = GatedRunner()
    batcher = await started(runner, BatchingConfig(max_batch_rows=4), split_rows=4)
    first = await hold_first_batch(batcher, runner)
    big = batcher.submit(ramp(12))
    assert batcher.stats().queued == 3
    batcher.cancel(big)
    runner.gate.set()
    await first
    after = await batcher.submit(request(1.0))
    assert after["y"].shape == (1, 2)
    assert runner.batches == [1, 1]  # no part of the cancelled request ever ran
    await batcher.stop()


async def test_a_split_request_needs_room_for_all_its_parts() -> None:
    runner = GatedRunner()
    config = BatchingConfig(max_batch_rows=4, default_queue_policy=QueuePolicy(max_queue_size=3))
    batcher = await started(runner, config, split_rows=4)
    first = await hold_first_batch(batcher, runner)
    queued = batcher.submit(request(1.0))
    with pytest.raises(QueueFull):
        batcher.submit(ramp(12))  # 3 parts, 2 places left
    with pytest.raises(InvalidInput, match="16 rows, 4 parts of at most max_batch_size 4; the queue holds at most 3"):
        batcher.submit(ramp(16))  # could never fit
    assert batcher.stats().queued == 1
    runner.gate.set()
    await asyncio.gather(first, queued)
    await batcher.stop()


async def test_queue_full_is_refused_at_once() -> None:
    runner = GatedRunner()
    config = BatchingConfig(max_batch_rows=4, default_queue_policy=QueuePolicy(max_queue_size=2))
    batcher = await started(runner, config)
    first = await hold_first_batch(batcher, runner)
    queued = [batcher.submit(request(1.0)), batcher.submit(request(2.0))]
    with pytest.raises(QueueFull, match=r"queue full \(2 requests queued\)"):
        batcher.submit(request(3.0))
    runner.gate.set()
    await asyncio.gather(first, *queued)
    await batcher.stop()


async def test_deadline_that_cannot_be_met_is_refused_and_never_runs() -> None:
    runner = GatedRunner()
    now = [100.0]
    batcher = await started(runner, BatchingConfig(max_batch_rows=4), clock=lambda: now[0],
                            warmups=((2, 0.050),))  # measured: a batch of one row (2 elements) takes 50 ms
    with pytest.raises(DeadlineExceeded, match="not executed"):
        batcher.submit(request(1.0, deadline_s=100.001))
    assert runner.batches == []
    await batcher.stop()


async def test_request_expiring_in_the_queue_fails_without_running() -> None:
    runner = GatedRunner()
    now = [100.0]
    batcher = await started(runner, BatchingConfig(max_batch_rows=4), clock=lambda: now[0])
    first = await hold_first_batch(batcher, runner)
    doomed = batcher.submit(request(7.0, deadline_s=100.5))
    now[0] = 101.0  # time passes while the instance is busy
    runner.gate.set()
    await first
    with pytest.raises(DeadlineExceeded, match="expired in the queue"):
        await doomed
    assert runner.batches == [1]
    await batcher.stop()


async def test_cancelled_request_is_removed_and_never_runs() -> None:
    runner = GatedRunner()
    batcher = await started(runner, BatchingConfig(max_batch_rows=4))
    first = await hold_first_batch(batcher, runner)
    cancelled = batcher.submit(request(5.0))
    kept = batcher.submit(request(6.0))
    batcher.cancel(cancelled)
    runner.gate.set()
    await asyncio.gather(first, kept)
    assert runner.batches == [1, 1]  # the cancelled request's row never reached the runner
    await batcher.stop()


async def test_poisoned_request_fails_alone() -> None:
    runner = GatedRunner()
    batcher = await started(runner, BatchingConfig(max_batch_rows=16))
    first = await hold_first_batch(batcher, runner)
    values = [1.0, 2.0, float("nan"), 4.0, 5.0]
    futures = [batcher.submit(request(v)) for v in values]
    runner.gate.set()
    results = await asyncio.gather(first, *futures, return_exceptions=True)
    for value, result in zip(values, results[1:], strict=True):
        if np.isnan(value):
            assert isinstance(result, ExecutionError) and "execution failed" in str(result)
        else:
            assert np.array_equal(result["y"], np.full((1, 2), 2 * value, np.float32))
    await batcher.stop()


async def test_output_without_batch_rows_fails_every_member() -> None:
    class Unsplittable(GatedRunner):
        def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            super().__call__(inputs)
            return {"y": np.zeros(3, np.float32)}

    runner = Unsplittable()
    batcher = await started(runner, BatchingConfig(max_batch_rows=8))
    first = await hold_first_batch(batcher, runner)
    futures = [batcher.submit(request(1.0, rows=2)), batcher.submit(request(1.0, rows=2))]  # one batch of 4 rows
    runner.gate.set()
    await first  # alone: nothing to split
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, ExecutionError) and "cannot split" in str(r) for r in results)
    assert runner.batches == [1, 4]
    await batcher.stop()


async def test_priority_levels_are_validated() -> None:
    batcher = await started(GatedRunner(), BatchingConfig(max_batch_rows=4, priority_levels=2, default_priority_level=2))
    with pytest.raises(InvalidInput, match="priority 3 out of range"):
        batcher.submit(request(1.0, priority=3))
    await batcher.stop()


async def test_stop_refuses_new_work_and_lets_queued_requests_run_within_the_grace() -> None:
    runner = GatedRunner()
    batcher = await started(runner, BatchingConfig(max_batch_rows=1))
    first = await hold_first_batch(batcher, runner)
    queued = batcher.submit(request(1.0))
    stopping = asyncio.create_task(batcher.stop(grace_s=60))
    await asyncio.sleep(0)
    with pytest.raises(ModelNotReady, match="not accepting requests"):
        batcher.submit(request(2.0))
    runner.gate.set()
    await stopping
    assert np.array_equal(first.result()["y"], np.full((1, 2), 200.0, np.float32))
    assert np.array_equal(queued.result()["y"], np.full((1, 2), 2.0, np.float32))
    assert runner.batches == [1, 1]


async def test_stop_past_the_grace_fails_queued_requests_unrun_and_still_answers_the_running_one() -> None:
    runner = GatedRunner()
    batcher = await started(runner, BatchingConfig(max_batch_rows=1))
    first = await hold_first_batch(batcher, runner)
    queued = batcher.submit(request(1.0))
    await batcher.stop(grace_s=0)
    with pytest.raises(ModelNotReady, match="unloaded before the request ran"):
        await queued
    assert not first.done()  # still executing: stop never abandons a running batch's future
    runner.gate.set()
    assert np.array_equal((await first)["y"], np.full((1, 2), 200.0, np.float32))
    assert runner.batches == [1]


async def test_timeout_override_only_shortens_the_policy_timeout() -> None:
    """`timeout` (µs) from the request applies only with allow_timeout_override, and only to
    shorten the policy's default; requests that time out in the queue never run."""
    runner = GatedRunner()
    now = [100.0]
    policy = QueuePolicy(default_timeout_us=1_000_000, allow_timeout_override=True)
    batcher = await started(runner, BatchingConfig(max_batch_rows=1, default_queue_policy=policy), clock=lambda: now[0])
    first = await hold_first_batch(batcher, runner)
    shortened = batcher.submit(request(1.0, timeout_us=1_000))  # 1 ms: expires at 100.001
    longer = batcher.submit(request(2.0, timeout_us=5_000_000))  # capped at the policy's 1 s
    default = batcher.submit(request(3.0))
    now[0] = 100.5  # past the shortened timeout only
    runner.gate.set()
    await first
    assert np.array_equal((await longer)["y"], np.full((1, 2), 4.0, np.float32))
    assert np.array_equal((await default)["y"], np.full((1, 2), 6.0, np.float32))
    with pytest.raises(DeadlineExceeded):
        await shortened
    assert runner.batches == [1, 1, 1]
    # A longer request timeout is capped at the policy's 1 s: at +2 s it has expired unrun.
    second = await hold_first_batch(batcher, runner)
    capped = batcher.submit(request(4.0, timeout_us=5_000_000))
    now[0] += 2.0
    runner.gate.set()
    await second
    with pytest.raises(DeadlineExceeded):
        await capped
    assert runner.batches == [1, 1, 1, 1]
    await batcher.stop()


async def test_timeout_override_is_ignored_when_not_allowed() -> None:
    runner = GatedRunner()
    now = [100.0]
    policy = QueuePolicy(default_timeout_us=2_000_000, allow_timeout_override=False)
    batcher = await started(runner, BatchingConfig(max_batch_rows=1, default_queue_policy=policy), clock=lambda: now[0])
    first = await hold_first_batch(batcher, runner)
    kept = batcher.submit(request(1.0, timeout_us=1_000))
    now[0] = 101.0  # past the request's 1 ms, within the policy's 2 s
    runner.gate.set()
    await first
    assert np.array_equal((await kept)["y"], np.full((1, 2), 2.0, np.float32))
    await batcher.stop()


def test_a_fixed_signature_gives_every_valid_request_one_batching_key() -> None:
    """Requests to a model whose inputs are all required and fixed beyond the batch dim share a
    key computed once; variable dims or optional inputs leave the key to each request."""
    from medserve.server.config import ModelConfig, TensorConfig
    from medserve.server.signature import Signature

    x, seq = TensorConfig("x", "FP32", (4,)), TensorConfig("seq", "FP32", (-1, 3))
    fixed = Signature.of(ModelConfig("m", max_batch_size=8, inputs=(x,)))
    assert fixed.fixed_key is not None and fixed.fixed_key == Signature.of(ModelConfig("n", max_batch_size=4, inputs=(x,))).fixed_key
    assert Signature.of(ModelConfig("m", max_batch_size=8, inputs=(x, seq))).fixed_key is None
    assert Signature.of(ModelConfig("m", max_batch_size=8, inputs=(TensorConfig("x", "FP32", (4,), optional=True),))).fixed_key is None
    assert Signature.of(ModelConfig("m", max_batch_size=0, inputs=(x,))).fixed_key is None


class ThreadRecorder:
    """A fast runner that records which thread ran each batch; its engine clock is the test's."""

    def __init__(self, engine_clock) -> None:  # type: ignore[no-untyped-def]
        self.engine_clock = engine_clock
        self.threads: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        return {"y": inputs["x"] * 2}


def ticking(step_s: float):  # type: ignore[no-untyped-def]
    """An engine clock that advances `step_s` per reading: every run 'costs' `step_s`."""
    now = [0.0]

    def clock() -> float:
        now[0] += step_s
        return now[0]

    return clock


async def test_a_cheap_measured_request_runs_inline_and_a_larger_one_on_an_instance() -> None:
    runner = ThreadRecorder(ticking(5e-6))
    batcher = await started(runner, BatchingConfig(max_batch_rows=64), inline_below_s=100e-6,
                            warmups=((2, 10e-6), (16, 40e-6)))
    out = await batcher.submit(request(1.0))  # work 2: measured, 10 µs
    assert np.array_equal(out["y"], np.full((1, 2), 2.0, np.float32))
    assert runner.threads == [threading.get_ident()]  # on the event loop: no hand-off
    await batcher.submit(request(1.0, rows=9))  # work 18: more than anything measured
    assert runner.threads[1] != threading.get_ident()
    assert batcher.stats().inline_batches == 1 and batcher.stats().executed_batches == 2
    await batcher.stop()


class SizeRecorder(ThreadRecorder):
    """ThreadRecorder that also records each batch's rows."""

    def __init__(self, engine_clock) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine_clock)
        self.batches: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append(inputs["x"].shape[0])
        return super().__call__(inputs)


async def test_lone_inline_requests_run_at_once_once_waiting_found_nobody_and_a_probe_brings_waiting_back() -> None:
    """A lone cheap request waits for the end of the loop iteration (a future not yet done at
    submit) until 8 such waits in a row found nobody to join; then it runs inside submit. One in
    64 still waits: submitted in one iteration behind such a probe, a burst joins its batch, and
    waiting is back on for the next lone request."""
    runner = SizeRecorder(ticking(5e-6))
    batcher = await started(runner, BatchingConfig(max_batch_rows=64), inline_below_s=100e-6,
                            warmups=((2, 10e-6), (128, 40e-6)))
    for _ in range(8):
        lone = batcher.submit(request(1.0))
        assert not lone.done()
        await lone
    burst = [batcher.submit(request(float(i))) for i in range(70)]
    assert [f.done() for f in burst] == [True] * 63 + [False] * 7  # the 64th is the probe
    results = await asyncio.gather(*burst)
    assert all(np.array_equal(out["y"], np.full((1, 2), 2.0 * i, np.float32)) for i, out in enumerate(results))
    assert runner.batches == [1] * (8 + 63) + [7]
    assert set(runner.threads) == {threading.get_ident()}  # every batch on the event loop
    assert not batcher.submit(request(1.0)).done()  # the probe found a crowd: waiting is back on
    await batcher.stop()


class PoisonRecorder(ThreadRecorder):
    """ThreadRecorder that fails a batch holding NaN and blocks a batch of 9 rows until `gate`."""

    def __init__(self, engine_clock) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine_clock)
        self.gate = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.isnan(inputs["x"]).any():
            raise RuntimeError("poisoned input")
        if inputs["x"].shape[0] == 9:
            self.gate.wait(30)
        return super().__call__(inputs)


async def test_a_lone_request_run_inside_submit_is_counted_like_a_batch_through_the_queue() -> None:
    """The lone request that runs inside `submit` (no flight is kept for it) leaves the batcher's
    counters, the statistics and the cost model as a batch through the queue and the pump does;
    a failing run answers its own caller ExecutionError and is counted as executed."""
    stats = ModelStats()
    runner = PoisonRecorder(ticking(5e-6))
    batcher = await started(runner, BatchingConfig(max_batch_rows=64), inline_below_s=100e-6,
                            warmups=((2, 20e-6),), observer=stats)
    for _ in range(8):  # the first lone requests wait for the pump, a flight each
        pumped = batcher.submit(request(1.0))
        assert not pumped.done()
        await pumped
    at_once = [batcher.submit(request(float(i))) for i in range(10)]
    assert all(f.done() for f in at_once)  # inside submit
    assert [float(f.result()["y"][0, 0]) for f in at_once] == [2.0 * i for i in range(10)]
    n = 18
    assert stats.execution_count == stats.inference_count == n
    assert stats.queue.count == stats.compute_infer.count == stats.batches[1].compute_infer.count == n
    assert stats.batch_rows.counts[0] == n and stats.compute_seconds.counts[0] == n
    assert stats.compute_infer.ns == pytest.approx(n * 5e-6 * 1e9)
    assert batcher.estimate_s(2) == pytest.approx(5e-6 + 15e-6 * 0.8 ** n)  # each run's 5 µs, averaged in from 20
    counted = batcher.stats()
    assert counted.executed_batches == counted.inline_batches == n and counted.in_flight == counted.queued == 0
    assert counted.work_requested == counted.work_executed == 2 * n
    failed = batcher.submit(request(float("nan")))
    assert failed.done() and isinstance(failed.exception(), ExecutionError)
    assert batcher.stats().executed_batches == n + 1 and stats.execution_count == n + 1
    assert stats.compute_infer.count == n + 1  # the failed batch's compute time counts (Triton does too)
    await batcher.stop()


async def test_with_preserve_ordering_a_cheap_lone_request_waits_for_an_earlier_batch_still_running() -> None:
    """A request cheap enough for the event loop, arriving while an earlier caller's batch runs on
    an instance, is not run inside `submit` and answered first: with preserve_ordering its
    result waits for the earlier batch's (without, it is answered at once)."""
    for ordered in (True, False):
        runner = PoisonRecorder(ticking(5e-6))
        batcher = await started(runner, BatchingConfig(max_batch_rows=64, preserve_ordering=ordered), instances=2,
                                inline_below_s=100e-6, warmups=((2, 10e-6),))
        for _ in range(9):  # waiting found nobody: lone requests now run inside submit
            await batcher.submit(request(1.0))
        slow = batcher.submit(request(3.0, rows=9))  # work 18: more than measured, on an instance
        await asyncio.sleep(0)
        cheap = batcher.submit(request(5.0))
        for _ in range(5):
            await asyncio.sleep(0)
        assert cheap.done() is (not ordered) and not slow.done()
        runner.gate.set()
        assert float((await cheap)["y"][0, 0]) == 10.0 and float((await slow)["y"][0, 0]) == 6.0
        await batcher.stop()


async def test_a_batch_measured_slower_than_the_bound_moves_off_the_event_loop() -> None:
    runner = ThreadRecorder(ticking(300e-6))  # each run: 300 µs
    batcher = await started(runner, BatchingConfig(max_batch_rows=64), inline_below_s=100e-6,
                            warmups=((2, 10e-6),))
    await batcher.submit(request(1.0))  # estimated 10 µs: inline, measured ~300 µs
    for _ in range(20):  # the estimate follows the measurements past the bound (20 % a batch)
        await batcher.submit(request(1.0))
    assert runner.threads[0] == threading.get_ident() and runner.threads[-1] != threading.get_ident()
    assert batcher.estimate_s(2) > 100e-6
    await batcher.stop()


def run_costs(costs_s: Sequence[float]):  # type: ignore[no-untyped-def]
    """An engine clock under which the k-th run (two readings) costs `costs_s[k]` (the last
    one from then on)."""
    now, readings = [0.0], [0]

    def clock() -> float:
        now[0] += costs_s[min(readings[0] // 2, len(costs_s) - 1)]
        readings[0] += 1
        return now[0]

    return clock


async def test_one_slow_run_of_a_cheap_model_does_not_send_the_next_requests_off_the_event_loop() -> None:
    """A one-row forest run costs 40 µs, and now and then one reads 600 µs of CPU (a page fault,
    cold caches). The requests after it must still run on the event loop: one of them handed to
    a thread costs a hand-off, and the requests arriving meanwhile queue behind it."""
    runner = ThreadRecorder(run_costs([40e-6, 40e-6, 600e-6, 40e-6]))
    batcher = await started(runner, BatchingConfig(max_batch_rows=64), inline_below_s=100e-6,
                            warmups=((2, 40e-6),))
    for _ in range(12):
        await batcher.submit(request(1.0))
    assert runner.threads == [threading.get_ident()] * 12
    assert batcher.estimate_s(2) < 100e-6
    await batcher.stop()


class BackgroundGate:
    """Doubles x; a batch holding the value 7 (a background part here) blocks until the gate
    opens; records the thread names and how many parts ran at once."""

    engine_clock = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []
        self.parts_running = self.most_parts = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.threads.append(threading.current_thread().name)
        if (x == 7).any():
            with self._lock:
                self.parts_running += 1
                self.most_parts = max(self.most_parts, self.parts_running)
            self.entered.set()
            self.gate.wait(30)
            with self._lock:
                self.parts_running -= 1
        return {"y": x * 2}


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_caller_never_waits_behind_a_background_part(ordered: bool) -> None:
    """One instance, busy with a background part (an explanation's rows): a caller's request runs
    beside it at once and is answered (with preserve_ordering too: ordering is among callers'
    batches); the next part waits for the first, on the background threads."""
    from medserve.server.batching import BACKGROUND

    runner = BackgroundGate()
    batcher = Batcher(
        runner, BatcherConfig("'m' version 1", BatchingConfig(max_batch_rows=16, preserve_ordering=ordered),
                              inline_below_s=0.0),
        executor=ThreadPoolExecutor(1, thread_name_prefix="callers"),
        background_executor=ThreadPoolExecutor(2, thread_name_prefix="background"),
    )
    batcher.start()
    parts = [batcher.submit(request(7.0, rows=4, priority=BACKGROUND)) for _ in range(2)]
    await asyncio.to_thread(runner.entered.wait, 30)
    out = await asyncio.wait_for(batcher.submit(request(1.0)), 10)  # the part is still blocked
    assert np.array_equal(out["y"], np.full((1, 2), 2.0, np.float32))
    assert not any(p.done() for p in parts)
    runner.gate.set()
    for p in parts:
        assert np.array_equal((await p)["y"], np.full((4, 2), 14.0, np.float32))
    assert runner.most_parts == 1  # parts one at a time, even with a second background thread free
    assert [name.split("_")[0] for name in runner.threads] == ["background", "callers", "background"]
    await batcher.stop()


async def served(batcher: Batcher, req: BatchRequest) -> Mapping[str, np.ndarray]:
    """A request as the inference core serves it: answered by `run_now` if it may, else submitted."""
    out = batcher.run_now(req)
    return out if out is not None else await batcher.submit(req)


async def test_run_now_answers_an_idle_batchers_cheap_lone_request_and_counts_it_as_submit_would() -> None:
    """`run_now` answers only once waiting found nobody (before, it declines and `submit` queues
    the request for the pump); it leaves the probe to `submit` (one request in 64 still waits),
    and its counters, statistics and cost model read exactly as the same requests through
    `submit` alone; a failing run raises its caller's ExecutionError and is counted."""
    batchers, stats = [], []
    for via_run_now in (True, False):
        observer = ModelStats()
        runner = PoisonRecorder(ticking(5e-6))
        batcher = await started(runner, BatchingConfig(max_batch_rows=64), inline_below_s=100e-6,
                                warmups=((2, 20e-6),), observer=observer)
        for _ in range(8):  # waiting for the pump, found nobody
            if via_run_now:
                assert batcher.run_now(request(1.0)) is None
            pumped = batcher.submit(request(1.0))
            assert not pumped.done()
            await pumped
        for i in range(80):
            if via_run_now:
                out = batcher.run_now(request(float(i)))
                if i == 63:  # the 64th is the probe: declined, and `submit` still makes it wait
                    assert out is None
                    probe = batcher.submit(request(float(i)))
                    assert not probe.done()
                    out = await probe
                assert out is not None and float(out["y"][0, 0]) == 2.0 * i
            else:
                await batcher.submit(request(float(i)))
        if via_run_now:
            with pytest.raises(ExecutionError):
                batcher.run_now(request(float("nan")))
        else:
            with pytest.raises(ExecutionError):
                await batcher.submit(request(float("nan")))
        batchers.append(batcher)
        stats.append(observer)
    ran, submitted = batchers
    assert ran.stats() == submitted.stats() and ran.stats().executed_batches == 8 + 80 + 1
    assert ran.estimate_s(2) == submitted.estimate_s(2)
    for field in ("execution_count", "inference_count", "compute_infer"):  # the engine's (ticking) clock
        assert getattr(stats[0], field) == getattr(stats[1], field), field
    assert {k: v.compute_infer for k, v in stats[0].batches.items()} == {k: v.compute_infer for k, v in stats[1].batches.items()}
    assert stats[0].queue.count == stats[1].queue.count  # (its time is the wall clock's: the pumped ones differ)
    assert stats[0].batch_rows.counts == stats[1].batch_rows.counts
    assert stats[0].compute_seconds.counts == stats[1].compute_seconds.counts
    for batcher in batchers:
        await batcher.stop()


async def test_run_now_declines_what_admission_would_queue_refuse_or_time() -> None:
    """A busy batcher, another priority, a deadline that cannot be met, too many rows, a traced
    request, a model that waits for company: `run_now` declines each (and leaves the request to
    `submit`, which answers it as before)."""
    timer = FakeTimer()
    runner = PoisonRecorder(ticking(5e-6))
    config = BatchingConfig(max_batch_rows=64, priority_levels=2)
    batcher = await started(runner, config, inline_below_s=100e-6, warmups=((2, 20e-6),), clock=timer.clock,
                            instances=2)
    for _ in range(8):
        await batcher.submit(request(1.0))
    assert batcher.run_now(request(1.0)) is not None
    assert batcher.run_now(request(1.0, priority=1)) is None
    assert batcher.run_now(request(1.0, deadline_s=timer.now + 1e-6)) is None  # the run takes ~5-20 µs
    assert batcher.run_now(request(1.0, deadline_s=timer.now + 1.0)) is not None
    assert batcher.run_now(request(1.0, rows=65)) is None
    assert batcher.run_now(request(1.0, timing=RequestTiming())) is None
    held = batcher.submit(request(3.0, rows=9))  # work 18: more than measured, on an instance (held there)
    await asyncio.sleep(0.05)
    assert not held.done() and batcher.run_now(request(1.0)) is None  # a batch in flight
    runner.gate.set()
    await held
    await batcher.stop()
    waiting = await started(runner, BatchingConfig(max_batch_rows=64, preferred_batch_sizes=(4,), max_queue_delay_us=100),
                            inline_below_s=100e-6, warmups=((2, 20e-6),))
    assert waiting.run_now(request(1.0)) is None
    await waiting.stop()
