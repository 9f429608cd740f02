"""`medserve serve --workers N`: N server processes on one port (SO_REUSEPORT), each with its own
sessions, batchers and statistics, so one Python process's transport ceiling is not the host's.

The kernel spreads new connections over the workers; a gRPC channel sticks to one connection,
so load spreads across channels (clients, or perf's load processes), not across calls of one
channel. Statistics are per worker: ServerMetadata.name says which worker answered
(`medserve-w<i>`).

The supervisor (`supervise`, generic over what a worker runs) restarts a worker that dies, with
exponential backoff, while the others keep serving; it exits only on SIGTERM/SIGINT (forwarded:
each worker drains on its own) or when restarts keep failing (`max_restarts` within
`restart_window_s`). SIGHUP is forwarded to every worker (each re-reads the identities file: a
revoked token is refused everywhere) and the supervisor carries on. A worker starts with SIGHUP
blocked (a signal mask survives fork and exec), so one that arrives before the worker can handle
it waits instead of killing it; the worker unblocks it once its handler is in place.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Backoff between restarts of one worker, and when to give up on the whole group."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_restarts: int = 5  # restarts of one worker within the window before the supervisor gives up
    restart_window_s: float = 60.0
    start_timeout_s: float = 300.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold `port` (0 = pick one) with SO_REUSEPORT while the workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass(slots=True, eq=False)
class _Worker:
    index: int
    ready_file: Path
    process: multiprocessing.process.BaseProcess | None = None
    restarts: list[float] | None = None  # monotonic times of recent restarts
    restart_at: float | None = None


def supervise(
    start: Callable[[int, Path], multiprocessing.process.BaseProcess],
    workers: int,
    *,
    on_ready: Callable[[list[dict[str, Any]]], None] = lambda statuses: None,
    policy: RestartPolicy = RestartPolicy(),
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run `workers` processes made by `start(index, ready_file)` (each writes its ready file,
    JSON with its pid, once serving), call `on_ready` with those files' contents, in worker
    order, when all are (and again once a restarted worker is: its pid and ports are new), keep
    them running, and return the exit status: 0 after a clean SIGTERM/SIGINT, 1 when a worker
    cannot be kept up."""
    with tempfile.TemporaryDirectory(prefix="medserve-workers-") as tmp:
        group = [_Worker(i, Path(tmp) / f"worker-{i}.json", restarts=[]) for i in range(workers)]
        stopping = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            if signum != signal.SIGHUP:
                stopping = True  # each worker drains on its own
            for w in group:
                if w.process is not None and w.process.is_alive() and w.process.pid is not None:
                    try:
                        os.kill(w.process.pid, signum)
                    except ProcessLookupError:  # it died just now: the loop restarts it
                        pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for w in group:
                w.process = _start_with_sighup_blocked(start, w.index, w.ready_file)
            deadline = clock() + policy.start_timeout_s
            while not all(w.ready_file.exists() for w in group):
                if stopping or any(not w.process.is_alive() for w in group if w.process) or clock() > deadline:
                    log.error("a worker failed to start; stopping the others")
                    _terminate(group)
                    return 1
                time.sleep(0.05)
            def announce() -> None:
                on_ready([json.loads(w.ready_file.read_text()) for w in group])

            announce()
            return _keep_up(group, start, policy, clock, lambda: stopping, announce)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _start_with_sighup_blocked(start: Callable[[int, Path], multiprocessing.process.BaseProcess], index: int,
                               ready_file: Path) -> multiprocessing.process.BaseProcess:
    """Start a worker that inherits a blocked SIGHUP (the supervisor's own arrives once it is started)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        return start(index, ready_file)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def _keep_up(group: list[_Worker], start: Callable[[int, Path], multiprocessing.process.BaseProcess],
             policy: RestartPolicy, clock: Callable[[], float], stopping: Callable[[], bool],
             announce: Callable[[], None]) -> int:
    restarted = False  # a restarted worker is not yet announced
    while True:
        if stopping():
            for w in group:
                if w.process is not None:
                    w.process.join()
            return 0 if all(w.process is None or w.process.exitcode == 0 for w in group) else 1
        now = clock()
        for w in group:
            assert w.restarts is not None
            if w.process is not None and not w.process.is_alive():
                if stopping():
                    break
                code = w.process.exitcode
                w.process = None
                w.restarts = [t for t in w.restarts if now - t < policy.restart_window_s]
                if len(w.restarts) >= policy.max_restarts:
                    log.error("worker %d keeps dying (exit %s; %d restarts in %.0f s): stopping the others",
                              w.index, code, len(w.restarts), policy.restart_window_s)
                    _terminate(group)
                    return 1
                backoff = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** len(w.restarts))
                w.restart_at = now + backoff
                log.error("worker %d exited (%s); restarting it in %.1f s, the others keep serving",
                          w.index, code, backoff)
            if w.process is None and w.restart_at is not None and now >= w.restart_at and not stopping():
                w.restarts.append(now)
                w.restart_at = None
                w.ready_file.unlink(missing_ok=True)
                w.process = _start_with_sighup_blocked(start, w.index, w.ready_file)
                log.info("worker %d restarted (pid %s)", w.index, w.process.pid)
                restarted = True
        if restarted and not stopping() and all(w.process is not None and w.ready_file.exists() for w in group):
            restarted = False
            announce()
        for w in group:
            if w.process is not None:
                w.process.join(timeout=0.1)
                break
        else:
            time.sleep(0.1)


def _terminate(group: list[_Worker]) -> None:
    for w in group:
        if w.process is not None and w.process.is_alive():
            w.process.terminate()
    for w in group:
        if w.process is not None:
            w.process.join()


def _worker_main(config: ServerConfig, index: int, ready_file: Path, log_level: str, log_format: str) -> None:
    import asyncio

    from . import app
    from .logs import configure

    configure(log_level, log_format, worker=f"w{index}")
    asyncio.run(app.run(config, ready_file=ready_file, reuse_port=True))


def _worker_config(config: ServerConfig, port: int, index: int, http_port: int | None = None) -> ServerConfig:
    metrics = None if config.metrics_port is None else (config.metrics_port + index if config.metrics_port else 0)
    # One audit chain per worker (FILE.w<i>; `medserve audit verify FILE` reads them all): two
    # writers appending to one file would interleave two chains.
    audit_log = None if config.audit_log is None else f"{config.audit_log}.w{index}"
    return replace(config, port=port, server_name=f"medserve-w{index}", metrics_port=metrics, audit_log=audit_log,
                   http_port=config.http_port if http_port is None else http_port)


def run_workers(config: ServerConfig, workers: int, *, ready_file: Path | None = None, log_format: str = "text",
                policy: RestartPolicy = RestartPolicy()) -> int:
    """Start the workers on one port, keep them up, forward SIGTERM/SIGINT/SIGHUP; the exit status."""
    reservation = reserve_port(config.host, config.port)
    port = reservation.getsockname()[1]
    # The REST port is shared the same way (SO_REUSEPORT), held until every worker binds it.
    http_reservation = None if config.http_port is None else reserve_port(config.host, config.http_port)
    http_port = None if http_reservation is None else http_reservation.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    # One canary key for every worker and every restart: an encounter meets the same version
    # whichever worker its connection reaches (a labels file's canary_seed still overrides it).
    config = replace(config, canary_key=config.canary_key or secrets.token_bytes(32))

    def start(index: int, worker_ready: Path) -> multiprocessing.process.BaseProcess:
        process = ctx.Process(target=_worker_main, args=(_worker_config(config, port, index, http_port), index,
                                                         worker_ready,
                                                         level, log_format), name=f"medserve-w{index}")
        process.start()
        return process

    def ready(statuses: list[dict[str, Any]]) -> None:
        reservation.close()  # every worker holds the port now (a restarted one binds beside them)
        if http_reservation is not None:
            http_reservation.close()
        if ready_file is not None:
            tmp_file = ready_file.with_suffix(ready_file.suffix + ".tmp")
            status: dict[str, Any] = {"port": port, "pid": os.getpid(), "workers": [s["pid"] for s in statuses]}
            if http_port is not None:
                status["http_port"] = http_port
            if config.metrics_port is not None:  # each worker's own (with 0, only the workers know them)
                status["metrics_ports"] = [s["metrics_port"] for s in statuses]
            tmp_file.write_text(json.dumps(status))
            tmp_file.replace(ready_file)
        log.info("medserve: %d workers ready on %s:%d", workers, config.host, port)

    try:
        return supervise(start, workers, on_ready=ready, policy=policy)
    finally:
        reservation.close()
        if http_reservation is not None:
            http_reservation.close()
