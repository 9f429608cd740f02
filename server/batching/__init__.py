"""Dynamic batching for one model version. Knows numpy and the standard library, nothing of
protobuf or gRPC.

    policy.py       queued items and the pure policy: `admit` (a request's arrival: refused, run
                    now, or queued), `runs_at_once` (whether `admit` would run it inline at once
                    on an idle batcher), `decide` (what runs, when, where), `releasable` (ordering)
    estimators.py   the cost model (execution seconds by work) and the learned crowd size
    execute.py      concatenate / run / bisect / split one batch; split and join oversized requests;
                    the `Runner` protocol (a batch in, outputs out, and the engine's clock)
    driver.py       `Batcher`: the asyncio driver (queue, pump, timer, executors, futures,
                    statistics); every choice it makes is one of the policy's answers

What a batch is: requests whose inputs have the same names, datatypes and non-batch dims (their
`key`), concatenated along dim 0. A batch never holds more than `max_batch_rows` rows (the sum of
dim 0, Triton's `max_batch_size`). A single request of more than `split_rows` rows (the model's
`max_batch_size`) is split into parts of at most that many rows, queued together in order (each
part may share a batch with other requests); its outputs are joined in order, and it fails as a
whole, with the first error of any part, if any part fails.

Groups without head-of-line blocking: every key has its own group and its own delay clock, so a
request of another shape never closes or delays the batch that is forming.

When a batch closes (`decide`), as soon as an instance is free and, for one group, any of:
  * the rows waiting reach `max_batch_rows` or the largest preferred batch size;
  * the oldest member has waited `max_queue_delay_us` (0 = run at once: batches still grow while
    every instance is busy, which is where most batching comes from);
  * with a delay but no preferred sizes configured: the group holds as many rows as recent
    batches reached (`CrowdEstimate`; now and then a batch waits the whole delay to notice
    rising load), so a lone request on a quiet server is not held back for company that never
    comes, and under load a batch closes when its usual crowd is in rather than when the delay ends;
  * waiting longer would make a member miss its deadline, given the measured cost of the batch
    (`CostModel`), or its queue-policy timeout would pass.
Among ready groups the one whose best member has the highest priority (level 1 first), then the
earliest arrival, runs first. Requests whose queue timeout passed under `timeout_action: DELAY`
rank after all others. `BACKGROUND` requests (explanations' perturbed rows) rank after every
caller's request, never share a batch with one, run one at a time per instance, only on an
instance no batch holds, and, when they leave the event loop, on threads of their own
(`background_executor`, at the lowest CPU priority; a part measured under `inline_below_s` runs
inline like any cheap batch); they hold no caller's slot: a caller's batch starts beside a
running part, so a caller never waits behind the server's own work. A `BACKGROUND` request may
hold more rows than `max_batch_rows` (it is never split into queued parts): it runs as engine
calls of at most that many rows in one flight, so a long part costs the event loop one hand-off.

Worst-case queueing delay for a request while an instance is free: `max_queue_delay_us`; while
all instances are busy it also waits for one to finish (bounded by its deadline).

Where a batch runs (also `decide`'s answer): on a worker thread of `executor` (onnxruntime
releases the GIL), except a batch whose measured cost is under `inline_below_s` (100 µs), which
runs on the event loop itself: a thread hand-off each way would cost more than the execution.
Costs are the engine's own time, measured in the executing thread and keyed by the batch's work
(its input elements), so a long sequence sent to a normally cheap model is not mistaken for a
cheap batch: a batch larger than anything measured never runs on the event loop. A request that
finds the batcher idle is answered by `decide` at once (usually "run it now"), without a trip
through the queue. One that would run inline waits for the end of the loop iteration, so that
requests decoded meanwhile join its batch, unless recent waits found nobody to join
(`LoneEstimate`): it then runs at once, in `submit`, and one in 64 waits as a probe. The
inference core asks `Batcher.run_now` first, which answers such a request itself (when
`runs_at_once` holds and the estimate says run): no queue item and no future, the same counters
and statistics.

Ordering: FIFO within a priority level and key. With `preserve_ordering`, batches release their
results in the order they were dispatched.

Refusals at `submit` (`admit`'s answers): queue full (`QueueFull`, naming the model and the
limit, with a retry hint; a split request needs room for all its parts); a deadline that cannot
be met even if the request ran now (`DeadlineExceeded`, never executed); a priority out of range,
too many rows, or a split request with more parts than the queue can ever hold (`InvalidInput`).
Before a batch runs, expired requests fail with `DeadlineExceeded` and
cancelled ones are dropped; neither ever runs. If a batch fails, it is bisected and re-run so only
the requests that cause the failure fail. Every future is resolved exactly once on every path.
"""
from .driver import Batcher, BatcherConfig, BatcherStats, BatchObserver, Clock, Timer, TimerHandle, join_parts
from .estimators import CostModel, CrowdEstimate, LoneEstimate, work_of
from .execute import Outcome, RunBatch, Runner, execute, execution_failure, join_outputs, split_rows
from .policy import (
    BACKGROUND,
    AdmissionConfig,
    Admit,
    Arrays,
    BatchRequest,
    CostEstimate,
    Decision,
    PolicyConfig,
    QueuedItem,
    Refuse,
    RequestTiming,
    Snapshot,
    admit,
    compatibility_key,
    decide,
    has_slot,
    queue_level,
    queue_timeout_us,
    releasable,
    retry_after_s,
    runs_at_once,
    runs_inline,
)

__all__ = [
    "BACKGROUND",
    "Admit",
    "AdmissionConfig",
    "Arrays",
    "BatchObserver",
    "BatchRequest",
    "Batcher",
    "BatcherConfig",
    "BatcherStats",
    "Clock",
    "CostEstimate",
    "CostModel",
    "CrowdEstimate",
    "LoneEstimate",
    "Decision",
    "Outcome",
    "PolicyConfig",
    "QueuedItem",
    "Refuse",
    "RequestTiming",
    "RunBatch",
    "Runner",
    "Snapshot",
    "Timer",
    "TimerHandle",
    "admit",
    "compatibility_key",
    "decide",
    "execute",
    "execution_failure",
    "has_slot",
    "join_outputs",
    "join_parts",
    "queue_level",
    "queue_timeout_us",
    "releasable",
    "retry_after_s",
    "runs_at_once",
    "runs_inline",
    "split_rows",
    "work_of",
]
