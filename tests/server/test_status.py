"""The one table from domain errors to gRPC status codes (`service.status_for`), without a server."""
from __future__ import annotations

import logging

import grpc
import pytest

from medserve.server import errors
from medserve.server.service import MAX_MESSAGE_CHARS, STATUS_BY_ERROR, status_for

EXPECTED = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.ModelLoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


@pytest.mark.parametrize(("cls", "code"), sorted(EXPECTED.items(), key=lambda kv: kv[0].__name__))
def test_each_domain_error_has_its_documented_status_and_keeps_its_message(cls: type[Exception], code: grpc.StatusCode) -> None:
    assert status_for(cls("model 'm' version 1: why")) == (code, "model 'm' version 1: why")


def test_the_table_covers_exactly_the_documented_errors() -> None:
    assert dict(STATUS_BY_ERROR) == EXPECTED


def test_a_subclass_takes_its_nearest_ancestor_in_the_table() -> None:
    class RateLimited(errors.QueueFull):
        pass

    assert status_for(RateLimited("slow down"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_long_messages_are_capped() -> None:
    code, message = status_for(errors.InvalidInput("x" * 5000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) == MAX_MESSAGE_CHARS and message.endswith("...")


def test_an_execution_failure_is_internal_with_its_summary_and_correlation_id(caplog: pytest.LogCaptureFixture) -> None:
    exc = errors.ExecutionError("model 'm' version 1: a Gather node failed (onnxruntime INVALID_ARGUMENT)")
    with caplog.at_level(logging.ERROR):
        code, message = status_for(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert message == f"{exc} (correlation id {exc.correlation_id})"
    assert any(exc.correlation_id in r.getMessage() for r in caplog.records)


def test_a_bug_is_internal_and_its_text_stays_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code, message = status_for(KeyError("patient 4711"))
    assert code == grpc.StatusCode.INTERNAL
    assert "4711" not in message and message.startswith("internal error (correlation id ")
    correlation = message.split("correlation id ")[1].split(";")[0]
    (record,) = [r for r in caplog.records if correlation in r.getMessage()]
    assert record.exc_info is not None  # the traceback goes to the log only
