"""The audit trail (`--audit-log FILE`): one JSON line per inference, administrative and refused
call — who (identity, peer), what (RPC, model, version, model SHA-256, rows), the outcome
(status code, latency) and the caller's request id — and never a tensor, feature or output
value: a record is built from `AuditEvent`'s fields only.

Tamper evidence: every line carries `prev`, the SHA-256 of the previous line (the first line of
a fresh log: 64 zeros), so an edited, inserted or deleted line breaks the chain (`verify`). The
chain runs on across rotations: when the file passes `max_bytes` it becomes FILE.1 (FILE.1 ->
FILE.2 ..., keeping `retention` old files) and the new file's first line chains to the last line
of the old one.

Off the request path: callers append events to a buffer; a writer thread serializes, chains,
writes and flushes them in batches, every 20 ms (waking the thread per call cost more than the
record itself: a thread wake under load costs the event loop tens to hundreds of µs). Nothing
is dropped: when the buffer holds `max_pending` events, `admit()` is False and new calls are
refused with UNAVAILABLE until the writer catches up; an event of a call already admitted is
always written.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

GENESIS = "0" * 64
WRITE_PERIOD_S = 0.02  # the writer's period: records reach the file within about this long
WAKE_AT = 4096  # ... or as soon as this many are buffered


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What one call did. `time_unix` is wall-clock time (a timestamp, not a latency)."""

    time_unix: float
    identity: str
    peer: str
    rpc: str
    status: str
    latency_ms: float
    model: str = ""
    version: str = ""
    model_sha256: str = ""
    rows: int = 0
    request_id: str = ""
    count: int = 1  # calls this record stands for (refusals of one peer in one second are one record)


_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # json's own C string encoder


class _Stamps:
    """ISO-8601 UTC timestamps with milliseconds, the date and time formatted once per second
    (the writer formats thousands of records a second; datetime per record was most of its cost)."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, time_unix: float) -> str:
        second = math.floor(time_unix)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        millis = min(999, int((time_unix - second) * 1000))
        return f"{self._prefix}.{millis:03d}Z"


def _line(event: AuditEvent, prev: str, stamp: Callable[[float], str]) -> str:
    """One record, byte for byte what `json.dumps(record, separators=(",", ":"),
    ensure_ascii=True)` writes, built with json's C string encoder (no dict, no generic encoder)."""
    return (
        f'{{"time":"{stamp(event.time_unix)}","identity":{_quote(event.identity)},"peer":{_quote(event.peer)},'
        f'"rpc":{_quote(event.rpc)},"model":{_quote(event.model)},"version":{_quote(event.version)},'
        f'"model_sha256":{_quote(event.model_sha256)},"status":{_quote(event.status)},"rows":{int(event.rows)},'
        f'"latency_ms":{float(round(event.latency_ms, 3))!r},"request_id":{_quote(event.request_id)},'
        f'"count":{int(event.count)},"prev":"{prev}"}}'
    )


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode("ascii")).hexdigest()


def _last_digest(path: Path) -> str:
    """The chain head of an existing log (its last line's digest), or GENESIS."""
    if not path.exists() or path.stat().st_size == 0:
        return GENESIS
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        lines = f.read().splitlines()
    return _digest(lines[-1].decode("ascii")) if lines else GENESIS


class AuditLog:
    """The writer. `record()` is called on the event loop; the thread does everything else."""

    def __init__(self, path: Path, *, max_bytes: int = 100 << 20, retention: int = 10, max_pending: int = 65536,
                 fsync: bool = False) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._retention = retention
        self._max_pending = max_pending
        self._fsync = fsync
        self._pending: collections.deque[AuditEvent] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._written = 0
        self._prev = GENESIS
        self._stamps = _Stamps()
        self._file: TextIO | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the log (continuing its chain) and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = _last_digest(self.path)
        self._file = self._open()
        self._thread = threading.Thread(target=self._run, name="medserve-audit", daemon=True)
        self._thread.start()

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding="ascii")

    @property
    def written(self) -> int:
        return self._written

    def admit(self) -> bool:
        """Whether a new call may start (False while the buffer is full: refuse it UNAVAILABLE)."""
        return len(self._pending) < self._max_pending

    def record(self, event: AuditEvent) -> None:
        self._pending.append(event)  # deque.append is thread-safe; the writer drains it
        if len(self._pending) == WAKE_AT:  # else the writer's own period: no thread wake per call
            self._wake.set()

    def close(self) -> None:
        """Write everything still buffered, then stop the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._file is not None:
            self._file.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(WRITE_PERIOD_S)
            self._wake.clear()
            self._drain()
            if self._stop and not self._pending:
                return

    def _drain(self) -> None:
        lines: list[str] = []
        while self._pending:
            event = self._pending.popleft()
            line = _line(event, self._prev, self._stamps)
            self._prev = _digest(line)
            lines.append(line)
        if not lines or self._file is None:
            return
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self._written += len(lines)
            if self._file.tell() >= self._max_bytes:
                self._rotate()
        except OSError:
            log.exception("audit log %s: write failed", self.path)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        for i in range(self._retention - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self._retention > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._file = self._open()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    lines: int
    message: str


def _rotated_set(path: Path) -> list[Path]:
    """FILE.N ... FILE.1, FILE: oldest first."""
    older = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1:].isdigit()),
        key=lambda p: -int(p.name[len(path.name) + 1:]),
    )
    return [*older, path]


def _lines(paths: list[Path]) -> Iterator[tuple[Path, int, str]]:
    for p in paths:
        with p.open("r", encoding="ascii", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                yield p, number, line.rstrip("\n")


def verify(path: Path, *, rotated: bool = True) -> VerifyResult:
    """Check the hash chain of FILE (and, with `rotated`, of FILE.N ... FILE.1 before it): an
    edited, inserted or deleted line is reported with its file and line number. The oldest
    line's `prev` is taken as given (older files may have been removed by retention)."""
    paths = _rotated_set(path) if rotated else [path]
    expected: str | None = None  # the oldest line kept chains to what retention already removed
    count = 0
    for p, number, line in _lines(paths):
        count += 1
        try:
            prev = json.loads(line)["prev"]
        except (ValueError, KeyError, TypeError):
            return VerifyResult(False, count, f"{p}:{number}: not an audit record")
        if expected is not None and prev != expected:
            return VerifyResult(
                False, count, f"{p}:{number}: the chain is broken (a line before it was edited, inserted or deleted)"
            )
        expected = _digest(line)
    return VerifyResult(True, count, f"{count} records, chain intact")
