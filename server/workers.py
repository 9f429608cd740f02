"""`medserve serve --workers N`: N server processes on one port (SO_REUSEPORT), each with its own
sessions, batchers and statistics, so one Python process's transport ceiling is not the host's.

The kernel spreads new connections over the workers; a gRPC channel sticks to one connection,
so load spreads across channels (clients, or perf's load processes), not across calls of one
channel. Statistics are per worker: ServerMetadata.name says which worker answered
(`medserve-w<i>`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .config import ServerConfig

log = logging.getLogger(__name__)


def _reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_main(config: ServerConfig, index: int, ready_file: Path, log_level: int) -> None:
    from . import app

    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s w{index} %(name)s: %(message)s")
    asyncio.run(app.run(config, ready_file=ready_file, reuse_port=True))


def _worker_config(config: ServerConfig, port: int, index: int) -> ServerConfig:
    metrics = None if config.metrics_port is None else (config.metrics_port + index if config.metrics_port else 0)
    return replace(config, port=port, server_name=f"medserve-w{index}", metrics_port=metrics)


def run_workers(config: ServerConfig, workers: int, *, ready_file: Path | None = None, start_timeout_s: float = 300.0) -> int:
    """Start the workers, wait until all are ready, forward SIGTERM/SIGINT, and return non-zero
    if any worker fails."""
    reservation = _reserve_port(config.host, config.port)
    port = reservation.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="medserve-workers-") as tmp:
        files = [Path(tmp) / f"worker-{i}.json" for i in range(workers)]
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(_worker_config(config, port, i), i, files[i], level),
                name=f"medserve-w{i}",
            )
            for i in range(workers)
        ]
        stopping = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signum)  # each worker drains on its own

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        for p in procs:
            p.start()
        deadline = time.monotonic() + start_timeout_s
        while not all(f.exists() for f in files):
            if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
                log.error("a worker failed to start; stopping the others")
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.join()
                return 1
            time.sleep(0.05)
        reservation.close()
        if ready_file is not None:
            pids = [json.loads(f.read_text())["pid"] for f in files]
            tmp_file = ready_file.with_suffix(ready_file.suffix + ".tmp")
            tmp_file.write_text(json.dumps({"port": port, "pid": multiprocessing.current_process().pid, "workers": pids}))
            tmp_file.replace(ready_file)
        log.info("medserve: %d workers ready on %s:%d", workers, config.host, port)
        failed = False
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
                if not p.is_alive() and p.exitcode not in (0, None) and not stopping:
                    failed = True
            if failed and not stopping:
                log.error("a worker exited unexpectedly; stopping the others")
                stopping = True
                for p in procs:
                    if p.is_alive():
                        p.terminate()
        return 1 if failed else 0
