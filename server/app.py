"""Wiring: the one place that builds the objects and connects them — repository, inference core,
servicer, health and reflection services — into a running grpc.aio server.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from medserve.protos import grpc_service_pb2

from .audit import AuditLog, load_key
from .codec import DecodeLimits
from .config import ServerConfig
from .errors import ConfigError, InvalidSetting
from .gate import Gate, receive_limit
from .health import GatedHealthServicer
from .httpd import HttpEndpoint, HttpLimits
from .identities import IdentityFile
from .inference import InferenceCore
from .metrics import registry_for
from .ratelimit import RateLimiter
from .repository import ModelRepository
from .rest import DATA_PLANE_LIMITS, RestFrontEnd, server_ssl_context
from .runtime import usable_providers
from .service import InferenceServicer, Lifecycle
from .tracing import Tracing
from .wiring import build_repository

log = logging.getLogger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HOLD_BEFORE_SHUTDOWN_S = 0.1  # the last moment of a drain (see `MedserveServer.stop`)
MIN_PENDING_CALLS = 16384  # calls gRPC may hold for the asyncio server to pick up (see `_grpc_options`)


class MedserveServer:
    """A started server: `await start()` loads the repository and binds; `await stop()` drains.

        server = MedserveServer(ServerConfig(repository="models", port=0))
        port = await server.start()
        ...
        await server.stop()
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        repository: ModelRepository | None = None,
        reuse_port: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.lifecycle = AuditedLifecycle()
        self.repository = repository or build_repository(config, clock=clock)
        self.core = InferenceCore(self.repository, clock, max_response_bytes=config.max_message_bytes)
        self._identities = IdentityFile.load(Path(config.tokens_file)) if config.tokens_file else None
        self.audit = (
            AuditLog(Path(config.audit_log), key=load_key(Path(config.audit_key or "")),
                     max_bytes=config.audit_max_bytes, retention=config.audit_retention, fsync=config.audit_fsync,
                     checkpoint_s=config.audit_checkpoint_s, clock=clock, on_health=self._audit_health_changed)
            if config.audit_log else None
        )
        self.lifecycle.audit = self.audit
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gate = Gate(
            identities=lambda: self._identities,
            plaintext=not (config.tls_cert or config.tls_key),
            rate_limiter=RateLimiter(clock),
            audit=self.audit,
            clock=clock,
            max_message_bytes=config.max_message_bytes,
        )
        limits = DecodeLimits(config.max_tensor_elements, config.max_bytes_elements, config.max_bytes_element_size,
                              text_bytes=config.max_text_bytes, json_bytes=config.max_json_bytes)
        tracing = tracing or Tracing()
        self._servicer = InferenceServicer(
            self.repository, self.core, self.lifecycle, clock=clock, server_name=config.server_name,
            model_control_mode=config.model_control_mode, authenticated=self._identities is not None,
            on_stream_item=self.gate.finish,
            limits=limits,
            tracing=tracing,
            max_message_bytes=config.max_message_bytes,
        )
        # The KServe V2 REST data plane: the same core, the same gate (server/rest.py).
        self._rest = RestFrontEnd(
            self.repository, self.core, self.lifecycle, self.gate, limits=limits,
            max_message_bytes=config.max_message_bytes, clock=clock, server_name=config.server_name,
            model_control_mode=config.model_control_mode, authenticated=self._identities is not None,
            tracing=tracing, limits_http=replace(DATA_PLANE_LIMITS, max_connections=config.max_concurrent_rpcs),
        ) if config.http_port is not None else None
        self.http_port: int | None = None
        # Server-level health open to probes; a model's health only to callers allowed the model.
        self._health = GatedHealthServicer(frozenset({"", SERVICE_NAME}), self.gate.authenticate)
        self._reuse_port = reuse_port
        self._server: grpc.aio.Server | None = None
        self._metrics: HttpEndpoint | None = None
        self._stopped = False
        self._poller: asyncio.Task[None] | None = None
        self._health_tasks: set[asyncio.Future[None]] = set()
        self.port: int | None = None
        self.metrics_port: int | None = None

    def reload_identities(self) -> None:
        """Re-read the identities file (SIGHUP: token rotation without a restart). A file that
        does not load leaves the identities in force as they were."""
        if self.config.tokens_file is None:
            return
        try:
            self._identities = IdentityFile.load(Path(self.config.tokens_file))
        except InvalidSetting as exc:
            log.error("identities not reloaded, the previous ones stay in force: %s", exc)
            return
        log.info("identities reloaded: %d", len(self._identities.identities))

    def _grpc_options(self) -> list[tuple[str, int]]:
        cfg = self.config

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        pending = max(MIN_PENDING_CALLS, 4 * cfg.max_concurrent_rpcs)

        return [
            # A little over the limit: the gate refuses (and audits) what is over it.
            ("grpc.max_receive_message_length", receive_limit(cfg.max_message_bytes)),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
            ("grpc.keepalive_time_ms", ms(cfg.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout_s)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(cfg.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", ms(cfg.max_connection_idle_s)),
            ("grpc.max_connection_age_ms", ms(cfg.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(cfg.max_connection_age_grace_s)),
            # Calls gRPC has received but the asyncio server has not yet picked up: past these
            # limits (by default 1,000 with random early drops up to 3,000) gRPC ends them
            # CANCELLED (as zombies: grpc/grpc#41785). Raised well past the concurrency limit, an
            # overload is answered by the concurrency limit or the queue (RESOURCE_EXHAUSTED)
            # or the caller's deadline; a pending call holds its headers and one stream window.
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending),
        ]

    async def start(self) -> int:
        cfg = self.config
        # Probes can reach the HTTP health paths while the models load (live, not ready).
        if cfg.metrics_port is not None:
            self._metrics = HttpEndpoint(
                self.repository, registry_for(self.repository, cfg.server_name), live=lambda: True,
                ready=lambda: self.lifecycle.ready, identities=lambda: self._identities,
                limits=HttpLimits(max_connections=cfg.metrics_max_connections,
                                  header_timeout_s=cfg.metrics_header_timeout_s),
            )
            self.metrics_port = await self._metrics.start(cfg.metrics_host, cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics, health on /v2/health/{live,ready}", cfg.metrics_host,
                     self.metrics_port)
        try:
            if cfg.model_control_mode == "explicit":
                await self.repository.load_named(cfg.load_models, exit_on_error=cfg.exit_on_error)
            else:
                await self.repository.load_all(exit_on_error=cfg.exit_on_error)
        except BaseException:
            await self._close_http()
            raise
        self._loop = asyncio.get_running_loop()
        if self.audit is not None:
            try:
                self.audit.start()  # fails closed: a first write that fails leaves the server not ready
            except BaseException:
                await self._close_http()
                raise
        server = grpc.aio.server(options=self._grpc_options(), maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        server.add_generic_rpc_handlers((self.gate.handler(self._servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        server.add_generic_rpc_handlers((self.gate.unknown_methods(),))  # last: what nothing else serves
        address = f"{self.config.host}:{self.config.port}"
        if ":" in self.config.host and not self.config.host.startswith("["):
            address = f"[{self.config.host}]:{self.config.port}"
        credentials = self._credentials()
        if credentials is None:
            if not self.config.loopback:  # only with --allow-plaintext (ServerConfig refuses otherwise)
                log.warning("serving WITHOUT TLS on %s (--allow-plaintext): TLS must be terminated in front "
                            "of this server", address)
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        if self._rest is not None:
            assert cfg.http_port is not None
            context = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) \
                if cfg.tls_cert and cfg.tls_key else None
            try:
                self.http_port = await self._rest.start(cfg.host, cfg.http_port, context, reuse_port=self._reuse_port)
            except BaseException:
                await server.stop(None)
                await self._close_http()
                raise
            log.info("KServe V2 REST on %s://%s:%d/v2", "https" if context else "http", cfg.host, self.http_port)
        # The models, sessions and imported modules live as long as the process: keep the
        # garbage collector from rescanning them on every collection of the request path.
        gc.freeze()
        if cfg.model_control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository poll")
        self.lifecycle.started = True
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._sync_server_health()  # NOT_SERVING while the audit trail cannot be written
        # grpc.health.v1 answers per model too (service name = model name), kept current as
        # models load and unload.
        for entry in self.repository.entries():
            await self._set_model_health(entry.name, entry.latest is not None)
        self.repository.watch(
            lambda name, ready: self._health_tasks.add(asyncio.ensure_future(self._set_model_health(name, ready)))
        )
        ready = [e.name for e in self.repository.entries() if e.state.value == "READY"]
        log.info(
            "medserve ready on %s:%d: %d model(s) READY (%s); providers available: %s",
            self.config.host, self.port, len(ready), ", ".join(ready), ",".join(usable_providers()),
        )
        return self.port

    def _credentials(self) -> grpc.ServerCredentials | None:
        cfg = self.config
        if not (cfg.tls_cert or cfg.tls_key):
            if cfg.tls_client_ca:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (cfg.tls_cert and cfg.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        try:
            chain = Path(cfg.tls_cert).read_bytes()
            key = Path(cfg.tls_key).read_bytes()
            client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        except OSError as exc:
            raise ConfigError(f"cannot read a TLS file: {exc}") from exc
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, answering every call with a status: first announce (health NOT_SERVING, new
        requests UNAVAILABLE) for `drain_announce_s`, then let queued and running requests finish
        for up to `grace_s`; requests still queued then are answered UNAVAILABLE; only then does
        the transport stop (so no accepted call ends CANCELLED), and the models unload."""
        if self._stopped:
            return
        self._stopped = True
        if self._poller is not None:
            self._poller.cancel()
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        self.lifecycle.draining = True
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await asyncio.sleep(min(grace, self.config.drain_announce_s))
        await self.repository.close(grace)
        if self._server is not None:
            # Everything accepted has its answer. Calls arriving now are held, then the transport
            # shuts down (GOAWAY: later calls are refused, UNAVAILABLE at the caller), and only
            # then are the held calls answered UNAVAILABLE: so no caller has a call in transit
            # when gRPC shuts down, which it would cancel (CANCELLED is not a drain's answer).
            self.gate.hold()
            await asyncio.sleep(HOLD_BEFORE_SHUTDOWN_S)
            stopping = asyncio.ensure_future(self._server.stop(max(1.0, HOLD_BEFORE_SHUTDOWN_S * 10)))
            await asyncio.sleep(HOLD_BEFORE_SHUTDOWN_S)
            self.gate.release()
            await stopping
        await self._close_http()
        self.gate.close()  # the refusals still being counted, before the audit trail closes
        if self.audit is not None:
            self.audit.close()
        log.info("medserve stopped")

    async def _close_http(self) -> None:
        if self._rest is not None:
            await self._rest.close()
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            await metrics.close()

    def _audit_health_changed(self, healthy: bool) -> None:
        """The audit writer's thread: its writes failed or succeed again; the loop updates health."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._sync_server_health)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _sync_server_health(self) -> None:
        """Server-level grpc.health follows readiness (audit writes included) once started."""
        if not self.lifecycle.started or self.lifecycle.draining:
            return
        status = (health_pb2.HealthCheckResponse.SERVING if self.lifecycle.ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            task = asyncio.ensure_future(self._health.set(name, status))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def _set_model_health(self, name: str, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(name, status)

    async def _poll(self) -> None:
        """Poll mode: follow the repository (new models and versions load, removed ones go; a
        version that fails to load leaves the serving one in place)."""
        while True:
            await asyncio.sleep(self.config.repository_poll_s)
            try:
                await self.repository.poll()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad scan
                log.exception("repository poll failed; trying again in %.0f s", self.config.repository_poll_s)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class AuditedLifecycle(Lifecycle):
    """Readiness that also needs the audit trail writable: while its writes fail, the server
    reports not ready (ServerReady, grpc.health, HTTP /v2/health/ready) and refuses new calls."""

    __slots__ = ("audit",)

    def __init__(self) -> None:
        super().__init__()
        self.audit: AuditLog | None = None

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and (self.audit is None or self.audit.healthy)


def write_ready_file(path: Path, port: int, metrics_port: int | None = None, http_port: int | None = None) -> None:
    """Tell a supervisor (or a test) the bound ports, atomically, once the server is ready
    (`metrics_port` where --metrics-port is on: with 0 only the server knows which it bound)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    ready: dict[str, int] = {"port": port, "pid": os.getpid()}
    if metrics_port is not None:
        ready["metrics_port"] = metrics_port
    if http_port is not None:
        ready["http_port"] = http_port
    tmp.write_text(json.dumps(ready), encoding="utf-8")
    os.replace(tmp, path)


async def run(config: ServerConfig, *, ready_file: Path | None = None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then drain; SIGHUP re-reads the identities file."""
    loop = asyncio.get_running_loop()
    # SIGHUP is handled before the identities file is first read, so no revocation sent while
    # the server starts is lost (the handler runs on the loop, once `server` exists); a
    # supervisor starts workers with SIGHUP blocked, so one sent before this point waits.
    servers: list[MedserveServer] = []

    def reload() -> None:
        for started in servers:
            started.reload_identities()

    loop.add_signal_handler(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    server = MedserveServer(config, reuse_port=reuse_port)
    servers.append(server)
    port = await server.start()
    if ready_file is not None:
        write_ready_file(ready_file, port, server.metrics_port, server.http_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", config.drain_grace_s)
    await server.stop()
