"""Unary gRPC calls over the `h2` library's HTTP/2 state machine, with rawh2's asyncio
structure (`rawh2.CallProtocol`: one protocol per connection, a future per call, the frames of
one event-loop iteration written in one `write`, the same status mapping), so the two differ
only in who frames the HTTP/2: `python -m medserve.perf.bench_transports` compares them.

h2 runs with header validation and normalisation off (the server is trusted and the request
headers are built once), as fast as the library goes. Deadlines travel as `grpc-timeout` and
are enforced locally too.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from . import rawh2
from .rawh2 import DEADLINE_EXCEEDED, DEFAULT_WINDOW, MAX_WINDOW, UNAVAILABLE, fail, timeout_header
from .scenario import grpc_message

CONFIG = h2.config.H2Configuration(client_side=True, validate_inbound_headers=False, validate_outbound_headers=False,
                                   normalize_inbound_headers=False, normalize_outbound_headers=False)


def request_headers(authority: str, path: str, timeout_s: float | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
               (b":authority", authority.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
               (b"user-agent", b"medserve-perf")]
    if timeout_s is not None:
        headers.append((b"grpc-timeout", timeout_header(timeout_s)))
    return headers


@dataclass(slots=True)
class _Call(rawh2.Call):
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    id: int = 0  # 0 until started (a call over the server's stream limit waits)


class Connection(rawh2.CallProtocol):
    """One HTTP/2 connection (framed by h2) carrying unary gRPC calls."""

    def __init__(self, authority: str) -> None:
        super().__init__(authority)
        self._h2 = h2.connection.H2Connection(config=CONFIG)
        self._waiting: collections.deque[_Call] = collections.deque()  # over the server's stream limit

    # -- calls -----------------------------------------------------------------------------

    def _request_head(self, authority: str, path: str, timeout_s: float | None) -> list[tuple[bytes, bytes]]:
        return request_headers(authority, path, timeout_s)

    def _begin(self, future: asyncio.Future[bytes], head: list[tuple[bytes, bytes]], body: bytes,
               timeout_s: float | None) -> None:
        entry = _Call(future, headers=head, body=body)
        if timeout_s is not None:
            entry.timer = self._loop.call_later(timeout_s, self._expire, entry)
        if len(self._streams) >= self._h2.remote_settings.max_concurrent_streams:
            self._waiting.append(entry)
        else:
            self._start(entry)

    def _start(self, entry: _Call) -> None:
        # Stream ids are taken when a call starts, so they rise in the order h2 sends them.
        entry.id = stream = self._h2.get_next_available_stream_id()
        self._streams[stream] = entry
        self._h2.send_headers(stream, entry.headers)
        self._send_data(stream, memoryview(grpc_message(entry.body)))
        self._schedule_flush()

    def _send_data(self, stream: int, data: memoryview) -> None:
        if stream not in self._streams:
            return  # reset or expired while waiting for a window
        while True:
            size = min(len(data), self._h2.local_flow_control_window(stream), self._h2.max_outbound_frame_size)
            last = size == len(data)
            if size <= 0 and not last:
                self._blocked.append((stream, data))
                return
            self._h2.send_data(stream, bytes(data[:size]), end_stream=last)
            if last:
                return
            data = data[size:]

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._h2.data_to_send()
        if self._transport is not None and out and not self._transport.is_closing():
            self._transport.write(out)

    def _expire(self, entry: _Call) -> None:
        entry.timer = None
        fail(entry.future, DEADLINE_EXCEEDED, "deadline exceeded (client side)")
        if entry.id and self._streams.pop(entry.id, None) is not None:
            try:
                self._h2.reset_stream(entry.id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.H2Error:
                pass  # closed meanwhile
            self._schedule_flush()
            self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._streams) < self._h2.remote_settings.max_concurrent_streams:
            entry = self._waiting.popleft()
            if not entry.future.done():  # else expired while waiting
                self._start(entry)

    async def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._h2.close_connection()
            self._flush()
            self._transport.close()
        await asyncio.shield(self.closed)

    # -- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0, h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW})
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(MAX_WINDOW - DEFAULT_WINDOW)
        transport.write(self._h2.data_to_send())

    def _shut(self, reason: str, above: int = 0) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for entry in waiting:  # never started: not in _streams
            if entry.timer is not None:
                entry.timer.cancel()
            fail(entry.future, UNAVAILABLE, reason)
        super()._shut(reason, above)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._shut(f"undecodable frame from the server: {type(exc).__name__}: {exc}")
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                entry = self._streams.get(event.stream_id)
                if entry is not None:
                    entry.chunks.append(event.data)
                if event.flow_controlled_length:
                    self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                if (entry := self._streams.get(event.stream_id)) is not None:
                    self._read_headers(entry, event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self._end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._on_reset(event.stream_id, int(event.error_code))
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._unblock()
                self._start_waiting()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._shut(f"server going away (HTTP/2 error {int(event.error_code or 0)})",
                           above=event.last_stream_id or 0)
        self._schedule_flush()


class Channel(rawh2.Channel):
    """rawh2's reconnecting channel over h2 connections."""

    connection = Connection
