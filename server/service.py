"""GRPCInferenceService servicer: translates protobuf <-> domain and domain errors <-> gRPC
status codes (`status.STATUS_BY_ERROR`, the one table), and nothing else.

It runs behind the gate (`gate.py`), which has authenticated the caller: each method asks the
call's identity whether it may use the model, and a model it may not use answers exactly as a
model that does not exist. Repository load/unload exist only in explicit model-control mode and
need an admin identity whenever authentication is on.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import onnxruntime

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc

from . import model_config
from .batching import RequestTiming
from .codec import DEFAULT_LIMITS, DecodeLimits, decode_infer_request, encode_infer_response
from .errors import (
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    Unsupported,
)
from .gate import CURRENT, PARSE_IN_THREAD_BYTES, Call, answer_with_status, current_identity, retry_hint
from .inference import InferenceCore, InferRequest
from .repository import LoadedVersion, ModelRepository, unknown_model
from .runtime import usable_providers
from .status import MAX_MESSAGE_CHARS, STATUS_BY_ERROR, status_code_name, status_for
from .tracing import Tracing

__all__ = ["MAX_MESSAGE_CHARS", "STATUS_BY_ERROR", "InferenceServicer", "Lifecycle", "rpc", "status_for"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_STREAM_IN_FLIGHT = 1024  # requests one ModelStreamInfer stream may have outstanding

EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy", "parameters")

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
            call = CURRENT.get()
            if call is not None:
                call.status = code.name
            answer_with_status(context, code, message, retry_hint(exc))
            return None  # type: ignore[return-value]  # with a non-OK status no message is sent

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
        model_control_mode: str = "none",
        authenticated: bool = False,
        on_stream_item: Callable[[Call], None] = lambda call: None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        tracing: Tracing | None = None,
    ) -> None:
        self._limits = limits
        self._tracing = tracing or Tracing(environ={})
        self._model_control_mode = model_control_mode
        self._authenticated = authenticated
        self._on_stream_item = on_stream_item  # the gate's audit record for each stream request
        self._repository = repository
        self._core = core
        self._lifecycle = lifecycle
        self._clock = clock
        self._server_name = server_name

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _allow(model: str) -> None:
        """A model the caller may not use answers exactly as one that does not exist."""
        if not current_identity().may_use(model):
            raise unknown_model(model)

    def _administer(self, operation: str) -> None:
        if self._model_control_mode != "explicit":
            raise Unsupported(
                f"{operation} needs the server to run with --model-control-mode explicit "
                f"(it runs with --model-control-mode {self._model_control_mode})"
            )
        identity = current_identity()
        if self._authenticated and not identity.admin:
            raise PermissionDenied(f"identity {identity.name!r} may not {operation} (it is not an admin)")

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
        self._allow(request.name)
        try:
            self._repository.get(request.name, request.version)
        except (ModelNotReady, ModelLoadFailed):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._lifecycle.ready)

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
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
        self._allow(request.name)
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
        self._allow(request.name)
        loaded = self._repository.get(request.name, request.version)
        extra = {"execution_providers": ",".join(loaded.model.providers), **_card_parameters(loaded)}
        return pb.ModelConfigResponse(config=model_config.to_proto(loaded.config, extra))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self._allow(request.name)
        identity = current_identity()
        versions = [v for v in self._repository.loaded_versions(request.name, request.version) if identity.may_use(v.name)]
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])

    # -- inference -------------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        call = CURRENT.get()
        if call is not None:
            call.model, call.version, call.request_id = request.model_name, request.model_version, request.id
        with self._tracing.span("ModelInfer", context.invocation_metadata()) as span:
            try:
                self._allow(request.model_name)
                self._check_accepting()
                decoded = await self._decode(request, context, call)
                if span is not None:
                    decoded = replace(decoded, timing=RequestTiming())
                result = await self._core.infer(decoded)
            except Exception as exc:
                self._tracing.fail(span, status_code_name(type(exc)))
                raise
            if span is not None and decoded.timing is not None:
                span.set_attributes({"medserve.model": result.model, "medserve.version": result.version,
                                     "medserve.model_sha256": result.sha256, "medserve.rows": result.rows})
                t = decoded.timing
                self._tracing.phases(span, t.queued_ns, t.started_ns, t.finished_ns)
        if call is not None:
            call.version, call.model_sha256, call.rows = result.version, result.sha256, result.rows
        return encode_infer_response(result)

    async def _decode(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
                      call: Call | None) -> InferRequest:
        """Tensors from the message; a large one on a worker thread (BYTES decoding loops in Python)."""
        deadline = self._deadline(context)
        if call is not None and call.body_bytes >= PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(decode_infer_request, request, deadline, self._limits)
        return decode_infer_request(request, deadline, self._limits)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; each response (or in-band error) carries its
        request id and is sent when ready, so callers can pipeline."""
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

        stream_call = CURRENT.get()

        async def answer(request: pb.ModelInferRequest) -> None:
            item = Call("ModelStreamInfer", current_identity(), stream_call.peer if stream_call else "",
                        self._clock(), model=request.model_name, version=request.model_version,
                        request_id=request.id, audited=True)
            try:
                self._allow(request.model_name)
                self._check_accepting()
                result = await self._core.infer(decode_infer_request(request, deadline, self._limits))
                item.version, item.model_sha256, item.rows = result.version, result.sha256, result.rows
                await responses.put(pb.ModelStreamInferResponse(infer_response=encode_infer_response(result)))
            except Exception as exc:  # noqa: BLE001 - reported in-band; the stream stays open
                code, message = status_for(exc)
                item.status = code.name
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                # The stream message has no status field; the code travels as a parameter.
                failed.parameters["status_code"].string_param = code.name
                await responses.put(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
            finally:
                self._on_stream_item(item)

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
        self._check_repository_name(request.repository_name)
        identity = current_identity()
        response = pb.RepositoryIndexResponse()
        for row in self._repository.index(ready_only=request.ready):
            if not identity.may_use(row.name):
                continue  # a model the caller may not use is not there for it
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        call = CURRENT.get()
        if call is not None:
            call.model = request.model_name
        self._administer("load models")
        self._check_repository_name(request.repository_name)
        if request.parameters:
            raise Unsupported(
                f"model {request.model_name!r}: load parameters {sorted(request.parameters)} (config override, "
                "file upload) are not supported; edit the repository instead"
            )
        log.info("model %r: load requested by %s", request.model_name, current_identity().name,
                 extra={"model": request.model_name, "identity": current_identity().name})
        await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        call = CURRENT.get()
        if call is not None:
            call.model = request.model_name
        self._administer("unload models")
        self._check_repository_name(request.repository_name)
        log.info("model %r: unload requested by %s", request.model_name, current_identity().name,
                 extra={"model": request.model_name, "identity": current_identity().name})
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
    """The model card's feature names and class labels (JSON lists), which columns each input of
    a mixed table carries (`input_columns`, a JSON object), and the file's SHA-256."""
    params = {"model_sha256": loaded.sha256}
    card = loaded.card
    if card is None:
        return params
    for key, value in (("feature_names", card.feature_names), ("class_labels", card.class_labels)):
        if value is not None:
            params[key] = json.dumps(list(value))
    if card.input_columns is not None:
        params["input_columns"] = json.dumps({k: list(v) for k, v in card.input_columns.items()})
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
