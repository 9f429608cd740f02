"""The asyncio client (grpc.aio): the same surface as :class:`~medserve.clients.Client`, awaited.

    from medserve.clients import AsyncClient

    async with AsyncClient(["10.0.0.5:8001", "10.0.0.6:8001"], timeout_s=2.0) as client:
        results = await asyncio.gather(*(client.infer("sepsis", {"x": x}) for x in batches))

Channels are opened on first use, inside the running event loop (grpc.aio binds a channel to
its loop), and closed by ``await client.close()`` or ``async with``. Use one AsyncClient per
event loop.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
import grpc.aio
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
from .client import StreamItem, _same_columns, _same_model, _StreamState
from .errors import DeadlineExceeded, FailedPrecondition, UsageError, from_rpc_error

if TYPE_CHECKING:
    from medserve.protos.grpc_service_pb2_grpc import GRPCInferenceServiceAsyncStub as AsyncStub

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class AsyncClient:
    """The asyncio twin of :class:`~medserve.clients.Client` (same arguments, same methods,
    awaited; ``sleep`` is an async function)."""

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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[AsyncStub] = []
        self._balancer: Balancer[str] = Balancer(self._settings.targets, retries.unhealthy_cooldown_s, clock)
        self._schemas: dict[tuple[str, str], RecordSchema] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def targets(self) -> tuple[str, ...]:
        return self._settings.targets

    def _open(self) -> list[AsyncStub]:
        if self._closed:
            raise UsageError("the client is closed")
        if not self._stubs:
            s = self._settings
            self._channels = [
                grpc.aio.secure_channel(t, s.credentials, options=s.options)
                if s.credentials is not None
                else grpc.aio.insecure_channel(t, options=s.options)
                for t in s.targets
            ]
            self._stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in self._channels]
        return self._stubs

    async def close(self) -> None:
        self._closed = True
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the one retry loop ------------------------------------------------------------------

    async def _unary(
        self,
        select: Callable[[AsyncStub], grpc.aio.UnaryUnaryMultiCallable[Req, Resp]],
        request: Req,
        timeout_s: float | None,
        request_id: str | None = None,
    ) -> Resp:
        stubs = self._open()
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
                response: Resp = await select(stubs[index])(request, timeout=remaining, metadata=settings.metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id)
            else:
                balancer.mark_healthy(index)
                return response
            if error.code is _UNAVAILABLE:
                balancer.mark_unhealthy(index)
            delay = attempts.next_delay_s(error, failover=balancer.healthy_other_than(index))
            if delay is None:
                raise error
            if delay > 0:
                await self._sleep(delay)

    # -- health and metadata -----------------------------------------------------------------

    async def server_live(self, *, timeout_s: float | None = None) -> bool:
        return bool((await self._unary(lambda s: s.ServerLive, pb.ServerLiveRequest(), timeout_s)).live)

    async def server_ready(self, *, timeout_s: float | None = None) -> bool:
        return bool((await self._unary(lambda s: s.ServerReady, pb.ServerReadyRequest(), timeout_s)).ready)

    async def model_ready(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> bool:
        request = pb.ModelReadyRequest(name=model, version=_codec.version_string(version))
        return bool((await self._unary(lambda s: s.ModelReady, request, timeout_s)).ready)

    async def server_metadata(self, *, timeout_s: float | None = None) -> ServerMetadata:
        response = await self._unary(lambda s: s.ServerMetadata, pb.ServerMetadataRequest(), timeout_s)
        return _codec.server_metadata(response)

    async def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=_codec.version_string(version))
        return _codec.model_metadata(await self._unary(lambda s: s.ModelMetadata, request, timeout_s))

    async def model_config(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelConfig:
        request = pb.ModelConfigRequest(name=model, version=_codec.version_string(version))
        return _codec.model_config(await self._unary(lambda s: s.ModelConfig, request, timeout_s))

    async def model_statistics(
        self, model: str | None = None, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> tuple[ModelStatistics, ...]:
        request = pb.ModelStatisticsRequest(name=model or "", version=_codec.version_string(version))
        return _codec.model_statistics(await self._unary(lambda s: s.ModelStatistics, request, timeout_s))

    async def repository_index(
        self, *, ready: bool = False, timeout_s: float | None = None
    ) -> tuple[RepositoryModel, ...]:
        request = pb.RepositoryIndexRequest(ready=ready)
        return _codec.repository_index(await self._unary(lambda s: s.RepositoryIndex, request, timeout_s))

    async def load_model(self, model: str, *, timeout_s: float | None = None) -> None:
        self._forget(model)
        request = pb.RepositoryModelLoadRequest(model_name=model)
        await self._unary(lambda s: s.RepositoryModelLoad, request, timeout_s)

    async def unload_model(self, model: str, *, timeout_s: float | None = None) -> None:
        self._forget(model)
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        await self._unary(lambda s: s.RepositoryModelUnload, request, timeout_s)

    def _forget(self, model: str) -> None:
        for key in [k for k in self._schemas if k[0] == model]:
            self._schemas.pop(key, None)

    # -- inference -----------------------------------------------------------------------------

    async def infer(
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
        """See :meth:`Client.infer <medserve.clients.Client.infer>`."""
        request = _codec.encode_infer_request(
            model, inputs, version=version, outputs=outputs, request_id=request_id, priority=priority
        )
        response = await self._unary(lambda s: s.ModelInfer, request, timeout_s, request_id)
        return _codec.decode_infer_response(response)

    async def infer_records(
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
        """See :meth:`Client.infer_records <medserve.clients.Client.infer_records>`."""
        deadline_s = self._clock() + (self._settings.timeout_s if timeout_s is None else check_timeout(timeout_s))
        label = _codec.model_label(model, version)
        schema = await self._record_schema(model, version, deadline_s)
        array = _codec.records_to_array(label, schema, records)
        result = await self.infer(
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
        fresh = await self._record_schema(model, version, deadline_s)
        if _same_columns(schema, fresh):
            return result
        array = _codec.records_to_array(label, fresh, records)
        result = await self.infer(
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

    async def _record_schema(self, model: str, version: str | int | None, deadline_s: float) -> RecordSchema:
        key = (model, _codec.version_string(version))
        schema = self._schemas.get(key)
        if schema is None:
            label = _codec.model_label(model, version)
            metadata = await self.model_metadata(model, version, timeout_s=self._left(deadline_s))
            config_features = None
            if metadata.feature_names is None:
                config = await self.model_config(model, version, timeout_s=self._left(deadline_s))
                config_features = config.feature_names
            schema = _codec.record_schema(label, metadata, config_features)
            self._schemas[key] = schema
        return schema

    async def infer_stream(
        self,
        requests: Iterable[InferRequest] | AsyncIterable[InferRequest],
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamItem]:
        """See :meth:`Client.infer_stream <medserve.clients.Client.infer_stream>`; ``requests``
        may also be an async iterable."""
        stubs = self._open()
        settings = self._settings
        timeout = settings.timeout_s if timeout_s is None else check_timeout(timeout_s)
        stream = _StreamState()

        async def messages() -> AsyncIterator[pb.ModelInferRequest]:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    message = stream.encode(request)
                    if message is not None:
                        yield message
            else:
                for message in stream.encode_all(requests):
                    yield message

        index = self._balancer.pick()
        call = stubs[index].ModelStreamInfer(messages(), timeout=timeout, metadata=settings.metadata)
        try:
            async for response in call:
                for item in stream.drain_local():
                    yield item
                yield stream.answer(response)
            for item in stream.drain_local():
                yield item
            for item in stream.unanswered():
                yield item
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code is _UNAVAILABLE:
                self._balancer.mark_unhealthy(index)
            raise error from None
        finally:
            call.cancel()
