"""Unary gRPC calls over a hand-framed HTTP/2 connection: the load processes' default transport.

Why not grpcio or h2: on a small host the generator shares the cores with the server it
measures, so every microsecond it spends per request is taken from the server. Measured
(`python -m medserve.perf.bench_transports`, 2026-12-02, this 2-core machine, where one
`loop.run_in_executor` round trip takes 110 µs): this client costs 51 µs of CPU per call, the
`h2` library in the same structure (a client since retired) 147 µs, grpc.aio 151 µs, h2load
28 µs; against a server that can use both cores (two processes) the load processes over rawh2
keep within 10 % of h2load's throughput, over h2 or grpc.aio they reach 0.5-0.7 of it. This
client does only what a unary call with a pre-encoded message needs:

* Request header blocks are encoded once per (path, deadline) with `hpack`, every field as a
  static-table index or a never-indexed literal, so the same bytes are valid on any connection
  at any time (no dynamic-table state on the sending side).
* Response header blocks are decoded with `hpack` (it keeps the peer's dynamic table); a block
  whose decoding left the table unchanged is remembered, so the server's steady-state
  `:status 200` headers and `grpc-status: 0` trailers cost a dictionary lookup.
* Frames written during one event-loop iteration go out in one `write`.
* Receive windows are opened to the maximum once; send windows, SETTINGS, PING, GOAWAY and
  RST_STREAM are honoured. Deadlines travel as `grpc-timeout` and are enforced locally too.

Every call ends with a gRPC status: the trailers' `grpc-status`, the HTTP status mapped as the
gRPC spec says, RST_STREAM's code, or UNAVAILABLE when the connection is lost or going away.
"""
from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import unquote

import hpack

from .scenario import grpc_message

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
SETTING_ENABLE_PUSH, SETTING_MAX_CONCURRENT_STREAMS, SETTING_INITIAL_WINDOW_SIZE, SETTING_MAX_FRAME_SIZE = 2, 3, 4, 5
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
DEADLINE_SLACK_S = 0.002  # a server-side cancel this close to the deadline is the deadline

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 0, 1, 2, 4
RESOURCE_EXHAUSTED, PERMISSION_DENIED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 8, 7, 12, 13, 14, 16
# gRPC's HTTP-to-gRPC status mapping (doc/http-grpc-status-mapping.md) and RST_STREAM codes.
HTTP_STATUS = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
               429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}
RST_STATUS = {0x7: UNAVAILABLE, 0x8: CANCELLED, 0xB: RESOURCE_EXHAUSTED, 0xC: PERMISSION_DENIED}


class RpcError(Exception):
    """A call that ended with a non-OK gRPC status (`code` is the numeric status)."""

    def __init__(self, code: int, message: str = "", pushback_ms: int | None = None) -> None:
        super().__init__(f"gRPC status {code}: {message}" if message else f"gRPC status {code}")
        self.code = code
        self.message = message
        self.pushback_ms = pushback_ms  # the trailers' grpc-retry-pushback-ms: when to try again


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def timeout_header(seconds: float) -> bytes:
    """`grpc-timeout`: at most 8 digits, the finest unit that fits."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        value = max(1, round(seconds * scale))
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def request_block(authority: str, path: str, timeout_s: float | None = None) -> bytes:
    """The HPACK block of a gRPC request's headers, valid on any connection (never-indexed)."""
    never = hpack.NeverIndexedHeaderTuple
    headers: list[tuple[bytes, bytes]] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        never(b":path", path.encode()),
        never(b":authority", authority.encode()),
        never(b"content-type", b"application/grpc"),
        never(b"te", b"trailers"),
        never(b"user-agent", b"medserve-perf"),
    ]
    if timeout_s is not None:
        headers.append(never(b"grpc-timeout", timeout_header(timeout_s)))
    return hpack.Encoder().encode(headers)


@dataclass(slots=True)
class Call:
    """One unary call: its future, the response message's pieces, what the headers said."""

    future: asyncio.Future[bytes]
    chunks: list[bytes] = field(default_factory=list)
    http_status: int = 200
    grpc_status: int | None = None
    message: str = ""
    pushback_ms: int | None = None
    timer: asyncio.TimerHandle | None = None
    send_window: int = DEFAULT_WINDOW


class CallProtocol(asyncio.Protocol):
    """What a connection carrying unary gRPC calls does whatever frames the HTTP/2: open and
    lose the connection, batch writes per event-loop iteration, end each call with its gRPC
    status (trailers, HTTP status, RST_STREAM code, deadline) and fail the rest when the
    connection goes. Subclasses keep every call they must end in `_streams` (by stream id) and
    provide `_flush`, `_send_data` and `_start_waiting`. Use `await Subclass.open(host, port)`."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._streams: dict[int, Call] = {}
        self._heads: dict[tuple[str, float | None], Any] = {}
        self._blocked: collections.deque[tuple[int, memoryview]] = collections.deque()  # (stream, data left)
        self._error: str | None = None  # set once the connection can take no new calls
        self.closed: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float = 10.0) -> Self:
        conn = cls(f"{host}:{port}")
        await asyncio.wait_for(conn._loop.create_connection(lambda: conn, host, port), timeout_s)
        return conn

    @property
    def usable(self) -> bool:
        return self._error is None

    def call(self, path: str, body: bytes, timeout_s: float | None = None) -> asyncio.Future[bytes]:
        """Start a unary call of `body` (a serialized message); the future gives the response
        message or raises RpcError."""
        if self._error is not None:
            return unavailable(self._error)
        key = (path, timeout_s)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = self._request_head(self.authority, path, timeout_s)
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._begin(future, head, body, timeout_s)
        return future

    def _request_head(self, authority: str, path: str, timeout_s: float | None) -> Any:
        """The request's headers as the subclass sends them (built once per path and deadline)."""
        raise NotImplementedError

    def _begin(self, future: asyncio.Future[bytes], head: Any, body: bytes, timeout_s: float | None) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _send_data(self, stream: int, data: memoryview) -> None:
        raise NotImplementedError

    def _start_waiting(self) -> None:
        raise NotImplementedError

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _unblock(self) -> None:
        blocked, self._blocked = self._blocked, collections.deque()
        for stream, data in blocked:
            self._send_data(stream, data)

    def _finish(self, stream: int, code: int, message: str = "") -> None:
        entry = self._streams.pop(stream, None)
        if entry is None:
            return
        if entry.timer is not None:
            entry.timer.cancel()
            if self._loop.time() >= entry.timer.when():  # the answer came after the deadline
                code, message = DEADLINE_EXCEEDED, "deadline exceeded (client side)"
        if not entry.future.done():
            if code == OK:
                body = b"".join(entry.chunks)
                entry.future.set_result(body[5:])
            else:
                entry.future.set_exception(RpcError(code, message, entry.pushback_ms))
        self._start_waiting()

    def _read_headers(self, entry: Call, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b":status":
                entry.http_status = int(value)
            elif name == b"grpc-status":
                entry.grpc_status = int(value)
            elif name == b"grpc-message":
                entry.message = unquote(value.decode("utf-8", "replace"))
            elif name == b"grpc-retry-pushback-ms" and value.isdigit():
                entry.pushback_ms = int(value)

    def _end(self, stream: int) -> None:
        """The server ended the stream: the trailers' status, else the HTTP status mapped."""
        entry = self._streams.get(stream)
        if entry is None:
            return
        status, message = entry.grpc_status, entry.message
        if status is None:
            http = entry.http_status
            status = HTTP_STATUS.get(http, UNKNOWN) if http != 200 else UNKNOWN
            message = message or f"HTTP status {http} without grpc-status"
        self._finish(stream, status, message)

    def _on_reset(self, stream: int, error: int) -> None:
        code = RST_STATUS.get(error, INTERNAL)
        entry = self._streams.get(stream)
        timer = entry.timer if entry is not None else None
        if code == CANCELLED and timer is not None and self._loop.time() >= timer.when() - DEADLINE_SLACK_S:
            code = DEADLINE_EXCEEDED  # the server cancels a call whose deadline passed (its clock, rounded)
        self._finish(stream, code, f"stream reset by the server (HTTP/2 error {error})")

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut(f"connection lost: {exc}" if exc else "connection closed")
        if not self.closed.done():
            self.closed.set_result(None)

    def _shut(self, reason: str, above: int = 0) -> None:
        """No new calls from now on; fail the calls on streams above `above` as UNAVAILABLE."""
        if self._error is None:
            self._error = reason
        for stream in [s for s in self._streams if s > above]:
            self._finish(stream, UNAVAILABLE, reason)


class Connection(CallProtocol):
    """One hand-framed HTTP/2 connection carrying unary gRPC calls."""

    def __init__(self, authority: str) -> None:
        super().__init__(authority)
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._next_stream = 1
        self._decoder = hpack.Decoder()
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._partial: tuple[int, int, bytearray] | None = None  # HEADERS awaiting CONTINUATION
        self._send_window = DEFAULT_WINDOW
        self._initial_window = DEFAULT_WINDOW
        self._max_frame = DEFAULT_MAX_FRAME
        self._max_streams = MAX_WINDOW
        self._waiting: collections.deque[tuple[int, bytes, bytes]] = collections.deque()  # over stream limit
        self._received = 0

    # -- calls -----------------------------------------------------------------------------

    def _request_head(self, authority: str, path: str, timeout_s: float | None) -> bytes:
        return request_block(authority, path, timeout_s)

    def _begin(self, future: asyncio.Future[bytes], head: bytes, body: bytes, timeout_s: float | None) -> None:
        stream = self._next_stream
        self._next_stream += 2
        entry = self._streams[stream] = Call(future, send_window=self._initial_window)
        if timeout_s is not None:
            entry.timer = self._loop.call_later(timeout_s, self._expire, stream)
        if len(self._streams) > self._max_streams:
            self._waiting.append((stream, head, body))
        else:
            self._start(stream, head, body)

    def _start(self, stream: int, block: bytes, body: bytes) -> None:
        # The block is a few dozen bytes; every peer takes frames of at least 16 kB (RFC 9113).
        self._send(frame(HEADERS, FLAG_END_HEADERS, stream, block))
        self._send_data(stream, memoryview(grpc_message(body)))

    def _send_data(self, stream: int, data: memoryview) -> None:
        entry = self._streams.get(stream)
        if entry is None:
            return  # reset or expired while waiting for a window
        while True:
            size = min(len(data), self._max_frame, self._send_window, entry.send_window)
            last = size == len(data)
            if size <= 0 and not last:
                self._blocked.append((stream, data))
                return
            self._send(frame(DATA, FLAG_END_STREAM if last else 0, stream, bytes(data[:size])))
            self._send_window -= size
            entry.send_window -= size
            if last:
                return
            data = data[size:]

    def _send(self, chunk: bytes) -> None:
        self._outbox.append(chunk)
        self._schedule_flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._outbox and not self._transport.is_closing():
            self._transport.write(b"".join(self._outbox))
        self._outbox.clear()

    def _expire(self, stream: int) -> None:
        entry = self._streams.pop(stream, None)
        if entry is not None:
            entry.timer = None
            fail(entry.future, DEADLINE_EXCEEDED, "deadline exceeded (client side)")
            self._send(frame(RST_STREAM, 0, stream, struct.pack(">I", 0x8)))
            self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._streams) - len(self._waiting) < self._max_streams:
            stream, block, body = self._waiting.popleft()
            if stream in self._streams:
                self._start(stream, block, body)

    async def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
            self._transport.close()
        await asyncio.shield(self.closed)

    # -- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = struct.pack(">HIHI", SETTING_ENABLE_PUSH, 0, SETTING_INITIAL_WINDOW_SIZE, MAX_WINDOW)
        transport.write(
            PREFACE + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
        )

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        pos, end = 0, len(inbox)
        try:
            while end - pos >= 9:
                length = (inbox[pos] << 16) | (inbox[pos + 1] << 8) | inbox[pos + 2]
                stop = pos + 9 + length
                if stop > end:
                    break
                kind, flags = inbox[pos + 3], inbox[pos + 4]
                stream = int.from_bytes(inbox[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(inbox[pos + 9:stop])
                pos = stop
                self._on_frame(kind, flags, stream, payload)
        except (hpack.HPACKError, ValueError, IndexError, struct.error) as exc:
            self._protocol_error(f"undecodable frame from the server: {type(exc).__name__}: {exc}")
            return
        del inbox[:pos]
        if self._received > MAX_WINDOW // 2:
            self._send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
            self._received = 0

    def _protocol_error(self, reason: str) -> None:
        self._shut(reason)
        if self._transport is not None:
            self._transport.close()

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self._partial is not None and kind != CONTINUATION:
            raise ValueError("expected CONTINUATION")
        if kind == DATA:
            self._received += len(payload)
            if flags & FLAG_PADDED:
                payload = payload[1:len(payload) - payload[0]]
            entry = self._streams.get(stream)
            if entry is not None:
                entry.chunks.append(payload)
                if flags & FLAG_END_STREAM:  # no trailers: a broken response
                    self._finish(stream, INTERNAL, "stream ended without trailers")
        elif kind == HEADERS:
            if flags & FLAG_PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & FLAG_PRIORITY:
                payload = payload[5:]
            if flags & FLAG_END_HEADERS:
                self._on_headers(stream, flags, payload)
            else:
                self._partial = (stream, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self._partial is None or self._partial[0] != stream:
                raise ValueError("unexpected CONTINUATION")
            self._partial[2].extend(payload)
            if flags & FLAG_END_HEADERS:
                first, head_flags, block = self._partial
                self._partial = None
                self._on_headers(first, head_flags, bytes(block))
        elif kind == RST_STREAM:
            (error,) = struct.unpack(">I", payload[:4])
            self._on_reset(stream, error)
        elif kind == SETTINGS:
            if not flags & FLAG_ACK:
                self._on_settings(payload)
                self._send(frame(SETTINGS, FLAG_ACK, 0))
        elif kind == PING:
            if not flags & FLAG_ACK:
                self._send(frame(PING, FLAG_ACK, 0, payload))
        elif kind == GOAWAY:
            last, error = struct.unpack(">II", payload[:8])
            self._shut(f"server going away (HTTP/2 error {error})", above=last & 0x7FFFFFFF)
        elif kind == WINDOW_UPDATE:
            (increment,) = struct.unpack(">I", payload[:4])
            if stream == 0:
                self._send_window += increment
            elif (entry := self._streams.get(stream)) is not None:
                entry.send_window += increment
            self._unblock()
        elif kind == PUSH_PROMISE:
            raise ValueError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored, as the spec says.

    def _on_settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == SETTING_INITIAL_WINDOW_SIZE:
                delta, self._initial_window = value - self._initial_window, value
                for entry in self._streams.values():
                    entry.send_window += delta
            elif key == SETTING_MAX_FRAME_SIZE:
                self._max_frame = value
            elif key == SETTING_MAX_CONCURRENT_STREAMS:
                self._max_streams = max(1, value)
        self._unblock()
        self._start_waiting()

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        known = self._decoded.get(block)
        if known is not None:
            return known
        table = self._decoder.header_table
        before = (len(table.dynamic_entries), table.dynamic_entries[0] if table.dynamic_entries else None,
                  table.maxsize)
        headers = [(bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True)]
        after_first = table.dynamic_entries[0] if table.dynamic_entries else None
        if (len(table.dynamic_entries), table.maxsize) == (before[0], before[2]) and after_first is before[1] \
                and len(self._decoded) < 1024:
            self._decoded[block] = headers
        return headers

    def _on_headers(self, stream: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # always: it keeps the peer's HPACK table in step
        entry = self._streams.get(stream)
        if entry is None:
            return
        self._read_headers(entry, headers)
        if flags & FLAG_END_STREAM:
            self._end(stream)


def unavailable(message: str) -> asyncio.Future[bytes]:
    """A call that fails with UNAVAILABLE on the next loop iteration, not at once: a caller
    looping on failures still yields to the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()
    loop.call_soon(fail, future, UNAVAILABLE, message)
    return future


def fail(future: asyncio.Future[bytes], code: int, message: str) -> None:
    if not future.done():
        future.set_exception(RpcError(code, message))


class Channel:
    """Calls over one connection to `address`, reconnecting after it is lost or goes away
    (calls made meanwhile fail at once with UNAVAILABLE, as an un-waiting gRPC channel's do)."""

    connection: Any = Connection

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._conn: Any = None
        self._connecting: asyncio.Task[None] | None = None
        self._last_error = "not connected"

    async def connect(self, timeout_s: float = 10.0) -> None:
        try:
            self._conn = await self.connection.open(self._host, self._port, timeout_s)
        except (OSError, TimeoutError) as exc:
            self._last_error = f"cannot connect to {self._host}:{self._port}: {exc}"

    def unary(self, path: str) -> Callable[..., asyncio.Future[bytes]]:
        def call(body: bytes, timeout: float | None = None) -> asyncio.Future[bytes]:
            conn = self._conn
            if conn is None or not conn.usable:
                if self._connecting is None or self._connecting.done():
                    self._connecting = asyncio.get_running_loop().create_task(self.connect())
                if conn is None:
                    return unavailable(self._last_error)
            return conn.call(path, body, timeout)

        return call

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            await self._conn.close()
