"""Load processes: each runs one asyncio loop and sends pre-encoded ModelInferRequest bytes as
they are (no serializer; the response bytes come back undecoded), over the transport its generator names:

* `python` (default): `rawh2`, hand-framed HTTP/2, the cheapest per call, so on a small host
  the generator leaves the cores to the server it measures;
* `grpcio`: grpc.aio channels with a generic method, the reference client, for checking
  rawh2's figures against.
Their costs, measured: `python -m medserve.perf.bench_transports` (figures in perf/README.md).

Closed loop: `concurrency` coroutines, each sending its next request when the previous one is
answered. Latency = answer time - send time.

Open loop: requests are due at fixed or Poisson-distributed *intended* times, sent whether or
not earlier ones were answered. Latency = answer time - intended time, so a generator or server
that falls behind shows up in the latency instead of silently delaying the schedule
(no coordinated omission). The gap between intended and actual send time is reported as
`send_lag` so a late generator is visible.

Only requests due (open) or started (closed) inside the measurement window are recorded; every
one of them ends with a status: a gRPC code, or INCOMPLETE when it was still unanswered
`drain_s` after the window. Errors never stop the run. Throughput counts the responses
*received* inside the window (so an overloaded server's rate shows, not the offered one).

The parent (`LoadPool`) starts the processes once (spawn: no fork of a gRPC process), hands
each a `Job` per measurement, and gets back compact arrays.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import resource
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rawh2
from .measure import INCOMPLETE
from .scenario import INFER_PATH

CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel: spread over workers
    ("grpc.enable_retries", 0),  # no retry buffering: less work per call
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


@dataclass(frozen=True, slots=True)
class Job:
    """One load process's part of one measurement. Times are `time.monotonic_ns()` values
    (CLOCK_MONOTONIC: the same clock in every process of the host)."""

    address: str
    mode: str  # "closed" | "open"
    concurrency: int  # closed: this process's share
    rate: float  # open: this process's share, requests/s
    arrival: str  # "poisson" | "fixed"
    phase_s: float  # open/fixed: offset of this process's first request
    warmup_s: float
    measure_s: float
    drain_s: float
    bodies: tuple[tuple[bytes, ...], ...]  # per model: request variants
    timeouts_s: tuple[float | None, ...]  # per model: gRPC deadline
    goals_ns: tuple[int | None, ...]  # per model: latency that still counts as goodput (None = any)
    plan: bytes  # model index per request, uint8, used cyclically (the weighted mix)
    channels: int
    max_outstanding: int
    seed: int
    generator: str = "python"  # "python": rawh2; "grpcio": grpc.aio channels
    back_off: bool = False  # closed: after RESOURCE_EXHAUSTED wait the server's retry pushback (else 5 ms)


def _rusage_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Recorder:
    """Per-request records of the measurement window, in flat arrays (cheap appends)."""

    def __init__(self) -> None:
        self.offset_ns = array("q")  # intended (open) or actual (closed) send time - window start
        self.latency_ns = array("q")
        self.lag_ns = array("q")
        self.status = array("h")
        self.model = array("B")

    def add(self, offset_ns: int, latency_ns: int, lag_ns: int, status: int, model: int) -> None:
        self.offset_ns.append(offset_ns)
        self.latency_ns.append(latency_ns)
        self.lag_ns.append(lag_ns)
        self.status.append(status)
        self.model.append(model)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "offset_ns": np.frombuffer(self.offset_ns, dtype=np.int64).copy(),
            "latency_ns": np.frombuffer(self.latency_ns, dtype=np.int64).copy(),
            "lag_ns": np.frombuffer(self.lag_ns, dtype=np.int64).copy(),
            "status": np.frombuffer(self.status, dtype=np.int16).copy(),
            "model": np.frombuffer(self.model, dtype=np.uint8).copy(),
        }


class _WindowCounts:
    """Responses *received* inside the window (whenever they were sent): the throughput."""

    __slots__ = ("done", "ok", "good")

    def __init__(self) -> None:
        self.done = self.ok = self.good = 0

    def count(self, status: int, latency_ns: int, goal_ns: int | None) -> None:
        self.done += 1
        if status == 0:
            self.ok += 1
            if goal_ns is None or latency_ns <= goal_ns:
                self.good += 1


class _Worker:
    def __init__(self, index: int, counters: Any) -> None:
        import grpc

        self._grpc = grpc
        self._index = index
        self._counters = counters
        self._channels: dict[str, list[Any]] = {}
        self._raw: dict[str, list[rawh2.Channel]] = {}
        self.window = _WindowCounts()
        self.messages: dict[int, str] = {}  # the first message of each status (never a payload's values)
        self.pushback_s = 0.0  # the last failure's retry pushback (RESOURCE_EXHAUSTED)

    async def calls(self, address: str, count: int, generator: str) -> list[Any]:
        if generator != "grpcio":
            return await self._raw_calls(address, count)
        chans = self._channels.setdefault(address, [])
        while len(chans) < count:
            options = [*CHANNEL_OPTIONS, ("medserve.perf.channel", f"{self._index}-{len(chans)}")]
            chans.append(self._grpc.aio.insecure_channel(address, options=options))
        for ch in chans[:count]:
            try:
                await asyncio.wait_for(ch.channel_ready(), 10)
            except TimeoutError:
                pass  # the first calls will fail with UNAVAILABLE and be counted as such
        return [ch.unary_unary(INFER_PATH, request_serializer=None, response_deserializer=None) for ch in chans[:count]]

    async def _raw_calls(self, address: str, count: int) -> list[Any]:
        chans = self._raw.setdefault(address, [])
        while len(chans) < count:
            chan = rawh2.Channel(address)
            await chan.connect()  # failing: the first calls end UNAVAILABLE and are counted as such
            chans.append(chan)
        return [ch.unary(INFER_PATH) for ch in chans[:count]]

    async def close(self) -> None:
        for chans in self._channels.values():
            for ch in chans:
                await ch.close()
        for raw in self._raw.values():
            for chan in raw:
                await chan.close()

    async def run(self, job: Job, start_ns: int) -> dict[str, Any]:
        calls = await self.calls(job.address, max(1, job.channels), job.generator)
        rec = _Recorder()
        self.window = _WindowCounts()
        self.messages = {}
        m0 = start_ns + int(job.warmup_s * 1e9)
        m1 = m0 + int(job.measure_s * 1e9)
        cpu: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        loop.call_at(m0 / 1e9, lambda: cpu.__setitem__("m0", _rusage_s()))
        loop.call_at(m1 / 1e9, lambda: cpu.__setitem__("m1", _rusage_s()))
        delay = (start_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        stats = {"backlogged": 0, "sent": 0}
        if job.mode == "closed":
            await self._closed(job, calls, rec, m0, m1, stats)
        else:
            await self._open(job, calls, rec, start_ns, m0, m1, stats)
        now = _rusage_s()
        return {
            **rec.arrays(),
            "cpu_s": cpu.get("m1", now) - cpu.get("m0", now),
            "window_s": job.measure_s,
            "backlogged": stats["backlogged"],
            "window_done": self.window.done,
            "window_ok": self.window.ok,
            "window_good": self.window.good,
            "sent_total": stats["sent"],
            "messages": self.messages,
            "pid": os.getpid(),
        }

    def _status(self, exc: BaseException) -> int:
        """The call's status; its first message per status is kept, and a retry pushback."""
        pushback: Any = None
        if isinstance(exc, rawh2.RpcError):
            status, message, pushback = exc.code, exc.message, exc.pushback_ms
        elif isinstance(exc, self._grpc.aio.AioRpcError):
            status, message = int(exc.code().value[0]), str(exc.details())
            pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        else:
            status, message = int(self._grpc.StatusCode.UNKNOWN.value[0]), type(exc).__name__
        if status not in self.messages:
            self.messages[status] = message[:160]
        self.pushback_s = int(pushback) / 1e3 if pushback is not None and str(pushback).isdigit() else 0.005
        return status

    async def _closed(self, job: Job, calls: Sequence[Any], rec: _Recorder, m0: int, m1: int, stats: dict[str, int]) -> None:
        plan = job.plan
        n_plan = len(plan)
        counters, index = self._counters, self._index
        clock = time.monotonic_ns
        conc = job.concurrency
        win, goals = self.window, job.goals_ns

        async def one(slot: int) -> None:
            call = calls[slot % len(calls)]
            k = slot
            while True:
                t0 = clock()
                if t0 >= m1:
                    return
                mi = plan[k % n_plan]
                variants = job.bodies[mi]
                body = variants[(k // n_plan) % len(variants)]
                k += conc
                try:
                    await call(body, timeout=job.timeouts_s[mi])
                    status = 0
                except asyncio.CancelledError:
                    if t0 >= m0:
                        rec.add(t0 - m0, clock() - t0, 0, INCOMPLETE, mi)
                    raise
                except Exception as exc:  # noqa: BLE001 - every outcome is a status
                    status = self._status(exc)
                t1 = clock()
                if t0 >= m0:
                    rec.add(t0 - m0, t1 - t0, 0, status, mi)
                if m0 <= t1 < m1:
                    win.count(status, t1 - t0, goals[mi])
                stats["sent"] += 1
                counters[index] += 1
                if status == rawh2.RESOURCE_EXHAUSTED and job.back_off:
                    await asyncio.sleep(self.pushback_s)

        tasks = [asyncio.ensure_future(one(i)) for i in range(conc)]
        await _finish(tasks, m1 + int(job.drain_s * 1e9))

    async def _open(self, job: Job, calls: Sequence[Any], rec: _Recorder, start: int, m0: int, m1: int,
                    stats: dict[str, int]) -> None:
        plan = job.plan
        n_plan = len(plan)
        counters, index = self._counters, self._index
        clock = time.monotonic_ns
        win, goals = self.window, job.goals_ns
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng(job.seed)
        mean_ns = 1e9 / job.rate
        tasks: set[asyncio.Task[None]] = set()
        free = asyncio.Event()

        async def send(intended: int, k: int) -> None:
            mi = plan[k % n_plan]
            variants = job.bodies[mi]
            body = variants[(k // n_plan) % len(variants)]
            sent = clock()
            try:
                await calls[k % len(calls)](body, timeout=job.timeouts_s[mi])
                status = 0
            except asyncio.CancelledError:
                if intended >= m0:
                    rec.add(intended - m0, clock() - intended, sent - intended, INCOMPLETE, mi)
                raise
            except Exception as exc:  # noqa: BLE001 - every outcome is a status
                status = self._status(exc)
            done = clock()
            if intended >= m0:
                rec.add(intended - m0, done - intended, sent - intended, status, mi)
            if m0 <= done < m1:
                win.count(status, done - intended, goals[mi])
            counters[index] += 1

        def on_done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            free.set()

        intended = start + int(job.phase_s * 1e9)
        k = 0
        gaps: Iterator[int] = iter(())
        while intended < m1:
            now = clock()
            if intended > now:
                await asyncio.sleep((intended - now) / 1e9)
            elif k % 64 == 63:
                await asyncio.sleep(0)  # behind schedule: still let answers in
            while len(tasks) >= job.max_outstanding:
                stats["backlogged"] += 1
                free.clear()
                await free.wait()
            task = loop.create_task(send(intended, k))
            task.add_done_callback(on_done)
            tasks.add(task)
            stats["sent"] += 1
            k += 1
            if job.arrival == "fixed":
                intended = start + int(job.phase_s * 1e9 + k * mean_ns)
            else:
                gap = next(gaps, None)
                if gap is None:
                    gaps = iter(rng.exponential(mean_ns, 4096).astype(np.int64).tolist())
                    gap = next(gaps)
                intended += max(1, gap)
        await _finish(list(tasks), m1 + int(job.drain_s * 1e9))


async def _finish(tasks: Sequence[asyncio.Future[None]], until_ns: int) -> None:
    """Wait for the tasks until `until_ns`, then cancel the rest (they record INCOMPLETE)."""
    if not tasks:
        return
    timeout = max(0.0, (until_ns - time.monotonic_ns()) / 1e9)
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)


def _process_main(index: int, conn: multiprocessing.connection.Connection, counters: Any) -> None:
    async def main() -> None:
        worker = _Worker(index, counters)
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await loop.run_in_executor(None, conn.recv)
                if message is None:
                    return
                job: Job = message
                await worker.calls(job.address, max(1, job.channels), job.generator)  # connect before the start
                conn.send("ready")
                start_ns = await loop.run_in_executor(None, conn.recv)
                if start_ns is None:
                    return
                try:
                    result = await worker.run(job, start_ns)
                except Exception as exc:  # noqa: BLE001 - report, keep the process usable
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                conn.send(result)
        finally:
            await worker.close()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass


class LoadPool:
    """`processes` load processes, started once and reused for every measurement.

        with LoadPool(2) as pool:
            results = pool.run(jobs, on_start=lambda start_ns: ...)
    """

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.counters = ctx.RawArray("q", processes)  # completions per process (progress line)
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(i, child, self.counters), name=f"medserve-perf-load-{i}",
                               daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def completed(self) -> int:
        return int(sum(self.counters))

    def start(self, jobs: Sequence[Job | None], lead_s: float = 0.1) -> int:
        """Hand out the jobs (None = idle this time), wait until every process has its channels
        ready, and return the common start time (monotonic ns)."""
        active = [(c, j) for c, j in zip(self._conns, jobs, strict=True) if j is not None]
        for conn, job in active:
            conn.send(job)
        for conn, _ in active:
            if conn.recv() != "ready":
                raise RuntimeError("load process failed to get ready")
        start_ns = time.monotonic_ns() + int(lead_s * 1e9)
        for conn, _ in active:
            conn.send(start_ns)
        self._active = [c for c, _ in active]
        return start_ns

    def collect(self) -> list[dict[str, Any]]:
        results = [conn.recv() for conn in self._active]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"load process failed: {errors[0]}")
        return results

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_jobs(total_concurrency: int, total_rate: float, processes: int) -> list[tuple[int, float, float]]:
    """(concurrency, rate, phase_s) per process: concurrency spread as evenly as possible,
    rate split equally, fixed-rate phases interleaved so the merged schedule stays even."""
    out = []
    for p in range(processes):
        conc = total_concurrency // processes + (1 if p < total_concurrency % processes else 0)
        rate = total_rate / processes if total_rate else 0.0
        phase = p / total_rate if total_rate else 0.0
        out.append((conc, rate, phase))
    return out
