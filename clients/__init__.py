"""The medserve Python client: numpy in, numpy out, typed errors, no heavy dependencies.

    from medserve.clients import Client

    with Client("10.0.0.5:8001", timeout_s=2.0) as client:
        result = client.infer("sepsis", {"x": features})
        result["risk"], result.model_version, result.model_sha256

Only grpcio, protobuf and numpy are needed (no onnxruntime, no torch). :class:`Client` is
synchronous and thread-safe; :class:`AsyncClient` is its grpc.aio twin. Errors are the classes of
:mod:`medserve.clients.errors`, one per gRPC status, under :class:`MedserveClientError`.
"""

from ._types import (
    BatchStatistics,
    Duration,
    Explanation,
    InferRequest,
    InferResult,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    RepositoryModel,
    RetryPolicy,
    ServerMetadata,
    TensorConfig,
    TensorMetadata,
    TLSConfig,
)
from .aio import AsyncClient
from .client import Client
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    InvalidInputError,
    MedserveClientError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    StreamRequestError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    UsageError,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "BatchStatistics",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "Duration",
    "Explanation",
    "FailedPrecondition",
    "InferRequest",
    "InferResult",
    "Internal",
    "InvalidArgument",
    "InvalidInputError",
    "MedserveClientError",
    "ModelConfig",
    "ModelMetadata",
    "ModelStatistics",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RepositoryModel",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerMetadata",
    "StreamRequestError",
    "TLSConfig",
    "TensorConfig",
    "TensorMetadata",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UsageError",
]
