"""Retries and balancing against real servers: a replica restarted on the same port, two
replicas balanced round-robin, and failover when one of them goes away."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import numpy as np
import pytest

from medserve.clients import Client, MedserveClientError, RetryPolicy

import onnx_models
from conftest import running_server, wait_for

X = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
PATIENT = RetryPolicy(max_attempts=10_000, initial_backoff_s=0.01, max_backoff_s=0.1)
# A grpc.aio server that shuts down answers CANCELLED (not UNAVAILABLE) to calls it had received
# but not yet handed to a handler (grpc/grpc#41785, reproduced here with a bare grpc.aio server).
# Inference is idempotent, so the restart test opts in to retrying that code too; the default
# policy retries UNAVAILABLE and RESOURCE_EXHAUSTED only.
PATIENT_ACROSS_RESTART = RetryPolicy(
    max_attempts=10_000, initial_backoff_s=0.01, max_backoff_s=0.1,
    retry_on=RetryPolicy().retry_on | {"CANCELLED"},
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    return repo


def inference_count(target: str) -> int:
    with Client(target) as client:
        return sum(s.inference_count for s in client.model_statistics("affine"))


class Caller:
    """Calls infer in a loop on a thread, recording every answer and every error."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.answers: list[float] = []
        self.errors: list[MedserveClientError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client-test-caller")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(float(self.client.infer("affine", X)["s"][0, 0]))
            except MedserveClientError as exc:
                self.errors.append(exc)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait_for_more(self, n: int) -> None:
        target = len(self.answers) + n
        wait_for(lambda: len(self.answers) >= target or bool(self.errors), timeout_s=30)


def test_a_replica_restarted_on_the_same_port_costs_the_caller_nothing(repo: Path) -> None:
    retries: list[float] = []

    def sleep(seconds: float) -> None:  # the real sleep, counted
        retries.append(seconds)
        time.sleep(seconds)

    # The port stays reserved across the restart (a bound, never listening SO_REUSEPORT
    # socket), so nothing else can take it while the replica is down.
    reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind(("127.0.0.1", 0))
    port = reservation.getsockname()[1]
    first = running_server(repo, port=port, reuse_port=True)
    server = first.__enter__()
    try:
        with Client(server.target, timeout_s=60, retries=PATIENT_ACROSS_RESTART, sleep=sleep) as client:
            caller = Caller(client).__enter__()
            try:
                caller.wait_for_more(20)
                first.__exit__(None, None, None)  # drain and stop: calls now fail and are retried
                first = None
                wait_for(lambda: len(retries) >= 3)  # the caller is in its retry loop
                with running_server(repo, port=port, reuse_port=True) as again:
                    assert again.port == port
                    caller.wait_for_more(20)
                    caller.__exit__(None, None, None)  # before this server stops too
            finally:
                caller.__exit__(None, None, None)
    finally:
        if first is not None:
            first.__exit__(None, None, None)
        reservation.close()
    assert caller.errors == []
    assert set(caller.answers) == {6.0}


@pytest.fixture
def two_servers(repo: Path) -> Iterator[tuple[str, str]]:
    with running_server(repo) as a, running_server(repo) as b:
        yield a.target, b.target


def test_calls_are_balanced_round_robin_over_replicas(two_servers: tuple[str, str]) -> None:
    a, b = two_servers
    with Client([a, b]) as client:
        for _ in range(10):
            client.infer("affine", X)
    assert (inference_count(a), inference_count(b)) == (5, 5)


def test_a_replica_that_goes_away_is_skipped(repo: Path) -> None:
    with running_server(repo) as keeper:
        second = running_server(repo)
        leaver = second.__enter__()
        leaver_target = leaver.target
        try:
            with Client([leaver_target, keeper.target], timeout_s=30, retries=PATIENT) as client:
                for _ in range(4):
                    client.infer("affine", X)
                second.__exit__(None, None, None)
                second = None
                before = inference_count(keeper.target)
                for _ in range(10):
                    assert client.infer("affine", X)["s"][0, 0] == 6.0
                assert inference_count(keeper.target) == before + 10
        finally:
            if second is not None:
                second.__exit__(None, None, None)
