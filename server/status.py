"""The one table from domain errors to gRPC status codes, looked up along the exception's MRO.
Anything not in it is a bug: the caller gets INTERNAL with a correlation id, the traceback goes
to the log only. Used by the servicer and by the gate in front of it."""
from __future__ import annotations

import logging
import uuid

import grpc

from .errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    ExecutionError,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    QueueFull,
    TooLarge,
    Unauthenticated,
    Unsupported,
)

log = logging.getLogger("medserve.server.service")

MAX_MESSAGE_CHARS = 1024

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# The KServe V2 REST column: the HTTP status of each gRPC code (a refusal with a retry hint also
# carries `Retry-After`; anything else, a bug, is 500 with a correlation id as over gRPC).
HTTP_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INTERNAL: 500,
}


def http_status_for(exc: BaseException, refusal_level: int = logging.INFO) -> tuple[int, str, str]:
    """The HTTP status, the gRPC code's name (for the audit record) and the caller-facing message
    of an exception: `status_for`'s answer in the REST column. A request over the size limit is
    413 (it is RESOURCE_EXHAUSTED over gRPC, but retrying it cannot help)."""
    code, message = status_for(exc, refusal_level)
    status = HTTP_BY_CODE.get(code, 500)
    if isinstance(exc, TooLarge):
        status = 413
    return status, code.name, message


def status_for(exc: BaseException, refusal_level: int = logging.INFO) -> tuple[grpc.StatusCode, str]:
    """The status and caller-facing message for an exception (logs what the caller must not see).
    A refusal is logged at `refusal_level` (the gate logs the refusals it counts per peer and
    second at DEBUG: a flood of strangers must not become a flood of log lines)."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            message = str(exc)
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[: MAX_MESSAGE_CHARS - 3] + "..."
            log.log(refusal_level, "request refused: %s: %s", code.name, message)
            return code, message
    if isinstance(exc, ExecutionError):  # its text is safe to show: the engine's own never is in it
        log.error("execution failed [correlation id %s]: %s", exc.correlation_id, exc)
        return grpc.StatusCode.INTERNAL, f"{str(exc)[:400]} (correlation id {exc.correlation_id})"
    correlation = uuid.uuid4().hex[:16]
    log.error("internal error [correlation id %s]", correlation, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation}; details in the server log)"




def status_code_name(error: type[BaseException]) -> str:
    """The gRPC status a failure of this class is answered with, without logging anything."""
    return next((STATUS_BY_ERROR[c].name for c in error.__mro__ if c in STATUS_BY_ERROR),
                "CANCELLED" if error.__name__ == "CancelledError" else "INTERNAL")
