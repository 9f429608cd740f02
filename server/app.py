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
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from medserve.protos import grpc_service_pb2, grpc_service_pb2_grpc

from .auth import TokenAuthorizer
from .config import ServerConfig
from .errors import ConfigError
from .inference import InferenceCore
from .metrics import start_metrics_server
from .repository import ModelRepository
from .runtime import usable_providers
from .service import InferenceServicer, Lifecycle

log = logging.getLogger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


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
    ) -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        self.repository = repository or ModelRepository(config, clock=clock)
        self.core = InferenceCore(self.repository, clock)
        authorizer = TokenAuthorizer.from_file(Path(config.tokens_file)) if config.tokens_file else None
        self._servicer = InferenceServicer(
            self.repository, self.core, self.lifecycle, clock=clock, server_name=config.server_name,
            authorizer=authorizer,
        )
        self._health = health_aio.HealthServicer()
        self._reuse_port = reuse_port
        self._server: grpc.aio.Server | None = None
        self._metrics: WSGIServer | None = None
        self._stopped = False
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> int:
        await self.repository.load_all(exit_on_error=self.config.exit_on_error)
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ]
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"{self.config.host}:{self.config.port}"
        if ":" in self.config.host and not self.config.host.startswith("["):
            address = f"[{self.config.host}]:{self.config.port}"
        credentials = self._credentials()
        if credentials is None:
            if self.config.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("serving WITHOUT TLS on %s: patient data will cross the network in clear text", address)
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        if self.config.metrics_port is not None:
            self._metrics, _, self.metrics_port = start_metrics_server(
                self.repository, self.config.host, self.config.metrics_port, self.config.server_name
            )
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        # The models, sessions and imported modules live as long as the process: keep the
        # garbage collector from rescanning them on every collection of the request path.
        gc.freeze()
        self.lifecycle.started = True
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
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
        """Drain: refuse new work (UNAVAILABLE, health NOT_SERVING), let in-flight requests
        finish for up to `grace_s`, then unload the models."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        self.lifecycle.draining = True
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # For a moment new calls still reach the servicer and get UNAVAILABLE (retryable
            # elsewhere); once grpc stops, calls it received but had not started end CANCELLED.
            await asyncio.sleep(min(grace, self.config.drain_announce_s))
            await self._server.stop(grace)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
        await self.repository.close()
        log.info("medserve stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def write_ready_file(path: Path, port: int) -> None:
    """Tell a supervisor (or a test) the bound port, atomically, once the server is ready."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}), encoding="utf-8")
    os.replace(tmp, path)


async def run(config: ServerConfig, *, ready_file: Path | None = None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then drain."""
    server = MedserveServer(config, reuse_port=reuse_port)
    port = await server.start()
    if ready_file is not None:
        write_ready_file(ready_file, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", config.drain_grace_s)
    await server.stop()
