"""The public surface of medserve.clients and its exception tree (no server needed)."""
from __future__ import annotations

import inspect
from pathlib import Path

import grpc
import pytest

from medserve import clients
from medserve.clients import errors

EXPORTED = {
    "Aborted", "AlreadyExists", "AsyncClient", "BatchStatistics", "Cancelled", "Client", "DataLoss",
    "DeadlineExceeded", "Duration", "Explanation", "FailedPrecondition", "InferRequest", "InferResult", "Internal",
    "InvalidArgument", "InvalidInputError", "MedserveClientError", "ModelConfig", "ModelMetadata",
    "ModelStatistics", "NotFound", "OutOfRange", "PermissionDenied", "RepositoryModel", "ResourceExhausted",
    "RetryPolicy", "ServerMetadata", "StreamRequestError", "TLSConfig", "TensorConfig", "TensorMetadata",
    "Unauthenticated", "Unavailable", "Unimplemented", "Unknown", "UsageError",
}


def test_exported_members() -> None:
    assert set(clients.__all__) == EXPORTED
    assert len(clients.__all__) == len(set(clients.__all__))
    public = {name for name in dir(clients) if not name.startswith("_")}
    # Submodules are importable attributes; everything else that is public is exported.
    assert public - EXPORTED <= {"aio", "client", "errors"}
    for name in clients.__all__:
        assert getattr(clients, name).__module__.startswith("medserve.clients")


def test_package_is_typed() -> None:
    assert (Path(clients.__file__).parent / "py.typed").is_file()


def test_sync_and_async_clients_have_the_same_surface() -> None:
    def methods(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(fn).parameters)
            for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")
        }

    assert methods(clients.Client) == methods(clients.AsyncClient)
    assert list(inspect.signature(clients.Client).parameters) == list(
        inspect.signature(clients.AsyncClient).parameters
    )


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_code_has_its_own_class(code: grpc.StatusCode) -> None:
    exc = errors.error_for_status(code, "boom", request_id="r-1")
    assert isinstance(exc, errors.MedserveClientError)
    assert type(exc).default_code is code
    assert (exc.code, exc.message, exc.request_id) == (code, "boom", "r-1")
    assert str(exc) == f"{code.name}: boom (request id r-1)"


def test_client_side_errors_sit_in_the_tree() -> None:
    assert issubclass(errors.InvalidInputError, errors.InvalidArgument)
    assert errors.InvalidInputError("x").code is grpc.StatusCode.INVALID_ARGUMENT
    assert issubclass(errors.UsageError, ValueError) and errors.UsageError("x").code is None
    assert issubclass(errors.StreamRequestError, errors.Unknown)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.MedserveClientError)
            assert name in (errors.__doc__ or ""), f"{name} missing from the drawn tree"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: object, details: object, trailers: object = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> object:
        return self._code

    def details(self) -> object:
        return self._details

    def trailing_metadata(self) -> object:
        return self._trailers


def test_from_rpc_error_reads_code_details_and_pushback() -> None:
    exc = errors.from_rpc_error(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", (("grpc-retry-pushback-ms", "250"),)),
        "abc",
    )
    assert isinstance(exc, errors.ResourceExhausted)
    assert (exc.message, exc.request_id, exc.retry_pushback_s) == ("queue full", "abc", 0.25)
    # A malformed push-back means "do not retry"; missing details and odd codes still map.
    bad = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "", (("grpc-retry-pushback-ms", "x"),)))
    assert bad.retry_pushback_s == -1.0 and bad.message == "RPC failed with UNAVAILABLE"
    odd = errors.from_rpc_error(FakeRpcError(None, None, None))
    assert isinstance(odd, errors.Unknown) and odd.code is grpc.StatusCode.UNKNOWN
