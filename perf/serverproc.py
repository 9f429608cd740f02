"""Servers the harness starts itself: `medserve serve` (or the fixed-response server) as a child
process that binds port 0 itself and reports the ports it bound in its ready file (no port is
picked here and bound later by another process: that races); stopped with SIGTERM (drain)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerHandle:
    address: str
    pid: int
    worker_pids: list[int] = field(default_factory=list)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int | None = None  # --metrics-port 0: the port the server bound
    http_port: int | None = None  # the KServe V2 REST port the server bound (--http-port; 0 with --port 0)
    metrics_ports: list[int] = field(default_factory=list)  # with --workers: each worker's, in worker order

    @property
    def metrics_url(self) -> str:
        if self.metrics_port is None:
            raise RuntimeError("this server was started without --metrics-port")
        return f"http://{self.address.rsplit(':', 1)[0]}:{self.metrics_port}/metrics"

    @property
    def metrics_urls(self) -> list[str]:
        """Every worker's /metrics (one process: its own, `metrics_url`)."""
        if not self.metrics_ports:
            return [self.metrics_url]
        host = self.address.rsplit(":", 1)[0]
        return [f"http://{host}:{p}/metrics" for p in self.metrics_ports]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def workers(self) -> int:
        return max(1, len(self.worker_pids))


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_process(cmd: Sequence[str], ready_file: Path, log_path: Path, timeout_s: float = 180,
                  host: str = "127.0.0.1") -> Iterator[ServerHandle]:
    """Run `cmd` (which must write {port, pid[, workers]} to `ready_file`), yield its handle,
    stop it with SIGTERM (then SIGKILL after 30 s)."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready_file.exists():
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited with {proc.returncode} "
                                   f"before it was ready:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s:.0f} s (log: {log_path})")
            time.sleep(0.05)
        ready = json.loads(ready_file.read_text())
        yield ServerHandle(f"{host}:{ready['port']}", proc.pid, list(ready.get("workers", [])), log_path, proc,
                           ready.get("metrics_port"), ready.get("http_port"), list(ready.get("metrics_ports", [])))
    finally:
        stop_process(proc)
        with contextlib.suppress(FileNotFoundError):
            ready_file.unlink()


@contextlib.contextmanager
def medserve(repository: str | Path, workers: int = 1, args: Sequence[str] = (), log_dir: Path | None = None,
             log_level: str = "WARNING", entry: Sequence[str] = ("-m", "medserve.server.cli")) -> Iterator[ServerHandle]:
    """`medserve serve --repository R --port 0 --workers N ARGS` on 127.0.0.1 (`entry`: what
    the interpreter runs with those arguments; `server_stages` runs it under its timers)."""
    tmp = Path(log_dir or tempfile.gettempdir())
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    ready = tmp / f"medserve-ready-{stamp}.json"
    cmd = [sys.executable, *entry, "--log-level", log_level, "serve",
           "--repository", str(repository), "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
           "--workers", str(workers), *args]
    with start_process(cmd, ready, tmp / f"medserve-{stamp}.log") as handle:
        yield handle


@contextlib.contextmanager
def fixed_server(capture_from: str, model: str, workers: int = 1, batch: int = 1,
                 log_dir: Path | None = None, request: bytes | None = None) -> Iterator[ServerHandle]:
    """`python -m medserve.perf.fixed_server` answering with `model`'s real responses (to a
    request of `batch` rows, or to `request`, a serialized ModelInferRequest)."""
    tmp = Path(log_dir or tempfile.gettempdir())
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    ready = tmp / f"fixed-ready-{stamp}.json"
    cmd = [sys.executable, "-m", "medserve.perf.fixed_server", "--capture-from", capture_from, "--model", model,
           "--batch", str(batch), "--port", "0", "--workers", str(workers), "--ready-file", str(ready)]
    if request is not None:
        request_file = tmp / f"fixed-request-{stamp}.bin"
        request_file.write_bytes(request)
        cmd += ["--request-file", str(request_file)]
    with start_process(cmd, ready, tmp / f"fixed-{stamp}.log") as handle:
        yield handle


@contextlib.contextmanager
def minimal_server(model_file: str | Path, workers: int = 1, log_dir: Path | None = None,
                   name: str | None = None, version: str | None = None,
                   entry: Sequence[str] = ("-m", "medserve.perf.minimal_server")) -> Iterator[ServerHandle]:
    """`python -m medserve.perf.minimal_server` on `model_file` (parse, run inline, encode)."""
    tmp = Path(log_dir or tempfile.gettempdir())
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    ready = tmp / f"minimal-ready-{stamp}.json"
    cmd = [sys.executable, *entry, "--model-file", str(model_file), "--port", "0",
           "--workers", str(workers), "--ready-file", str(ready)]
    cmd += ["--name", name] if name else []
    cmd += ["--version", version] if version else []
    with start_process(cmd, ready, tmp / f"minimal-{stamp}.log") as handle:
        yield handle
