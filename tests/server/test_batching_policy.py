"""The batching policy as a pure function: explicit queues and explicit `now`, no event loop
running, no clock."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from medserve.server.batching import BatchRequest, CostModel, CrowdEstimate, PolicyConfig, QueuedItem, decide, work_of

KEY_A = ("x", "<f4", (4,))
KEY_B = ("x", "<f4", (8,))


@pytest.fixture
def loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def item(loop: asyncio.AbstractEventLoop) -> Callable[..., QueuedItem]:
    """item(seq, at, rows=1, key=KEY_A, level=0, deadline=None, timeout_at=None, delay=False)"""

    def make(
        seq: int,
        at: float,
        rows: int = 1,
        key: tuple[object, ...] = KEY_A,
        level: int = 0,
        deadline: float | None = None,
        timeout_at: float | None = None,
        delay: bool = False,
    ) -> QueuedItem:
        request = BatchRequest(inputs={"x": np.zeros((rows, 4), np.float32)}, rows=rows, key=key, deadline_s=deadline)
        return QueuedItem(request, loop.create_future(), seq, level, at, timeout_at, delay, key, work_of(request.inputs))

    return make


class FixedCost:
    """Every batch costs `seconds`; `measured` up to `largest` work (a CostEstimate)."""

    def __init__(self, seconds: float, largest: int = 1 << 30) -> None:
        self.seconds, self.largest = seconds, largest

    def estimate(self, work: int) -> float:
        return self.seconds

    def measured(self, work: int) -> bool:
        return work <= self.largest


no_cost = FixedCost(0.0)


def seqs(items: tuple[QueuedItem, ...]) -> list[int]:
    return [it.seq for it in items]


def test_empty_queue_waits_for_an_arrival() -> None:
    d = decide([], 0.0, PolicyConfig(max_batch_rows=8), no_cost, free_slots=1)
    assert d.run == () and d.wait_s is None


def test_zero_delay_runs_at_once(item) -> None:
    q = [item(0, 1.0), item(1, 1.0)]
    d = decide(q, 1.0, PolicyConfig(max_batch_rows=8), no_cost, free_slots=1)
    assert seqs(d.run) == [0, 1]


def test_max_delay_waits_then_runs(item) -> None:
    cfg = PolicyConfig(max_batch_rows=8, max_queue_delay_s=0.010)
    q = [item(0, 1.000), item(1, 1.004)]
    d = decide(q, 1.005, cfg, no_cost, free_slots=1)
    assert d.run == () and d.wait_s == pytest.approx(0.005)
    d = decide(q, 1.010, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0, 1]


def test_full_batch_runs_before_the_delay(item) -> None:
    cfg = PolicyConfig(max_batch_rows=4, max_queue_delay_s=10.0)
    q = [item(0, 0.0, rows=2), item(1, 0.0, rows=2), item(2, 0.0, rows=1)]
    d = decide(q, 0.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0, 1]  # 4 rows: the row limit, not the request count, closes it


def test_rows_limit_stops_at_the_first_request_that_does_not_fit(item) -> None:
    cfg = PolicyConfig(max_batch_rows=5, max_queue_delay_s=0.0)
    q = [item(0, 0.0, rows=3), item(1, 0.0, rows=3), item(2, 0.0, rows=1)]
    d = decide(q, 0.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0]  # FIFO: request 2 does not jump ahead of request 1


def test_preferred_size_closes_the_batch(item) -> None:
    cfg = PolicyConfig(max_batch_rows=64, max_queue_delay_s=10.0, preferred_rows=(2, 4))
    q = [item(i, 0.0) for i in range(5)]
    d = decide(q, 0.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0, 1, 2, 3]
    d = decide(q[:3], 0.0, cfg, no_cost, free_slots=1)
    assert d.run == () and d.wait_s == pytest.approx(10.0)


def test_no_free_instance_runs_nothing(item) -> None:
    q = [item(0, 0.0)]
    d = decide(q, 0.0, PolicyConfig(max_batch_rows=8), no_cost, free_slots=0)
    assert d.run == () and d.wait_s is None


def test_higher_priority_first_and_lower_levels_fill_the_batch(item) -> None:
    cfg = PolicyConfig(max_batch_rows=2)
    q = [item(0, 0.0, level=2), item(1, 0.0, level=2), item(2, 0.0, level=1)]
    d = decide(q, 0.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [2, 0]


def test_background_rows_never_join_a_callers_batch_and_run_one_part_at_a_time(item) -> None:
    from medserve.server.batching.policy import BACKGROUND_LEVEL

    cfg = PolicyConfig(max_batch_rows=64)
    q = [item(0, 0.0, rows=16, level=BACKGROUND_LEVEL), item(1, 0.0, rows=16, level=BACKGROUND_LEVEL),
         item(2, 0.5, level=1), item(3, 0.6, level=1)]
    d = decide(q, 1.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [2, 3]  # the callers run first, and alone: 2 rows, not 34
    d = decide(q[:2], 1.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0]  # background parts are not merged back into one long batch


def test_a_callers_batch_starts_beside_a_background_part_but_a_part_waits_for_a_free_instance(item) -> None:
    """One instance, held by a background part: a caller's request runs now (beside it); the
    next background part waits, and so does a caller's batch when a caller's batch holds it."""
    from medserve.server.batching.policy import BACKGROUND_LEVEL

    cfg = PolicyConfig(max_batch_rows=64)
    caller, part = item(0, 0.5, level=1), item(1, 0.0, rows=16, level=BACKGROUND_LEVEL)
    d = decide([part, caller], 1.0, cfg, no_cost, free_slots=1, background_in_flight=1)
    assert seqs(d.run) == [0]
    d = decide([part], 1.0, cfg, no_cost, free_slots=1, background_in_flight=1)
    assert not d.run and d.wait_s is None  # the part's end pumps the batcher again
    d = decide([part, caller], 1.0, cfg, no_cost, free_slots=0, background_in_flight=0)
    assert not d.run
    d = decide([part], 1.0, cfg, no_cost, free_slots=1, background_in_flight=0)
    assert seqs(d.run) == [1]


def test_padded_batches_keep_to_the_oldest_ones_length_bucket_when_that_costs_less(item) -> None:
    """Cost 50 µs + 1 µs per element (measured over the whole range): four short notes and one
    long one run as the four alone (padding all five to 64 costs more per real element); when
    the lengths are close, padding them together is cheaper than leaving one out."""
    cost = CostModel()
    for work in (1, 16, 64, 256, 1024):
        cost.observe(work, 50e-6 + work * 1e-6)

    def padded(seq: int, rows: int, length: int) -> QueuedItem:
        it = item(seq, 0.0, rows=rows)
        it.length, it.work = length, rows * length
        return it

    cfg = PolicyConfig(max_batch_rows=64)
    q = [padded(0, 1, 4), padded(1, 1, 64), padded(2, 1, 3), padded(3, 1, 4), padded(4, 1, 4)]
    assert seqs(decide(q, 0.0, cfg, cost, free_slots=1).run) == [0, 2, 3, 4]  # lengths 3-4: bucket (2, 4]
    q = [padded(0, 1, 4), padded(1, 1, 5), padded(2, 1, 4), padded(3, 1, 4)]
    assert seqs(decide(q, 0.0, cfg, cost, free_slots=1).run) == [0, 1, 2, 3]  # one batch, padded to 5
    unmeasured = CostModel()
    unmeasured.observe(4, 54e-6)
    q = [padded(0, 1, 4), padded(1, 1, 64), padded(2, 1, 4)]
    assert seqs(decide(q, 0.0, cfg, unmeasured, free_slots=1).run) == [0, 1, 2]  # the bucket's cost unmeasured


def test_background_parts_are_sized_by_the_measured_cost() -> None:
    from medserve.server.inference import background_part_rows

    cost = CostModel()
    for rows in (1, 64, 1024):
        cost.observe(rows * 30, 20e-6 + rows * 2e-6)  # 30 features: 2 µs a row over a fixed 20 µs
    assert background_part_rows(cost.estimate, 30, limit=4096, budget_s=1e-3) == 256  # 532 µs; 512 would be 1.04 ms
    assert background_part_rows(cost.estimate, 30, limit=128, budget_s=1e-3) == 128  # the model's own limit
    assert background_part_rows(cost.estimate, 30 * 4096, limit=64, budget_s=1e-3) == 1  # never zero


def test_shape_groups_have_their_own_delay_clock(item) -> None:
    cfg = PolicyConfig(max_batch_rows=8, max_queue_delay_s=0.010)
    q = [item(0, 0.000, key=KEY_A), item(1, 0.008, key=KEY_B), item(2, 0.009, key=KEY_A)]
    d = decide(q, 0.010, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0, 2]  # B's arrival neither closed nor joined A's batch
    d = decide([q[1]], 0.010, cfg, no_cost, free_slots=1)
    assert d.run == () and d.wait_s == pytest.approx(0.008)


def test_a_full_group_of_another_shape_runs_while_the_older_group_waits(item) -> None:
    cfg = PolicyConfig(max_batch_rows=2, max_queue_delay_s=1.0)
    q = [item(0, 0.0, key=KEY_A), item(1, 0.1, key=KEY_B), item(2, 0.1, key=KEY_B)]
    d = decide(q, 0.1, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [1, 2]


def test_batching_off_runs_each_request_alone(item) -> None:
    q = [item(0, 0.0), item(1, 0.0)]
    d = decide(q, 0.0, PolicyConfig(max_batch_rows=0), no_cost, free_slots=1)
    assert seqs(d.run) == [0]


def test_expired_deadline_is_failed_not_run(item) -> None:
    q = [item(0, 0.0, deadline=0.5), item(1, 0.0)]
    d = decide(q, 1.0, PolicyConfig(max_batch_rows=8), no_cost, free_slots=1)
    assert seqs(d.expire) == [0] and seqs(d.run) == [1]


def test_deadline_that_execution_cannot_meet_expires(item) -> None:
    q = [item(0, 0.0, deadline=1.004)]
    d = decide(q, 1.0, PolicyConfig(max_batch_rows=8), FixedCost(0.005), free_slots=1)
    assert seqs(d.expire) == [0]


def test_batch_closes_early_for_a_deadline(item) -> None:
    cfg = PolicyConfig(max_batch_rows=8, max_queue_delay_s=1.0)
    cost = FixedCost(0.25)
    q = [item(0, 0.0, deadline=0.5)]
    d = decide(q, 0.125, cfg, cost, free_slots=1)
    assert d.run == () and d.wait_s == pytest.approx(0.125)  # must start by 0.25, not at 1.0
    d = decide(q, 0.25, cfg, cost, free_slots=1)
    assert seqs(d.run) == [0]


def test_cancelled_requests_are_dropped(item) -> None:
    q = [item(0, 0.0), item(1, 0.0)]
    q[0].future.cancel()
    d = decide(q, 0.0, PolicyConfig(max_batch_rows=8), no_cost, free_slots=1)
    assert seqs(d.drop) == [0] and seqs(d.run) == [1]


def test_queue_policy_reject_expires_at_the_timeout(item) -> None:
    q = [item(0, 0.0, timeout_at=0.5)]
    cfg = PolicyConfig(max_batch_rows=8, max_queue_delay_s=10.0)
    d = decide(q, 0.2, cfg, no_cost, free_slots=1)
    assert d.run == () and d.wait_s == pytest.approx(0.3)
    d = decide(q, 0.5, cfg, no_cost, free_slots=1)
    assert seqs(d.expire) == [0]


def test_queue_policy_delay_keeps_the_request_behind_the_others(item) -> None:
    cfg = PolicyConfig(max_batch_rows=1)
    q = [item(0, 0.0, timeout_at=0.5, delay=True), item(1, 0.6)]
    d = decide(q, 1.0, cfg, no_cost, free_slots=1)
    assert d.expire == () and seqs(d.run) == [1]
    d = decide([q[0]], 1.0, cfg, no_cost, free_slots=1)
    assert seqs(d.run) == [0]


def test_cost_model_interpolates_and_extrapolates() -> None:
    cost = CostModel(alpha=1.0)
    assert cost.estimate(4) == 0.0
    cost.observe(1, 0.001)
    cost.observe(9, 0.009)
    assert cost.estimate(5) == pytest.approx(0.005)
    assert cost.estimate(18) == pytest.approx(0.018)
    cost.observe(1, 0.003)
    assert cost.estimate(1) == pytest.approx(0.003)


def test_crowd_estimate_waits_the_whole_delay_until_a_batch_has_run() -> None:
    crowd = CrowdEstimate(alpha=0.5, probe_every=4)
    assert crowd.target() is None
    crowd.observe(6)
    assert crowd.target() == 6


def test_crowd_estimate_follows_the_batches_and_closes_lone_requests_at_once() -> None:
    crowd = CrowdEstimate(alpha=0.5, probe_every=100)
    crowd.observe(10)
    for _ in range(6):
        crowd.observe(12)  # batches that closed at the target took everyone queued
    assert crowd.target() == 12
    crowd.observe(3)  # the whole delay passed and only 3 came: the load fell
    assert crowd.target() == 3
    crowd.observe(1)
    assert crowd.target() == 1  # nobody comes: no waiting


def test_crowd_estimate_probes_the_whole_delay_every_so_often() -> None:
    crowd = CrowdEstimate(alpha=0.5, probe_every=3)
    crowd.observe(1)
    for _ in range(3):
        assert crowd.target() == 1
        crowd.observe(1)
    assert crowd.target() is None  # the next batch waits the whole delay ...
    crowd.observe(9)  # ... and finds a crowd
    assert crowd.target() == 5 and crowd.since_probe == 0


def test_crowd_estimate_probes_less_often_while_probes_find_nobody() -> None:
    crowd = CrowdEstimate(alpha=0.5, probe_every=2, probe_max=8)

    def batches_until_probe() -> int:
        n = 0
        while crowd.target() is not None:
            crowd.observe(1)
            n += 1
        crowd.observe(1)  # the probe: nobody came
        return n

    crowd.observe(1)
    assert [batches_until_probe() for _ in range(5)] == [2, 4, 8, 8, 8]
    while crowd.target() is not None:
        crowd.observe(1)
    crowd.observe(4)  # a probe that found company: back to probing often
    assert crowd.interval == 2


def test_cost_model_knows_what_it_has_measured() -> None:
    cost = CostModel(alpha=0.5)
    assert not cost.measured(1)
    cost.observe(8, 0.001)  # bucket [8, 16)
    cost.observe(12, 0.003)  # same bucket: the means move halfway
    assert cost.estimate(10) == pytest.approx(0.002)
    assert cost.estimate(2) == pytest.approx(0.002)  # below the smallest: the smallest's time
    assert cost.measured(12) and not cost.measured(13)
    assert cost.estimate(40) == pytest.approx(0.002 * 40 / 10)  # beyond: scaled by work


def test_a_cheap_measured_batch_runs_inline_and_anything_larger_than_measured_does_not(item) -> None:
    cfg = PolicyConfig(max_batch_rows=8, inline_below_s=100e-6)
    q = [item(0, 0.0, rows=2)]  # work 8
    assert decide(q, 0.0, cfg, FixedCost(50e-6), free_slots=1).inline
    assert not decide(q, 0.0, cfg, FixedCost(150e-6), free_slots=1).inline  # too slow for the loop
    assert not decide(q, 0.0, cfg, FixedCost(50e-6, largest=4), free_slots=1).inline  # never measured
    assert decide(q, 0.0, cfg, FixedCost(50e-6, largest=4), free_slots=1).run  # ... runs, on an instance


def test_the_learned_crowd_closes_a_batch_before_the_delay(item) -> None:
    cfg = PolicyConfig(max_batch_rows=8, max_queue_delay_s=10.0)
    q = [item(i, 0.0) for i in range(3)]
    assert decide(q, 0.0, cfg, no_cost, free_slots=1).run == ()  # no estimate: wait for the delay
    assert seqs(decide(q, 0.0, cfg, no_cost, free_slots=1, close_at_rows=3).run) == [0, 1, 2]
    assert seqs(decide(q, 0.0, cfg, no_cost, free_slots=1, close_at_rows=2).run) == [0, 1]
    d = decide(q[:1], 0.0, cfg, no_cost, free_slots=1, close_at_rows=2)
    assert d.run == () and d.wait_s == pytest.approx(10.0)


def test_a_batch_is_costed_by_its_work_not_its_rows(item) -> None:
    """One long sequence costs what its elements cost: the deadline check sees it."""
    cost = CostModel(alpha=1.0)
    cost.observe(4, 0.001)  # one row of 4 elements: 1 ms
    cost.observe(64, 0.016)
    cfg = PolicyConfig(max_batch_rows=8)
    short = item(0, 0.0, deadline=0.010)  # work 4: fits its 10 ms
    assert seqs(decide([short], 0.0, cfg, cost, free_slots=1).run) == [0]
    long = QueuedItem(
        BatchRequest(inputs={"x": np.zeros((1, 64), np.float32)}, rows=1, key=KEY_A, deadline_s=0.010),
        short.future.get_loop().create_future(), 1, 0, 0.0, None, False, KEY_A, 64,
    )
    assert seqs(decide([long], 0.0, cfg, cost, free_slots=1).expire) == [1]  # 16 ms > 10 ms
