"""The audit trail (`--audit-log FILE --audit-key KEY`): one JSON line per inference,
administrative and refused call — who (identity, peer), what (RPC, model, version, model
SHA-256, rows), the outcome (status code, latency) and the caller's request id — and never a
tensor, feature or output value: a record is built from `AuditEvent`'s fields only.

Tamper evidence: a keyed chain. Every line is one ASCII JSON object that begins with `seq` (1, 2,
3 ... along the chain) and `kind`, and ends with `prev` (the previous record's MAC; 64 zeros for
the first) and `mac`, the HMAC-SHA-256 under the key of the line's text before `,"mac"`. Without
the key nobody can write a record that verifies, so an edited, inserted, replaced or deleted
line is found by `verify` even when the rest of the chain was recomputed. What the file alone
cannot show — its last records cut off — the checkpoint shows: the writer logs
`audit checkpoint file=F count=N head=H` (the last written record's seq and MAC) to the
server's own log every `checkpoint_s` and on stop, for the log pipeline to carry off the host,
and `verify --expect-count N --expect-head H` checks the file against it.

Besides the calls (`kind` "call") the writer records its own life: "start" (a writer opened the
file: seq 1, or the next seq after a tail that verified), "rotate" (the first record of a file
after rotation; it carries the retention in force, so `verify` tells records removed by
retention from deleted first lines), "break" (at start the last line did not verify: a new chain
begins at seq 1, never chained onto an unverified line; an ERROR is logged) and "stop".

Off the request path: callers append events to a buffer; a writer thread serializes, chains,
MACs and writes them in batches every 20 ms (a thread wake per call cost more than the record
itself). Nothing is dropped, and writes fail closed: when a write fails, the bytes not written
stay pending in order, `admit()` turns False (new calls answer UNAVAILABLE), `healthy` turns
False (the server reports not ready), and the thread retries with backoff; service resumes when
a write succeeds. `admit()` is also False while the buffer holds `max_pending` events; an event
of a call already admitted is always recorded.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidSetting

log = logging.getLogger(__name__)

GENESIS = "0" * 64
WRITE_PERIOD_S = 0.02  # the writer's period: records reach the file within about this long
WAKE_AT = 4096  # ... or as soon as this many are buffered
KEY_BYTES = 32
CHECKPOINT_S = 60.0
RETRY_MAX_S = 1.0  # the longest wait between two tries of a failing write
STOP_RETRY_S = 2.0
ROTATION_RETRY_S = 60.0  # after a rotation failed (a rename refused), the writer keeps to one file this long  # on stop, how long a failing write is still retried before records are given up
_MAC_SUFFIX = re.compile(r',"mac":"([0-9a-f]{64})"\}\Z')
_MAC_SUFFIX_LEN = len(',"mac":"') + 64 + len('"}')
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


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
    transport: str = "grpc"  # "http": a REST call (the field is written only then: gRPC records are unchanged)


# -- the key --------------------------------------------------------------------------------

def keygen(path: Path) -> None:
    """Write a new key (32 random bytes, hex) to `path`, owner-only; never over an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidSetting(f"{path}: exists; not overwritten (a new key would not verify the old records)") from None
    except OSError as exc:
        raise InvalidSetting(f"{path}: cannot create the key file ({exc.strerror})") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


def load_key(path: Path) -> bytes:
    """The key of `path` (as `keygen` writes it: 64 hex digits), or InvalidSetting naming the file."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InvalidSetting(f"--audit-key {path}: cannot read it ({exc.strerror})") from None
    value = text.strip()
    if not re.fullmatch(rb"[0-9a-fA-F]{64}", value):
        raise InvalidSetting(f"--audit-key {path}: expected 64 hex digits (as `medserve audit keygen FILE` writes)")
    st = path.stat()
    # Group bits are fine when the group is the server's own (a Kubernetes Secret mounted 0440 with
    # the pod's fsGroup); anyone else who can read the key can rewrite the audit trail.
    ours = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if st.st_mode & 0o007 or (st.st_mode & 0o070 and not ours):
        log.warning("--audit-key %s: readable by others (mode %o): whoever can read it can rewrite the audit trail",
                    path, stat.S_IMODE(st.st_mode))
    return bytes.fromhex(value.decode("ascii"))


def mac_of(key: bytes, body: str) -> str:
    return hmac.digest(key, body.encode("ascii"), "sha256").hex()


class _Mac:
    """HMAC-SHA-256 (RFC 2104) under one key with the padded key's two SHA-256 states computed
    once: a record's MAC costs about a quarter of `hmac.digest`, which redoes them per call
    (measured 1.0 vs 3.9 µs a record on the writer thread, which shares the GIL with the loop)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def __call__(self, body: bytes) -> str:
        inner = self._inner.copy()
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


# -- records --------------------------------------------------------------------------------

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


def _body(event: AuditEvent, seq: int, prev: str, stamp: Callable[[float], str]) -> str:
    """A call record without its MAC: byte for byte what `json.dumps(record, separators=(",", ":"),
    ensure_ascii=True)` writes less the closing brace, built with json's C string encoder."""
    return (
        f'{{"seq":{seq},"kind":"call","time":"{stamp(event.time_unix)}","identity":{_quote(event.identity)},'
        f'"peer":{_quote(event.peer)},"rpc":{_quote(event.rpc)},"model":{_quote(event.model)},'
        f'"version":{_quote(event.version)},"model_sha256":{_quote(event.model_sha256)},'
        f'"status":{_quote(event.status)},"rows":{int(event.rows)},'
        f'"latency_ms":{float(round(event.latency_ms, 3))!r},"request_id":{_quote(event.request_id)},'
        f'"count":{int(event.count)},'
        + ("" if event.transport == "grpc" else f'"transport":{_quote(event.transport)},')
        + f'"prev":"{prev}"'
    )


def _control_body(kind: str, seq: int, prev: str, time_unix: float, **fields: Any) -> str:
    record = {"seq": seq, "kind": kind, "time": _Stamps()(time_unix), **fields, "prev": prev}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True)[:-1]


def _seal(key: bytes, body: str) -> tuple[str, str]:
    """(line, mac) of a record body."""
    mac = mac_of(key, body)
    return f'{body},"mac":"{mac}"}}', mac


@dataclass(frozen=True, slots=True)
class Record:
    """One parsed line: its fields, the text its MAC covers, and the MAC it claims."""

    fields: dict[str, Any]
    body: str
    mac: str

    @property
    def seq(self) -> int:
        return int(self.fields["seq"])

    @property
    def kind(self) -> str:
        return str(self.fields["kind"])

    @property
    def prev(self) -> str:
        return str(self.fields["prev"])


class BadRecord(ValueError):
    """A line that is not an audit record (the message says why, never the line's text)."""


def parse_line(raw: bytes) -> Record:
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"bad bytes (a non-ASCII byte at column {exc.start + 1})") from None
    match = _MAC_SUFFIX.search(line)
    try:
        fields = json.loads(line)
    except ValueError:
        raise BadRecord("not a JSON object (cut off or edited by hand)") from None
    if not isinstance(fields, dict) or match is None:
        raise BadRecord("not an audit record (no trailing mac)")
    seq, kind, prev = fields.get("seq"), fields.get("kind"), fields.get("prev")
    if not (isinstance(seq, int) and seq >= 1 and isinstance(kind, str) and isinstance(prev, str)
            and _HEX64.match(prev)):
        raise BadRecord("not an audit record (seq, kind or prev missing or malformed)")
    return Record(fields, line[:-_MAC_SUFFIX_LEN], match.group(1))


def _last_line(path: Path) -> tuple[bytes, bool] | None:
    """The whole last line of a regular file however long (read backwards in blocks), and
    whether the file ends with a newline; None for an empty file."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        complete = f.read(1) == b"\n"
        stop = end - 1 if complete else end
        chunks: list[bytes] = []
        pos = stop
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                chunks.append(block[cut + 1:])
                break
            chunks.append(block)
            pos -= step
        return b"".join(reversed(chunks)), complete


# -- the writer -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The head of a chain: the seq (`count`) and MAC (`head`) of its last written record."""

    file: str
    count: int
    head: str


def _retry_delays() -> Iterator[float]:
    delay = WRITE_PERIOD_S
    while True:
        yield delay
        delay = min(RETRY_MAX_S, delay * 2)


class AuditLog:
    """The writer. `record()` and `admit()` are called on the event loop; the thread does the rest."""

    def __init__(self, path: Path, *, key: bytes, max_bytes: int = 100 << 20, retention: int | None = None,
                 max_pending: int = 65536, fsync: bool = False, checkpoint_s: float = CHECKPOINT_S,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 write: Callable[[int, bytes], int] = os.write,
                 on_health: Callable[[bool], None] = lambda healthy: None) -> None:
        if len(key) < 16:
            raise InvalidSetting("the audit key is too short")
        self.path = path
        self._key = key
        self._mac = _Mac(key)
        self._max_bytes = max_bytes
        self._retention = retention  # rotated files kept; None = all (rotation deletes nothing)
        self._max_pending = max_pending
        self._fsync = fsync
        self._checkpoint_s = checkpoint_s
        self._clock = clock
        self._wall = wall_clock
        self._write = write  # injectable: the tests' failing disk
        self._on_health = on_health
        self._pending: collections.deque[AuditEvent] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._stamps = _Stamps()
        self._fd: int | None = None
        self._regular = False
        self._thread: threading.Thread | None = None
        # Chain state: the last record serialized (`_seq`, `_prev`) and the last one written.
        self._seq = 0
        self._prev = GENESIS
        self._head = Checkpoint(path.name, 0, GENESIS)
        self._out = bytearray()  # serialized, chained, not yet written (in order)
        self._out_events = 0
        self._out_tail = (0, GENESIS)  # seq and MAC of the last record in `_out`
        self._written = 0
        self._failing = False
        self._next_checkpoint = 0.0
        self._no_rotation_until = 0.0

    # -- the event loop's side (cheap) -------------------------------------------------------

    @property
    def written(self) -> int:
        """Call records written to the file so far."""
        return self._written

    @property
    def healthy(self) -> bool:
        """False while writes fail: the server is not ready and refuses new calls."""
        return not self._failing

    @property
    def head(self) -> Checkpoint:
        return self._head

    def admit(self) -> bool:
        """Whether a new call may start (False while writes fail or the buffer is full: UNAVAILABLE)."""
        return not self._failing and len(self._pending) < self._max_pending

    def record(self, event: AuditEvent) -> None:
        self._pending.append(event)  # deque.append is thread-safe; the writer drains it
        if len(self._pending) == WAKE_AT:  # else the writer's own period: no thread wake per call
            self._wake.set()

    # -- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the log, continue its chain if its last record verifies (else record a break),
        write the start record (a failure leaves the log failing, not the server down), and
        start the writer thread. A log that cannot be opened at all is InvalidSetting."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidSetting(f"--audit-log {self.path}: cannot create its folder ({exc.strerror})") from None
        self._fd = self._open()
        self._chain_onto_tail()
        self._next_checkpoint = self._clock() + self._checkpoint_s
        self._flush()
        if self._failing:
            log.error("audit log %s: the first write failed; new calls are refused UNAVAILABLE until it succeeds",
                      self.path)
        self._thread = threading.Thread(target=self._run, name="medserve-audit", daemon=True)
        self._thread.start()

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise InvalidSetting(f"--audit-log {self.path}: cannot open it ({exc.strerror})") from None
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        return fd

    def _chain_onto_tail(self) -> None:
        tail = _last_line(self.path) if self._regular else None
        if tail is None:
            self._control("start", file=self.path.name)
            return
        raw, complete = tail
        try:
            record = parse_line(raw)
            if not hmac.compare_digest(mac_of(self._key, record.body), record.mac):
                raise BadRecord("its MAC does not match (edited, or written under another key)")
            if not complete:
                raise BadRecord("it has no end of line (cut off)")
        except BadRecord as exc:
            reason = f"the last line did not verify: {exc}"
            log.error("audit log %s: %s; a break record starts a new chain (`medserve audit verify` will report it)",
                      self.path, reason)
            if not complete:
                self._out += b"\n"  # the cut-off line stays as it is, on a line of its own
            self._control("break", file=self.path.name, reason=reason)
            return
        self._seq, self._prev = record.seq, record.mac
        self._head = Checkpoint(self.path.name, record.seq, record.mac)
        self._control("start", file=self.path.name)

    def close(self) -> None:
        """Write everything still buffered (a failing write is retried for `STOP_RETRY_S`), then
        the stop record, log the checkpoint, and stop the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        delays = _retry_delays()
        wait = WRITE_PERIOD_S
        stop_deadline: float | None = None
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            try:
                self._serialize()
                if self._stop and stop_deadline is None:
                    stop_deadline = time.monotonic() + STOP_RETRY_S
                    self._control("stop", file=self.path.name)
                self._flush()
            except Exception:  # noqa: BLE001 - a dead writer would let calls run unrecorded: fail closed
                log.exception("audit log %s: the writer failed", self.path)
                self._set_failing(True, "the writer failed")
            if self._failing:
                wait = next(delays)
            else:
                delays, wait = _retry_delays(), WRITE_PERIOD_S
            if not self._failing and self._clock() >= self._next_checkpoint:
                self._log_checkpoint()
            if self._stop and not self._pending and (not self._out or time.monotonic() >= (stop_deadline or 0)):
                if self._out:
                    log.error("audit log %s: writes still failing at stop: %d records not written",
                              self.path, self._out.count(b"\n"))
                else:
                    self._log_checkpoint()
                return

    def _log_checkpoint(self) -> None:
        head = self._head
        self._next_checkpoint = self._clock() + self._checkpoint_s
        log.info("audit checkpoint file=%s count=%d head=%s", head.file, head.count, head.head,
                 extra={"audit_file": head.file, "audit_count": head.count, "audit_head": head.head})

    def _serialize(self) -> None:
        """Chain and MAC what is buffered onto `_out` (kept across failed writes)."""
        if not self._pending:
            return
        parts: list[bytes] = []
        mac, seq, prev, stamps, pending = self._mac, self._seq, self._prev, self._stamps, self._pending
        n = 0
        while pending:
            seq += 1
            body = _body(pending.popleft(), seq, prev, stamps).encode("ascii")
            prev = mac(body)
            parts += (body, b',"mac":"', prev.encode("ascii"), b'"}\n')
            n += 1
        self._seq, self._prev = seq, prev
        self._out += b"".join(parts)
        self._out_events += n
        self._out_tail = (seq, prev)

    def _control(self, kind: str, **fields: Any) -> None:
        self._seq += 1
        line, self._prev = _seal(self._key, _control_body(kind, self._seq, self._prev, self._wall(), **fields))
        self._out += (line + "\n").encode("ascii")
        self._out_tail = (self._seq, self._prev)

    def _flush(self, may_rotate: bool = True) -> None:
        """Write `_out` (exactly what is left of it after a partial or failed write); rotate."""
        if not self._out:
            return
        if self._fd is None:
            try:
                self._fd = self._open()
            except InvalidSetting as exc:
                self._set_failing(True, str(exc))
                return
        try:
            while self._out:
                done = self._write(self._fd, bytes(self._out))
                if done <= 0:
                    raise OSError(errno.EIO, "nothing written")
                del self._out[:done]
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._set_failing(True, f"write failed ({exc.strerror or exc})")
            return
        self._written += self._out_events
        self._out_events = 0
        self._head = Checkpoint(self.path.name, *self._out_tail)
        self._set_failing(False, "")
        if may_rotate and self._regular and os.fstat(self._fd).st_size >= self._max_bytes:
            self._rotate()

    def _set_failing(self, failing: bool, why: str) -> None:
        if failing == self._failing:
            return
        self._failing = failing
        if failing:
            log.error("audit log %s: %s; records kept pending, new calls refused UNAVAILABLE, not ready", self.path,
                      why)
        else:
            log.warning("audit log %s: writes succeed again; serving", self.path)
        try:
            self._on_health(not failing)
        except Exception:  # noqa: BLE001 - the writer must outlive its observer
            log.exception("audit log: health callback failed")

    def _rotate(self) -> None:
        """FILE becomes FILE.1 (FILE.1 -> FILE.2 ...; with a retention, files past it are
        deleted); the new FILE begins with a rotate record that continues the chain."""
        if time.monotonic() < self._no_rotation_until:
            return
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        try:
            for i, p in sorted(_numbered(self.path), key=lambda pair: -pair[0]):
                if self._retention is not None and i + 1 > self._retention:
                    p.unlink()
                else:
                    os.replace(p, _nth(self.path, i + 1))
            os.replace(self.path, _nth(self.path, 1))
        except OSError as exc:  # the chain goes on in the same file (the next write reopens it)
            self._no_rotation_until = time.monotonic() + ROTATION_RETRY_S
            log.error("audit log %s: rotation failed (%s); writing on in the same file, trying again in %.0f s",
                      self.path, exc.strerror or exc, ROTATION_RETRY_S)
            return
        self._control("rotate", file=self.path.name, retention=self._retention)
        self._flush(may_rotate=False)


def _nth(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def _numbered(path: Path) -> list[tuple[int, Path]]:
    """FILE.1, FILE.2 ... that exist, with their numbers."""
    out = []
    for p in path.parent.glob(f"{glob_escape(path.name)}.*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            out.append((int(suffix), p))
    return out


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# -- verification ---------------------------------------------------------------------------

@dataclass(slots=True)
class VerifyResult:
    """What `verify` found in one chain. `ok` is False when any problem was found."""

    chain: str
    records: int = 0  # lines that parsed as records
    calls: int = 0  # calls the call records stand for (their `count`s)
    head: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def message(self) -> str:
        if self.problems:
            return "\n".join(self.problems)
        return f"{self.chain}: {self.records} records ({self.calls} calls), chain intact" + "".join(
            f"; {n}" for n in self.notes)


def chain_files(path: Path, *, rotated: bool = True) -> list[Path]:
    """One chain's files, oldest first: FILE.N ... FILE.1, FILE."""
    if not rotated:
        return [path]
    older = sorted(_numbered(path), key=lambda pair: -pair[0])
    return [p for _, p in older] + ([path] if path.exists() else [])


def chains(path: Path) -> list[Path]:
    """The chains a FILE argument names: FILE itself, and the per-worker FILE.w0, FILE.w1 ...
    (`--workers N` writes one chain per worker)."""
    found = [path] if path.exists() or _numbered(path) else []
    workers = sorted(
        (p for p in path.parent.glob(f"{glob_escape(path.name)}.w*") if re.fullmatch(r"w\d+", p.name[len(path.name) + 1:])),
        key=lambda p: int(p.name[len(path.name) + 2:]),
    )
    return found + workers


def verify(path: Path, *, key: bytes | None, checkpoint: tuple[int, str] | None = None,
           rotated: bool = True) -> VerifyResult:
    """Check one chain (FILE and, with `rotated`, FILE.N ... FILE.1 before it). With `key`,
    every record's MAC; always the sequence, the links and how the chain begins; with a
    `checkpoint` (count, head), that the chain reaches it unchanged. Each kind of damage has its
    own message, naming the file and line (never a line's content)."""
    result = VerifyResult(str(path))
    mac = _Mac(key) if key is not None else None
    files = chain_files(path, rotated=rotated)
    if not files:
        result.problems.append(f"{path}: no such file")
        return result
    expected_seq: int | None = None  # None: the next record begins a chain
    expected_prev = GENESIS
    last_seq = 0
    first = True
    mac_failures: list[tuple[str, int, int]] = []  # (where, seq, ordinal)
    at_count: Record | None = None
    last_kind = ""
    for p in files:
        data = p.read_bytes()
        if not data:
            result.problems.append(
                f"{p}: empty (0 bytes): truncated; a log the server opened holds at least its start record")
            continue
        raw_lines = data.split(b"\n")
        if raw_lines[-1] == b"":
            raw_lines.pop()
        else:
            result.problems.append(f"{p}:{len(raw_lines)}: the last line has no end of line: cut off")
        for number, raw in enumerate(raw_lines, start=1):
            where = f"{p}:{number}"
            try:
                record = parse_line(raw)
            except BadRecord as exc:
                result.problems.append(f"{where}: {exc}")
                expected_seq = -1  # unknown: the next record's link is not judged
                continue
            result.records += 1
            seq = record.seq
            if mac is not None and not hmac.compare_digest(mac(record.body.encode("ascii")), record.mac):
                mac_failures.append((where, seq, result.records))
            if record.kind == "call":
                count = record.fields.get("count", 1)
                result.calls += count if isinstance(count, int) else 1
            if record.kind == "break":
                result.problems.append(
                    f"{where}: break record: when the server started, the line before it did not verify "
                    f"({record.fields.get('reason', 'no reason given')}); a new chain begins here")
                expected_seq, first = None, False
            if first:
                first = False
                if record.kind == "rotate" and number == 1:
                    if record.fields.get("retention") is None:
                        result.problems.append(
                            f"{where}: the chain starts at record {seq} after a rotation, but its writer kept every "
                            f"rotated file: the file(s) with records 1..{seq - 1} were deleted")
                    else:
                        result.notes.append(f"records 1..{seq - 1} removed by retention "
                                            f"({record.fields['retention']} rotated files kept)")
                elif not (seq == 1 and record.prev == GENESIS and record.kind in ("start", "break")):
                    result.problems.append(
                        f"{where}: the chain starts at record {seq}, not at a start or rotation record: "
                        f"the first lines were deleted (records before {seq})")
            elif expected_seq is None:
                if not (seq == 1 and record.prev == GENESIS):
                    result.problems.append(f"{where}: a break record must begin a chain at record 1")
            elif expected_seq == -1:
                pass  # after a line that did not parse
            elif seq > expected_seq:
                result.problems.append(f"{where}: records {expected_seq}..{seq - 1} are missing: deleted")
            elif seq < expected_seq:
                result.problems.append(
                    f"{where}: record {seq} comes after record {expected_seq - 1}: a record copied, replayed or moved")
            elif record.prev != expected_prev:
                result.problems.append(
                    f"{where}: its link (prev) is not the MAC of the record before it: a record was replaced "
                    "or the chain recomputed")
            expected_seq, expected_prev, last_seq = seq + 1, record.mac, seq
            if checkpoint is not None and seq == checkpoint[0]:
                at_count = record
            result.head = Checkpoint(p.name, seq, record.mac)
            last_kind = record.kind
    _judge_macs(result, mac_failures, checkpoint)
    if checkpoint is not None:
        count, head = checkpoint
        if at_count is None and last_seq < count:
            result.problems.append(
                f"{path}: the chain ends at record {last_seq}, the checkpoint says {count}: "
                f"truncated (records {last_seq + 1}..{count} removed)")
        elif at_count is None:
            result.problems.append(f"{path}: record {count} of the checkpoint is not in the chain")
        elif at_count.mac != head:
            result.problems.append(
                f"{path}: record {count} is not the checkpoint's head: the log up to the checkpoint was rewritten")
        elif last_seq > count:
            result.notes.append(f"{last_seq - count} records after the checkpoint")
    if result.head is not None and last_kind != "stop":
        # Not a fault by itself (a running or killed server has none), but a clean stop always
        # ends with one, and nobody without the key can write one after cutting records off.
        result.notes.append("it does not end with a stop record: the server is running, was killed, or the end was "
                            "cut off (a checkpoint tells)")
    if key is None:
        result.notes.append("MACs NOT checked (no --key): sequence and links only")
    return result


def _judge_macs(result: VerifyResult, failures: list[tuple[str, int, int]],
                checkpoint: tuple[int, str] | None) -> None:
    """Name what the records that fail their MAC mean: one record edited; the wrong key; the
    chain rewritten from some record on; records forged after the checkpoint's head.
    `failures` holds (where, seq, ordinal in the chain)."""
    if not failures:
        return
    if len(failures) == result.records and result.records > 1:
        result.problems.append(f"{failures[0][0]}: no record verifies: the wrong --key, or the whole log forged")
        return
    covered = checkpoint[0] if checkpoint is not None else None
    after = [f for f in failures if covered is not None and f[1] > covered]
    before = [f for f in failures if f not in after]
    for where, seq, _ in after:
        result.problems.append(
            f"{where}: record {seq}, after the checkpoint's head (record {covered}), fails its MAC: forged and appended")
    if not before:
        return
    ordinals = [o for _, _, o in failures]
    from_first = ordinals[ordinals.index(before[0][2]):]
    if len(before) > 1 and from_first == list(range(before[0][2], result.records + 1)):
        result.problems.append(
            f"{before[0][0]}: every record from here on ({len(from_first)}) fails its MAC: the chain from here was "
            "rewritten without the key (a record deleted, inserted or edited and the links recomputed)")
        return
    for where, seq, ordinal in before:
        last = covered is None and ordinal == result.records
        result.problems.append(
            f"{where}: record {seq} fails its MAC: the last record was edited, or forged and appended" if last
            else f"{where}: record {seq} fails its MAC: it was edited")
