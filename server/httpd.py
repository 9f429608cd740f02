"""The plaintext HTTP endpoint on `--metrics-port` (bound to `--metrics-host`, loopback unless
asked): Prometheus `/metrics` and the KServe V2 REST health paths for probes —
`/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}/ready` (200 when true, 503 when not,
404 for a model that is not there). Server-level health is open (a Kubernetes probe has no
credentials, and the gRPC port may require mutual TLS); a model's readiness names a model, so
with identities on it needs a bearer token, and a model the caller may not use answers exactly as
a missing one (no model-name oracle for strangers). It serves no model data.

Served by aiohttp's server on the server's own event loop: a connection is a few kilobytes of
state, not a thread. A connection that has not sent a whole request within `header_timeout_s`
of connecting (or stays idle that long after a response) is closed; past `max_connections` the
oldest connection is closed to make room, so a flood of half-sent requests cannot lock probes
out. `/metrics` is rendered on one thread of its own (about 10 ms for the demo repository), so
a scrape never stalls the event loop and a flood of scrapes queues behind one thread. The KServe
V2 REST data plane is a second aiohttp site on the same loop, on `--http-port` (`rest.py`); the
probes and Prometheus stay here.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import MedserveError, Unauthenticated
from .gate import is_loopback_address
from .identities import Identity, IdentityFile, bearer_identity
from .layout import is_model_name
from .repository import ModelRepository

log = logging.getLogger(__name__)
SERVER_HEADER = {"Server": "medserve"}  # not aiohttp's name and version


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one HTTP client may hold: connections, time to send a request, header sizes."""

    max_connections: int = 256
    header_timeout_s: float = 10.0  # from connect to a whole request, and idle between requests
    max_line_bytes: int = 4096  # the request line, one header line
    max_headers: int = 64
    backlog: int = 128


async def listen(runner: web.BaseRunner, host: str, port: int, backlog: int,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> int:
    """Set `runner` up and serve it on a socket bound here to host:port (0 = any free port; with
    `reuse_port`, shared with the other workers); returns the port. On failure nothing is left
    open."""
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        site = web.SockSite(runner, sock, ssl_context=ssl_context, backlog=backlog)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound: int = sock.getsockname()[1]
    return bound


class _Unauthorized(Exception):
    """No usable credentials for a path that needs them (401; the message says what to send)."""


class _Handler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse is answered with the status's
    phrase alone and logged as one DEBUG line naming the peer and the kind of error: aiohttp's
    own answer and its ERROR log line (with a traceback) quote the bytes the client sent."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # a bug in the handler (which reads no payload): its traceback
            log.error("HTTP request failed", exc_info=exc)
        else:
            log.debug("HTTP request from %s refused %d (%s)", request.remote, status,
                      type(exc).__name__ if exc else "malformed")
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun: the connection is closed instead")
        response = web.Response(status=status, text=HTTPStatus(status).phrase, headers=SERVER_HEADER)
        response.force_close()
        return response


class _BoundedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections (past it, the oldest is closed)
    and `_Handler` for each connection. It reads aiohttp's `_connections`, `_loop` and `_kwargs`
    (aiohttp is pinned; tests/security/test_strangers.py covers both behaviours)."""

    def __init__(self, handler: Callable[[web.BaseRequest], object], max_connections: int, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self._max_connections = max_connections

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        while len(self._connections) > self._max_connections:
            oldest = next(iter(self._connections))
            self._connections.pop(oldest)
            oldest.force_close()


def _json(status: int, body: Mapping[str, object], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers={**SERVER_HEADER, **(headers or {})})


NOT_FOUND_MODEL = {"error": "no such model"}  # a missing model and one the caller may not use alike


class HttpEndpoint:
    """The endpoint's request handling and its listening socket; `start` binds, `close` stops."""

    def __init__(
        self,
        repository: ModelRepository,
        registry: CollectorRegistry,
        *,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        identities: Callable[[], IdentityFile | None] = lambda: None,
        limits: HttpLimits = HttpLimits(),
    ) -> None:
        self._repository = repository
        self._registry = registry
        self._live = live
        self._ready = ready
        self._identities = identities  # called per request: SIGHUP swaps the file underneath
        self._limits = limits
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medserve-metrics")
        self._runner: web.ServerRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the port."""
        limits = self._limits
        server = _BoundedServer(
            self._handle, limits.max_connections, keepalive_timeout=limits.header_timeout_s,
            max_line_size=limits.max_line_bytes, max_field_size=limits.max_line_bytes,
            max_headers=limits.max_headers, access_log=None,
        )
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        self.port = await listen(runner, host, port, limits.backlog)
        self._runner = runner
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- requests --------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _json(405, {"error": "GET only"}, {"Allow": "GET, HEAD"})
        path = request.path
        if path == "/v2/health/live":
            ok = self._live()
            return _json(200 if ok else 503, {"live": ok})
        if path == "/v2/health/ready":
            ok = self._ready()
            return _json(200 if ok else 503, {"ready": ok})
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "ready":
            try:
                return self._model_ready(parts[3], self._caller(request))
            except _Unauthorized as exc:
                return _json(401, {"error": str(exc)}, {"WWW-Authenticate": 'Bearer realm="medserve"'})
        if path in ("/metrics", "/"):
            return await self._metrics(request)
        return _json(404, {"error": "not found"})

    def _caller(self, request: web.BaseRequest) -> Identity | None:
        """The bearer token's identity; None when identities are off (everyone may ask)."""
        identities = self._identities()
        if identities is None:
            return None
        header = request.headers.get("Authorization")
        if header is None:
            raise _Unauthorized("model readiness needs credentials: send 'Authorization: Bearer <token>'")
        if not is_loopback_address(request.remote):
            raise _Unauthorized("bearer tokens are not accepted over plaintext from another host")
        try:
            return bearer_identity(identities, header)
        except Unauthenticated as exc:
            raise _Unauthorized(str(exc)) from None

    def _model_ready(self, name: str, caller: Identity | None) -> web.Response:
        if (not is_model_name(name) or (caller is not None and not caller.may_use(name))
                or name not in {e.name for e in self._repository.entries()}):
            return _json(404, NOT_FOUND_MODEL)
        try:
            self._repository.get(name)
            ok = self._ready()
        except MedserveError:
            ok = False
        return _json(200 if ok else 503, {"name": name, "ready": ok})

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        accept, encoding = request.headers.get("Accept"), request.headers.get("Accept-Encoding", "")
        body, content_type = await asyncio.get_running_loop().run_in_executor(
            self._executor, _render, self._registry, accept, "gzip" in encoding)
        response = web.Response(body=body, headers={**SERVER_HEADER, "Content-Type": content_type})
        if "gzip" in encoding:
            response.headers["Content-Encoding"] = "gzip"
        return response


def _render(registry: CollectorRegistry, accept: str | None, compress: bool) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept or "")
    body = encoder(registry)
    return (gzip.compress(body) if compress else body), content_type
