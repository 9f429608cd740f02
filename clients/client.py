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

import random as _random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self, TypeAlias, TypeVar

import grpc
import numpy.typing as npt

from medserve.protos import grpc_service_pb2_grpc as pb_grpc

from . import _calls
from ._calls import StreamItem as StreamItem  # re-exported: the item type of infer_stream
from ._calls import StreamState
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

R = TypeVar("R")
Stub: TypeAlias = pb_grpc.GRPCInferenceServiceStub


class Client:
    """A client of one medserve deployment (one target, or several replicas balanced per call).

    ``target``: ``"host:port"`` or a list of replicas, tried round-robin per call; a replica
    that is down is skipped for ``retries.unhealthy_cooldown_s``. A target that resolves to
    several addresses (``"dns:///medserve.ns.svc.cluster.local:8001"`` for a headless Service,
    ``"ipv4:10.0.0.5:8001,10.0.0.6:8001"``) is balanced by gRPC itself, round_robin over the
    addresses that answer. ``timeout_s``: default
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
        self._core = _calls.Core(self._settings, clock, random)
        self._sleep = sleep
        self._channels: list[grpc.Channel] = _calls.open_channels(
            self._settings, grpc.secure_channel, grpc.insecure_channel
        )
        self._stubs: list[Stub] = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in self._channels]
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

    # -- the drivers of the sans-IO core ----------------------------------------------------------

    def _unary(self, method: str, request: Any, timeout_s: float | None, request_id: str | None = None) -> Any:
        """The one retry loop: ``stub.<method>(request)`` with retries and replica failover."""
        if self._closed:
            raise UsageError("the client is closed")
        tries = self._core.tries(timeout_s, request_id)
        metadata = self._settings.metadata
        while True:
            index, remaining = tries.next()
            try:
                response = getattr(self._stubs[index], method)(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                failure = exc
            except ValueError:
                if self._closed:  # grpc: "Cannot invoke RPC on closed channel!"
                    raise UsageError("the client is closed") from None
                raise
            else:
                return tries.succeeded(index, response)
            delay = tries.failed(index, failure)
            if delay > 0:
                self._sleep(delay)

    def _call(self, call: _calls.Call[R]) -> R:
        return call.decode(self._unary(call.method, call.request, call.timeout_s, call.request_id))

    def _run(self, flow: _calls.Flow[R]) -> R:
        try:
            step = next(flow)
            while True:
                step = flow.send(getattr(self, step.method)(*step.args, **step.kwargs))
        except StopIteration as done:
            result: R = done.value
            return result

    # -- health and metadata -----------------------------------------------------------------

    def server_live(self, *, timeout_s: float | None = None) -> bool:
        return self._call(_calls.server_live(timeout_s))

    def server_ready(self, *, timeout_s: float | None = None) -> bool:
        return self._call(_calls.server_ready(timeout_s))

    def model_ready(self, model: str, version: str | int | None = None, *, timeout_s: float | None = None) -> bool:
        return self._call(_calls.model_ready(model, version, timeout_s))

    def server_metadata(self, *, timeout_s: float | None = None) -> ServerMetadata:
        return self._call(_calls.server_metadata(timeout_s))

    def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelMetadata:
        return self._call(_calls.model_metadata(model, version, timeout_s))

    def model_config(
        self, model: str, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> ModelConfig:
        return self._call(_calls.model_config(model, version, timeout_s))

    def model_statistics(
        self, model: str | None = None, version: str | int | None = None, *, timeout_s: float | None = None
    ) -> tuple[ModelStatistics, ...]:
        """Cumulative statistics per model version (all models when ``model`` is None)."""
        return self._call(_calls.model_statistics(model, version, timeout_s))

    def repository_index(self, *, ready: bool = False, timeout_s: float | None = None) -> tuple[RepositoryModel, ...]:
        """Every model of the repository and its versions' states (only READY ones with ``ready``)."""
        return self._call(_calls.repository_index(ready, timeout_s))

    def load_model(self, model: str, *, timeout_s: float | None = None) -> None:
        """Load (or reload) a model from the server's repository; returns once it is served."""
        self._core.forget(model)
        self._call(_calls.load_model(model, timeout_s))

    def unload_model(self, model: str, *, timeout_s: float | None = None) -> None:
        self._core.forget(model)
        self._call(_calls.unload_model(model, timeout_s))

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
        explain: bool = False,
        routing_key: str | None = None,
    ) -> InferResult:
        """Run ``model`` on ``inputs`` (input name -> array; BYTES from bytes/str arrays).

        ``outputs`` limits the returned outputs (default all); ``priority`` 1 is the highest.
        ``version`` is a number or a label (``"stable"``, ``"canary"``); ``routing_key`` (an
        encounter id) decides which side of a canary a request naming no version meets, the same
        side every time (the request id decides without it).

            result = client.infer("sepsis", {"x": np.zeros((4, 12), np.float32)}, request_id="enc-1")
            result["risk"].shape, result.model_version, result.model_sha256, result.version_label
        """
        return self._call(
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

    def explain(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike] | None = None,
        *,
        records: Sequence[Mapping[str, Any]] | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Explanation:
        """Run ``model`` and say why it answered so: attributions per input feature (tables:
        Shapley values that add up to output - base value) or per element (images, signals,
        sequences: occlusion), named by the model card's features, with a ``top(k)`` view.
        Give ``inputs`` (as for :meth:`infer`) or ``records`` (as for :meth:`infer_records`).

            why = client.explain("sepsis", records=[{"heart_rate": 112, "lactate": 4.1, ...}])
            why.top(3), why.method, why.base_value
        """
        if (inputs is None) == (records is None):
            raise UsageError("explain: give inputs or records, not both")
        if records is not None:
            result = self._run(self._core.infer_records(
                model, records, version=version, outputs=None, timeout_s=timeout_s, request_id=request_id,
                priority=None, explain=True))
        else:
            assert inputs is not None
            result = self.infer(model, inputs, version=version, timeout_s=timeout_s, request_id=request_id,
                                explain=True)
        return self._run(self._core.explanation(model, result, timeout_s))

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
        routing_key: str | None = None,
    ) -> InferResult:
        """Run a tabular model on records (feature name -> number), one row per record.

        The column order comes from the model card's ``feature_names`` (via the model's metadata,
        cached per model and version); a missing or unknown feature is refused before anything
        is sent. If the server answers with a different model file than the cached metadata
        describes (a reload in between), the metadata is refreshed and, when the columns
        changed, the request is sent again in the new order.

            client.infer_records("breast-cancer", [{"mean radius": 14.2, "mean texture": 20.1, ...}])
        """
        return self._run(
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
        core = self._core
        timeout = core.timeout(timeout_s)
        stream = StreamState()
        index = core.balancer.pick()
        call = self._stubs[index].ModelStreamInfer(
            stream.encode_all(requests), timeout=timeout, metadata=self._settings.metadata
        )
        try:
            for response in call:
                yield from stream.on_response(response)
            yield from stream.on_end()
        except grpc.RpcError as exc:
            raise core.stream_failed(index, exc) from None
        finally:
            call.cancel()
