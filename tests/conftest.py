"""Shared test helpers: a real medserve server on a real port (in-process on its own event loop
thread, or as a subprocess), and builders for small model repositories.

tritonclient is never imported in this process (its generated modules and ours both register
`inference.*` in protobuf's default pool); the compatibility suite in `tests/compat/` runs in a
child pytest process, see `tests/test_compat_suite.py`.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

import onnx_models

collect_ignore = [] if os.environ.get("MEDSERVE_COMPAT_CHILD") else ["compat"]


@dataclass
class RunningServer:
    server: Any  # medserve.server.app.MedserveServer
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. a repository call) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stub(self) -> Any:
        from medserve.protos import grpc_service_pb2_grpc

        channel = grpc.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        )
        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@contextlib.contextmanager
def running_server(
    repository: Path, repository_cls: Any = None, *, reuse_port: bool = False, tracing: Any = None, **overrides: Any
) -> Iterator[RunningServer]:
    """Start a real grpc.aio medserve server on 127.0.0.1, port 0, in a background thread.
    `overrides` are ServerConfig fields; `repository_cls` makes the repository from the config and
    a clock (`gated_repository`, or `medserve.server.wiring.build_repository` with a factory hook);
    `reuse_port` binds with SO_REUSEPORT (to share a port the test holds reserved)."""
    from medserve.server.app import MedserveServer
    from medserve.server.config import ServerConfig

    # No drain announcement by default: tests stop servers often; the restart tests set their own.
    base = ServerConfig(repository=str(repository), port=0, drain_grace_s=5.0, drain_announce_s=0.0)
    config = replace(base, **overrides)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="medserve-test-loop", daemon=True)
    thread.start()
    repo = repository_cls(config, clock=time.monotonic) if repository_cls is not None else None
    server = MedserveServer(config, repository=repo, reuse_port=reuse_port, tracing=tracing)
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    except BaseException:
        asyncio.run_coroutine_threadsafe(server.repository.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        raise
    try:
        yield RunningServer(server, port, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def server_process(repository: Path, *args: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`medserve serve` as a child process on port 0; yields (port, process) once it is ready
    (the harness's launcher: log to a file, ready file, SIGTERM then SIGKILL on exit)."""
    with server_handle(repository, *args) as handle:
        assert handle.process is not None
        yield handle.port, handle.process


@contextlib.contextmanager
def server_handle(repository: Path, *args: str) -> Iterator[Any]:
    """`server_process`'s server as the launcher's handle (its REST port, its pid, its process)."""
    from medserve.perf.serverproc import medserve

    with medserve(repository, args=args, log_dir=repository.parent, log_level="INFO") as handle:
        yield handle


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """make_repo(name=builder, ...) -> repository path with version 1 of each model;
    a builder is a function(path) from onnx_models, optionally (builder, config_text)."""

    def build(**models: Any) -> Path:
        repo = tmp_path / "repo"
        repo.mkdir(exist_ok=True)
        for name, spec in models.items():
            builder, config = spec if isinstance(spec, tuple) else (spec, None)
            builder(repo / name / "1" / "model.onnx")
            if config is not None:
                onnx_models.write_config(repo, name, config)
        return repo

    return build


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until `predicate()` holds (for state that another thread changes)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)




class GatedModel:
    """Wraps a loaded model so a test decides when executions may proceed: while `gate` is
    clear, every execution waits in its worker thread (the instance stays busy). Gate slow models
    (onnx_models.slow, gather with slow_layers), or start the server with `inline_below_us=0`:
    batches measured under 100 µs run on the event loop itself, where a closed gate would stall
    the whole server."""

    def __init__(self, model: Any, gate: threading.Event) -> None:
        self._model = model
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, inputs: Any) -> Any:
        if not self._gate.wait(60):
            raise TimeoutError("test gate never opened")
        return self._model(inputs)


def gated_repository(gates: dict[str, threading.Event]) -> Any:
    """A repository builder (for `running_server(repository_cls=...)`) whose models named in
    `gates` execute only while their gate is set: the factory hands their batchers a
    `GatedModel` (warm-up runs ungated); nothing runs inline on the event loop (a closed gate
    there would stall the server)."""
    from medserve.server.wiring import build_repository

    def gate_runner(files: Any, runner: Any) -> Any:
        gate = gates.get(files.name)
        return runner if gate is None else GatedModel(runner, gate)

    def build(config: Any, *, clock: Callable[[], float]) -> Any:
        return build_repository(replace(config, inline_below_us=0), clock=clock, wrap_runner=gate_runner)

    return build
