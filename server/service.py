"""GRPCInferenceService servicer: translates protobuf <-> domain and domain errors <-> gRPC
status codes (`status.STATUS_BY_ERROR`, the one table), and nothing else.

It runs behind the gate (`gate.py`), which has authenticated the caller: each method asks the
call's identity whether it may use the model, and a model it may not use answers exactly as a
model that does not exist. Repository load/unload exist only in explicit model-control mode and
need an admin identity whenever authentication is on.
"""
from __future__ import annotations

import asyncio
import contextlib
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
from .codec import DEFAULT_LIMITS, DecodeLimits, decode_fixed, decode_infer_request, encode_infer_response
from .config import DEFAULT_MAX_MESSAGE_BYTES
from .errors import (
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    TooLarge,
    Unsupported,
)
from .gate import (
    CURRENT,
    MAX_REQUEST_ID_CHARS,
    PARSE_IN_THREAD_BYTES,
    Call,
    StreamItem,
    answer_with_status,
    check_request_id,
    current_identity,
    retry_hint,
)
from .inference import InferenceCore
from .repository import LoadedVersion, ModelRepository, unknown_model
from .runtime import usable_providers
from .status import MAX_MESSAGE_CHARS, STATUS_BY_ERROR, status_code_name, status_for
from .tracing import Tracing

__all__ = ["MAX_MESSAGE_CHARS", "STATUS_BY_ERROR", "InferenceServicer", "Lifecycle", "rpc", "status_for"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"
NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()  # tracing off: no generator per request
MAX_STREAM_IN_FLIGHT = 1024  # requests one ModelStreamInfer stream may have outstanding
STREAM_FRAMING_BYTES = 16  # ModelStreamInferResponse's own bytes around the ModelInferResponse it carries

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
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._limits = limits
        self._max_message_bytes = max_message_bytes  # gRPC's send limit: a larger answer is refused here
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
    def _allow(model: str, version: str = "", call: Call | None = None) -> None:
        """A model the caller may not use answers exactly as one that does not exist. The call's
        audit record names the model asked for, allowed or not."""
        call = call or CURRENT.get()
        if call is not None:
            call.model, call.version = model, version
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
        self._allow(request.name, request.version)
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
        self._allow(request.name, request.version)
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
        for key, value in _rollout_parameters(self._repository, loaded.name).items():
            response.parameters[key].string_param = value
        return response

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        self._allow(request.name, request.version)
        loaded = self._repository.get(request.name, request.version)
        extra = {"execution_providers": ",".join(loaded.model.providers), **_card_parameters(loaded)}
        return pb.ModelConfigResponse(config=model_config.to_proto(loaded.config, extra))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self._allow(request.name, request.version)
        identity = current_identity()
        versions = [v for v in self._repository.loaded_versions(request.name, request.version) if identity.may_use(v.name)]
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])

    # -- inference -------------------------------------------------------------------------

    @rpc
    def ModelInfer(self, request: pb.ModelInferRequest,
                   context: grpc.aio.ServicerContext) -> Awaitable[pb.ModelInferResponse]:
        # A plain call handing back `_infer`'s coroutine: one coroutine fewer per request.
        return self._infer(request, context, CURRENT.get(), self._deadline(context))

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, call: Call | None,
                     deadline: float | None, framing_bytes: int = 0) -> pb.ModelInferResponse:
        """One request, unary or one message of a stream: the id checked before anything is
        decoded, access, decoding (off the loop when large), inference, the answer checked against
        the send limit before it is handed to gRPC (so the caller's status is the audited one)."""
        rpc_name = call.rpc if call is not None else "ModelInfer"
        if call is not None:
            call.model, call.version = request.model_name, request.model_version
            call.request_id = request.id  # the record keeps at most MAX_REQUEST_ID_CHARS of it
        tracing = self._tracing.span(rpc_name, context.invocation_metadata()) if self._tracing.enabled else NO_SPAN
        with tracing as span:
            try:
                check_request_id(request.id)  # first: the same answer for a forbidden and a missing model
                self._allow(request.model_name, request.model_version, call)
                self._check_accepting()
                fixed = self._core.fixed_input(request.model_name, request.model_version)
                if fixed is not None and (decoded := decode_fixed(request, fixed, deadline, self._limits)) is not None:
                    pass  # the common request of a fixed-signature model: decoded and validated at once
                elif call is not None and call.body_bytes >= PARSE_IN_THREAD_BYTES:  # BYTES decoding loops in Python
                    decoded = await asyncio.to_thread(decode_infer_request, request, deadline, self._limits)
                else:  # a plain call: the common small request costs no coroutine of its own
                    decoded = decode_infer_request(request, deadline, self._limits)
                if request.parameters and "routing_key" in request.parameters:
                    decoded = replace(decoded, routing_key=_routing_key(request))
                if span is not None:
                    decoded = replace(decoded, timing=RequestTiming())
                result = await self._core.infer(decoded)
                if call is not None:
                    call.version, call.model_sha256, call.rows = result.version, result.sha256, result.rows
                    if result.label:  # the audit record names the version and the label that reached it
                        call.version = f"{result.version}@{result.label}"
                response = encode_infer_response(result)
                if response.ByteSize() + framing_bytes > self._max_message_bytes:
                    raise TooLarge(
                        f"model {result.model!r} version {result.version}: the response is over the message size "
                        f"limit of {self._max_message_bytes / (1 << 20):g} MiB (--max-message-mb); ask for fewer "
                        "rows or outputs per request"
                    )
            except Exception as exc:
                self._tracing.fail(span, status_code_name(type(exc)))
                raise
            if span is not None and decoded.timing is not None:
                span.set_attributes({"medserve.model": result.model, "medserve.version": result.version,
                                     "medserve.model_sha256": result.sha256, "medserve.rows": result.rows})
                t = decoded.timing
                self._tracing.phases(span, t.queued_ns, t.started_ns, t.finished_ns)
        return response

    async def ModelStreamInfer(
        self, items: AsyncIterator[StreamItem], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently, each through ModelInfer's own path; each
        response (or in-band error, with the refusals the gate decided per message: rate limit,
        size, malformed message) carries its request id and is sent when ready, so callers can
        pipeline. Every message leaves its own audit record (`on_stream_item`)."""
        # Bounded: a stream holds at most MAX_STREAM_IN_FLIGHT requests; past that the reader
        # stops reading and HTTP/2 flow control pushes back on the client.
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(MAX_STREAM_IN_FLIGHT)
        slots = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        deadline = self._deadline(context)

        async def one(item: StreamItem) -> None:
            try:
                await answer(item)
            finally:
                slots.release()

        async def answer(item: StreamItem) -> None:
            call = item.call
            try:
                if item.refusal is not None:
                    raise item.refusal
                response = await self._infer(item.request, context, call, deadline, STREAM_FRAMING_BYTES)
                await responses.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:  # noqa: BLE001 - reported in-band; the stream stays open
                code, message = status_for(exc)
                call.status = code.name
                failed = pb.ModelInferResponse(model_name=_echo(call.model), model_version=_echo(call.version),
                                               id=_echo(call.request_id))
                # The stream message has no status field; the code travels as a parameter.
                failed.parameters["status_code"].string_param = code.name
                await responses.put(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
            finally:
                self._on_stream_item(call)

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for item in items:
                    await slots.acquire()
                    task = asyncio.create_task(one(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
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

    # Answered UNIMPLEMENTED through `rpc` (status set, audit record written), not by abort.

    @rpc
    async def SystemSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("system shared memory is not supported by medserve")

    @rpc
    async def SystemSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("system shared memory is not supported by medserve")

    @rpc
    async def SystemSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("system shared memory is not supported by medserve")

    @rpc
    async def CudaSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("CUDA shared memory is not supported by medserve")

    @rpc
    async def CudaSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("CUDA shared memory is not supported by medserve")

    @rpc
    async def CudaSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("CUDA shared memory is not supported by medserve")

    @rpc
    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("the trace extension is not supported by medserve")

    @rpc
    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        raise Unsupported("the logging extension is not supported by medserve")


def _echo(text: str) -> str:
    """A caller's name or id echoed in an in-band error: not one over the cap (it was refused, or
    would make the answer as large as the question)."""
    return text if len(text) <= MAX_REQUEST_ID_CHARS else ""


MAX_ROUTING_KEY_CHARS = 256


def _routing_key(request: pb.ModelInferRequest) -> str:
    """The request parameter `routing_key` (an encounter id: hashed for the canary, never logged,
    never echoed)."""
    param = request.parameters["routing_key"]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"model {request.model_name[:80]!r}: parameter 'routing_key' must be a string")
    key = param.string_param
    if len(key) > MAX_ROUTING_KEY_CHARS:
        raise InvalidInput(f"model {request.model_name[:80]!r}: parameter 'routing_key' is {len(key)} characters; "
                           f"at most {MAX_ROUTING_KEY_CHARS}")
    return key


def _rollout_parameters(repository: ModelRepository, name: str) -> dict[str, str]:
    """The model's labels (`version_labels`: JSON {label: version}, with `canary_percent` and
    `shadow`) and its silent trials' figures (`trial`: a JSON list of counts and histograms,
    what `medserve trial report` reads); none for a model without a labels file."""
    params: dict[str, str] = {}
    route = repository.routes.get(name)
    if route is not None:
        spec = route.spec
        params["version_labels"] = json.dumps({k: v for k, v in sorted(spec.labels.items())})
        params["canary_percent"] = f"{spec.canary_percent:g}"
        if spec.shadow is not None:
            params["shadow"] = str(spec.shadow)
    trials = repository.trials(name)
    if trials:
        params["trial"] = json.dumps([t.summary() for t in trials], separators=(",", ":"))
    return params


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
