"""The plaintext HTTP endpoint on `--metrics-port`: Prometheus `/metrics` and the KServe V2 REST
health paths for probes — `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}/ready`
(200 when true, 503 when not, 404 for a model that is not there) — open and plaintext, so a
Kubernetes probe works while the gRPC port requires mutual TLS. It serves no model data.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from .errors import MedserveError
from .layout import is_model_name
from .repository import ModelRepository

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Probes every few seconds are not news (and access lines are not medserve's log)."""


def _json(start: StartResponse, status: str, body: dict[str, object]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def health_app(repository: ModelRepository, live: Callable[[], bool], ready: Callable[[], bool],
               metrics: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """The WSGI application: health paths, else /metrics."""

    def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/v2/health/live":
            ok = live()
            return _json(start, "200 OK" if ok else "503 Service Unavailable", {"live": ok})
        if path == "/v2/health/ready":
            ok = ready()
            return _json(start, "200 OK" if ok else "503 Service Unavailable", {"ready": ok})
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "ready":
            name = parts[3]
            if not is_model_name(name) or name not in {e.name for e in repository.entries()}:
                return _json(start, "404 Not Found", {"error": "no such model"})
            try:
                repository.get(name)
                ok = ready()
            except MedserveError:
                ok = False
            return _json(start, "200 OK" if ok else "503 Service Unavailable", {"name": name, "ready": ok})
        if path in ("/metrics", "/"):
            return metrics(environ, start)
        return _json(start, "404 Not Found", {"error": "not found"})

    return app


def start_http(repository: ModelRepository, registry: CollectorRegistry, host: str, port: int,
               live: Callable[[], bool], ready: Callable[[], bool]) -> tuple[WSGIServer, int]:
    """Serve the endpoint on host:port (0 = any free port) on a thread; returns it and its port."""
    app = health_app(repository, live, ready, make_wsgi_app(registry))
    server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="medserve-http", daemon=True).start()
    return server, server.server_port
