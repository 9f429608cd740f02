"""Each error class, produced for real by a medserve server (and by a stopped one)."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medserve.clients import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InferResult,
    Internal,
    InvalidArgument,
    MedserveClientError,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
)

import onnx_models
from client_helpers import corrupt, slow_queue
from conftest import RunningServer, running_server

NO_RETRY = RetryPolicy(max_attempts=1)
SLOW_X = {"x": np.ones((1, 1024), np.float32)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("client-errors") / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    onnx_models.gather(repo / "lookup" / "1" / "model.onnx")
    slow_queue(repo, "slowq")
    corrupt(repo, "broken")
    with running_server(repo, exit_on_error=False) as s:
        yield s


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.target, timeout_s=30, retries=NO_RETRY) as c:
        yield c


def test_not_found(client: Client) -> None:
    with pytest.raises(NotFound, match="no-such-model") as info:
        client.infer("no-such-model", {"x": np.zeros((1, 4), np.float32)}, request_id="nf-1")
    assert info.value.request_id == "nf-1"
    with pytest.raises(NotFound):
        client.model_metadata("affine", version=9)


def test_invalid_argument_names_the_tensor(client: Client) -> None:
    with pytest.raises(InvalidArgument, match=r"input 'x'.*expected shape \[-1, 4\], got \[2, 3\]") as info:
        client.infer("affine", {"x": np.zeros((2, 3), np.float32)})
    assert info.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument):
        client.infer("affine", {"x": np.zeros((2, 4), np.float64)})


def test_failed_precondition_for_a_model_that_failed_to_load(client: Client) -> None:
    with pytest.raises(FailedPrecondition, match="broken"):
        client.infer("broken", {"x": np.zeros((1, 4), np.float32)})


def test_internal_when_the_runtime_fails(client: Client) -> None:
    with pytest.raises(Internal, match="correlation id"):
        client.infer("lookup", {"idx": np.array([[99]], np.int64)})  # index outside the table


def test_deadline_exceeded_on_a_slow_model(client: Client) -> None:
    with pytest.raises(DeadlineExceeded) as info:
        client.infer("slowq", SLOW_X, timeout_s=0.001, request_id="late")
    assert info.value.request_id == "late"
    assert isinstance(client.infer("slowq", SLOW_X), InferResult)  # the server carries on


def _flood(target: str, retries: RetryPolicy, n: int = 12) -> list[InferResult | BaseException]:
    async def main() -> list[InferResult | BaseException]:
        async with AsyncClient(target, timeout_s=60, retries=retries) as client:
            return await asyncio.gather(*(client.infer("slowq", SLOW_X) for _ in range(n)), return_exceptions=True)

    return asyncio.run(main())


def test_resource_exhausted_when_the_queue_is_full(server: RunningServer) -> None:
    outcomes = _flood(server.target, NO_RETRY)
    assert any(isinstance(o, ResourceExhausted) for o in outcomes)
    assert all(isinstance(o, (InferResult, ResourceExhausted)) for o in outcomes)


def test_retries_absorb_resource_exhausted(server: RunningServer) -> None:
    patient = RetryPolicy(max_attempts=1000, initial_backoff_s=0.005, max_backoff_s=0.05)
    outcomes = _flood(server.target, patient)
    assert all(isinstance(o, InferResult) for o in outcomes), [type(o).__name__ for o in outcomes]


def test_unavailable_from_a_stopped_server(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    with running_server(repo, model_control_mode="explicit", load_models=("*",)) as server:
        target = server.target
        with Client(target) as client:
            assert client.server_live()
    with Client(target, timeout_s=5, retries=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)) as client:
        with pytest.raises(Unavailable) as info:
            client.infer("affine", {"x": np.zeros((1, 4), np.float32)}, request_id="u-1")
        assert info.value.request_id == "u-1"
        with pytest.raises(Unavailable):
            list(client.infer_stream([]))

    async def aio() -> None:
        async with AsyncClient(target, retries=NO_RETRY) as client:
            with pytest.raises(Unavailable):
                await client.server_live()

    asyncio.run(aio())


def test_no_bare_rpc_error_escapes(client: Client) -> None:
    import grpc

    for call in (
        lambda: client.model_config("no-such-model"),
        lambda: client.model_statistics("no-such-model"),
        lambda: client.load_model("no-such-model"),
    ):
        with pytest.raises(MedserveClientError) as info:
            call()
        assert not isinstance(info.value, grpc.RpcError)
        assert info.value.__cause__ is None and info.value.__context__ is None  # no grpc traceback chained
