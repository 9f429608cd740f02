"""Prometheus metrics, read from the statistics the server already keeps (`ModelStats`, batcher
queue depth) at scrape time: nothing extra on the request path, and a registry of our own (no
process-wide state). Served over HTTP by prometheus-client on `--metrics-port`; with
`--workers N`, worker i serves on port + i, each labelled with its worker name.
"""
from __future__ import annotations

from collections.abc import Iterator
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .repository import ModelRepository

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
        batches = CounterMetricFamily(
            "medserve_batches", "Batches executed, by size in rows", labels=[*_LABELS, "batch_size"]
        )
        queued = GaugeMetricFamily("medserve_queue_depth", "Requests waiting in the batcher", labels=_LABELS)
        close_at = GaugeMetricFamily(
            "medserve_batch_close_rows",
            "Rows at which the batcher now closes a batch, learned from recent batches (models with a "
            "queue delay and no preferred sizes; absent while it waits the whole delay)",
            labels=_LABELS,
        )
        for v in self._repository.loaded_versions():
            labels = [self._worker, v.name, str(v.version)]
            s = v.stats
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
            if v.batcher is not None:
                snapshot = v.batcher.stats()
                queued.add_metric(labels, snapshot.queued)
                if snapshot.close_at_rows is not None:
                    close_at.add_metric(labels, snapshot.close_at_rows)
        yield from (requests, request_seconds, phase_seconds, inferences, executions, batches, queued, close_at)


def start_metrics_server(
    repository: ModelRepository, host: str, port: int, worker: str
) -> tuple[WSGIServer, Thread, int]:
    """Serve /metrics on host:port (0 = any free port); returns the server, its thread and port."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RepositoryCollector(repository, worker))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread, server.server_port
