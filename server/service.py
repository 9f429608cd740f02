"""GRPCInferenceService servicer: translates protobuf <-> domain and domain errors <-> gRPC
status codes, and nothing else.

The one error table is `STATUS_BY_ERROR`, looked up along the exception's MRO. Anything not in it
is a bug: the caller gets INTERNAL with a correlation id, the traceback goes to the log only.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import onnxruntime

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc

from . import model_config
from .auth import ALL_MODELS, TokenAuthorizer
from .codec import decode_infer_request, encode_infer_response
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
    Unauthenticated,
    Unsupported,
)
from .inference import InferenceCore
from .repository import LoadedVersion, ModelRepository
from .runtime import usable_providers

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_MESSAGE_CHARS = 1024
MAX_STREAM_IN_FLIGHT = 1024  # requests one ModelStreamInfer stream may have outstanding

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy", "parameters")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and caller-facing message for an exception (logs what the caller must not see)."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            message = str(exc)
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[: MAX_MESSAGE_CHARS - 3] + "..."
            log.info("request refused: %s: %s", code.name, message)
            return code, message
    if isinstance(exc, ExecutionError):  # its text is safe to show: the engine's own never is in it
        log.error("execution failed [correlation id %s]: %s", exc.correlation_id, exc)
        return grpc.StatusCode.INTERNAL, f"{str(exc)[:400]} (correlation id {exc.correlation_id})"
    correlation = uuid.uuid4().hex[:16]
    log.error("internal error [correlation id %s]", correlation, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation}; details in the server log)"


Response = TypeVar("Response")


def rpc(method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turn every exception an RPC raises into its status (the one place errors become codes)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            code, message = status_for(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


@dataclass(slots=True)
class Lifecycle:
    """Whether the server is up and whether it takes new work (shared with the wiring module)."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        core: InferenceCore,
        lifecycle: Lifecycle,
        clock: Callable[[], float] = time.monotonic,
        server_name: str = "medserve",
        authorizer: TokenAuthorizer | None = None,
    ) -> None:
        self._authorizer = authorizer
        self._repository = repository
        self._core = core
        self._lifecycle = lifecycle
        self._clock = clock
        self._server_name = server_name

    # -- helpers ---------------------------------------------------------------------------

    def _authorize(self, context: grpc.aio.ServicerContext, model: str | None) -> None:
        if self._authorizer is not None:
            self._authorizer.check(context.invocation_metadata() or (), model)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self._clock() + remaining

    def _check_accepting(self) -> None:
        if self._lifecycle.draining:
            raise ModelNotReady("server is draining; send the request to another replica")

    # -- health and metadata ---------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # open to probes: no token needed

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._lifecycle.ready)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        self._authorize(context, request.name)
        try:
            self._repository.get(request.name, request.version)
        except (ModelNotReady, ModelLoadFailed):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._lifecycle.ready)

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        self._authorize(context, None)
        providers = ",".join(usable_providers())
        return pb.ServerMetadataResponse(
            name=self._server_name,
            version=f"{VERSION} (onnxruntime {onnxruntime.__version__}; providers {providers})",
            extensions=EXTENSIONS,
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        self._authorize(context, request.name)
        loaded = self._repository.get(request.name, request.version)
        config = loaded.config
        batch = (-1,) if config.max_batch_size > 0 else ()
        response = pb.ModelMetadataResponse(
            name=loaded.name, versions=self._repository.ready_versions(loaded.name), platform=config.platform
        )
        for t in config.inputs:
            response.inputs.add(name=t.name, datatype=t.datatype, shape=batch + t.dims)
        for t in config.outputs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=batch + t.dims)
        for key, value in _card_parameters(loaded).items():
            response.parameters[key].string_param = value
        return response

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        self._authorize(context, request.name)
        loaded = self._repository.get(request.name, request.version)
        extra = {"execution_providers": ",".join(loaded.model.providers), **_card_parameters(loaded)}
        return pb.ModelConfigResponse(config=model_config.to_proto(loaded.config, extra))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        self._authorize(context, request.name or ALL_MODELS)
        versions = self._repository.loaded_versions(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])

    # -- inference -------------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        self._authorize(context, request.model_name)
        self._check_accepting()
        result = await self._core.infer(decode_infer_request(request, self._deadline(context)))
        return encode_infer_response(result)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; each response (or in-band error) carries its
        request id and is sent when ready, so callers can pipeline."""
        try:
            self._authorize(context, None)
        except Exception as exc:  # noqa: BLE001 - a stream without credentials ends at once
            code, message = status_for(exc)
            await context.abort(code, message)
        # Bounded: a stream holds at most MAX_STREAM_IN_FLIGHT requests; past that the reader
        # stops reading and HTTP/2 flow control pushes back on the client.
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(MAX_STREAM_IN_FLIGHT)
        slots = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        deadline = self._deadline(context)

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                await answer(request)
            finally:
                slots.release()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                self._authorize(context, request.model_name)
                self._check_accepting()
                result = await self._core.infer(decode_infer_request(request, deadline))
                await responses.put(pb.ModelStreamInferResponse(infer_response=encode_infer_response(result)))
            except Exception as exc:  # noqa: BLE001 - reported in-band; the stream stays open
                code, message = status_for(exc)
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                # The stream message has no status field; the code travels as a parameter.
                failed.parameters["status_code"].string_param = code.name
                await responses.put(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await responses.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()

    # -- repository ------------------------------------------------------------------------

    def _check_repository_name(self, name: str) -> None:
        if name and name != self._repository.root.name:
            raise ModelNotFound(f"repository {name!r} is not served here (serving {self._repository.root.name!r})")

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._authorize(context, None)
        self._check_repository_name(request.repository_name)
        response = pb.RepositoryIndexResponse()
        for row in self._repository.index(ready_only=request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._authorize(context, ALL_MODELS)
        self._check_repository_name(request.repository_name)
        if request.parameters:
            raise Unsupported(
                f"model {request.model_name!r}: load parameters {sorted(request.parameters)} (config override, "
                "file upload) are not supported; edit the repository instead"
            )
        await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._authorize(context, ALL_MODELS)
        self._check_repository_name(request.repository_name)
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- not implemented (and not advertised in ServerMetadata.extensions) ------------------

    async def _unimplemented(self, context: grpc.aio.ServicerContext, feature: str) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{feature} is not supported by medserve")

    async def SystemSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "system shared memory")

    async def SystemSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "CUDA shared memory")

    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "the trace extension")

    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context, "the logging extension")


def _card_parameters(loaded: LoadedVersion) -> dict[str, str]:
    """The model card's feature names and class labels (JSON lists) and the file's SHA-256."""
    params = {"model_sha256": loaded.sha256}
    for key in ("feature_names", "class_labels"):
        value = loaded.card_list(key)
        if value is not None:
            params[key] = json.dumps(value)
    return params


def _statistics(v: LoadedVersion) -> pb.ModelStatistics:
    s = v.stats

    def d(x):  # type: ignore[no-untyped-def]
        return pb.StatisticDuration(count=x.count, ns=x.ns)

    stats = pb.ModelStatistics(
        name=v.name,
        version=str(v.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=d(s.success),
            fail=d(s.fail),
            queue=d(s.queue),
            compute_input=d(s.compute_input),
            compute_infer=d(s.compute_infer),
            compute_output=d(s.compute_output),
        ),
    )
    for size in sorted(s.batches):
        b = s.batches[size]
        stats.batch_stats.add(
            batch_size=size, compute_input=d(b.compute_input), compute_infer=d(b.compute_infer), compute_output=d(b.compute_output)
        )
    return stats
