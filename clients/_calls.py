"""The sans-IO core of the sync and the asyncio client: what to send, how to read the answer, when
to retry and how multi-step calls proceed, with no channel, no blocking and no awaiting.

- :class:`Call` describes one unary RPC: the stub method's name, the request message, a function
  that turns the response into the public result, and the call's timeout and request id.
- :class:`Core` holds a client's shared state (settings, replica balancer, record-schema cache,
  clock, random source) and builds those calls.
- Multi-step calls (``infer_records``) are generators (:data:`Flow`) that yield the :class:`Step`
  (a public client method and its arguments) to perform next and receive its result; their return
  value is the call's result.
- :class:`Tries` is the bookkeeping of one call's retry loop, :class:`StreamState` that of one
  ModelStreamInfer stream.

The clients are thin drivers: ``Client`` runs the calls with blocking gRPC calls and
``time.sleep``, ``AsyncClient`` awaits them on grpc.aio.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar

import grpc
import numpy.typing as npt

from medserve.protos import grpc_service_pb2 as pb

from . import _codec
from ._resilience import Attempts, Balancer, Clock, Random
from ._settings import Settings, check_timeout
from ._types import (
    Explanation,
    InferRequest,
    InferResult,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    RecordSchema,
    RepositoryModel,
    ServerMetadata,
)
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInputError,
    MedserveClientError,
    StreamRequestError,
    error_for_status,
    from_rpc_error,
)

R = TypeVar("R")
C = TypeVar("C")
StreamItem: TypeAlias = InferResult | MedserveClientError

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_CANCELLED = grpc.StatusCode.CANCELLED


class Call(NamedTuple, Generic[R]):
    """One unary RPC: ``decode(stub.<method>(request))`` under ``timeout_s`` (None: the client's
    default); ``request_id`` labels the errors it raises."""

    method: str
    request: Any
    decode: Callable[[Any], R]
    timeout_s: float | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a multi-step call: the client's own public method ``client.<method>(*args,
    **kwargs)`` (so a step goes through whatever that method does, overridden or wrapped)."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


Flow: TypeAlias = Generator[Step, Any, R]
"""A multi-step call: yields each :class:`Step` to perform, is sent its result, returns the
final result."""


# -- decoders of the simple calls ----------------------------------------------------------------


def _live(response: Any) -> bool:
    return bool(response.live)


def _ready(response: Any) -> bool:
    return bool(response.ready)


def _nothing(response: Any) -> None:
    return None


# -- the calls --------------------------------------------------------------------------------------


def server_live(timeout_s: float | None) -> Call[bool]:
    return Call("ServerLive", pb.ServerLiveRequest(), _live, timeout_s)


def server_ready(timeout_s: float | None) -> Call[bool]:
    return Call("ServerReady", pb.ServerReadyRequest(), _ready, timeout_s)


def model_ready(model: str, version: str | int | None, timeout_s: float | None) -> Call[bool]:
    request = pb.ModelReadyRequest(name=model, version=_codec.version_string(version))
    return Call("ModelReady", request, _ready, timeout_s)


def server_metadata(timeout_s: float | None) -> Call[ServerMetadata]:
    return Call("ServerMetadata", pb.ServerMetadataRequest(), _codec.server_metadata, timeout_s)


def model_metadata(model: str, version: str | int | None, timeout_s: float | None) -> Call[ModelMetadata]:
    request = pb.ModelMetadataRequest(name=model, version=_codec.version_string(version))
    return Call("ModelMetadata", request, _codec.model_metadata, timeout_s)


def model_config(model: str, version: str | int | None, timeout_s: float | None) -> Call[ModelConfig]:
    request = pb.ModelConfigRequest(name=model, version=_codec.version_string(version))
    return Call("ModelConfig", request, _codec.model_config, timeout_s)


def model_statistics(
    model: str | None, version: str | int | None, timeout_s: float | None
) -> Call[tuple[ModelStatistics, ...]]:
    request = pb.ModelStatisticsRequest(name=model or "", version=_codec.version_string(version))
    return Call("ModelStatistics", request, _codec.model_statistics, timeout_s)


def repository_index(ready: bool, timeout_s: float | None) -> Call[tuple[RepositoryModel, ...]]:
    return Call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), _codec.repository_index, timeout_s)


def load_model(model: str, timeout_s: float | None) -> Call[None]:
    return Call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=model), _nothing, timeout_s)


def unload_model(model: str, timeout_s: float | None) -> Call[None]:
    return Call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model), _nothing, timeout_s)


def infer(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    *,
    version: str | int | None,
    outputs: Sequence[str] | None,
    timeout_s: float | None,
    request_id: str | None,
    priority: int | None,
    explain: bool = False,
    routing_key: str | None = None,
) -> Call[InferResult]:
    """The ModelInfer call (raises :class:`InvalidInputError` for inputs refused before sending)."""
    request = _codec.encode_infer_request(
        model, inputs, version=version, outputs=outputs, request_id=request_id, priority=priority, explain=explain,
        routing_key=routing_key,
    )
    return Call("ModelInfer", request, _codec.decode_infer_response, timeout_s, request_id)


def open_channels(settings: Settings, secure: Callable[..., C], insecure: Callable[..., C]) -> list[C]:
    """One channel per target, made by ``secure`` (with the credentials) or ``insecure``: the
    ``grpc`` or the ``grpc.aio`` channel constructors."""
    s = settings
    return [
        secure(t, s.credentials, options=s.options) if s.credentials is not None else insecure(t, options=s.options)
        for t in s.targets
    ]


def same_model(schema: RecordSchema, result: InferResult) -> bool:
    return schema.model_sha256 is None or result.model_sha256 in (None, schema.model_sha256)


def same_columns(a: RecordSchema, b: RecordSchema) -> bool:
    return (a.feature_names, a.inputs()) == (b.feature_names, b.inputs())


# -- a client's shared state ------------------------------------------------------------------------


class Core:
    """The I/O-free state of one client: settings, replica balancer, record-schema and
    metadata caches."""

    __slots__ = ("balancer", "clock", "metadata", "random", "schemas", "settings")

    def __init__(self, settings: Settings, clock: Clock, random: Random) -> None:
        self.settings = settings
        self.clock = clock
        self.random = random
        self.balancer: Balancer[str] = Balancer(settings.targets, settings.retries.unhealthy_cooldown_s, clock)
        self.schemas: dict[tuple[str, str], RecordSchema] = {}
        # (model, version, model file's SHA-256) -> its metadata: what names an explanation's values
        self.metadata: dict[tuple[str, str, str | None], ModelMetadata] = {}

    def timeout(self, timeout_s: float | None) -> float:
        """The call's timeout: ``timeout_s`` checked, or the client's default."""
        return self.settings.timeout_s if timeout_s is None else check_timeout(timeout_s)

    def tries(self, timeout_s: float | None, request_id: str | None) -> Tries:
        return Tries(self, timeout_s, request_id)

    def forget(self, model: str) -> None:
        """Drop the cached record schemas and metadata of every version of ``model`` (it is (re)loaded)."""
        for key in [k for k in self.schemas if k[0] == model]:
            self.schemas.pop(key, None)
        for named in [k for k in self.metadata if k[0] == model]:
            self.metadata.pop(named, None)

    def explanation(self, model: str, result: InferResult, timeout_s: float | None) -> Flow[Explanation]:
        """``result`` (asked with ``explain``) as an :class:`Explanation`, named by the metadata
        of the version and model file that answered: fetched once per file (the SHA-256 in the
        answer), not once per explanation (a second call per explanation doubled its round trips)."""
        key = (model, result.model_version, result.model_sha256)
        metadata = self.metadata.get(key)
        if metadata is None:
            metadata = yield Step("model_metadata", (model, result.model_version), {"timeout_s": timeout_s})
            self.metadata[key] = metadata
        return Explanation.of(result, metadata.feature_names, metadata.class_labels, metadata.input_columns)

    def left(self, deadline_s: float, request_id: str | None = None) -> float:
        left = deadline_s - self.clock()
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed", request_id=request_id)
        return left

    def record_schema(self, model: str, version: str | int | None, deadline_s: float) -> Flow[RecordSchema]:
        """The cached record schema, else fetched (metadata, and the config when the metadata
        has no feature names) and cached."""
        key = (model, _codec.version_string(version))
        schema = self.schemas.get(key)
        if schema is None:
            label = _codec.model_label(model, version)
            metadata: ModelMetadata = yield Step(
                "model_metadata", (model, version), {"timeout_s": self.left(deadline_s)}
            )
            config_features = None
            if metadata.feature_names is None:
                config: ModelConfig = yield Step("model_config", (model, version), {"timeout_s": self.left(deadline_s)})
                config_features = config.feature_names
            schema = _codec.record_schema(label, metadata, config_features)
            self.schemas[key] = schema
        return schema

    def infer_records(
        self,
        model: str,
        records: Sequence[Mapping[str, Any]],
        *,
        version: str | int | None,
        outputs: Sequence[str] | None,
        timeout_s: float | None,
        request_id: str | None,
        priority: int | None,
        explain: bool = False,
        routing_key: str | None = None,
    ) -> Flow[InferResult]:
        """``Client.infer_records`` as a flow: schema, infer; when the answer comes from another
        model file, refresh the schema and, if its columns changed, infer again."""
        deadline_s = self.clock() + self.timeout(timeout_s)
        label = _codec.model_label(model, version)

        def send(schema: RecordSchema) -> Step:
            inputs = _codec.records_to_inputs(label, schema, records)
            left = self.left(deadline_s, request_id)
            return Step(
                "infer",
                (model, inputs),
                {
                    "version": version,
                    "outputs": outputs,
                    "timeout_s": left,
                    "request_id": request_id,
                    "priority": priority,
                    **({"explain": True} if explain else {}),
                    **({"routing_key": routing_key} if routing_key else {}),
                },
            )

        schema = yield from self.record_schema(model, version, deadline_s)
        result: InferResult = yield send(schema)
        if same_model(schema, result):
            return result
        self.schemas.pop((model, _codec.version_string(version)), None)
        fresh = yield from self.record_schema(model, version, deadline_s)
        if same_columns(schema, fresh):
            return result
        result = yield send(fresh)
        if not same_model(fresh, result):
            raise FailedPrecondition(
                f"model {label} changed twice during the call; its columns are in flux, retry later",
                request_id=request_id,
            )
        return result

    def stream_failed(self, index: int, exc: grpc.RpcError) -> MedserveClientError:
        """The error to raise for a failed stream on replica ``index`` (marked down if UNAVAILABLE)."""
        error = from_rpc_error(exc)
        if error.code is _UNAVAILABLE:
            self.balancer.mark_unhealthy(index)
        return error


class Tries:
    """The retry loop of one unary call, minus the calling and the sleeping:

    tries = core.tries(timeout_s, request_id)
    while True:
        index, remaining = tries.next()         # raises DeadlineExceeded when time is up
        try: response = <call replica index with timeout remaining>
        except grpc.RpcError as exc: failure = exc
        else: return tries.succeeded(index, response)
        <sleep tries.failed(index, failure)>    # raises the typed error when giving up
    """

    __slots__ = ("_attempts", "_balancer", "_request_id")

    def __init__(self, core: Core, timeout_s: float | None, request_id: str | None) -> None:
        self._attempts = Attempts(core.settings.retries, core.timeout(timeout_s), core.clock, core.random)
        self._balancer = core.balancer
        self._request_id = request_id

    def next(self) -> tuple[int, float]:
        """The replica for the next try and the seconds it has."""
        index = self._balancer.pick()
        remaining = self._attempts.remaining_s()
        if remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it could be tried", request_id=self._request_id)
        return index, remaining

    def succeeded(self, index: int, response: R) -> R:
        self._balancer.mark_healthy(index)
        return response

    def failed(self, index: int, exc: grpc.RpcError) -> float:
        """Seconds to wait before the next try; raises the typed error when giving up."""
        error = from_rpc_error(exc, self._request_id)
        if error.code is _CANCELLED and self._attempts.remaining_s() <= 0:
            # The server's deadline timer reset the stream before ours fired (grpc-go and
            # grpc-dotnet make the same correction): the deadline passed, nobody cancelled.
            raise DeadlineExceeded(f"the call's deadline passed ({error.message})", request_id=self._request_id)
        balancer = self._balancer
        if error.code is _UNAVAILABLE:
            balancer.mark_unhealthy(index)
        delay = self._attempts.next_delay_s(error, failover=balancer.healthy_other_than(index))
        if delay is None:
            raise error
        return delay


class StreamState:
    """Request-id bookkeeping of one stream (shared by the sync and the asyncio client)."""

    def __init__(self) -> None:
        self.pending: dict[str, InferRequest] = {}
        self.local: deque[MedserveClientError] = deque()
        self._position = itertools.count()

    def encode(self, request: InferRequest) -> pb.ModelInferRequest | None:
        """The wire message, or None when the request was refused locally (queued for yielding)."""
        position = next(self._position)
        if not isinstance(request, InferRequest):
            self.local.append(
                InvalidInputError(f"stream item {position} is a {type(request).__name__}, not an InferRequest")
            )
            return None
        rid = request.request_id if request.request_id is not None else str(position)
        try:
            if rid in self.pending:
                raise InvalidInputError(f"request id {rid!r} is already in flight on this stream")
            message = _codec.encode_infer_request(
                request.model,
                request.inputs,
                version=request.version,
                outputs=request.outputs,
                request_id=rid,
                priority=request.priority,
                routing_key=request.routing_key,
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

    def on_response(self, response: pb.ModelStreamInferResponse) -> Iterator[StreamItem]:
        """What to yield on a response: the requests refused locally so far, then its answer."""
        yield from self.drain_local()
        yield self.answer(response)

    def on_end(self) -> Iterator[StreamItem]:
        """What to yield when the stream ends: the last local refusals, then every request left
        without an answer."""
        yield from self.drain_local()
        yield from self.unanswered()

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
