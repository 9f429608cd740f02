"""Prometheus metrics, read from the statistics the server already keeps (`ModelStats`, batcher
queue depth) at scrape time: nothing extra on the request path, and a registry of our own (no
process-wide state). Served over HTTP by prometheus-client on `--metrics-port`; with
`--workers N`, worker i serves on port + i, each labelled with its worker name.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .repository import ModelRepository
from .rollout import DIFF_EDGES, TrialStats
from .stats import Histogram
from .status import status_code_name


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), h.total)

_LABELS = ["worker", "model", "version"]


class RepositoryCollector(Collector):
    """Yields the repository's per-version counters in Prometheus form on each scrape."""


    def __init__(self, repository: ModelRepository, worker: str) -> None:
        self._repository = repository
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("medserve_requests", "Requests answered, by outcome", labels=[*_LABELS, "outcome"])
        request_seconds = CounterMetricFamily(
            "medserve_request_seconds", "Server time of answered requests", labels=[*_LABELS, "outcome"]
        )
        phase_seconds = CounterMetricFamily(
            "medserve_phase_seconds", "Time per request in each phase", labels=[*_LABELS, "phase"]
        )
        inferences = CounterMetricFamily("medserve_inferences", "Rows executed", labels=_LABELS)
        executions = CounterMetricFamily("medserve_executions", "Batches executed", labels=_LABELS)
        on_loop = CounterMetricFamily(
            "medserve_executions_on_event_loop", "Batches executed on the event loop's thread (estimated cheaper "
            "than a hand-off); the rest of medserve_executions ran on an instance's thread", labels=_LABELS)
        batches = CounterMetricFamily(
            "medserve_batches", "Batches executed, by size in rows", labels=[*_LABELS, "batch_size"]
        )
        queued = GaugeMetricFamily("medserve_queue_depth", "Requests waiting in the batcher", labels=_LABELS)
        close_at = GaugeMetricFamily(
            "medserve_batch_close_rows",
            "Rows at which a forming batch now stops waiting for more, learned from recent batches (models with a "
            "queue delay and no preferred sizes; absent while it waits the whole delay)",
            labels=_LABELS,
        )
        work = CounterMetricFamily(
            "medserve_input_elements", "Input elements of executed batches: 'requested' the requests carried, "
            "'executed' the batches ran (more with padded batching; the difference is the padding)",
            labels=[*_LABELS, "kind"])
        request_h = HistogramMetricFamily("medserve_request_duration_seconds",
                                          "Server time of each answered request", labels=_LABELS)
        queue_h = HistogramMetricFamily("medserve_queue_duration_seconds", "Time each request waited in the batcher",
                                        labels=_LABELS)
        compute_h = HistogramMetricFamily("medserve_compute_duration_seconds",
                                          "Execution time of each batch (inputs, inference, outputs)", labels=_LABELS)
        batch_h = HistogramMetricFamily("medserve_batch_rows", "Rows of each executed batch", labels=_LABELS)
        failures = CounterMetricFamily("medserve_request_failures", "Failed requests by gRPC status code",
                                       labels=[*_LABELS, "code"])
        in_flight = GaugeMetricFamily("medserve_requests_in_flight", "Requests being served now", labels=_LABELS)
        state = GaugeMetricFamily("medserve_model_state", "1 for each model version's current state",
                                  labels=[*_LABELS, "state"])
        out_of_range = CounterMetricFamily(
            "medserve_out_of_range", "Requests with a value outside the training 1st-99th percentile range, by feature",
            labels=[*_LABELS, "feature"])
        psi = GaugeMetricFamily("medserve_feature_psi",
                                "Population stability index of recent rows against the training deciles",
                                labels=[*_LABELS, "feature"])
        for row in self._repository.index():
            state.add_metric([self._worker, row.name, row.version, row.state], 1)
        for v in self._repository.loaded_versions():
            labels = [self._worker, v.name, str(v.version)]
            s = v.stats
            for h, family in ((s.request_seconds, request_h), (s.queue_seconds, queue_h),
                              (s.compute_seconds, compute_h), (s.batch_rows, batch_h)):
                _histogram(family, labels, h)
            by_code: dict[str, int] = {}
            for error, count in s.failures.items():
                code = status_code_name(error)
                by_code[code] = by_code.get(code, 0) + count
            for code, count in sorted(by_code.items()):
                failures.add_metric([*labels, code], count)
            in_flight.add_metric(labels, s.in_flight)
            if v.monitor is not None:
                for feature, count in v.monitor.out_of_range.items():
                    out_of_range.add_metric([*labels, feature], count)
                for feature, value in v.monitor.psi().items():
                    psi.add_metric([*labels, feature], value)
            for outcome, d in (("success", s.success), ("fail", s.fail)):
                requests.add_metric([*labels, outcome], d.count)
                request_seconds.add_metric([*labels, outcome], d.ns / 1e9)
            for phase, d in (
                ("queue", s.queue),
                ("compute_input", s.compute_input),
                ("compute_infer", s.compute_infer),
                ("compute_output", s.compute_output),
            ):
                phase_seconds.add_metric([*labels, phase], d.ns / 1e9)
            inferences.add_metric(labels, s.inference_count)
            executions.add_metric(labels, s.execution_count)
            for size, b in sorted(dict(s.batches).items()):
                batches.add_metric([*labels, str(size)], b.compute_infer.count)
            snapshot = v.batcher.stats()  # every version is built whole: it has its batcher
            queued.add_metric(labels, snapshot.queued)
            on_loop.add_metric(labels, snapshot.inline_batches)
            work.add_metric([*labels, "requested"], snapshot.work_requested)
            work.add_metric([*labels, "executed"], snapshot.work_executed)
            if snapshot.close_at_rows is not None:
                close_at.add_metric(labels, snapshot.close_at_rows)
        yield from (requests, request_seconds, phase_seconds, inferences, executions, on_loop, batches, queued, close_at,
                    work, request_h, queue_h, compute_h, batch_h, failures, in_flight, state, out_of_range, psi)
        yield from trial_metrics(self._worker, self._repository.trials())
        yield from gpu_metrics()


_TRIAL_LABELS = ["worker", "model", "serving_version", "shadow_version"]


def trial_metrics(worker: str, trials: list[TrialStats]) -> Iterator[Metric]:
    """Silent trials per model and (serving, shadow) version pair: counts and the histogram of
    per-row differences only (agreement = agreeing rows / compared rows)."""
    if not trials:
        return
    compared = CounterMetricFamily("medserve_trial_rows", "Silent trial: rows the shadow scored and compared",
                                   labels=_TRIAL_LABELS)
    agreeing = CounterMetricFamily("medserve_trial_agreeing_rows",
                                   "Silent trial (classifiers): compared rows with the same top class", labels=_TRIAL_LABELS)
    shed = CounterMetricFamily("medserve_trial_shed_rows", "Silent trial: rows not scored because callers came first "
                               "(the serving version had a queue) or the trial's backlog was full", labels=_TRIAL_LABELS)
    shed_requests = CounterMetricFamily("medserve_trial_shed_requests", "Silent trial: requests shed",
                                        labels=_TRIAL_LABELS)
    failed = CounterMetricFamily("medserve_trial_failed_rows", "Silent trial: rows the shadow refused or failed",
                                 labels=_TRIAL_LABELS)
    difference = HistogramMetricFamily("medserve_trial_difference",
                                       "Silent trial: per-row difference (classifiers: the largest probability "
                                       "difference; regressions: the absolute difference)", labels=_TRIAL_LABELS)
    psi = GaugeMetricFamily("medserve_trial_psi", "Silent trial: PSI of the shadow's outputs against the serving "
                            "version's over the last window", labels=_TRIAL_LABELS)
    for t in trials:
        labels = [worker, t.model, str(t.serving), str(t.shadow)]
        compared.add_metric(labels, t.rows)
        if t.kind == "classification":
            agreeing.add_metric(labels, t.agree)
        shed.add_metric(labels, t.shed_rows)
        shed_requests.add_metric(labels, t.shed_requests)
        failed.add_metric(labels, t.failed_rows)
        cumulative, buckets = 0, []
        for edge, count in zip((*DIFF_EDGES, float("inf")), t.differences, strict=True):
            cumulative += count
            buckets.append(("+Inf" if edge == float("inf") else repr(edge), cumulative))
        difference.add_metric(labels, buckets, t.difference_sum)
        if t.psi is not None:
            psi.add_metric(labels, t.psi)
    yield from (compared, agreeing, shed, shed_requests, failed, difference, psi)


def registry_for(repository: ModelRepository, worker: str) -> CollectorRegistry:
    """A registry of this server's own (no process-wide state): the repository's metrics and
    the process's (CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RepositoryCollector(repository, worker))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@functools.cache
def _nvml() -> ctypes.CDLL | None:
    """NVIDIA's management library when a GPU driver is present (None elsewhere: no GPU metrics)."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return lib if lib.nvmlInit_v2() == 0 else None


def gpu_metrics() -> Iterator[Metric]:
    """GPU utilisation and memory per device, read from NVML at scrape time (nothing without a GPU)."""
    lib = _nvml()
    if lib is None:
        return
    count = ctypes.c_uint(0)
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return
    util = GaugeMetricFamily("medserve_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["gpu"])
    used = GaugeMetricFamily("medserve_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
    total = GaugeMetricFamily("medserve_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["gpu"])
    for i in range(count.value):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
            continue
        rates, memory = _Utilization(), _Memory()
        if lib.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(rates)) == 0:
            util.add_metric([str(i)], rates.gpu / 100)
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
            used.add_metric([str(i)], memory.used)
            total.add_metric([str(i)], memory.total)
    yield from (util, used, total)
