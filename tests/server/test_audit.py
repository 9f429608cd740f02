"""The audit trail: one JSON line per inference, administrative and refused call, with who, what
and the outcome but never a value; a hash chain that `medserve audit verify` checks (a deleted
or edited line is found); rotation that keeps the chain; nothing dropped when the writer is behind."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw
from medserve.server.audit import AuditEvent, AuditLog, _line, _Stamps, verify
from medserve.server.identities import IdentityFile

import onnx_models
from conftest import running_server, wait_for

SENTINEL = 987654.25


def request(model: str, x: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_inference_admin_and_refused_calls_leave_one_record_each(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "sepsis" / "1" / "model.onnx")
    ids = IdentityFile.load(tmp_path / "ids.json")
    ward, ops = ids.add("ward", ["sepsis"]), ids.add("ops", ["*"], admin=True)
    ids.save()
    log = tmp_path / "audit" / "audit.jsonl"
    with running_server(repo, tokens_file=str(tmp_path / "ids.json"), audit_log=str(log),
                        model_control_mode="explicit", load_models=("*",)) as server:
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
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 4)
    records = lines(log)
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
    assert str(SENTINEL) not in log.read_text() and "987654" not in log.read_text()
    assert verify(log).ok


def test_verify_finds_a_deleted_or_edited_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    writer = AuditLog(log)
    writer.start()
    for i in range(5):
        writer.record(AuditEvent(1.7e9 + i, "ward", "ipv4:127.0.0.1:1", "ModelInfer", "OK", 1.0, "m", "1", "a" * 64, 1,
                                 f"r{i}"))
    writer.close()
    assert verify(log).ok and verify(log).lines == 5
    original = log.read_text().splitlines()
    log.write_text("\n".join(original[:2] + original[3:]) + "\n")  # line 3 deleted
    result = verify(log)
    assert not result.ok and f"{log}:3" in result.message
    edited = list(original)
    edited[1] = edited[1].replace('"status":"OK"', '"status":"DENIED"')
    log.write_text("\n".join(edited) + "\n")
    assert not verify(log).ok
    done = subprocess.run([sys.executable, "-m", "medserve.server.cli", "audit", "verify", str(log)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "chain is broken" in done.stderr


def test_rotation_keeps_the_chain_and_the_retention(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for _ in range(2):  # a restart continues the chain of what is there
        writer = AuditLog(log, max_bytes=600, retention=3)
        writer.start()
        for i in range(20):
            writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id=str(i)))
            if i % 3 == 0:
                wait_for(lambda w=writer, n=i + 1: w.written >= n)  # several write batches: several rotations
        writer.close()
    rotated = sorted(p.name for p in tmp_path.glob("audit.jsonl.*"))
    assert rotated == ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    result = verify(log)
    assert result.ok, result.message


def test_a_full_buffer_refuses_new_calls_instead_of_dropping_records(tmp_path: Path) -> None:
    writer = AuditLog(tmp_path / "audit.jsonl", max_pending=3)  # not started: nothing drains
    for i in range(3):
        assert writer.admit()
        writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id=str(i)))
    assert not writer.admit()  # the gate answers UNAVAILABLE
    writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id="admitted earlier"))
    writer.start()
    writer.close()
    assert [r["request_id"] for r in lines(tmp_path / "audit.jsonl")] == ["0", "1", "2", "admitted earlier"]


@settings(max_examples=300, deadline=None)
@given(identity=st.text(), peer=st.text(max_size=40), request_id=st.text(), model=st.text(max_size=20),
       latency_ms=st.floats(min_value=0, max_value=1e7, allow_nan=False), rows=st.integers(0, 1 << 40),
       time_unix=st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_a_record_is_exactly_what_the_json_encoder_writes(identity: str, peer: str, request_id: str, model: str,
                                                         latency_ms: float, rows: int, time_unix: float) -> None:
    """The writer builds lines by hand (for speed): any text a caller controls (identity, peer,
    request id) is escaped exactly as json.dumps escapes it, and the line parses back."""
    event = AuditEvent(time_unix, identity, peer, "ModelInfer", "OK", latency_ms, model, "1", "ab" * 32, rows,
                       request_id)
    stamps = _Stamps()
    line = _line(event, "0" * 64, stamps)
    record = {"time": stamps(time_unix), "identity": identity, "peer": peer, "rpc": "ModelInfer", "model": model,
              "version": "1", "model_sha256": "ab" * 32, "status": "OK", "rows": rows,
              "latency_ms": round(latency_ms, 3), "request_id": request_id, "count": 1, "prev": "0" * 64}
    assert line == json.dumps(record, separators=(",", ":"), ensure_ascii=True)
    assert json.loads(line) == record
    assert "\n" not in line


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
    import os

    from medserve.server import audit as audit_module
    from medserve.server.cli import _server_config, build_parser

    args = build_parser().parse_args(["serve", "--repository", str(tmp_path), "--audit-log", str(tmp_path / "a"),
                                      *(["--audit-fsync"] if fsync else [])])
    config = _server_config(args)
    assert config.audit_fsync is fsync
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(audit_module.os, "fsync", spy)
    writer = AuditLog(tmp_path / "audit.jsonl", fsync=config.audit_fsync)
    writer.start()
    for i in range(3):
        writer.record(AuditEvent(1.7e9, "w", "p", "ModelInfer", "OK", 0.5, request_id=str(i)))
        wait_for(lambda w=writer, n=i + 1: w.written >= n)  # one write each
    writer.close()
    assert len(synced) == (3 if fsync else 0)
    assert [r["request_id"] for r in lines(tmp_path / "audit.jsonl")] == ["0", "1", "2"]
