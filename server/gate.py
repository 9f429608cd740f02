"""The gate in front of every GRPCInferenceService method — the server's interceptor, built as
the method handlers themselves so it costs no extra task or coroutine per call.

For each call, before its body is parsed: who is calling (a bearer token from the metadata, or
the mutual-TLS client certificate's names, resolved to a named `Identity`; a token is refused
over plaintext from a non-loopback peer), whether the message is within `--max-message-mb`
(gRPC itself takes a little more, `receive_limit`, so that an oversized message is refused here,
RESOURCE_EXHAUSTED naming the limit, and audited), whether that identity is within its rate limit
(RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`; on a stream each message takes a token and is
refused in band), and whether the audit trail can take one more record (UNAVAILABLE while it is
behind). Then the body is parsed — on a worker thread when it is large, so a big message never
stalls the event loop — and the servicer runs with the call's `Call` in `CURRENT`, where it reads
the identity (per-model access) and notes what the audit record needs (model, version, file,
rows, request id).

Every inference (each stream message too), administration and refused call leaves an audit
record with the identity, request id and status the caller really got; methods medserve does not
serve are refused UNIMPLEMENTED here too (`unknown_methods`). Refusals of callers without valid
credentials, and refusals because the audit trail is behind, are counted per peer per second
(`refusals.RefusalTally`) so that a flood of them cannot fill the trail. Probes (ServerLive,
ServerReady) are open and unrecorded.

The admission itself is transport-neutral (`identify`, `admit`, `refuse`, `finish`): the KServe
V2 REST front end (`rest.py`) passes the same checks with an `Authorization` header, its peer's
address and its TLS certificate's names, and its records name the transport (`Call.transport`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from medserve.protos import grpc_service_pb2 as pb

from .audit import AuditEvent, AuditLog
from .config import DEFAULT_MAX_MESSAGE_BYTES
from .errors import (
    InvalidInput,
    MedserveError,
    ModelNotReady,
    QueueFull,
    TooLarge,
    Unauthenticated,
    Unsupported,
)
from .identities import ANONYMOUS, Identity, IdentityFile, bearer_identity
from .ratelimit import RateLimiter
from .refusals import RefusalTally
from .status import status_code_name, status_for  # the one error table

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes: no credentials, no record
AUDITED = frozenset({"ModelInfer", "RepositoryModelLoad", "RepositoryModelUnload"})  # + every refusal
STREAMED = "ModelStreamInfer"  # its messages are rate-limited, parsed and audited one by one
PARSE_IN_THREAD_BYTES = 1 << 20  # a body this large is parsed (and decoded) off the event loop
MAX_REQUEST_ID_CHARS = 128  # a longer request id is refused (it is echoed and audited)
MAX_RPC_NAME_CHARS = 128  # an unknown method's path, as far as the audit record keeps it
TALLY_FLUSH_S = 1.0  # counted refusals reach the audit trail about this long after their second


@dataclass(slots=True, eq=False)
class Call:
    """One call (or one stream message) as the gate admitted it; the servicer fills in what the
    audit record needs. `tally`: the call was refused in a way that is counted per peer and
    second rather than recorded alone (see `refusals`)."""

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
    tally: bool = False
    transport: str = "grpc"  # "http" for the REST front end (named in the audit record)


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One message of a ModelStreamInfer stream as the gate hands it to the servicer: the
    request, or the refusal the gate decided (rate limit, oversized, malformed, audit behind),
    which the servicer answers in band. `call` is the message's own audit record."""

    call: Call
    request: Any = None
    refusal: MedserveError | None = None


# The call being served, per task (grpc.aio runs every call in a task of its own).
CURRENT: ContextVar[Call | None] = ContextVar("medserve_call", default=None)


def current_identity() -> Identity:
    call = CURRENT.get()
    return ANONYMOUS if call is None else call.identity


def audit_text(text: str) -> str:
    """A caller's text (request id, model name, version) as an audit record keeps it: whole up to
    `MAX_REQUEST_ID_CHARS`, else its first that many characters and "..." (a refused 1 MiB id
    or model name must not make a 1 MiB record)."""
    return text if len(text) <= MAX_REQUEST_ID_CHARS else text[:MAX_REQUEST_ID_CHARS] + "..."



def check_request_id(request_id: str) -> None:
    """Refuse an over-long request id (INVALID_ARGUMENT naming the limit, never the id)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"the request id is longer than {MAX_REQUEST_ID_CHARS} characters (the limit); "
                           "send a shorter, opaque id")


def receive_limit(max_message_bytes: int) -> int:
    """What gRPC itself accepts (`grpc.max_receive_message_length`): somewhat more than the
    limit, so that a message a little over it reaches the gate, which refuses it with a status
    naming the limit and audits it. Messages past this are refused by gRPC before any handler
    runs (RESOURCE_EXHAUSTED, not audited: the server never sees them)."""
    return min((1 << 31) - 1, max_message_bytes + max(1 << 20, max_message_bytes // 8))


def is_loopback_peer(peer: str) -> bool:
    """Whether a grpc peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is local."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    return is_loopback_address(rest.rsplit(":", 1)[0].strip("[]"))


def is_loopback_address(host: str | None) -> bool:
    """Whether an IP address ("127.0.0.1", "::1", "fe80::1%eth0") is this host's loopback."""
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """A verified client certificate's names in the order an identity is looked up by them:
    every subject alternative name (DNS, URI, e-mail, IP) in the certificate's order, then the
    common name."""
    names: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        names += [value.decode("utf-8", "replace") for value in auth_context.get(key) or ()]
    return names


def certificate_subject(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The name a certificate is first known by (its first SAN, else its CN), for messages."""
    return next(iter(certificate_names(auth_context)), None)


def _head_class() -> Any:
    """A message of fields 1-3 only, as bytes: ModelInferRequest's model_name, model_version and
    id (and the name and version of the model RPCs), read from a body that is refused before it
    is parsed whole (the record still names the model and id the caller sent)."""
    file = descriptor_pb2.FileDescriptorProto(name="medserve_gate_head.proto", package="medserve.gate",
                                              syntax="proto3")
    message = file.message_type.add(name="Head")
    for number, name in ((1, "first"), (2, "second"), (3, "third")):
        message.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("medserve.gate.Head"))


_HEAD = _head_class()
# Which head fields name the model, the version and the request id, per RPC (0 = none).
_HEAD_FIELDS = {"ModelInfer": (1, 2, 3), STREAMED: (1, 2, 3), "ModelReady": (1, 2, 0), "ModelMetadata": (1, 2, 0),
                "ModelConfig": (1, 2, 0), "ModelStatistics": (1, 2, 0), "RepositoryModelLoad": (2, 0, 0),
                "RepositoryModelUnload": (2, 0, 0)}


def _head_text(head: Any, number: int) -> str:
    return "" if not number else getattr(head, ("first", "second", "third")[number - 1]).decode("utf-8", "replace")


class AuditBehind(ModelNotReady):
    """The audit trail cannot take another record yet (UNAVAILABLE; counted, not recorded alone)."""


class RateLimited(QueueFull):
    """An identity is over its rate limit (RESOURCE_EXHAUSTED, with a retry hint)."""


class Gate:
    """Authentication, size and rate limits, audit admission and off-loop parsing for every call."""

    def __init__(
        self,
        *,
        identities: Callable[[], IdentityFile | None],
        plaintext: bool,
        rate_limiter: RateLimiter,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._identities = identities  # called per call: SIGHUP swaps the file underneath
        self._plaintext = plaintext
        self._rates = rate_limiter
        self._audit = audit
        self._clock = clock
        self._wall = wall_clock
        self._max_message_bytes = max_message_bytes
        self._held: asyncio.Event | None = None
        self._tally = RefusalTally(audit.record if audit is not None else (lambda event: None),
                                   clock=clock, wall_clock=wall_clock)
        self._tally_timer: asyncio.TimerHandle | None = None

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

    def close(self) -> None:
        """Write the refusals still being counted (before the audit trail closes)."""
        if self._tally_timer is not None:
            self._tally_timer.cancel()
            self._tally_timer = None
        self._tally.flush()

    # -- admission -------------------------------------------------------------------------

    def authenticate(self, context: grpc.aio.ServicerContext) -> Identity:
        if self._identities() is None:  # authentication off: the metadata is not read at all
            return ANONYMOUS
        header = next((v for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
        return self.identify(
            header.decode() if isinstance(header, bytes) else header, lambda: is_loopback_peer(context.peer()),
            lambda: certificate_names(context.auth_context()))

    def identify(self, authorization: str | None, loopback: Callable[[], bool],
                 cert_names: Callable[[], list[str]]) -> Identity:
        """Who is calling, whatever the transport: the bearer token's identity (refused over
        plaintext from another host), else the verified client certificate's, else refused.
        `loopback` and `cert_names` are asked only when needed."""
        identities = self._identities()
        if identities is None:
            return ANONYMOUS
        if authorization is not None:
            if self._plaintext and not loopback():
                raise Unauthenticated(
                    "bearer tokens are not accepted over plaintext from another host; connect with TLS"
                )
            return bearer_identity(identities, authorization)
        names = cert_names() if not self._plaintext else []
        if names:
            identity = next((identities.by_certificate[n] for n in names if n in identities.by_certificate), None)
            if identity is None:
                raise Unauthenticated(f"client certificate {names[0]!r} is not a known identity")
            return identity
        raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>' or a client certificate")

    # -- the transport-neutral admission (the REST front end calls these) --------------------

    async def wait_if_held(self) -> None:
        """The last moment of a drain: new calls wait (see `hold`)."""
        if self._held is not None:
            await self._held.wait()

    def admit(self, call: Call, authorization: str | None, loopback: Callable[[], bool],
              cert_names: Callable[[], list[str]]) -> None:
        """A whole call of another transport: identity, size, rate and audit admission, before its
        body is read. Raises the refusal; `call` says who it was."""
        call.identity = self.identify(authorization, loopback, cert_names)
        self._admit_message(call)

    def refuse(self, call: Call, exc: MedserveError) -> None:
        """Record a refusal decided before the body was parsed (the status, whether it is counted
        per peer and second) and write the call's audit record."""
        call.status = status_code_name(type(exc))
        call.tally = isinstance(exc, Unauthenticated | AuditBehind)
        self.finish(call)

    def _admit(self, call: Call, context: grpc.aio.ServicerContext) -> None:
        """Authenticate the call and, but for a stream (whose messages are admitted one by one),
        check its size, rate and the audit trail. Raises the refusal; `call` says who it was."""
        if call.rpc in OPEN_METHODS:
            return
        call.identity = self.authenticate(context)
        if call.rpc != STREAMED:
            self._admit_message(call)

    def _admit_message(self, call: Call) -> None:
        if call.body_bytes > self._max_message_bytes:
            raise TooLarge(f"{call.rpc}: the request is over the message size limit of "
                           f"{_mib(self._max_message_bytes)} (--max-message-mb); send smaller requests")
        wait_s = self._rates.wait_s(call.identity)
        if wait_s > 0:
            raise RateLimited(f"identity {call.identity.name!r} is over its rate limit "
                              f"({call.identity.rate_per_s:g}/s); retry later", wait_s)
        if self._audit is not None and not self._audit.admit():
            raise AuditBehind("the audit trail is behind; retry shortly")

    def _refused(self, call: Call, exc: MedserveError, body: bytes) -> None:
        """Note a refusal decided before the body was parsed: its status, whether it is counted,
        and (for an identified caller) the model, version and id the body names."""
        call.status = status_code_name(type(exc))
        call.tally = isinstance(exc, Unauthenticated | AuditBehind)
        if call.tally or isinstance(exc, InvalidInput) or not body:
            return  # a stranger's body is not read; a malformed one cannot be
        fields = _HEAD_FIELDS.get(call.rpc)
        if fields is None:
            return
        try:
            head = _HEAD.FromString(body)
        except DecodeError:
            return
        call.model, call.version, call.request_id = (_head_text(head, n) for n in fields)

    def finish(self, call: Call) -> None:
        """Write the call's audit record (inference, administration, or any refusal)."""
        if self._audit is None or not (call.audited or call.status != "OK"):
            return
        latency_ms = (self._clock() - call.started_s) * 1e3
        if call.tally:
            self._tally.add(call.identity.name, call.peer, call.rpc, call.status, latency_ms, call.transport)
            if self._tally_timer is None and self._tally.pending:
                self._tally_timer = asyncio.get_running_loop().call_later(TALLY_FLUSH_S, self._flush_tally)
            return
        self._audit.record(AuditEvent(
            time_unix=self._wall(), identity=call.identity.name, peer=call.peer, rpc=call.rpc, status=call.status,
            latency_ms=latency_ms, model=audit_text(call.model), version=audit_text(call.version),
            model_sha256=call.model_sha256, rows=call.rows, request_id=audit_text(call.request_id),
            transport=call.transport,
        ))

    def _flush_tally(self) -> None:
        self._tally_timer = None
        if self._tally.flush_ended():  # its second is not over yet (a slow clock): look again
            self._tally_timer = asyncio.get_running_loop().call_later(TALLY_FLUSH_S, self._flush_tally)

    async def _refuse(self, context: grpc.aio.ServicerContext, call: Call, exc: MedserveError,
                      body: bytes = b"") -> None:
        counted = isinstance(exc, Unauthenticated | AuditBehind)
        code, message = status_for(exc, logging.DEBUG if counted else logging.INFO)
        if len(body) >= PARSE_IN_THREAD_BYTES and not (counted or isinstance(exc, InvalidInput)):
            await asyncio.to_thread(self._refused, call, exc, body)
        else:
            self._refused(call, exc, body)
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

    def unknown_methods(self) -> grpc.GenericRpcHandler:
        """Every method no other handler serves (register it last): refused UNIMPLEMENTED behind
        the same gate (credentials first), and audited, instead of by gRPC unseen."""
        return _UnknownMethods(self)

    def _unary(self, rpc: str, behavior: Callable[[Any, Any], Awaitable[Any]], parse: Callable[[bytes], Any]):  # type: ignore[no-untyped-def]
        async def handle(body: bytes, context: grpc.aio.ServicerContext) -> Any:
            if self._held is not None:
                await self._held.wait()
            call = Call(rpc, ANONYMOUS, context.peer(), self._clock(), len(body), audited=rpc in AUDITED)
            try:
                self._admit(call, context)
                request = parse_inline(parse, body, rpc) if len(body) < PARSE_IN_THREAD_BYTES else \
                    await _parse(parse, body, rpc)
            except MedserveError as exc:
                await self._refuse(context, call, exc, body)
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
            call = Call(rpc, ANONYMOUS, context.peer(), self._clock())
            try:
                self._admit(call, context)
            except MedserveError as exc:
                await self._refuse(context, call, exc)
                return

            async def items() -> AsyncIterator[StreamItem]:
                # A stream outlives SIGHUP: each message re-checks that the identity it opened with
                # is still in the identities file in force (looked up only when the file changed).
                checked, revoked = self._identities(), False
                async for body in bodies:
                    item = Call(rpc, call.identity, call.peer, self._clock(), len(body), audited=True)
                    try:
                        if (known := self._identities()) is not checked:
                            checked, revoked = known, known is not None and call.identity not in known.identities
                        if revoked:
                            raise Unauthenticated("the credentials of this stream were revoked or changed; "
                                                  "open a new stream")
                        self._admit_message(item)
                        request = await _parse(parse, body, rpc)
                    except MedserveError as exc:
                        if len(body) >= PARSE_IN_THREAD_BYTES:
                            await asyncio.to_thread(self._refused, item, exc, body)
                        else:
                            self._refused(item, exc, body)
                        yield StreamItem(item, refusal=exc)
                        continue
                    yield StreamItem(item, request)

            token = CURRENT.set(call)
            try:
                async for response in behavior(items(), context):
                    yield response
            finally:
                CURRENT.reset(token)
                self.finish(call)

        return handle

    async def _unknown(self, method: str, context: grpc.aio.ServicerContext) -> None:
        call = Call(method[:MAX_RPC_NAME_CHARS], ANONYMOUS, context.peer(), self._clock())
        try:
            self._admit(call, context)
            raise Unsupported("method not found: medserve serves inference.GRPCInferenceService, "
                              "grpc.health.v1.Health and server reflection")
        except MedserveError as exc:
            await self._refuse(context, call, exc)


class _UnknownMethods(grpc.GenericRpcHandler):
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)  # type: ignore[attr-defined]
        gate = self._gate

        async def handle(bodies: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            await gate._unknown(method, context)  # noqa: SLF001 - the gate's own handler
            return
            yield b""  # an async generator: a stream handler answers any kind of call

        return grpc.stream_stream_rpc_method_handler(handle)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


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
    """`grpc-retry-pushback-ms` for a refusal that knows when to retry (gRPC clients honour it);
    a negative `retry_after_s` is sent as -1: do not retry."""
    after = getattr(exc, "retry_after_s", None)
    if not after:
        return ()
    return (("grpc-retry-pushback-ms", "-1" if after < 0 else str(max(1, round(after * 1e3)))),)


def parse_inline(parse: Callable[[bytes], Any], body: bytes, rpc: str) -> Any:
    """A small body, parsed here (a plain call: the common request costs no coroutine of its own)."""
    try:
        return parse(body)
    except DecodeError:
        raise InvalidInput(f"{rpc}: the request is not a valid protobuf message") from None


async def _parse(parse: Callable[[bytes], Any], body: bytes, rpc: str) -> Any:
    if len(body) < PARSE_IN_THREAD_BYTES:
        return parse_inline(parse, body, rpc)
    try:
        return await asyncio.to_thread(parse, body)
    except DecodeError:
        raise InvalidInput(f"{rpc}: the request is not a valid protobuf message") from None
