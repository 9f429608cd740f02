"""The synchronous client: numpy in, numpy out, typed errors, retries and replica failover.

    from medserve.clients import Client

    with Client("10.0.0.5:8001", timeout_s=2.0) as client:
        result = client.infer("sepsis", {"x": features})      # name -> np.ndarray
        risk = result["risk"]

Every call has a deadline (``timeout_s``, the client's default otherwise), which also bounds
all retries of that call. One gRPC channel per target is opened at construction and reused;
close the client (or use it as a context manager) to release them. A Client may be shared by
threads.
"""

from __future__ import annotations

import itertools
import random as _random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self, TypeAlias, TypeVar

import grpc
import numpy.typing as npt

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc

from . import _codec
from ._resilience import Attempts, Balancer, Clock, Random
from ._settings import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_RETRIES, Settings, build_settings, check_timeout
from ._types import (
    InferRequest,
    InferResult,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    RecordSchema,
    RepositoryModel,
    RetryPolicy,
    ServerMetadata,
    TLSConfig,
)
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInputError,
    MedserveClientError,
    StreamRequestError,
    UsageError,
    error_for_status,
    from_rpc_error,
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Stub: TypeAlias = pb_grpc.GRPCInferenceServiceStub
StreamItem: TypeAlias = InferResult | MedserveClientError

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class Client:
    """A client of one medserve deployment (one target, or several replicas balanced per call).

    ``target``: ``"host:port"`` or a list of replicas, tried round-robin per call; a replica
    that is down is skipped for ``retries.unhealthy_cooldown_s``. ``timeout_s``: default
    deadline of every call. ``tls``: CA bundle and optional client certificate (mutual TLS).
    ``token``: bearer token sent as ``authorization: Bearer <token>``; refused without TLS unless
    ``allow_insecure_token=True`` and every target is a loopback address. ``retries``: see
    :class:`RetryPolicy`. ``clock``/``sleep``/``random`` are for tests of the retry schedule.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout_s: float = 10.0,
        tls: TLSConfig | None = None,
        token: str | None = None,
        allow_insecure_token: bool = False,
        retries: RetryPolicy = DEFAULT_RETRIES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        random: Random = _random.random,
    ) -> None:
        self._settings: Settings = build_settings(
            target,
            timeout_s=timeout_s,
            tls=tls,
            token=token,
            allow_insecure_token=allow_insecure_token,
            retries=retries,
            max_message_bytes=max_message_bytes,
        )
        self._clock = clock
        self._sleep = sleep
        self._random = random
        s = self._settings
        self._channels: list[grpc.Channel] = [
            grpc.secure_channel(t, s.credentials, options=s.options)
            if s.credentials is not None
            else grpc.insecure_channel(t, options=s.options)
            for t in s.targets
        ]
        self._stubs: list[Stub] = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in self._channels]
        self._balancer: Balancer[str] = Balancer(s.targets, retries.unhealthy_cooldown_s, clock)
        self._schemas: dict[tuple[str, str], RecordSchema] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def targets(self) -> tuple[str, ...]:
        return self._settings.targets

    def close(self) -> None:
        """Close every channel; later calls raise :class:`UsageError`."""
        self._closed = True
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the one retry loop ------------------------------------------------------------------

    def _unary(
        self,
        select: Callable[[Stub], grpc.UnaryUnaryMultiCallable[Req, Resp]],
        request: Req,
        timeout_s: float | None,
        request_id: str | None = None,
    ) -> Resp:
        if self._closed:
            raise UsageError("the client is closed")
        settings = self._settings
        attempts = Attempts(
            settings.retries,
            settings.timeout_s if timeout_s is None else check_timeout(timeout_s),
            self._clock,
            self._random,
        )
        balancer = self._balancer
        while True:
            index = balancer.pick()
            remaining = attempts.remaining_s()
            if remaining <= 0:
                raise DeadlineExceeded("the call's deadline passed before it could be tried", request_id=request_id)
            try:
                response = select(self._stubs[index])(request, timeout=remaining, metadata=settings.metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id)
            except ValueError:
                if self._closed:  # grpc: "Cannot invoke RPC on closed channel!"
                    raise UsageError("the client is closed") from None
                raise
            else:
                balancer.mark_healthy(index)
                return response
            if error.code is _UNAVAILABLE:
                balancer.mark_unhealthy(index)
            delay = attempts.next_delay_s(error, failover=balancer.healthy_other_than(index))
            if delay is None:
                raise error
            if delay > 0:
                self._sleep(delay)

    # -- health and metadata -----------------------------------------------------------------

    def server_live(self, *, timeout_s: float | None = None) -> bool:
        return bool(self._unary(lambda s: s.ServerLive, pb.ServerLiveRequest(), timeout_s).live)

    def server_ready(self, *, timeout_s: float | None = None) -> bool:
        return bool(self._unary(lambda s: s.ServerReady, pb.ServerReadyRequest(), timeout_s).ready)

    def model_ready(self, model: str, version: str | int | None = None, *, timeout_s: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=_codec.version_string(version))
        return bool(self._unary(lambda s: s.ModelReady, request, timeout_s).ready)

    def server_metadata(self, *, timeout_s: float | None = None) -> ServerMetadata:
        return _codec.server_metadata(self._unary(lambda s: s.ServerMetadata, pb.ServerMetadataRequest(), timeout_s))

    def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=_codec.version_string(version))
        return _codec.model_metadata(self._unary(lambda s: s.ModelMetadata, request, timeout_s))

    def model_config(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelConfig:
        request = pb.ModelConfigRequest(name=model, version=_codec.version_string(version))
        return _codec.model_config(self._unary(lambda s: s.ModelConfig, request, timeout_s))

    def model_statistics(
        self, model: str | None = None, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> tuple[ModelStatistics, ...]:
        """Cumulative statistics per model version (all models when ``model`` is None)."""
        request = pb.ModelStatisticsRequest(name=model or "", version=_codec.version_string(version))
        return _codec.model_statistics(self._unary(lambda s: s.ModelStatistics, request, timeout_s))

    def repository_index(self, *, ready: bool = False, timeout_s: float | None = None) -> tuple[RepositoryModel, ...]:
        """Every model of the repository and its versions' states (only READY ones with ``ready``)."""
        request = pb.RepositoryIndexRequest(ready=ready)
        return _codec.repository_index(self._unary(lambda s: s.RepositoryIndex, request, timeout_s))

    def load_model(self, model: str, *, timeout_s: float | None = None) -> None:
        """Load (or reload) a model from the server's repository; returns once it is served."""
        self._forget(model)
        self._unary(lambda s: s.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model), timeout_s)

    def unload_model(self, model: str, *, timeout_s: float | None = None) -> None:
        self._forget(model)
        self._unary(lambda s: s.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model), timeout_s)

    def _forget(self, model: str) -> None:
        for key in [k for k in self._schemas if k[0] == model]:
            self._schemas.pop(key, None)

    # -- inference -----------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        priority: int | None = None,
    ) -> InferResult:
        """Run ``model`` on ``inputs`` (input name -> array; BYTES from bytes/str arrays).

        ``outputs`` limits the returned outputs (default all); ``priority`` 1 is the highest.

            result = client.infer("sepsis", {"x": np.zeros((4, 12), np.float32)}, request_id="enc-1")
            result["risk"].shape, result.model_version, result.model_sha256
        """
        request = _codec.encode_infer_request(
            model, inputs, version=version, outputs=outputs, request_id=request_id, priority=priority
        )
        response = self._unary(lambda s: s.ModelInfer, request, timeout_s, request_id)
        return _codec.decode_infer_response(response)

    def infer_records(
        self,
        model: str,
        records: Sequence[Mapping[str, Any]],
        *,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        priority: int | None = None,
    ) -> InferResult:
        """Run a tabular model on records (feature name -> number), one row per record.

        The column order comes from the model card's ``feature_names`` (via the model's metadata,
        cached per model and version); a missing or unknown feature is refused before anything
        is sent. If the server answers with a different model file than the cached metadata
        describes (a reload in between), the metadata is refreshed and, when the columns
        changed, the request is sent again in the new order.

            client.infer_records("breast-cancer", [{"mean radius": 14.2, "mean texture": 20.1, ...}])
        """
        deadline_s = self._clock() + (self._settings.timeout_s if timeout_s is None else check_timeout(timeout_s))
        label = _codec.model_label(model, version)
        schema = self._record_schema(model, version, deadline_s)
        array = _codec.records_to_array(label, schema, records)
        result = self.infer(
            model,
            {schema.input_name: array},
            version=version,
            outputs=outputs,
            timeout_s=self._left(deadline_s, request_id),
            request_id=request_id,
            priority=priority,
        )
        if _same_model(schema, result):
            return result
        self._schemas.pop((model, _codec.version_string(version)), None)
        fresh = self._record_schema(model, version, deadline_s)
        if _same_columns(schema, fresh):
            return result
        array = _codec.records_to_array(label, fresh, records)
        result = self.infer(
            model,
            {fresh.input_name: array},
            version=version,
            outputs=outputs,
            timeout_s=self._left(deadline_s, request_id),
            request_id=request_id,
            priority=priority,
        )
        if not _same_model(fresh, result):
            raise FailedPrecondition(
                f"model {label} changed twice during the call; its columns are in flux, retry later",
                request_id=request_id,
            )
        return result

    def _left(self, deadline_s: float, request_id: str | None = None) -> float:
        left = deadline_s - self._clock()
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed", request_id=request_id)
        return left

    def _record_schema(self, model: str, version: str | int | None, deadline_s: float) -> RecordSchema:
        key = (model, _codec.version_string(version))
        schema = self._schemas.get(key)
        if schema is None:
            label = _codec.model_label(model, version)
            metadata = self.model_metadata(model, version, timeout_s=self._left(deadline_s))
            config_features = None
            if metadata.feature_names is None:
                config_features = self.model_config(model, version, timeout_s=self._left(deadline_s)).feature_names
            schema = _codec.record_schema(label, metadata, config_features)
            self._schemas[key] = schema
        return schema

    def infer_stream(self, requests: Iterable[InferRequest], *, timeout_s: float | None = None) -> Iterator[StreamItem]:
        """Pipeline many requests over one ModelStreamInfer stream; yields, as they arrive,
        an :class:`InferResult` or a :class:`MedserveClientError` per request (never raised:
        :class:`StreamRequestError` for a server-side failure, :class:`InvalidInputError` for a
        request refused before sending), each carrying the request id. Requests without an id
        get their position in ``requests`` ("0", "1", ...). ``timeout_s`` bounds the whole
        stream. A failure of the stream itself is raised. Streams are not retried.

            reqs = (InferRequest("sepsis", {"x": x}, request_id=str(i)) for i, x in enumerate(batches))
            for item in client.infer_stream(reqs):
                ...
        """
        if self._closed:
            raise UsageError("the client is closed")
        settings = self._settings
        timeout = settings.timeout_s if timeout_s is None else check_timeout(timeout_s)
        stream = _StreamState()
        index = self._balancer.pick()
        call = self._stubs[index].ModelStreamInfer(
            stream.encode_all(requests), timeout=timeout, metadata=settings.metadata
        )
        try:
            for response in call:
                yield from stream.drain_local()
                yield stream.answer(response)
            yield from stream.drain_local()
            yield from stream.unanswered()
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code is _UNAVAILABLE:
                self._balancer.mark_unhealthy(index)
            raise error from None
        finally:
            call.cancel()


def _same_model(schema: RecordSchema, result: InferResult) -> bool:
    return schema.model_sha256 is None or result.model_sha256 in (None, schema.model_sha256)


def _same_columns(a: RecordSchema, b: RecordSchema) -> bool:
    return (a.feature_names, a.input_name, a.datatype) == (b.feature_names, b.input_name, b.datatype)


class _StreamState:
    """Request-id bookkeeping of one stream (shared by the sync and the asyncio client)."""

    def __init__(self) -> None:
        self.pending: dict[str, InferRequest] = {}
        self.local: deque[MedserveClientError] = deque()
        self._position = itertools.count()

    def encode(self, request: InferRequest) -> pb.ModelInferRequest | None:
        """The wire message, or None when the request was refused locally (queued for yielding)."""
        position = next(self._position)
        rid = request.request_id if request.request_id is not None else str(position)
        try:
            if not isinstance(request, InferRequest):
                raise InvalidInputError(f"stream item {position} is a {type(request).__name__}, not an InferRequest")
            if rid in self.pending:
                raise InvalidInputError(f"request id {rid!r} is already in flight on this stream")
            message = _codec.encode_infer_request(
                request.model,
                request.inputs,
                version=request.version,
                outputs=request.outputs,
                request_id=rid,
                priority=request.priority,
            )
        except InvalidInputError as exc:
            exc.request_id = rid
            self.local.append(exc)
            return None
        self.pending[rid] = request
        return message

    def encode_all(self, requests: Iterable[InferRequest]) -> Iterator[pb.ModelInferRequest]:
        for request in requests:
            message = self.encode(request)
            if message is not None:
                yield message

    def drain_local(self) -> Iterator[MedserveClientError]:
        while self.local:
            yield self.local.popleft()

    def answer(self, response: pb.ModelStreamInferResponse) -> StreamItem:
        inner = response.infer_response
        self.pending.pop(inner.id, None)
        if response.error_message:
            # medserve names the status in a parameter; other servers send the message alone.
            code_name = inner.parameters["status_code"].string_param if "status_code" in inner.parameters else ""
            code = getattr(grpc.StatusCode, code_name, None) if code_name else None
            if isinstance(code, grpc.StatusCode):
                return error_for_status(code, response.error_message, request_id=inner.id or None)
            return StreamRequestError(response.error_message, request_id=inner.id or None)
        try:
            return _codec.decode_infer_response(inner)
        except MedserveClientError as exc:  # one malformed answer fails its request, not the stream
            return exc

    def unanswered(self) -> Iterator[MedserveClientError]:
        for rid in list(self.pending):
            del self.pending[rid]
            yield StreamRequestError("the stream ended without a response to this request", request_id=rid)
