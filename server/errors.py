"""Domain errors of the server. No grpc import: `service.py` owns the one table that maps
these classes to gRPC status codes (walking the MRO), so the core never speaks transport.

    MedserveError
     ├── InvalidInput        bad request: names, datatypes, shapes, sizes, encodings
     ├── ModelNotFound       unknown model or version
     ├── ModelNotReady       model loading/unloading, or the server is draining
     ├── ModelLoadFailed     the model exists but failed to load (config, file, hash, warm-up)
     │    └── ConfigError    a config.pbtxt / model file problem, naming the file and field
     ├── QueueFull           bounded queue or rate limit refused the request
     ├── TooLarge            a message (request or response) over its size limit
     ├── DeadlineExceeded    the request expired (or could not meet its deadline) before running
     ├── Cancelled           the caller went away before the request ran
     ├── Unsupported         a protocol feature this server does not implement
     ├── Unauthenticated     no credentials, or credentials this server does not know
     ├── PermissionDenied    valid credentials without access to this model or operation
     ├── ExecutionError      the runtime failed while executing a batch (a bug or ORT failure)
     └── InvalidSetting      a server setting (command-line flag) is out of range: the server
                             does not start (never reaches a caller)

Messages name model, version, tensor, expected and got, and never tensor values (patient data).
"""
from __future__ import annotations

import uuid


def model_label(name: str, version: int | str) -> str:
    """How every message names a model version: "'sepsis' version 3" ("latest" when unset)."""
    return f"{name!r} version {version or 'latest'}"


class MedserveError(Exception):
    """Base class of every error the server reports to a caller."""


class InvalidInput(MedserveError):
    """The request is malformed or does not match the model's signature."""


class ModelNotFound(MedserveError):
    """No such model, or no such version of it."""


class ModelNotReady(MedserveError):
    """The model (or the whole server) cannot take requests right now; retrying later may work."""


class ModelLoadFailed(MedserveError):
    """The model is known but failed to load; retrying will not help until it is fixed."""


class ConfigError(ModelLoadFailed):
    """A model repository entry is broken; the message names the file and the field."""


class QueueFull(MedserveError):
    """A bounded queue is full (or a rate limit is reached); the caller should back off and retry,
    after `retry_after_s` when known (sent as `grpc-retry-pushback-ms`)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(MedserveError):
    """A request or response message over the size limit (`--max-message-mb`): RESOURCE_EXHAUSTED,
    naming the limit. Retrying the same call will not help (and a response too large would be
    computed again): `retry_after_s` -1 is sent as `grpc-retry-pushback-ms: -1`, "do not retry"."""

    retry_after_s = -1.0


class DeadlineExceeded(MedserveError):
    """The request expired, or could not meet its deadline, before it was executed."""


class Cancelled(MedserveError):
    """The caller cancelled the request before it ran."""


class Unsupported(MedserveError):
    """A protocol feature that this server does not implement."""


class Unauthenticated(MedserveError):
    """The call carries no bearer token, or one this server does not know."""


class PermissionDenied(MedserveError):
    """The token is valid but not for this model or operation."""


class ExecutionError(MedserveError):
    """The runtime failed executing a batch (INTERNAL). The message names the model, version and
    the failing node's op type, never the engine's own text (it can quote input values); the
    correlation id ties the caller's status to the server's log line."""

    def __init__(self, message: str, *, correlation_id: str | None = None) -> None:
        super().__init__(message)
        self.correlation_id = correlation_id or uuid.uuid4().hex[:16]


class InvalidSetting(MedserveError):
    """A server setting is invalid; the message names the command-line flag, expected and got."""
