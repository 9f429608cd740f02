"""Exceptions raised by the medserve client: one class per gRPC status code, one common base.

    MedserveClientError            .code (grpc.StatusCode | None), .message, .request_id
     ├── Cancelled                 CANCELLED            the call was cancelled
     ├── Unknown                   UNKNOWN              the server (or a proxy) gave no better code
     │    └── StreamRequestError   (in-band)            one request of an infer_stream failed;
     │                                                  yielded, not raised, the stream goes on
     ├── InvalidArgument           INVALID_ARGUMENT     the server refused the request as malformed
     │    └── InvalidInputError    (client side)        refused before anything was sent
     ├── DeadlineExceeded          DEADLINE_EXCEEDED    the call's deadline passed
     ├── NotFound                  NOT_FOUND            unknown model or version
     ├── AlreadyExists             ALREADY_EXISTS
     ├── PermissionDenied          PERMISSION_DENIED    valid token, not for this model/operation
     ├── ResourceExhausted         RESOURCE_EXHAUSTED   queue full: back off (retried for you)
     ├── FailedPrecondition        FAILED_PRECONDITION  the model failed to load; fix it first
     ├── Aborted                   ABORTED
     ├── OutOfRange                OUT_OF_RANGE
     ├── Unimplemented             UNIMPLEMENTED        feature not offered by this server
     ├── Internal                  INTERNAL             server bug or runtime failure (has a
     │                                                  correlation id for the server log)
     ├── Unavailable               UNAVAILABLE          server down, draining or model not ready
     │                                                  (retried for you, other replicas tried)
     ├── DataLoss                  DATA_LOSS
     ├── Unauthenticated           UNAUTHENTICATED      missing or unknown bearer token
     └── UsageError                (client side)        the client was misconfigured or misused,
                                                        e.g. a token over an insecure channel
                                                        (also a ValueError)

Every failed RPC surfaces as one of these: a bare ``grpc.RpcError`` never escapes the client.
Messages are the server's (they name model, tensor, expected and got) and never carry tensor
values.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "InvalidInputError",
    "MedserveClientError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamRequestError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UsageError",
    "error_for_status",
    "from_rpc_error",
]

PUSHBACK_KEY = "grpc-retry-pushback-ms"


class MedserveClientError(Exception):
    """Base of every error the client raises.

    ``code`` is the gRPC status (None only for :class:`UsageError`), ``message`` the server's
    (or the client's) explanation, ``request_id`` the id of the inference request, if any.
    ``retry_pushback_s`` is the server's requested delay before a retry (trailing metadata
    ``grpc-retry-pushback-ms``); a negative value means "do not retry".
    """

    default_code: grpc.StatusCode | None = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
        retry_pushback_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.request_id = request_id
        self.retry_pushback_s = retry_pushback_s

    def __str__(self) -> str:
        prefix = f"{self.code.name}: " if self.code is not None else ""
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{prefix}{self.message}{suffix}"


class Cancelled(MedserveClientError):
    default_code = grpc.StatusCode.CANCELLED


class Unknown(MedserveClientError):
    default_code = grpc.StatusCode.UNKNOWN


class StreamRequestError(Unknown):
    """One request of a stream failed in-band without a status code (medserve sends its code,
    which gives the matching class instead), or the stream ended before answering it."""


class InvalidArgument(MedserveClientError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidInputError(InvalidArgument):
    """The client refused the request before sending it (bad dtype, missing feature, ...)."""


class DeadlineExceeded(MedserveClientError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(MedserveClientError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MedserveClientError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(MedserveClientError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MedserveClientError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(MedserveClientError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MedserveClientError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRange(MedserveClientError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(MedserveClientError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(MedserveClientError):
    default_code = grpc.StatusCode.INTERNAL


class Unavailable(MedserveClientError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(MedserveClientError):
    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(MedserveClientError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class UsageError(MedserveClientError, ValueError):
    """The client was configured or called in a way it cannot honour (nothing was sent)."""


_BY_CODE: dict[grpc.StatusCode, type[MedserveClientError]] = {
    cls.default_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
    if cls.default_code is not None
}


def error_for_status(
    code: grpc.StatusCode,
    message: str,
    *,
    request_id: str | None = None,
    retry_pushback_s: float | None = None,
) -> MedserveClientError:
    """The exception for a status code (OK and unmapped codes give :class:`Unknown`)."""
    cls = _BY_CODE.get(code, Unknown)
    return cls(
        message,
        code=code if code in _BY_CODE else grpc.StatusCode.UNKNOWN,
        request_id=request_id,
        retry_pushback_s=retry_pushback_s,
    )


def _pushback_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    for key, value in metadata or ():
        if key == PUSHBACK_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            try:
                return int(text.strip()) / 1000.0
            except ValueError:
                return -1.0  # a malformed push-back means "do not retry" (gRPC's rule)
    return None


def from_rpc_error(error: grpc.RpcError, request_id: str | None = None) -> MedserveClientError:
    """Translate a failed RPC (sync or aio) into the matching :class:`MedserveClientError`."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    trailers_fn = getattr(error, "trailing_metadata", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    try:
        trailers = trailers_fn() if callable(trailers_fn) else None
    except Exception:  # noqa: BLE001 - metadata is optional; never mask the real error
        trailers = None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details if isinstance(details, str) and details else f"RPC failed with {code.name}"
    return error_for_status(code, message, request_id=request_id, retry_pushback_s=_pushback_s(trailers))
