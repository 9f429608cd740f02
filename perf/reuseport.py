"""Reference servers as one process or as N processes on one port (SO_REUSEPORT), as
`medserve serve --workers N` runs: the port is bound by the servers themselves (port 0 = the
kernel picks one) and reported in the ready file, so no port is picked here and bound later.

Used by `fixed_server` and `minimal_server`; the supervisor is medserve's own
(`medserve.server.workers.supervise`), so the ceilings start, restart and stop as medserve does.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

# worker(host, port, reuse_port, ready_file, *args): serve until SIGTERM, writing
# {"port", "pid"} to ready_file once serving.
Worker = Callable[..., None]


async def serve_until_stopped(server: Any, address: str, ready_file: Path | None,
                              stop: asyncio.Event | None = None) -> None:
    """Bind `server` (a grpc.aio server with its handlers) to `address`, start it, write the
    ready file, and serve until `stop` is set (by default: SIGTERM or SIGINT)."""
    bound = server.add_insecure_port(address)
    await server.start()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        write_ready(ready_file, port=bound, pid=os.getpid())
    await stop.wait()
    await server.stop(0.5)


def write_ready(path: Path, **facts: Any) -> None:
    """The ready file, written whole (renamed into place) so a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts))
    os.replace(tmp, path)


def run_workers(worker: Worker, args: tuple[Any, ...], workers: int, host: str, port: int,
                ready_file: Path | None, name: str) -> int:
    """`worker` in this process (workers <= 1), or `workers` spawned processes sharing one port,
    kept up by medserve's supervisor; the ready file then lists the workers' pids."""
    if workers <= 1:
        worker(host, port, False, ready_file, *args)
        return 0
    from medserve.server.workers import reserve_port, supervise

    reservation = reserve_port(host, port)
    port = reservation.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")

    def start(index: int, worker_ready: Path) -> multiprocessing.process.BaseProcess:
        process = ctx.Process(target=worker, args=(host, port, True, worker_ready, *args),
                              name=f"{name}-w{index}", daemon=True)
        process.start()
        return process

    def ready(pids: list[int]) -> None:
        reservation.close()
        if ready_file is not None:
            write_ready(ready_file, port=port, pid=os.getpid(), workers=pids)

    try:
        return supervise(start, workers, on_ready=ready)
    finally:
        reservation.close()
