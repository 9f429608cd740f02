"""Measurements around the load: latency histograms (HdrHistogram), the server's own
ModelStatistics before and after the window (per worker process, summed), CPU and RSS of
processes read from /proc (the server) or getrusage (the harness), this machine's thread
hand-off, and the timing of calls made in process (the engine, a tokenizer, a client library).
Every benchmark reads these here, so a figure means the same wherever it is printed.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CDF_POINTS = (0.0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 99.95, 99.99, 100.0)
HIGHEST_US = 3_600_000_000  # one hour


INCOMPLETE = -1  # status of a request still unanswered when the drain time ran out
FAILED = -2  # h2load: a request the server counted as failed, whose gRPC status nobody saw


def status_name(code: int) -> str:
    """gRPC status code number -> name (INCOMPLETE for -1: unanswered when the drain ran out;
    FAILED for -2: failed by the server's count, code unseen)."""
    import grpc

    if code == INCOMPLETE:
        return "INCOMPLETE"
    if code == FAILED:
        return "FAILED"
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc.name
    return f"CODE_{code}"


def histogram(latencies_us: Iterable[int]) -> Any:
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram(1, HIGHEST_US, 3)
    for v in latencies_us:
        h.record_value(min(max(1, int(v)), HIGHEST_US))
    return h


def latency_summary(latency_ns: np.ndarray) -> dict[str, Any]:
    """p50/p90/p99/p99.9, max, min, mean (µs) and a coarse CDF, from an HdrHistogram (3
    significant digits). Empty input gives None values."""
    if latency_ns.size == 0:
        return {"count": 0, **{f"p{p:g}": None for p in PERCENTILES}, "max": None, "min": None, "mean": None,
                "cdf": []}
    us = np.maximum(1, np.rint(latency_ns / 1e3)).astype(np.int64)
    values, counts = np.unique(us, return_counts=True)
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram(1, HIGHEST_US, 3)
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        h.record_value(min(v, HIGHEST_US), c)
    out: dict[str, Any] = {"count": int(h.get_total_count())}
    for p in PERCENTILES:
        out[f"p{p:g}"] = float(h.get_value_at_percentile(p))
    out["max"] = float(h.get_max_value())
    out["min"] = float(h.get_min_value())
    out["mean"] = round(float(h.get_mean_value()), 1)
    out["cdf"] = [[p, float(h.get_value_at_percentile(p) if p > 0 else h.get_min_value())] for p in CDF_POINTS]
    return out


# -- /proc ----------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and all its descendants (so `medserve serve --workers N` counts every worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _host_cpu_ticks() -> list[int]:
    """/proc/stat's all-cores line since boot, in clock ticks: user, nice, system, idle,
    iowait, irq, softirq, steal, ... (fewer on old kernels)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def host_busy_s() -> float:
    """CPU seconds the whole host has spent busy since boot, all cores (/proc/stat: user,
    nice, system, irq, softirq; not idle, iowait or time stolen by a hypervisor)."""
    v = _host_cpu_ticks()
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / _TICKS


def thread_schedstat_s(pid: int, tid: int | None = None) -> tuple[float, float]:
    """Seconds one thread (the main thread by default: a server's event loop) has run on a CPU
    and waited ready in the run queue since it started (/proc/<pid>/task/<tid>/schedstat, in
    nanoseconds; utime's 10 ms ticks are too coarse to charge one request). NaN where the
    kernel keeps no such figures (built without CONFIG_SCHED_INFO)."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    except FileNotFoundError:
        return math.nan, math.nan
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def host_stolen_s() -> float:
    """CPU seconds a hypervisor has given to other guests while this one's vCPUs were ready to
    run, all cores, since boot (/proc/stat: steal). A VM's "slow spell" shows up here, so a
    benchmark can tell the host's noise from its own."""
    v = _host_cpu_ticks()
    return v[7] / _TICKS if len(v) > 7 else 0.0


def _proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_mib(pids: Iterable[int]) -> float:
    """Resident memory of the processes (MiB, summed; one that has gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            total += _proc_rss_bytes(pid)
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


@dataclass(frozen=True, slots=True)
class ProcSnapshot:
    at_s: float
    cpu_s: dict[int, float]
    rss_bytes: int


def proc_snapshot(pids: Iterable[int]) -> ProcSnapshot | None:
    cpu: dict[int, float] = {}
    rss = 0
    for pid in pids:
        try:
            cpu[pid] = _proc_cpu_s(pid)
            rss += _proc_rss_bytes(pid)
        except (OSError, ValueError, IndexError):
            continue
    return ProcSnapshot(time.monotonic(), cpu, rss) if cpu else None


def proc_delta(before: ProcSnapshot | None, after: ProcSnapshot | None) -> dict[str, float] | None:
    """Cores used (CPU seconds / wall seconds, summed over processes) and RSS at the end (MiB)."""
    if before is None or after is None:
        return None
    wall = after.at_s - before.at_s
    used = sum(after.cpu_s[p] - before.cpu_s[p] for p in after.cpu_s if p in before.cpu_s)
    return {"cpu_cores": round(used / wall, 3) if wall > 0 else 0.0, "rss_mib": round(after.rss_bytes / 2**20, 1),
            "processes": len(after.cpu_s)}


def metric_totals(urls: Iterable[str], name: str, by: str, where: Mapping[str, str] | None = None) -> dict[str, float]:
    """The samples named `name` on every URL's Prometheus /metrics (a server's workers, each on
    its own port) whose labels include `where`, summed by the value of their label `by`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (where or {}).items()):
                    key = sample.labels.get(by, "")
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


# -- in process ------------------------------------------------------------------------------


def executor_round_trip_us(calls: int = 20_000) -> dict[str, float]:
    """This machine's thread hand-off: one `loop.run_in_executor(None, f)` round trip (submit
    to the default thread pool, run a no-op there, wake the loop with the result), µs: median
    and mean over `calls`. Machines of one kind differ several-fold here, so every benchmark
    prints it beside its figures."""

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        clock = time.perf_counter_ns
        times = []
        for _ in range(calls):
            t0 = clock()
            await loop.run_in_executor(None, int)
            times.append(clock() - t0)
        return times

    us = np.asarray(asyncio.run(run())[calls // 10:], dtype=np.float64) / 1e3  # the first tenth warms up
    return {"median_us": round(float(np.median(us)), 1), "mean_us": round(float(us.mean()), 1)}


def time_calls(call: Callable[[], object], *, calls: int = 0, seconds: float = 0.0) -> list[int]:
    """Nanoseconds of each of `call()`'s runs, one after another: at least `calls` of them and
    for at least `seconds` (the in-process loop every benchmark times its calls with)."""
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    times: list[int] = []
    while len(times) < calls or clock() < end:
        t0 = clock()
        call()
        times.append(clock() - t0)
    return times


# -- server statistics ----------------------------------------------------------------------

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class StatsProbe:
    """ModelStatistics of every worker behind one address. Workers share a port
    (SO_REUSEPORT) and each keeps its own statistics, so the probe opens separate connections
    until it has met `workers` distinct ServerMetadata names (or gives up after `tries`)."""

    def __init__(self, address: str, workers: int | None = None, tries: int = 48) -> None:
        import grpc

        from medserve.protos import grpc_service_pb2 as pb
        from medserve.protos import grpc_service_pb2_grpc as pb_grpc

        self._pb = pb
        self._grpc = grpc
        self._channels: list[Any] = []
        self.stubs: dict[str, Any] = {}
        self.available = True
        want = workers or 1
        for i in range(tries if workers and workers > 1 else 1):
            ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                         ("medserve.perf.probe", i)])
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            try:
                name = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name
            except grpc.RpcError:
                name = f"server-{i}"
            if name in self.stubs:
                ch.close()
                continue
            self._channels.append(ch)
            self.stubs[name] = stub
            if len(self.stubs) >= want:
                break

    def snapshot(self) -> dict[str, dict[str, int]] | None:
        """model -> counters summed over workers; None if the server has no statistics."""
        if not self.available:
            return None
        total: dict[str, dict[str, int]] = {}
        for stub in self.stubs.values():
            try:
                resp = stub.ModelStatistics(self._pb.ModelStatisticsRequest(), timeout=10)
            except self._grpc.RpcError:
                self.available = False
                return None
            for s in resp.model_stats:
                key = s.name if not s.version else f"{s.name}:{s.version}"
                agg = total.setdefault(key, {})
                agg["inference_count"] = agg.get("inference_count", 0) + s.inference_count
                agg["execution_count"] = agg.get("execution_count", 0) + s.execution_count
                for d in _DURATIONS:
                    dur = getattr(s.inference_stats, d)
                    agg[f"{d}_count"] = agg.get(f"{d}_count", 0) + dur.count
                    agg[f"{d}_ns"] = agg.get(f"{d}_ns", 0) + dur.ns
        return total

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


def server_outcomes(before: Mapping[str, Mapping[str, int]] | None, after: Mapping[str, Mapping[str, int]] | None,
                    model: str, version: str = "") -> tuple[int, int] | None:
    """(successes, failures) the server counted for `model` (every version, or `version`)
    between two snapshots; None when the server keeps no statistics. A model the server does
    not know counts (0, 0): its requests fail before any model's statistics see them."""
    if before is None or after is None:
        return None
    keys = {model, f"{model}:{version}"} if version else None
    success = fail = 0
    for key, a in after.items():
        if (key not in keys) if keys else (key != model and not key.startswith(model + ":")):
            continue
        b = before.get(key, {})
        success += a.get("success_count", 0) - b.get("success_count", 0)
        fail += a.get("fail_count", 0) - b.get("fail_count", 0)
    return success, fail


def stats_delta(before: Mapping[str, Mapping[str, int]] | None, after: Mapping[str, Mapping[str, int]] | None,
                window_s: float) -> dict[str, dict[str, float | None]] | None:
    """Per model: requests answered by the server in the window, mean queue and compute times
    (µs per request) and the mean batch size formed (Δinference_count / Δexecution_count)."""
    if before is None or after is None:
        return None
    out: dict[str, dict[str, float | None]] = {}
    for key, a in after.items():
        b = before.get(key, {})

        def d(name: str, a: Mapping[str, int] = a, b: Mapping[str, int] = b) -> int:
            return a.get(name, 0) - b.get(name, 0)

        executions = d("execution_count")
        if executions == 0 and d("success_count") == 0 and d("fail_count") == 0:
            continue

        def mean_us(name: str) -> float | None:
            n = d(f"{name}_count")
            return round(d(f"{name}_ns") / n / 1e3, 1) if n else None

        out[key] = {
            "success": d("success_count"),
            "fail": d("fail_count"),
            "success_rps": round(d("success_count") / window_s, 1),
            "inferences": d("inference_count"),
            "executions": executions,
            "mean_batch": round(d("inference_count") / executions, 2) if executions else None,
            "queue_us": mean_us("queue"),
            "compute_input_us": mean_us("compute_input"),
            "compute_infer_us": mean_us("compute_infer"),
            "compute_output_us": mean_us("compute_output"),
            "request_us": mean_us("success"),
        }
    return out
