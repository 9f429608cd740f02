"""The audit trail: one JSON line per inference, administrative and refused call, with who, what
and the outcome but never a value; a keyed chain (HMAC-SHA-256) that `verify` checks, each kind
of damage with its own message; rotation that deletes nothing unless asked; writes that fail
closed and resume; the checkpoint in the server's log; nothing dropped when the writer is behind.
The attacks against a running server are in tests/security/test_audit_trail.py."""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw
from medserve.server.audit import (
    GENESIS,
    AuditEvent,
    AuditLog,
    _body,
    _Stamps,
    keygen,
    load_key,
    mac_of,
    verify,
)
from medserve.server.errors import InvalidSetting
from medserve.server.identities import IdentityFile

import onnx_models
from conftest import running_server, wait_for

SENTINEL = 987654.25
KEY = bytes(range(32))


def request(model: str, x: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def calls(path: Path) -> list[dict]:
    return [r for r in lines(path) if r["kind"] == "call"]


def event(i: int = 0, **kw: object) -> AuditEvent:
    fields: dict = {"time_unix": 1.7e9 + i, "identity": "ward", "peer": "ipv4:127.0.0.1:1", "rpc": "ModelInfer",
                    "status": "OK", "latency_ms": 1.0, "model": "m", "version": "1", "model_sha256": "a" * 64,
                    "rows": 1, "request_id": f"r{i}"}
    fields.update(kw)
    return AuditEvent(**fields)


def written_log(path: Path, n: int = 5, **kw: object) -> Path:
    writer = AuditLog(path, key=KEY, **kw)  # type: ignore[arg-type]
    writer.start()
    for i in range(n):
        writer.record(event(i))
    writer.close()
    return path


def test_inference_admin_and_refused_calls_leave_one_record_each(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "sepsis" / "1" / "model.onnx")
    ids = IdentityFile.load(tmp_path / "ids.json")
    ward, ops = ids.add("ward", ["sepsis"]), ids.add("ops", ["*"], admin=True)
    ids.save()
    keygen(tmp_path / "audit.key")
    log = tmp_path / "audit" / "audit.jsonl"
    with running_server(repo, tokens_file=str(tmp_path / "ids.json"), audit_log=str(log),
                        audit_key=str(tmp_path / "audit.key"), model_control_mode="explicit",
                        load_models=("*",)) as server:
        stub = server.stub()
        as_ward = (("authorization", f"Bearer {ward}"),)
        stub.ModelInfer(request("sepsis", np.full((3, 4), SENTINEL, np.float32), "enc-1"), metadata=as_ward)
        with pytest.raises(grpc.RpcError):  # bad shape: refused
            stub.ModelInfer(request("sepsis", np.full((1, 5), SENTINEL, np.float32), "enc-2"), metadata=as_ward)
        with pytest.raises(grpc.RpcError):  # no credentials: refused at the gate
            stub.ModelInfer(request("sepsis", np.zeros((1, 4), np.float32)))
        stub.ModelMetadata(pb.ModelMetadataRequest(name="sepsis"), metadata=as_ward)  # not audited: metadata
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="sepsis"),
                                 metadata=(("authorization", f"Bearer {ops}"),))
        wait_for(lambda: log.exists() and len(calls(log)) == 4)
    records = calls(log)
    sha = records[0]["model_sha256"]
    assert [(r["rpc"], r["identity"], r["model"], r["version"], r["status"], r["rows"], r["request_id"])
            for r in records] == [
        ("ModelInfer", "ward", "sepsis", "1", "OK", 3, "enc-1"),
        ("ModelInfer", "ward", "sepsis", "", "INVALID_ARGUMENT", 0, "enc-2"),
        ("ModelInfer", "anonymous", "", "", "UNAUTHENTICATED", 0, ""),
        ("RepositoryModelLoad", "ops", "sepsis", "", "OK", 0, ""),
    ]
    assert len(sha) == 64 and all(r["peer"].startswith("ipv") for r in records)
    assert all(r["latency_ms"] >= 0 and r["time"].endswith("Z") for r in records)
    assert [r["kind"] for r in lines(log)][0] == "start" and lines(log)[-1]["kind"] == "stop"
    assert str(SENTINEL) not in log.read_text() and "987654" not in log.read_text()
    assert verify(log, key=load_key(tmp_path / "audit.key")).ok


def test_every_line_is_sealed_by_the_key_and_linked_to_the_one_before(tmp_path: Path) -> None:
    log = written_log(tmp_path / "audit.jsonl")
    records = lines(log)
    assert [r["seq"] for r in records] == list(range(1, 8))  # start, 5 calls, stop
    assert records[0]["prev"] == GENESIS
    for before, record, text in zip(records, records[1:], log.read_text().splitlines()[1:], strict=False):
        assert record["prev"] == before["mac"]
        assert record["mac"] == mac_of(KEY, text[: text.index(',"mac":"')])
    result = verify(log, key=KEY)
    assert result.ok and result.records == 7 and result.calls == 5, result.message


@pytest.mark.parametrize(("damage", "expected"), [
    ("edit_middle", "record 3 fails its MAC: it was edited"),
    ("edit_last", "fails its MAC: the last record was edited, or forged and appended"),
    ("delete_middle", "records 4..4 are missing: deleted"),
    ("delete_first", "the chain starts at record 4, not at a start or rotation record: the first lines were deleted"),
    ("recompute", "fails its MAC: the chain from here was rewritten without the key"),
    ("replay", "comes after record 7: a record copied, replayed or moved"),
    ("empty", "empty (0 bytes): truncated"),
    ("non_ascii", "bad bytes (a non-ASCII byte at column"),
    ("not_json", "not a JSON object"),
    ("cut_off", "the last line has no end of line: cut off"),
    ("wrong_key", "no record verifies: the wrong --key, or the whole log forged"),
])
def test_verify_names_each_kind_of_damage(tmp_path: Path, damage: str, expected: str) -> None:
    log = written_log(tmp_path / "audit.jsonl")
    text = log.read_text().splitlines()
    key = KEY
    if damage == "edit_middle":
        text[2] = text[2].replace('"status":"OK"', '"status":"DENIED"')
    elif damage == "edit_last":
        text[-1] = text[-1].replace('"kind":"stop"', '"kind":"stip"')
    elif damage == "delete_middle":
        del text[3]
    elif damage == "delete_first":
        del text[:3]
    elif damage == "recompute":  # a middle line deleted, seq and links recomputed, MACs under a guessed key
        del text[3]
        guess = b"\x00" * 32
        prev = json.loads(text[2])["mac"]
        for i in range(3, len(text)):
            record = json.loads(text[i])
            record["seq"], record["prev"] = i + 1, prev
            body = json.dumps({k: v for k, v in record.items() if k != "mac"}, separators=(",", ":"))[:-1]
            prev = mac_of(guess, body)
            text[i] = f'{body},"mac":"{prev}"}}'
    elif damage == "replay":
        text.append(text[2])
    elif damage == "empty":
        text = []
    elif damage == "non_ascii":
        text[2] = text[2].replace("ward", "w\u00e4rd")
    elif damage == "not_json":
        text[2] = text[2][:40]
    elif damage == "wrong_key":
        key = b"\x01" * 32
    body = "\n".join(text) + ("\n" if text else "")
    if damage == "cut_off":
        body = body[:-20]
    log.write_bytes(body.encode("utf-8"))
    result = verify(log, key=key)
    assert not result.ok
    assert expected in result.message, result.message
    assert "Traceback" not in result.message and "DENIED" not in result.message


def test_a_checkpoint_finds_truncation_and_appended_forgeries(tmp_path: Path) -> None:
    log = written_log(tmp_path / "audit.jsonl")
    text = log.read_text().splitlines()
    last = json.loads(text[-1])
    checkpoint = (last["seq"], last["mac"])
    assert verify(log, key=KEY, checkpoint=checkpoint).ok
    log.write_text("\n".join(text[:4]) + "\n")  # cut back to an earlier line: the file alone looks fine ...
    alone = verify(log, key=KEY)
    assert alone.ok and "does not end with a stop record" in alone.message  # ... but for its missing stop record
    result = verify(log, key=KEY, checkpoint=checkpoint)
    assert not result.ok and "the checkpoint says 7: truncated (records 5..7 removed)" in result.message
    forged = dict(last, seq=8, prev=last["mac"], kind="call")
    forged_body = json.dumps({k: v for k, v in forged.items() if k != "mac"}, separators=(",", ":"))[:-1]
    log.write_text("\n".join([*text, f'{forged_body},"mac":"{"0" * 64}"}}']) + "\n")
    result = verify(log, key=KEY, checkpoint=checkpoint)
    assert not result.ok and "after the checkpoint's head (record 7), fails its MAC: forged and appended" in \
        result.message
    result = verify(log, key=KEY, checkpoint=(7, "f" * 64))
    assert "record 7 is not the checkpoint's head" in result.message


def test_verify_without_the_key_checks_links_and_says_so(tmp_path: Path) -> None:
    log = written_log(tmp_path / "audit.jsonl")
    result = verify(log, key=None)
    assert result.ok and "MACs NOT checked" in result.message
    text = log.read_text().splitlines()
    del text[3]
    log.write_text("\n".join(text) + "\n")
    assert "missing: deleted" in verify(log, key=None).message


def test_the_writer_reads_the_whole_last_line_however_long(tmp_path: Path) -> None:
    """Row 5 of issue 25: a 100 KB record last (the old reader saw its last 64 KiB only)."""
    log = tmp_path / "audit.jsonl"
    writer = AuditLog(log, key=KEY)
    writer.start()
    writer.record(event(0, request_id="x" * 100_000))
    writer.close()
    text = log.read_text()
    log.write_text(text[: text.rindex('{"seq"')])  # the stop record gone: the long one is last
    written_log(log, 1)
    result = verify(log, key=KEY)
    assert result.ok, result.message
    assert [r["kind"] for r in lines(log)] == ["start", "call", "start", "call", "stop"]


def test_a_start_after_an_edited_last_line_writes_a_break_not_a_link(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    log = written_log(tmp_path / "audit.jsonl")
    text = log.read_text().splitlines()
    text[-1] = text[-1].replace('"kind":"stop"', '"kind":"stip"')
    log.write_text("\n".join(text) + "\n")
    with caplog.at_level(logging.ERROR, logger="medserve.server.audit"):
        written_log(log, 1)
    assert "the last line did not verify" in caplog.text
    after = lines(log)[len(text):]
    assert after[0]["kind"] == "break" and after[0]["seq"] == 1 and after[0]["prev"] == GENESIS
    result = verify(log, key=KEY)
    assert "break record" in result.message and "record 7 fails its MAC" in result.message


def test_a_start_after_a_cut_off_last_line_breaks_on_a_line_of_its_own(tmp_path: Path) -> None:
    """A power loss can leave half a line: the next start neither links to it nor glues onto it."""
    log = written_log(tmp_path / "audit.jsonl")
    text = log.read_text()
    log.write_text(text[:-30])  # the stop record cut off, no end of line
    written_log(log, 1)
    raw = log.read_text().splitlines()
    assert json.loads(raw[7])["kind"] == "break" and "no end of line" not in raw[6]
    result = verify(log, key=KEY)
    assert "not a JSON object" in result.message and "break record" in result.message
    assert "(cut off)" in json.loads(raw[7])["reason"] or "not a JSON object" in json.loads(raw[7])["reason"]


def test_rotation_keeps_every_file_unless_a_retention_is_given(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for _ in range(2):  # a restart continues the chain of what is there
        writer = AuditLog(log, key=KEY, max_bytes=1500)
        writer.start()
        for i in range(20):
            writer.record(event(i))
            if i % 3 == 0:
                wait_for(lambda w=writer, n=i + 1: w.written >= n)  # several write batches: several rotations
        writer.close()
    rotated = sorted(p.name for p in tmp_path.glob("audit.jsonl.*"))
    assert len(rotated) >= 8
    result = verify(log, key=KEY)
    assert result.ok and result.calls == 40, result.message
    assert lines(tmp_path / rotated[0])[0]["kind"] == "rotate"
    assert lines(tmp_path / f"audit.jsonl.{len(rotated)}")[0]["kind"] == "start"  # the oldest: nothing deleted


def test_a_retention_gap_is_told_from_deleted_first_lines(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    writer = AuditLog(log, key=KEY, max_bytes=1500, retention=2)
    writer.start()
    for i in range(30):
        writer.record(event(i))
        wait_for(lambda w=writer, n=i + 1: w.written >= n)
    writer.close()
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl.*")) == ["audit.jsonl.1", "audit.jsonl.2"]
    result = verify(log, key=KEY)
    assert result.ok and "removed by retention (2 rotated files kept)" in result.message, result.message
    oldest = tmp_path / "audit.jsonl.2"
    oldest.write_text("\n".join(oldest.read_text().splitlines()[2:]) + "\n")
    result = verify(log, key=KEY)
    assert not result.ok and "the first lines were deleted" in result.message


def test_a_deleted_rotated_file_is_found_when_the_writer_kept_all(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    writer = AuditLog(log, key=KEY, max_bytes=1500)
    writer.start()
    for i in range(12):
        writer.record(event(i))
        wait_for(lambda w=writer, n=i + 1: w.written >= n)
    writer.close()
    oldest = max(tmp_path.glob("audit.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    oldest.unlink()
    result = verify(log, key=KEY)
    assert not result.ok and "its writer kept every rotated file" in result.message


class FailingDisk:
    """os.write as a filling disk does it while `full` is set: the first write is short (7
    bytes), the next ones fail with ENOSPC; the writer must resume exactly after those bytes."""

    def __init__(self) -> None:
        self.full = threading.Event()
        self.short_writes = 0

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full.is_set():
            if self.short_writes == 0 and len(data) > 7:
                self.short_writes += 1
                return os.write(fd, data[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


def test_failed_writes_keep_records_pending_refuse_new_calls_and_resume(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    disk = FailingDisk()
    health: list[bool] = []
    writer = AuditLog(log, key=KEY, write=disk, on_health=health.append)
    writer.start()
    writer.record(event(0))
    wait_for(lambda: writer.written == 1)
    disk.full.set()
    writer.record(event(1))
    # The writer thread turns `healthy` and then tells its observer: wait for both.
    wait_for(lambda: not writer.healthy and health == [False])
    assert not writer.admit()
    writer.record(event(2))  # a call admitted before the failure was seen
    disk.full.clear()
    wait_for(lambda: writer.healthy and writer.written == 3 and health == [False, True], timeout_s=5)
    assert writer.admit() and disk.short_writes == 1
    writer.close()
    result = verify(log, key=KEY)
    assert result.ok and result.calls == 3, result.message
    assert [r["request_id"] for r in calls(log)] == ["r0", "r1", "r2"]


def test_an_unexpected_writer_error_fails_closed_rather_than_killing_the_writer(tmp_path: Path) -> None:
    broken = threading.Event()

    def write(fd: int, data: bytes) -> int:
        if broken.is_set():
            raise RuntimeError("a bug")
        return os.write(fd, data)

    writer = AuditLog(tmp_path / "audit.jsonl", key=KEY, write=write)
    writer.start()
    broken.set()
    writer.record(event(0))
    wait_for(lambda: not writer.healthy)
    assert not writer.admit()
    broken.clear()
    wait_for(lambda: writer.healthy and writer.written == 1, timeout_s=5)
    writer.close()
    assert verify(tmp_path / "audit.jsonl", key=KEY).ok


def test_a_log_that_cannot_be_written_at_start_is_not_healthy(tmp_path: Path) -> None:
    writer = AuditLog(Path("/dev/full"), key=KEY)
    writer.start()
    assert not writer.healthy and not writer.admit()
    writer.close()


def test_the_checkpoint_is_logged_every_period_and_on_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    log = tmp_path / "audit.jsonl"
    writer = AuditLog(log, key=KEY, checkpoint_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="medserve.server.audit"):
        writer.start()
        writer.record(event(0))
        wait_for(lambda: writer.written == 1)
        assert "audit checkpoint" not in caplog.text
        now[0] += 60.0
        wait_for(lambda: "audit checkpoint" in caplog.text)
        first = [r for r in caplog.records if r.getMessage().startswith("audit checkpoint")][0]
        assert first.getMessage() == f"audit checkpoint file=audit.jsonl count=2 head={lines(log)[1]['mac']}"
        assert (first.audit_count, first.audit_head) == (2, lines(log)[1]["mac"])  # type: ignore[attr-defined]
        writer.close()
    last = [r for r in caplog.records if r.getMessage().startswith("audit checkpoint")][-1]
    stop = lines(log)[-1]
    assert stop["kind"] == "stop" and (last.audit_count, last.audit_head) == (stop["seq"], stop["mac"])  # type: ignore[attr-defined]
    assert verify(log, key=KEY, checkpoint=(stop["seq"], stop["mac"])).ok


def test_a_full_buffer_refuses_new_calls_instead_of_dropping_records(tmp_path: Path) -> None:
    writer = AuditLog(tmp_path / "audit.jsonl", key=KEY, max_pending=3)  # not started: nothing drains
    for i in range(3):
        assert writer.admit()
        writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id=str(i)))
    assert not writer.admit()  # the gate answers UNAVAILABLE
    writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id="admitted earlier"))
    writer.start()
    writer.close()
    assert [r["request_id"] for r in calls(tmp_path / "audit.jsonl")] == ["0", "1", "2", "admitted earlier"]


def test_keygen_writes_an_owner_only_key_and_never_overwrites(tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    assert len(load_key(tmp_path / "k")) == 32
    with pytest.raises(InvalidSetting, match="exists; not overwritten"):
        keygen(tmp_path / "k")
    (tmp_path / "bad").write_text("not hex\n")
    with pytest.raises(InvalidSetting, match="expected 64 hex digits"):
        load_key(tmp_path / "bad")


def test_an_audit_log_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    from medserve.server.config import ServerConfig

    with pytest.raises(InvalidSetting, match="needs --audit-key FILE.*medserve audit keygen FILE"):
        ServerConfig(repository=str(tmp_path), audit_log=str(tmp_path / "a"))


@settings(max_examples=300, deadline=None)
@given(identity=st.text(), peer=st.text(max_size=40), request_id=st.text(), model=st.text(max_size=20),
       latency_ms=st.floats(min_value=0, max_value=1e7, allow_nan=False), rows=st.integers(0, 1 << 40),
       time_unix=st.floats(min_value=0, max_value=4e9, allow_nan=False), seq=st.integers(1, 1 << 40))
def test_a_record_is_exactly_what_the_json_encoder_writes(identity: str, peer: str, request_id: str, model: str,
                                                         latency_ms: float, rows: int, time_unix: float,
                                                         seq: int) -> None:
    """The writer builds lines by hand (for speed): any text a caller controls (identity, peer,
    request id) is escaped exactly as json.dumps escapes it, and the line parses back."""
    e = AuditEvent(time_unix, identity, peer, "ModelInfer", "OK", latency_ms, model, "1", "ab" * 32, rows,
                   request_id)
    stamps = _Stamps()
    body = _body(e, seq, "0" * 64, stamps)
    record = {"seq": seq, "kind": "call", "time": stamps(time_unix), "identity": identity, "peer": peer,
              "rpc": "ModelInfer", "model": model, "version": "1", "model_sha256": "ab" * 32, "status": "OK",
              "rows": rows, "latency_ms": round(latency_ms, 3), "request_id": request_id, "count": 1,
              "prev": "0" * 64}
    assert body + "}" == json.dumps(record, separators=(",", ":"), ensure_ascii=True)
    assert json.loads(body + "}") == record
    assert "\n" not in body


@given(time_unix=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamps_are_utc_iso_8601_with_milliseconds(time_unix: float) -> None:
    stamp = _Stamps()(time_unix)
    parsed = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    assert 0 <= time_unix - parsed.timestamp() < 1e-3 + 1e-6


@pytest.mark.parametrize("fsync", [False, True])
def test_audit_fsync_syncs_every_write_to_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fsync: bool) -> None:
    """`--audit-fsync` reaches the writer, and the writer then syncs the file after each write
    (a spy around the real os.fsync counts the calls on the log's own descriptor)."""
    from medserve.server import audit as audit_module
    from medserve.server.cli import _server_config, build_parser

    args = build_parser().parse_args(["serve", "--repository", str(tmp_path), "--audit-log", str(tmp_path / "a"),
                                      "--audit-key", str(tmp_path / "k"), *(["--audit-fsync"] if fsync else [])])
    config = _server_config(args)
    assert config.audit_fsync is fsync
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(audit_module.os, "fsync", spy)
    writer = AuditLog(tmp_path / "audit.jsonl", key=KEY, fsync=config.audit_fsync)
    writer.start()
    for i in range(3):
        writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id=str(i)))
        wait_for(lambda w=writer, n=i + 1: w.written >= n)  # one write each
    writer.close()
    assert len(synced) == (5 if fsync else 0)  # the start record, three calls, the stop record
    assert [r["request_id"] for r in calls(tmp_path / "audit.jsonl")] == ["0", "1", "2"]


def test_the_cli_needs_a_key_to_serve_or_verify_and_says_what_it_did_not_check(tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "medserve.server.cli", *args], capture_output=True, text=True,
                              timeout=60, check=False)

    served = cli("serve", "--repository", str(tmp_path), "--audit-log", str(tmp_path / "a.jsonl"))
    assert served.returncode == 2 and served.stderr.count("\n") == 1
    assert "needs --audit-key FILE" in served.stderr and "medserve audit keygen FILE" in served.stderr
    log = written_log(tmp_path / "audit.jsonl")
    (tmp_path / "k").write_text(KEY.hex() + "\n")
    assert cli("audit", "verify", str(log)).returncode == 2  # no key, and not asked for structure only
    structure = cli("audit", "verify", str(log), "--structure-only")
    assert structure.returncode == 0 and "MACs NOT checked (no --key)" in structure.stdout
    keyed = cli("audit", "verify", str(log), "--key", str(tmp_path / "k"))
    assert keyed.returncode == 0 and "7 records (5 calls), chain intact" in keyed.stdout


@pytest.mark.parametrize(("mode", "group", "warned"), [
    (0o600, "ours", False),
    (0o440, "ours", False),  # a Kubernetes Secret mounted 0440 with the pod's fsGroup
    (0o440, "other", True),
    (0o604, "ours", True),
])
def test_the_key_is_warned_about_when_someone_else_can_read_it(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              mode: int, group: str, warned: bool) -> None:
    key = tmp_path / "audit.key"
    keygen(key)
    if group == "other":
        others = [g for g in range(1, 65534) if g != os.getegid() and g not in os.getgroups()]
        os.chown(key, -1, others[0])
    os.chmod(key, mode)
    with caplog.at_level(logging.WARNING, logger="medserve.server.audit"):
        load_key(key)
    assert ("readable by others" in caplog.text) is warned
