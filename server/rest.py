"""The KServe V2 REST data plane on `--http-port` (Open Inference Protocol over HTTP/1.1, with
Triton's HTTP extensions that `tritonclient.http` uses): the front end beside the gRPC servicer,
on the same event loop, the same `InferenceCore` and the same `Gate`.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     open to probes (as gRPC's ServerLive/ServerReady)
    GET  /v2/models/{m}[/versions/{v}]         model metadata (`v` may be a version label)
    GET  /v2/models/{m}[/versions/{v}]/ready   200 ready, 503 not (404: missing or not yours)
    GET  /v2/models/{m}[/versions/{v}]/config  Triton's model configuration (JSON)
    GET  /v2/models[/{m}[/versions/{v}]]/stats Triton's statistics
    POST /v2/models/{m}[/versions/{v}]/infer   JSON tensors, or Triton's binary tensor extension
    POST /v2/repository/index                  the repository index
    POST /v2/repository/models/{m}/load|unload explicit model-control mode, admin identity

Each call passes the gate before its body is read: identity (an `Authorization: Bearer` header,
or the verified client certificate over mutual TLS), `Content-Length` against
`--max-message-mb` (a chunked body is cut off at the same size while it is read), the identity's
rate limit (429 with `Retry-After`), the audit trail's admission; then the body is read and
decoded (`rest_codec`, limits on tensors and text before any tensor is converted). A model the
caller may not use answers exactly as a missing one (404). Errors are `{"error": "..."}` naming
model, version and tensor, never a value; the status is the REST column of `status.py`. Every
inference, administration and refusal leaves an audit record naming the transport ("http").

Deadlines: the request parameter `timeout` (microseconds, as over gRPC) and the header
`Timeout-Ms` (milliseconds from arrival, the REST counterpart of `grpc-timeout`); `traceparent`
continues the caller's trace.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import onnxruntime
import orjson
from aiohttp import web
from google.protobuf import json_format

from . import model_config
from .batching import RequestTiming
from .codec import DecodeLimits
from .errors import InvalidInput, MedserveError, ModelLoadFailed, ModelNotReady, PermissionDenied, TooLarge, Unsupported
from .gate import (
    AUDITED,
    CURRENT,
    PARSE_IN_THREAD_BYTES,
    Call,
    Gate,
    check_request_id,
    is_loopback_address,
)
from .httpd import HttpLimits, _BoundedServer, listen
from .identities import ANONYMOUS
from .inference import InferenceCore
from .repository import LoadedVersion, ModelRepository, unknown_model
from .rest_codec import check_json_size, decode_request, encode_response, parse_header
from .runtime import usable_providers
from .service import EXTENSIONS, VERSION, Lifecycle, _card_parameters, _rollout_parameters
from .status import http_status_for, status_code_name
from .tracing import Tracing

log = logging.getLogger(__name__)

SERVER_HEADER = {"Server": "medserve"}
HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "Timeout-Ms"
BINARY_TYPE = "application/octet-stream"
NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
# Connections (past them the oldest is closed), idle time between requests, header lines (aiohttp's
# default line size: model names and labels are in the path), listen backlog.
DATA_PLANE_LIMITS = HttpLimits(max_connections=4096, header_timeout_s=60.0, max_line_bytes=8190, backlog=1024)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body),
                        content_type="application/json", headers={**SERVER_HEADER, **(headers or {})})


def error_response(exc: BaseException, call: Call | None = None, counted: bool = False) -> web.Response:
    """`{"error": "..."}` with the REST status of the failure (and `Retry-After` where known)."""
    status, code, message = http_status_for(exc, logging.DEBUG if counted else logging.INFO)
    if call is not None:
        call.status = code
    headers: dict[str, str] = {}
    after = getattr(exc, "retry_after_s", None)
    if after and after > 0:
        headers["Retry-After"] = str(max(1, math.ceil(after)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="medserve"'
    return _json(status, {"error": message}, headers)


def _peer(request: web.Request) -> str:
    """The caller as gRPC names a peer ("ipv4:127.0.0.1:5000"), so both transports' records read alike."""
    peername = request.transport.get_extra_info("peername") if request.transport is not None else None
    if not peername:
        return "unknown"
    host, port = peername[0], peername[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _certificate_names(request: web.Request) -> list[str]:
    """The verified client certificate's names in the gate's order: SANs, then the common name."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return []
    names = [str(value) for _, value in cert.get("subjectAltName", ())]
    for rdn in cert.get("subject", ()):
        names += [str(value) for key, value in rdn if key == "commonName"]
    return names


class _BoundedRunner(web.AppRunner):
    """aiohttp's runner for the routed application, serving it through httpd's `_BoundedServer`:
    past `max_connections` the oldest connection is closed, and a request aiohttp cannot parse
    is answered with the status's phrase alone, its bytes never echoed nor logged. (It repeats
    `AppRunner._make_server` with aiohttp's private `_set_loop`, `_handle` and `_make_request`;
    aiohttp is pinned and tests/rest/test_rest_api.py covers both behaviours.)"""

    def __init__(self, app: web.Application, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        app, loop = self._app, asyncio.get_running_loop()
        app._set_loop(loop)  # noqa: SLF001
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        handler: Any = app._handle  # noqa: SLF001 - a routed Request handler, which aiohttp's Server takes
        return _BoundedServer(handler, self._max_connections, request_factory=app._make_request,  # noqa: SLF001
                              loop=loop, **self._kwargs)


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS as the gRPC port serves it: the same chain and key; with a client CA, clients must
    present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class RestFrontEnd:
    """The REST routes over the shared core and gate; `start` binds, `close` stops."""

    def __init__(
        self,
        repository: ModelRepository,
        core: InferenceCore,
        lifecycle: Lifecycle,
        gate: Gate,
        *,
        limits: DecodeLimits,
        max_message_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        server_name: str = "medserve",
        model_control_mode: str = "none",
        authenticated: bool = False,
        tracing: Tracing | None = None,
        limits_http: HttpLimits = DATA_PLANE_LIMITS,
    ) -> None:
        self._http_limits = limits_http
        self._repository = repository
        self._core = core
        self._lifecycle = lifecycle
        self._gate = gate
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._clock = clock
        self._server_name = server_name
        self._model_control_mode = model_control_mode
        self._authenticated = authenticated
        self._tracing = tracing or Tracing(environ={})
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- the server ------------------------------------------------------------------------

    def application(self) -> web.Application:
        # The body is read by `_body` under the gate's limit; aiohttp's own cap only backs it up.
        app = web.Application(client_max_size=self._max_message_bytes + (1 << 20), handler_args={"access_log": None})
        r = app.router
        r.add_get("/v2", self._call("ServerMetadata", self._server_metadata))
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._ready)
        r.add_get("/v2/models/stats", self._call("ModelStatistics", self._statistics))
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self._call("ModelMetadata", self._metadata))
            r.add_get(base + "/ready", self._call("ModelReady", self._model_ready))
            r.add_get(base + "/config", self._call("ModelConfig", self._config))
            r.add_get(base + "/stats", self._call("ModelStatistics", self._statistics))
            r.add_post(base + "/infer", self._call("ModelInfer", self._infer))
        r.add_post("/v2/repository/index", self._call("RepositoryIndex", self._index))
        r.add_post("/v2/repository/models/{model}/load", self._call("RepositoryModelLoad", self._load))
        r.add_post("/v2/repository/models/{model}/unload", self._call("RepositoryModelUnload", self._unload))
        # Anything else, behind the same gate (credentials first) and audited, as gRPC's unknown methods.
        r.add_route("*", "/{path:.*}", self._call("UnknownPath", self._unknown))
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        limits = self._http_limits
        runner = _BoundedRunner(self.application(), limits.max_connections, handle_signals=False, shutdown_timeout=1.0,
                                access_log=None, keepalive_timeout=limits.header_timeout_s,
                                max_line_size=limits.max_line_bytes, max_field_size=limits.max_line_bytes,
                                max_headers=limits.max_headers)
        self.port = await listen(runner, host, port, limits.backlog, ssl_context, reuse_port)
        self._runner = runner
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- the gate --------------------------------------------------------------------------

    def _call(self, rpc: str, behavior: Callable[[web.Request, Call, bytes], Awaitable[web.StreamResponse]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A route behind the gate: admission before the body is read, the call in `CURRENT`,
        every failure its REST status, the audit record written once."""
        gate = self._gate
        audited = rpc in AUDITED

        async def handle(request: web.Request) -> web.StreamResponse:
            await gate.wait_if_held()
            length = request.content_length or 0
            call = Call(rpc, ANONYMOUS, _peer(request), self._clock(), length, audited=audited, transport="http")
            call.model = request.match_info.get("model", "")
            call.version = request.match_info.get("version", "")
            try:
                gate.admit(call, request.headers.get("Authorization"), lambda: is_loopback_address(request.remote),
                           lambda: _certificate_names(request))
                body = await self._body(request, rpc) if request.method == "POST" else b""
            except MedserveError as exc:
                gate.refuse(call, exc)
                return error_response(exc, call, counted=call.tally)
            call.body_bytes = len(body)
            token = CURRENT.set(call)
            try:
                return await behavior(request, call, body)
            except asyncio.CancelledError:
                call.status = "CANCELLED"  # the caller went away: its record says so
                raise
            except web.HTTPException:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                return error_response(exc, call)
            finally:
                CURRENT.reset(token)
                gate.finish(call)

        return handle

    async def _body(self, request: web.Request, rpc: str) -> bytes:
        """The body, cut off past the size limit while it is read (a chunked body has no length)."""
        limit = self._max_message_bytes
        if request.content_length is not None:
            return await request.read() if request.content_length else b""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"{rpc}: the request is over the message size limit of {limit / (1 << 20):g} MiB "
                               "(--max-message-mb); send smaller requests")
            chunks.append(chunk)
        return b"".join(chunks)

    def _allow(self, call: Call, model: str, version: str = "") -> None:
        call.model, call.version = model, version
        if not call.identity.may_use(model):
            raise unknown_model(model)

    # -- health and metadata ---------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return _json(200, {"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        ok = self._lifecycle.ready
        return _json(200 if ok else 503, {"ready": ok})

    async def _server_metadata(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        providers = ",".join(usable_providers())
        return _json(200, {"name": self._server_name,
                           "version": f"{VERSION} (onnxruntime {onnxruntime.__version__}; providers {providers})",
                           "extensions": list(EXTENSIONS)})

    def _loaded(self, request: web.Request, call: Call) -> LoadedVersion:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        self._allow(call, model, version)
        return self._repository.get(model, version)

    async def _model_ready(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        self._allow(call, model, version)
        try:
            self._repository.get(model, version)
            ok = self._lifecycle.ready
        except (ModelNotReady, ModelLoadFailed):
            ok = False
        return _json(200 if ok else 503, {"name": model, "ready": ok})

    async def _metadata(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        loaded = self._loaded(request, call)
        config = loaded.config
        batch = [-1] if config.max_batch_size > 0 else []
        params = {**_card_parameters(loaded), **_rollout_parameters(self._repository, loaded.name)}
        return _json(200, {
            "name": loaded.name, "versions": self._repository.ready_versions(loaded.name), "platform": config.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in config.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)}
                        for t in config.outputs],
            "parameters": params,
        })

    async def _config(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        loaded = self._loaded(request, call)
        extra = {"execution_providers": ",".join(loaded.model.providers), **_card_parameters(loaded)}
        proto = model_config.to_proto(loaded.config, extra)
        return _json(200, json_format.MessageToDict(proto, preserving_proto_field_name=True))

    async def _statistics(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        model, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        if model:
            self._allow(call, model, version)
        versions = [v for v in self._repository.loaded_versions(model, version) if call.identity.may_use(v.name)]
        return _json(200, {"model_stats": [_statistics(v) for v in versions]})

    # -- inference -------------------------------------------------------------------------

    def _deadline(self, request: web.Request, call: Call) -> float | None:
        header = request.headers.get(TIMEOUT_HEADER)
        if header is None:
            return None
        try:
            ms = float(header)
        except ValueError:
            ms = -1.0
        if not ms > 0 or math.isinf(ms):
            raise InvalidInput(f"header {TIMEOUT_HEADER} must be a positive number of milliseconds")
        return call.started_s + ms / 1e3

    async def _infer(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        tracing = (self._tracing.span("ModelInfer", [("traceparent", request.headers.get("traceparent", ""))])
                   if self._tracing.enabled else NO_SPAN)
        with tracing as span:
            if span is not None:
                span.set_attribute("medserve.transport", "http")
            try:
                self._allow(call, model, version)
                if self._lifecycle.draining:
                    raise ModelNotReady("server is draining; send the request to another replica")
                deadline = self._deadline(request, call)
                decoded = await self._decode(request, model, version, body, deadline)
                call.request_id = decoded.request.id
                check_request_id(decoded.request.id)
                core_request = decoded.request
                if decoded.routing_key:
                    core_request.routing_key = decoded.routing_key
                if span is not None:
                    core_request.timing = RequestTiming()
                result = await self._core.infer(core_request)
                call.version, call.model_sha256, call.rows = result.version, result.sha256, result.rows
                if result.label:
                    call.version = f"{result.version}@{result.label}"
                answer, header_length = encode_response(result, decoded.binary, decoded.binary_all)
                if len(answer) > self._max_message_bytes:
                    raise TooLarge(
                        f"model {result.model!r} version {result.version}: the response is over the message size "
                        f"limit of {self._max_message_bytes / (1 << 20):g} MiB (--max-message-mb); ask for fewer "
                        "rows or outputs per request")
            except Exception as exc:
                self._tracing.fail(span, status_code_name(type(exc)))
                raise
            if span is not None and core_request.timing is not None:
                span.set_attributes({"medserve.model": result.model, "medserve.version": result.version,
                                     "medserve.model_sha256": result.sha256, "medserve.rows": result.rows})
                t = core_request.timing
                self._tracing.phases(span, t.queued_ns, t.started_ns, t.finished_ns)
        if header_length is None:
            return web.Response(body=answer, content_type="application/json", headers=SERVER_HEADER)
        return web.Response(body=answer, content_type=BINARY_TYPE,
                            headers={**SERVER_HEADER, HEADER_LENGTH: str(header_length)})

    async def _decode(self, request: web.Request, model: str, version: str, body: bytes, deadline: float | None):  # type: ignore[no-untyped-def]
        header = request.headers.get(HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise InvalidInput(f"header {HEADER_LENGTH} must be an integer") from None

        label = f"{model!r} version {version or 'latest'}"
        check_json_size(body, header_length, label, self._limits)

        def decode():  # type: ignore[no-untyped-def]
            document, binary = parse_header(body, header_length, label, self._limits)
            return decode_request(model, version, document, binary, self._limits, deadline)

        if len(body) >= PARSE_IN_THREAD_BYTES:  # a big body is parsed off the event loop
            return await asyncio.to_thread(decode)
        return decode()

    async def _unknown(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        call.model = call.version = ""
        raise Unsupported(f"{request.method} {request.path[:128]!r}: not a route of medserve's KServe V2 REST API "
                          "(see /v2 and the README)")

    # -- repository ------------------------------------------------------------------------

    async def _index(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        ready = False
        if body.strip():
            try:
                document = json.loads(body)
            except ValueError:
                raise InvalidInput("repository index: the request body is not valid JSON") from None
            ready = bool(isinstance(document, dict) and document.get("ready"))
        rows = [{"name": row.name, "version": row.version, "state": row.state, "reason": row.reason}
                for row in self._repository.index(ready_only=ready) if call.identity.may_use(row.name)]
        return _json(200, rows)

    def _administer(self, call: Call, operation: str) -> str:
        call.model = model = call.model
        if self._model_control_mode != "explicit":
            raise Unsupported(f"{operation} needs the server to run with --model-control-mode explicit "
                              f"(it runs with --model-control-mode {self._model_control_mode})")
        if self._authenticated and not call.identity.admin:
            raise PermissionDenied(f"identity {call.identity.name!r} may not {operation} (it is not an admin)")
        return model

    async def _load(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        model = self._administer(call, "load models")
        if body.strip():
            try:
                document = json.loads(body)
            except ValueError:
                raise InvalidInput(f"model {model!r}: the load request body is not valid JSON") from None
            if isinstance(document, dict) and document.get("parameters"):
                raise Unsupported(f"model {model!r}: load parameters (config override, file upload) are not "
                                  "supported; edit the repository instead")
        log.info("model %r: load requested by %s over HTTP", model, call.identity.name,
                 extra={"model": model, "identity": call.identity.name})
        await self._repository.load(model)
        return _json(200, {})

    async def _unload(self, request: web.Request, call: Call, body: bytes) -> web.Response:
        model = self._administer(call, "unload models")
        log.info("model %r: unload requested by %s over HTTP", model, call.identity.name,
                 extra={"model": model, "identity": call.identity.name})
        await self._repository.unload(model)
        return _json(200, {})


def _statistics(v: LoadedVersion) -> dict[str, Any]:
    """Triton's statistics of one version (the fields of ModelStatistics, as its HTTP API writes them)."""
    s = v.stats

    def d(x: Any) -> dict[str, int]:
        return {"count": x.count, "ns": x.ns}

    return {
        "name": v.name, "version": str(v.version), "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {"success": d(s.success), "fail": d(s.fail), "queue": d(s.queue),
                            "compute_input": d(s.compute_input), "compute_infer": d(s.compute_infer),
                            "compute_output": d(s.compute_output)},
        "batch_stats": [{"batch_size": size, "compute_input": d(b.compute_input), "compute_infer": d(b.compute_infer),
                         "compute_output": d(b.compute_output)} for size, b in sorted(s.batches.items())],
    }
