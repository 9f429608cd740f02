"""OpenTelemetry tracing (the optional `tracing` extra): a server span per inference request,
continuing the caller's W3C `traceparent` from the gRPC metadata, with the time the request
waited in the batcher and the time its batch executed as child spans.

Configured only by the standard variables: `OTEL_TRACES_EXPORTER` (otlp, console; unset or
none = tracing off), `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME` (default medserve), ...
Without the extra or with tracing off, `Tracing.span` costs one attribute check per request.
Spans carry the model, version, rows and status — never a tensor value.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)


class Tracing:
    """The server's tracer, or nothing. `provider` injects an SDK TracerProvider (tests use an
    in-memory exporter); None = configure from the environment."""

    def __init__(self, provider: Any = None, environ: Mapping[str, str] = os.environ) -> None:
        self._tracer: Any = None
        if provider is None:
            provider = _provider_from(environ)
        if provider is not None:
            from opentelemetry import propagate, trace

            self._tracer = provider.get_tracer("medserve.server")
            self._extract = propagate.extract
            self._kind = trace.SpanKind.SERVER
            self._status = trace.Status
            self._error = trace.StatusCode.ERROR

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextlib.contextmanager
    def span(self, rpc: str, metadata: Iterable[tuple[str, Any]] | None) -> Iterator[Any]:
        """A server span for one request (None when tracing is off)."""
        if self._tracer is None:
            yield None
            return
        carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
        with self._tracer.start_as_current_span(
            f"inference.GRPCInferenceService/{rpc}", context=self._extract(carrier), kind=self._kind,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            yield span

    def phases(self, span: Any, queued_ns: int, started_ns: int, finished_ns: int) -> None:
        """The batcher's phases of the request, as child spans with their real times."""
        if span is None or not queued_ns:
            return
        from opentelemetry import trace

        context = trace.set_span_in_context(span)
        for name, start, end in (("queue", queued_ns, started_ns), ("compute", started_ns, finished_ns)):
            self._tracer.start_span(name, context=context, start_time=start).end(end_time=end)

    def fail(self, span: Any, code: str) -> None:
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code)
            span.set_status(self._status(self._error, code))


def _provider_from(environ: Mapping[str, str]) -> Any:
    exporters = [e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if not exporters or exporters == ["none"] or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ModuleNotFoundError:
        log.warning("OTEL_TRACES_EXPORTER is set but the tracing extra is not installed "
                    "(pip install 'medserve[tracing]'); tracing is off")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "medserve")}))
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER %r is not supported by medserve (otlp, console); ignored", name)
    log.info("tracing on: exporters %s", ",".join(exporters))
    return provider
