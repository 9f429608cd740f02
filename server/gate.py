"""The gate in front of every GRPCInferenceService method — the server's interceptor, built as
the method handlers themselves so it costs no extra task or coroutine per call.

For each call, before its body is parsed: who is calling (a bearer token from the metadata, or
the mutual-TLS client certificate's subject, resolved to a named `Identity`; a token is refused
over plaintext from a non-loopback peer), whether that identity is within its rate limit
(RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`), and whether the audit trail can take one
more record (UNAVAILABLE while it is behind). Then the body is parsed — on a worker thread when
it is large, so a big message never stalls the event loop — and the servicer runs with the
call's `Call` in `CURRENT`, where it reads the identity (per-model access) and notes what the
audit record needs (model, version, file, rows, request id). Inference, administration and
refused calls each leave one audit record; probes (ServerLive, ServerReady) are open and
unrecorded.
"""
from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from medserve.protos import grpc_service_pb2 as pb

from .audit import AuditEvent, AuditLog
from .errors import InvalidInput, MedserveError, ModelNotReady, QueueFull, Unauthenticated
from .identities import ANONYMOUS, Identity, IdentityFile, token_digest
from .ratelimit import RateLimiter

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes: no credentials, no record
AUDITED = frozenset({"ModelInfer", "RepositoryModelLoad", "RepositoryModelUnload"})  # + every refusal
PARSE_IN_THREAD_BYTES = 1 << 20  # a body this large is parsed (and decoded) off the event loop


@dataclass(slots=True, eq=False)
class Call:
    """One call as the gate admitted it; the servicer fills in what the audit record needs."""

    rpc: str
    identity: Identity
    peer: str
    started_s: float
    body_bytes: int = 0
    status: str = "OK"
    model: str = ""
    version: str = ""
    model_sha256: str = ""
    rows: int = 0
    request_id: str = ""
    audited: bool = False


# The call being served, per task (grpc.aio runs every call in a task of its own).
CURRENT: ContextVar[Call | None] = ContextVar("medserve_call", default=None)


def current_identity() -> Identity:
    call = CURRENT.get()
    return ANONYMOUS if call is None else call.identity


def is_loopback_peer(peer: str) -> bool:
    """Whether a grpc peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is local."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def certificate_subject(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """A verified client certificate's subject: its first subject alternative name, else its CN."""
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        values = list(auth_context.get(key) or ())
        if values:
            return values[0].decode("utf-8", "replace")
    return None


class Gate:
    """Authentication, rate limits, audit admission and off-loop parsing for every call."""

    def __init__(
        self,
        *,
        identities: Callable[[], IdentityFile | None],
        plaintext: bool,
        rate_limiter: RateLimiter,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._identities = identities  # called per call: SIGHUP swaps the file underneath
        self._plaintext = plaintext
        self._rates = rate_limiter
        self._audit = audit
        self._clock = clock
        self._wall = wall_clock
        self._held: asyncio.Event | None = None

    # -- the end of a drain ----------------------------------------------------------------

    def hold(self) -> None:
        """New calls wait instead of being answered (until `release`). Used for the last moment of
        a drain: every caller then waits on a call of its own, so none has one in transit when
        the transport shuts down (gRPC cancels calls it received but had not handed out, and the
        caller would see CANCELLED instead of UNAVAILABLE)."""
        self._held = asyncio.Event()

    def release(self) -> None:
        if self._held is not None:
            self._held.set()

    # -- admission -------------------------------------------------------------------------

    def authenticate(self, context: grpc.aio.ServicerContext) -> Identity:
        identities = self._identities()
        if identities is None:
            return ANONYMOUS
        header = next((v for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
        if header is not None:
            if self._plaintext and not is_loopback_peer(context.peer()):
                raise Unauthenticated(
                    "bearer tokens are not accepted over plaintext from another host; connect with TLS"
                )
            value = header.decode() if isinstance(header, bytes) else header
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            identity = identities.by_token.get(token_digest(token.strip()))
            if identity is None:
                raise Unauthenticated("unknown bearer token")
            return identity
        subject = certificate_subject(context.auth_context()) if not self._plaintext else None
        if subject is not None:
            identity = identities.by_certificate.get(subject)
            if identity is None:
                raise Unauthenticated(f"client certificate {subject!r} is not a known identity")
            return identity
        raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>' or a client certificate")

    def _admit(self, rpc: str, context: grpc.aio.ServicerContext, body_bytes: int) -> Call:
        call = Call(rpc, ANONYMOUS, context.peer(), self._clock(), body_bytes, audited=rpc in AUDITED)
        if rpc in OPEN_METHODS:
            return call
        call.identity = self.authenticate(context)
        wait_s = self._rates.wait_s(call.identity)
        if wait_s > 0:
            raise RateLimited(f"identity {call.identity.name!r} is over its rate limit "
                              f"({call.identity.rate_per_s:g}/s); retry later", wait_s)
        if self._audit is not None and not self._audit.admit():
            raise ModelNotReady("the audit trail is behind; retry shortly")
        return call

    def finish(self, call: Call) -> None:
        """Write the call's audit record (inference, administration, or any refusal)."""
        if self._audit is None or not (call.audited or call.status != "OK"):
            return
        self._audit.record(AuditEvent(
            time_unix=self._wall(), identity=call.identity.name, peer=call.peer, rpc=call.rpc, status=call.status,
            latency_ms=(self._clock() - call.started_s) * 1e3, model=call.model, version=call.version,
            model_sha256=call.model_sha256, rows=call.rows, request_id=call.request_id,
        ))

    def _refuse(self, context: grpc.aio.ServicerContext, call: Call, exc: MedserveError) -> None:
        from .service import status_for  # the one error table

        code, message = status_for(exc)
        call.status = code.name
        self.finish(call)
        answer_with_status(context, code, message, retry_hint(exc))

    # -- handlers --------------------------------------------------------------------------

    def handler(self, servicer: Any) -> grpc.GenericRpcHandler:
        """The servicer's methods behind the gate, as one generic handler for the server."""
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in SERVICE.methods:
            parse = message_factory.GetMessageClass(method.input_type).FromString
            serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
            behavior = getattr(servicer, method.name)
            if method.client_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self._stream(method.name, behavior, parse), response_serializer=serialize)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(method.name, behavior, parse), response_serializer=serialize)
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def _unary(self, rpc: str, behavior: Callable[[Any, Any], Awaitable[Any]], parse: Callable[[bytes], Any]):  # type: ignore[no-untyped-def]
        async def handle(body: bytes, context: grpc.aio.ServicerContext) -> Any:
            if self._held is not None:
                await self._held.wait()
            try:
                call = self._admit(rpc, context, len(body))
            except MedserveError as exc:
                self._refuse(context, Call(rpc, ANONYMOUS, context.peer(), self._clock()), exc)
                return None
            try:
                request = await _parse(parse, body, rpc)
            except InvalidInput as exc:
                self._refuse(context, call, exc)
                return None
            token = CURRENT.set(call)
            try:
                return await behavior(request, context)
            finally:
                CURRENT.reset(token)
                self.finish(call)

        return handle

    def _stream(self, rpc: str, behavior: Callable[[Any, Any], AsyncIterator[Any]], parse: Callable[[bytes], Any]):  # type: ignore[no-untyped-def]
        async def handle(bodies: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                call = self._admit(rpc, context, 0)
            except MedserveError as exc:
                self._refuse(context, Call(rpc, ANONYMOUS, context.peer(), self._clock()), exc)
                return

            async def requests() -> AsyncIterator[Any]:
                async for body in bodies:
                    yield await _parse(parse, body, rpc)

            token = CURRENT.set(call)
            try:
                async for response in behavior(requests(), context):
                    yield response
            finally:
                CURRENT.reset(token)

        return handle


class RateLimited(QueueFull):
    """An identity is over its rate limit (RESOURCE_EXHAUSTED, with a retry hint)."""


def answer_with_status(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                       trailing: tuple[tuple[str, str], ...] = ()) -> None:
    """End a call with a status by setting it, not by aborting: gRPC turns an abort during the
    server's graceful shutdown into CANCELLED (grpc/grpc#37239), a status set and returned with
    travels as it is. The handler then returns None: with a non-OK status no message is sent."""
    context.set_code(code)
    context.set_details(message)
    if trailing:
        context.set_trailing_metadata(trailing)


def retry_hint(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """`grpc-retry-pushback-ms` for a refusal that knows when to retry (gRPC clients honour it)."""
    after = getattr(exc, "retry_after_s", None)
    return (("grpc-retry-pushback-ms", str(max(1, round(after * 1e3)))),) if after else ()


async def _parse(parse: Callable[[bytes], Any], body: bytes, rpc: str) -> Any:
    try:
        if len(body) >= PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(parse, body)
        return parse(body)
    except DecodeError:
        raise InvalidInput(f"{rpc}: the request is not a valid protobuf message") from None
