"""grpc.health.v1 with per-model names that answer only to callers allowed the model.

The server-level names ("" and the inference service's) are open: a Kubernetes gRPC probe or a
load balancer has no credentials. A model's name (the service name of its per-model health) is
answered only to a caller whose identity may use the model; to anyone else it is answered exactly
as a name that does not exist (Check: NOT_FOUND; Watch: SERVICE_UNKNOWN, never updated), so the
health service is no oracle for which models a server holds.
"""
from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from .errors import MedserveError
from .identities import Identity

# A service name no model can have (model names are letters, digits and _.-): what a caller not
# allowed a model watches instead, so its stream behaves as one for a missing name.
_NOBODY = "\x00not-a-model"


class GatedHealthServicer(health_aio.HealthServicer):
    """The reference aio health servicer behind an identity check for per-model names."""

    def __init__(self, open_names: frozenset[str],
                 authenticate: Callable[[grpc.aio.ServicerContext], Identity]) -> None:
        super().__init__()
        self._open = open_names
        self._authenticate = authenticate  # raises a MedserveError for missing or unknown credentials

    def _allowed(self, service: str, context: grpc.aio.ServicerContext) -> bool:
        if service in self._open:
            return True
        try:
            return self._authenticate(context).may_use(service)
        except MedserveError:
            return False

    async def Check(self, request: health_pb2.HealthCheckRequest,  # type: ignore[override]
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse | None:
        if not self._allowed(request.service, context):
            await context.abort(grpc.StatusCode.NOT_FOUND)  # as the base class answers a missing name
        return await super().Check(request, context)  # type: ignore[no-any-return]

    async def Watch(self, request: health_pb2.HealthCheckRequest,  # type: ignore[override]
                    context: grpc.aio.ServicerContext) -> None:
        service = request.service
        if not self._allowed(service, context):
            await super().Watch(health_pb2.HealthCheckRequest(service=_NOBODY), context)
            return
        await super().Watch(request, _Rechecked(context, lambda: self._allowed(service, context)))  # type: ignore[arg-type]


class _Rechecked:
    """A Watch stream's context that checks the caller again before each update (a watch lives
    on; the identities file may change under it): once the caller may no longer use the model,
    the stream says SERVICE_UNKNOWN, as for a missing name, and nothing more."""

    def __init__(self, context: grpc.aio.ServicerContext, allowed: Callable[[], bool]) -> None:
        self._context = context
        self._allowed = allowed
        self._revoked = False

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        if self._revoked:
            return
        if not self._allowed():
            self._revoked = True
            response = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        await self._context.write(response)
