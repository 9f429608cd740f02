"""An audit trail that holds (issue #25, rows 3 [rotation], 4, 5, 6, 7), against real servers
and the real `medserve audit verify` command.

What each test attacks, and what the code before answered:
- row 4: edited copies of a real server's audit file (last line edited, a forged line appended,
  the first 3 lines deleted, a middle line deleted with the chain recomputed, truncation to 0
  bytes and to an earlier line, a non-ASCII byte) were all "chain intact" (exit 0) or a
  traceback; after an edit of the last line and a restart, the server chained onto the edit.
- row 5: a 100 KB request id as the last record, restart, one call: "the chain is broken".
- row 6: `--audit-log /dev/full`: 50 inferences answered OK with no record written.
- row 7: `--workers 2 --audit-log F`: two chains interleaved in one file, "chain broken".
- row 3: rotation with a retention deleted the real record (here: more rotations than the old
  default retention of 10 kept).
Also: writes that start failing on a running server (a file size limit set on the process with
prlimit, a real EFBIG from the kernel) refuse new calls and report not ready, and service resumes
with every record written when the limit is lifted.
"""
from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medserve.perf.serverproc import start_process
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw
from medserve.server.audit import AuditEvent, AuditLog, keygen, load_key

import onnx_models
from conftest import running_server, wait_for

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own connection


def request(request_id: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="sepsis", id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(to_raw(np.ones((1, 4), np.float32)))
    return req


def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "sepsis" / "1" / "model.onnx")
    return repo


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medserve.server.cli", "audit", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def serve_cmd(repo: Path, ready: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "medserve.server.cli", "serve", "--repository", str(repo), "--port", "0",
            "--ready-file", str(ready), *args]


def checkpoints(server_log: str) -> dict[str, tuple[int, str]]:
    """The last checkpoint the server logged for each audit file: {file: (count, head)}."""
    found = {}
    for m in re.finditer(r"audit checkpoint file=(\S+) count=(\d+) head=([0-9a-f]{64})", server_log):
        found[m.group(1)] = (int(m.group(2)), m.group(3))
    return found


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def serve_and_call(tmp_path: Path, key: Path, audit: Path, ids: list[str], name: str) -> str:
    """Start `medserve serve` with the audit trail on, make one inference per id, stop it
    (SIGTERM: drain); the server's log."""
    ready, log = tmp_path / f"{name}.ready", tmp_path / f"{name}.log"
    cmd = serve_cmd(repository(tmp_path), ready, "--audit-log", str(audit), "--audit-key", str(key))
    with start_process(cmd, ready, log) as handle, grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request_id in ids:
            stub.ModelInfer(request(request_id), timeout=30)
    return log.read_text()


def forge(line: str, **changes: object) -> str:
    """A record changed and re-sealed as someone without the key would: a MAC under a guess."""
    from medserve.server.audit import mac_of

    record = {k: v for k, v in json.loads(line).items() if k != "mac"} | changes
    body = json.dumps(record, separators=(",", ":"))[:-1]
    return f'{body},"mac":"{mac_of(b"guess" * 8, body)}"}}'


def test_verify_detects_each_edit_of_a_real_servers_log_with_its_own_message(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    assert audit_cli("keygen", str(key)).returncode == 0
    audit = tmp_path / "audit.jsonl"
    server_log = serve_and_call(tmp_path, key, audit, [f"enc-{i}" for i in range(6)], "first")
    count, head = checkpoints(server_log)["audit.jsonl"]
    lines = audit.read_text().splitlines()
    assert len(lines) == count == 8  # start, 6 calls, stop

    def attack(name: str, changed: list[str] | bytes) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / name / "audit.jsonl"
        copy.parent.mkdir()
        copy.write_bytes(changed if isinstance(changed, bytes) else ("\n".join(changed) + "\n").encode())
        return audit_cli("verify", str(copy), "--key", str(key), "--expect-count", str(count), "--expect-head", head)

    intact = audit_cli("verify", str(audit), "--key", str(key), "--expect-count", str(count), "--expect-head", head)
    assert intact.returncode == 0 and "8 records (6 calls), chain intact" in intact.stdout, intact.stderr

    def recomputed() -> list[str]:  # line 4 deleted, seq and links recomputed after it, MACs guessed
        out = lines[:3]
        for line in lines[4:]:
            out.append(forge(line, seq=len(out) + 1, prev=json.loads(out[-1])["mac"]))
        return out

    cases = {
        "last_edited": (lines[:-1] + [lines[-1].replace('"kind":"stop"', '"kind":"call"')],
                        "record 8 fails its MAC: it was edited"),
        "forged_append": (lines + [forge(lines[-2], seq=9, prev=json.loads(lines[-1])["mac"])],
                          "record 9, after the checkpoint's head (record 8), fails its MAC: forged and appended"),
        "first_3_deleted": (lines[3:], "the chain starts at record 4, not at a start or rotation record: "
                                       "the first lines were deleted"),
        "middle_deleted_recomputed": (recomputed(), "every record from here on (4) fails its MAC: the chain from "
                                                    "here was rewritten without the key"),
        "truncated_to_0": (b"", "empty (0 bytes): truncated"),
        "truncated_to_line_5": (lines[:5], "the chain ends at record 5, the checkpoint says 8: truncated"),
        "non_ascii": (("\n".join(lines[:2] + [lines[2].replace("enc-1", "enc-\u00e9")] + lines[3:]) + "\n")
                      .encode("latin-1"), "bad bytes (a non-ASCII byte at column"),
    }
    messages = set()
    for name, (changed, expected) in cases.items():
        done = attack(name, changed)
        assert done.returncode == 1, f"{name}: exit {done.returncode}: {done.stdout} {done.stderr}"
        assert expected in done.stderr, f"{name}: {done.stderr}"
        assert "Traceback" not in done.stderr
        messages.add(expected)
    assert len(messages) == len(cases)


def test_a_restart_after_an_edited_last_line_records_a_break_instead_of_chaining_onto_it(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    keygen(key)
    audit = tmp_path / "audit.jsonl"
    serve_and_call(tmp_path, key, audit, ["enc-1", "enc-2"], "first")
    lines = audit.read_text().splitlines()
    edited = lines[:-1]  # as if the server had been killed: the last call record is last ...
    edited[-1] = edited[-1].replace('"request_id":"enc-2"', '"request_id":"enc-9"')  # ... and it is edited
    audit.write_text("\n".join(edited) + "\n")
    server_log = serve_and_call(tmp_path, key, audit, ["enc-3"], "second")
    assert re.search(r"ERROR .*audit log .*the last line did not verify", server_log)
    after = records(audit)[len(edited)]
    assert after["kind"] == "break" and after["seq"] == 1 and after["prev"] == "0" * 64
    done = audit_cli("verify", str(audit), "--key", str(key))
    assert done.returncode == 1
    assert "record 3 fails its MAC" in done.stderr and "break record" in done.stderr, done.stderr


def test_a_100_kb_last_record_is_read_whole_at_restart(tmp_path: Path) -> None:
    """Row 5: the writer had read only the last 64 KiB of the file; the chain then 'broke'."""
    key = tmp_path / "audit.key"
    keygen(key)
    audit = tmp_path / "audit.jsonl"
    writer = AuditLog(audit, key=load_key(key))  # a server that wrote a 100 KB request id last
    writer.start()
    writer.record(AuditEvent(time.time(), "ward", "ipv4:127.0.0.1:1", "ModelInfer", "OK", 1.0,
                             request_id="x" * 100_000))
    writer.close()
    text = audit.read_text()
    audit.write_text(text[: text.rindex('{"seq"')])  # no stop record: the 100 KB one is last
    server_log = serve_and_call(tmp_path, key, audit, ["enc-1"], "restart")
    assert "did not verify" not in server_log
    count, head = checkpoints(server_log)["audit.jsonl"]
    done = audit_cli("verify", str(audit), "--key", str(key), "--expect-count", str(count), "--expect-head", head)
    assert done.returncode == 0 and "(2 calls), chain intact" in done.stdout, done.stderr


def test_an_unwritable_audit_log_answers_no_call_ok_and_reports_not_ready(tmp_path: Path) -> None:
    """Row 6: `--audit-log /dev/full` (every write fails, ENOSPC)."""
    key = tmp_path / "audit.key"
    keygen(key)
    with running_server(repository(tmp_path), audit_log="/dev/full", audit_key=str(key), metrics_port=0) as server:
        stub = server.stub()
        codes = []
        for i in range(50):
            try:
                stub.ModelInfer(request(f"enc-{i}"), timeout=10)
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
        assert codes == ["UNAVAILABLE"] * 50
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/v2/health/ready", timeout=10)
        assert http.value.code == 503
        http.value.close()


def test_over_rest_an_unwritable_audit_log_answers_no_call_ok_and_reports_not_ready(tmp_path: Path) -> None:
    """Row 6 over the KServe V2 REST front end: `--audit-log /dev/full`, and every inference,
    JSON or binary, is refused 503 (UNAVAILABLE, the gate's refusal), never answered 200
    without its record; readiness says 503 on the REST port too."""
    key = tmp_path / "audit.key"
    keygen(key)
    with running_server(repository(tmp_path), audit_log="/dev/full", audit_key=str(key), http_port=0) as server:
        base = f"http://127.0.0.1:{server.server.http_port}/v2"
        json_body = json.dumps({"id": "enc", "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()
        header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                         "parameters": {"binary_data_size": 16}}]}).encode()
        binary_body = header + np.ones((1, 4), np.float32).tobytes()
        answers = []
        for i in range(40):
            binary = i % 2 == 1
            headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
            if binary:
                headers["Inference-Header-Content-Length"] = str(len(header))
            post = urllib.request.Request(f"{base}/models/sepsis/infer", data=binary_body if binary else json_body,
                                          headers=headers, method="POST")
            try:
                with urllib.request.urlopen(post, timeout=10) as answer:
                    answers.append((answer.status, ""))
            except urllib.error.HTTPError as err:
                answers.append((err.code, json.loads(err.read()).get("error", "")))
                err.close()
        assert [code for code, _ in answers] == [503] * 40
        assert all("audit trail is behind" in message for _, message in answers), answers[0]
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"{base}/health/ready", timeout=10)
        assert ready.value.code == 503
        ready.value.close()
        with urllib.request.urlopen(f"{base}/health/live", timeout=10) as live:  # alive, only not ready
            assert live.status == 200


def test_writes_that_start_failing_refuse_calls_until_they_succeed_and_lose_no_record(tmp_path: Path) -> None:
    """A running server whose audit file may not grow (RLIMIT_FSIZE set on it with prlimit: the
    kernel's EFBIG, after a short write): new calls UNAVAILABLE, not ready; the limit lifted,
    it serves again and every record of a call answered OK is in the file."""
    key = tmp_path / "audit.key"
    keygen(key)
    audit, ready = tmp_path / "audit.jsonl", tmp_path / "ready.json"
    cmd = serve_cmd(repository(tmp_path), ready, "--audit-log", str(audit), "--audit-key", str(key))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # a pipe: no file size limit
    output: list[bytes] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    answered: dict[str, str] = {}
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout_s=120)
        assert proc.poll() is None, b"".join(output).decode(errors="replace")
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def call(request_id: str) -> str:
                try:
                    stub.ModelInfer(request(request_id), timeout=10)
                    answered[request_id] = "OK"
                except grpc.RpcError as err:
                    answered[request_id] = err.code().name
                return answered[request_id]

            for i in range(3):
                assert call(f"before-{i}") == "OK"
            wait_for(lambda: len([r for r in records(audit) if r["kind"] == "call"]) == 3)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (audit.stat().st_size + 100, hard))
            deadline = time.monotonic() + 10
            i = 0
            while call(f"during-{i}") == "OK":  # calls admitted before the writer saw the failure
                i += 1
                assert time.monotonic() < deadline, "writes fail but calls are still answered OK"
            assert answered[f"during-{i}"] == "UNAVAILABLE"
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert call("refused") == "UNAVAILABLE"
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
            wait_for(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready, timeout_s=5)
            assert call("after") == "OK"
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
        proc.stdout.close()  # type: ignore[union-attr]
    server_log = b"".join(output).decode(errors="replace")
    assert "write failed" in server_log and "writes succeed again" in server_log
    count, head = checkpoints(server_log)["audit.jsonl"]
    done = audit_cli("verify", str(audit), "--key", str(key), "--expect-count", str(count), "--expect-head", head)
    assert done.returncode == 0, done.stderr
    in_file = {r["request_id"] for r in records(audit) if r["kind"] == "call" and r["status"] == "OK"}
    assert {rid for rid, code in answered.items() if code == "OK"} == in_file


def test_two_workers_write_two_chains_verified_together(tmp_path: Path) -> None:
    """Row 7: `--workers 2 --audit-log F`, 24 calls over 8 connections."""
    key = tmp_path / "audit.key"
    keygen(key)
    audit, ready, log = tmp_path / "audit.jsonl", tmp_path / "ready.json", tmp_path / "server.log"
    cmd = serve_cmd(repository(tmp_path), ready, "--workers", "2", "--audit-log", str(audit), "--audit-key", str(key))
    with start_process(cmd, ready, log) as handle:
        for c in range(8):
            with grpc.insecure_channel(handle.address, options=OWN_CONNECTION) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for i in range(3):
                    stub.ModelInfer(request(f"c{c}-{i}"), timeout=30)
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*")) == ["audit.jsonl.w0", "audit.jsonl.w1"]
    found = checkpoints(log.read_text())
    pairs = [arg for name in ("audit.jsonl.w0", "audit.jsonl.w1")
             for arg in ("--expect-count", str(found[name][0]), "--expect-head", found[name][1])]
    done = audit_cli("verify", str(audit), "--key", str(key), *pairs)
    assert done.returncode == 0, done.stderr
    assert "2 chains intact" in done.stdout and "(24 calls)" in done.stdout, done.stdout


def test_rotation_keeps_the_real_record_however_many_rotations_follow(tmp_path: Path) -> None:
    """Row 3 (rotation): many more rotations than the old default retention (10 files) kept."""
    key = tmp_path / "audit.key"
    keygen(key)
    audit = tmp_path / "audit.jsonl"
    with running_server(repository(tmp_path), audit_log=str(audit), audit_key=str(key),
                        audit_max_bytes=1024) as server:
        stub = server.stub()
        stub.ModelInfer(request("the-real-one"), timeout=10)
        for i in range(200):  # ten at a time, each ten written before the next: 20 batches, 20 rotations
            stub.ModelInfer(request(f"filler-{i}"), timeout=10)
            if i % 10 == 9:
                wait_for(lambda n=i + 2: server.server.audit.written >= n)
    rotated = list(tmp_path.glob("audit.jsonl.*"))
    assert len(rotated) > 11
    assert any("the-real-one" in p.read_text() for p in rotated)
    done = audit_cli("verify", str(audit), "--key", str(key))
    assert done.returncode == 0 and "(201 calls), chain intact" in done.stdout, done.stderr
