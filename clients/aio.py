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

from . import _calls
from ._calls import StreamItem, StreamState
from ._resilience import Clock, Random
from ._settings import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_RETRIES, Settings, build_settings
from ._types import (
    Explanation,
    InferRequest,
    InferResult,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    RepositoryModel,
    RetryPolicy,
    ServerMetadata,
    TLSConfig,
)
from .errors import UsageError

if TYPE_CHECKING:
    from medserve.protos.grpc_service_pb2_grpc import GRPCInferenceServiceAsyncStub as AsyncStub

R = TypeVar("R")


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
        self._core = _calls.Core(self._settings, clock, random)
        self._sleep = sleep
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[AsyncStub] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def targets(self) -> tuple[str, ...]:
        return self._settings.targets

    def _open(self) -> list[AsyncStub]:
        if self._closed:
            raise UsageError("the client is closed")
        if not self._stubs:
            self._channels = _calls.open_channels(self._settings, grpc.aio.secure_channel, grpc.aio.insecure_channel)
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

    # -- the drivers of the sans-IO core ----------------------------------------------------------

    async def _unary(self, method: str, request: Any, timeout_s: float | None, request_id: str | None = None) -> Any:
        """The one retry loop: ``stub.<method>(request)`` with retries and replica failover."""
        stubs = self._open()
        tries = self._core.tries(timeout_s, request_id)
        metadata = self._settings.metadata
        while True:
            index, remaining = tries.next()
            try:
                response = await getattr(stubs[index], method)(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                failure = exc
            else:
                return tries.succeeded(index, response)
            delay = tries.failed(index, failure)
            if delay > 0:
                await self._sleep(delay)

    async def _call(self, call: _calls.Call[R]) -> R:
        return call.decode(await self._unary(call.method, call.request, call.timeout_s, call.request_id))

    async def _run(self, flow: _calls.Flow[R]) -> R:
        try:
            step = next(flow)
            while True:
                step = flow.send(await getattr(self, step.method)(*step.args, **step.kwargs))
        except StopIteration as done:
            result: R = done.value
            return result

    # -- health and metadata -----------------------------------------------------------------

    async def server_live(self, *, timeout_s: float | None = None) -> bool:
        return await self._call(_calls.server_live(timeout_s))

    async def server_ready(self, *, timeout_s: float | None = None) -> bool:
        return await self._call(_calls.server_ready(timeout_s))

    async def model_ready(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> bool:
        return await self._call(_calls.model_ready(model, version, timeout_s))

    async def server_metadata(self, *, timeout_s: float | None = None) -> ServerMetadata:
        return await self._call(_calls.server_metadata(timeout_s))

    async def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelMetadata:
        return await self._call(_calls.model_metadata(model, version, timeout_s))

    async def model_config(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelConfig:
        return await self._call(_calls.model_config(model, version, timeout_s))

    async def model_statistics(
        self, model: str | None = None, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> tuple[ModelStatistics, ...]:
        return await self._call(_calls.model_statistics(model, version, timeout_s))

    async def repository_index(
        self, *, ready: bool = False, timeout_s: float | None = None
    ) -> tuple[RepositoryModel, ...]:
        return await self._call(_calls.repository_index(ready, timeout_s))

    async def load_model(self, model: str, *, timeout_s: float | None = None) -> None:
        self._core.forget(model)
        await self._call(_calls.load_model(model, timeout_s))

    async def unload_model(self, model: str, *, timeout_s: float | None = None) -> None:
        self._core.forget(model)
        await self._call(_calls.unload_model(model, timeout_s))

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
        explain: bool = False,
        routing_key: str | None = None,
    ) -> InferResult:
        """See :meth:`Client.infer <medserve.clients.Client.infer>`."""
        return await self._call(
            _calls.infer(
                model,
                inputs,
                version=version,
                outputs=outputs,
                timeout_s=timeout_s,
                request_id=request_id,
                priority=priority,
                explain=explain,
                routing_key=routing_key,
            )
        )

    async def explain(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        *,
        records: Sequence[Mapping[str, Any]] | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Explanation:
        """See :meth:`Client.explain <medserve.clients.Client.explain>`."""
        if (inputs is None) == (records is None):
            raise UsageError("explain: give inputs or records, not both")
        if records is not None:
            result = await self._run(self._core.infer_records(
                model, records, version=version, outputs=None, timeout_s=timeout_s, request_id=request_id,
                priority=None, explain=True))
        else:
            assert inputs is not None
            result = await self.infer(model, inputs, version=version, timeout_s=timeout_s, request_id=request_id,
                                      explain=True)
        return await self._run(self._core.explanation(model, result, timeout_s))

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
        routing_key: str | None = None,
    ) -> InferResult:
        """See :meth:`Client.infer_records <medserve.clients.Client.infer_records>`."""
        return await self._run(
            self._core.infer_records(
                model,
                records,
                version=version,
                outputs=outputs,
                timeout_s=timeout_s,
                request_id=request_id,
                priority=priority,
                routing_key=routing_key,
            )
        )

    async def infer_stream(
        self,
        requests: Iterable[InferRequest] | AsyncIterable[InferRequest],
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamItem]:
        """See :meth:`Client.infer_stream <medserve.clients.Client.infer_stream>`; ``requests``
        may also be an async iterable."""
        stubs = self._open()
        core = self._core
        timeout = core.timeout(timeout_s)
        stream = StreamState()

        async def messages() -> AsyncIterator[pb.ModelInferRequest]:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    message = stream.encode(request)
                    if message is not None:
                        yield message
            else:
                for message in stream.encode_all(requests):
                    yield message

        index = core.balancer.pick()
        call = stubs[index].ModelStreamInfer(messages(), timeout=timeout, metadata=self._settings.metadata)
        try:
            async for response in call:
                for item in stream.on_response(response):
                    yield item
            for item in stream.on_end():
                yield item
        except grpc.RpcError as exc:
            raise core.stream_failed(index, exc) from None
        finally:
            call.cancel()
