"""The gate under attack (issue #25, rows 3, 9, 12 and the certificate rule of 16), each against a
real server on a real port, checking both what the caller got and what the audit trail says.

Every refusal is recorded with the identity, request id and status the caller really got;
refusals of callers without credentials are counted per peer per second (a flood cannot fill
the trail); a rate limit counts stream messages; request ids are capped; a message over the
size limit, either way, is refused by the gate (RESOURCE_EXHAUSTED naming the limit) and audited.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw
from medserve.server.audit import AuditEvent
from medserve.server.config import ServerConfig
from medserve.server.gate import MAX_REQUEST_ID_CHARS, certificate_names, receive_limit
from medserve.server.identities import IdentityFile
from medserve.server.refusals import OTHER_PEERS, RefusalTally, peer_host

import onnx_models
from conftest import RunningServer, running_server, wait_for
from credentials import make_certs, make_client_cert

MIB = 1 << 20
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def audit_options(folder: Path) -> dict[str, Any]:
    """ServerConfig fields for an audit trail in `folder` (with a key when the server takes one)."""
    options: dict[str, Any] = {"audit_log": str(folder / "audit.jsonl")}
    if "audit_key" in ServerConfig.__dataclass_fields__:
        from medserve.server import audit

        audit.keygen(folder / "audit.key")  # type: ignore[attr-defined]
        options["audit_key"] = str(folder / "audit.key")
    return options


def records(log: Path) -> list[dict[str, Any]]:
    """Every audit record of the trail (its rotated files first), in order."""
    files = sorted(log.parent.glob(log.name + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    found = []
    for file in [*(f for f in files if f.suffix[1:].isdigit()), log]:
        if file.exists():
            found += [r for r in map(json.loads, file.read_text().splitlines()) if "rpc" in r]
    return found


def infer_request(model: str = "ward", rows: int = 1, request_id: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(to_raw(np.zeros((rows, 4), np.float32)))
    return req


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path, dict[str, str]]]:
    """One server: tokens, an audit trail, a 1 MiB message limit; identities `ward` (the `ward`
    model), `unary2` and `stream2` (rate-limited to 2/s, burst 2, each its own bucket)."""
    root = tmp_path_factory.mktemp("gate")
    for name in ("ward", "secret"):
        onnx_models.affine(root / "repo" / name / "1" / "model.onnx")
    ids = IdentityFile.load(root / "ids.json")
    tokens = {"ward": str(ids.add("ward", ["ward"]))}
    for name in ("unary2", "stream2"):
        tokens[name] = str(ids.add(name, ["ward"], rate_per_s=2, burst=2))
    ids.save()
    options = audit_options(root)
    with running_server(root / "repo", tokens_file=str(root / "ids.json"), max_message_bytes=MIB,
                        **options) as server:
        yield server, Path(options["audit_log"]), tokens


def test_a_stream_is_rate_limited_per_message_and_each_message_is_audited(gated: Any) -> None:
    """Row 9: an identity limited to 2/s sends one ModelStreamInfer of 200 requests. Before: 200
    OK in 0.11 s (the rate was taken once, when the stream opened)."""
    server, log, tokens = gated
    ids = [f"st-{i}" for i in range(200)]
    started = time.monotonic()
    responses = list(server.stub().ModelStreamInfer(iter([infer_request(request_id=i) for i in ids]),
                                                    metadata=bearer(tokens["stream2"]), timeout=30))
    elapsed_s = time.monotonic() - started
    codes = {r.infer_response.id: r.infer_response.parameters["status_code"].string_param or "OK" for r in responses}
    assert set(codes) == set(ids)
    ok = [i for i, c in codes.items() if c == "OK"]
    print(f"stream of 200 at 2/s: {len(ok)} OK, {200 - len(ok)} RESOURCE_EXHAUSTED in {elapsed_s:.2f} s")
    assert 1 <= len(ok) <= 2 + int(2 * elapsed_s) + 1  # the burst, plus what the bucket refilled meanwhile
    assert all(c == "RESOURCE_EXHAUSTED" for i, c in codes.items() if i not in ok)
    refused = next(r for r in responses if r.error_message)
    assert "'stream2' is over its rate limit" in refused.error_message
    wait_for(lambda: len([r for r in records(log) if r["identity"] == "stream2"]) >= 200)
    mine = [r for r in records(log) if r["identity"] == "stream2"]
    assert sorted((r["request_id"], r["status"]) for r in mine) == sorted(codes.items())
    assert {(r["rpc"], r["model"]) for r in mine} == {("ModelStreamInfer", "ward")}


def test_a_rate_limited_call_is_audited_with_its_identity_model_and_id(gated: Any) -> None:
    """Row 12: before, a rate-limited call was recorded as `anonymous`, without model or id."""
    server, log, tokens = gated
    stub = server.stub()
    got = [code_of(lambda i=i: stub.ModelInfer(infer_request(request_id=f"rl-{i}"), metadata=bearer(tokens["unary2"]),
                                               timeout=30))[0] for i in range(4)]
    assert got[:2] == [grpc.StatusCode.OK] * 2 and grpc.StatusCode.RESOURCE_EXHAUSTED in got[2:]
    wait_for(lambda: len([r for r in records(log) if r["request_id"].startswith("rl-")]) == 4)
    mine = {r["request_id"]: r for r in records(log) if r["request_id"].startswith("rl-")}
    for i, code in enumerate(got):
        r = mine[f"rl-{i}"]
        assert (r["identity"], r["model"], r["rpc"], r["status"]) == ("unary2", "ward", "ModelInfer", code.name)


def test_a_request_id_over_128_characters_is_refused_without_echo(gated: Any) -> None:
    """Row 3: a 1 MiB request id became a 1 MiB audit record; now it is refused INVALID_ARGUMENT
    naming the limit, before any tensor is decoded, unary and per stream message, and the record
    keeps 128 characters of it."""
    server, log, tokens = gated
    stub = server.stub()
    long_id = "ID-" + "x" * (MIB - 100)
    answers = {}
    for model in ("secret", "no_such_model", "ward"):  # a forbidden model answers as a missing one
        code, details = code_of(lambda m=model: stub.ModelInfer(infer_request(m, request_id=long_id),
                                                                 metadata=bearer(tokens["ward"]), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert f"longer than {MAX_REQUEST_ID_CHARS} characters" in details and "xxxx" not in details
        answers[model] = details
    assert answers["secret"] == answers["no_such_model"]
    exactly = "e" * MAX_REQUEST_ID_CHARS
    assert stub.ModelInfer(infer_request(request_id=exactly), metadata=bearer(tokens["ward"]), timeout=30).id == exactly
    streamed = list(stub.ModelStreamInfer(iter([infer_request(request_id=long_id), infer_request(request_id="fine")]),
                                          metadata=bearer(tokens["ward"]), timeout=30))
    by_id = {r.infer_response.id: r for r in streamed}
    assert set(by_id) == {"", "fine"}  # the long id is not echoed
    assert by_id[""].infer_response.parameters["status_code"].string_param == "INVALID_ARGUMENT"
    assert "xxxx" not in by_id[""].error_message and by_id["fine"].error_message == ""
    long_name = "M-" + "m" * (MIB - 100)  # a caller's model name is capped in its record too
    code, details = code_of(lambda: stub.ModelInfer(infer_request(long_name, request_id="long-name"),
                                                    metadata=bearer(tokens["ward"]), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) <= 1024
    wait_for(lambda: len([r for r in records(log) if r["request_id"].startswith("ID-")]) == 4)
    long_records = [r for r in records(log) if r["request_id"].startswith("ID-")]
    assert all(len(r["request_id"]) <= MAX_REQUEST_ID_CHARS + 3 for r in long_records)
    wait_for(lambda: any(r["request_id"] == "long-name" for r in records(log)))
    assert [len(r["model"]) for r in records(log) if r["request_id"] == "long-name"] == [MAX_REQUEST_ID_CHARS + 3]
    assert max(len(line) for line in log.read_text().splitlines()) < 2048


def test_a_malformed_stream_message_is_refused_in_band_and_audited(gated: Any) -> None:
    """Row 12: before, a traceback in the log and UNKNOWN to the caller; now INVALID_ARGUMENT in
    band, the stream goes on, and the record names the identity."""
    server, log, tokens = gated
    with grpc.insecure_channel(server.target) as channel:
        stream = channel.stream_stream(STREAM, request_serializer=None,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        bodies = [b"\x0a\xff\xff\xff\xff\x0f", infer_request(request_id="after-malformed").SerializeToString()]
        responses = list(stream(iter(bodies), metadata=bearer(tokens["ward"]), timeout=30))
    assert len(responses) == 2
    bad = next(r for r in responses if r.error_message)
    assert bad.infer_response.parameters["status_code"].string_param == "INVALID_ARGUMENT"
    assert "not a valid protobuf message" in bad.error_message
    assert any(r.infer_response.id == "after-malformed" and not r.error_message for r in responses)
    wait_for(lambda: any(r["request_id"] == "after-malformed" for r in records(log)))
    assert ("ModelStreamInfer", "ward", "INVALID_ARGUMENT", "") in {
        (r["rpc"], r["identity"], r["status"], r["request_id"]) for r in records(log)}


def test_unimplemented_and_unknown_methods_are_refused_and_audited(gated: Any) -> None:
    """Row 12: UNIMPLEMENTED methods were not audited (and methods outside the service were
    answered by gRPC, unseen). Strangers get UNAUTHENTICATED first."""
    server, log, tokens = gated
    stub = server.stub()
    code, _ = code_of(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(),
                                                            metadata=bearer(tokens["ward"]), timeout=30))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(server.target) as channel:
        for method in ("/inference.GRPCInferenceService/NoSuchMethod", "/other.Service/Call"):
            unknown = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            assert code_of(lambda u=unknown: u(b"", metadata=bearer(tokens["ward"]), timeout=30))[0] == \
                grpc.StatusCode.UNIMPLEMENTED
            assert code_of(lambda u=unknown: u(b"", timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
        health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                     response_deserializer=None)
        assert code_of(lambda: health(b"", timeout=30))[0] == grpc.StatusCode.OK  # still served, first
    expected = {("SystemSharedMemoryStatus", "UNIMPLEMENTED"), ("/inference.GRPCInferenceService/NoSuchMethod",
                "UNIMPLEMENTED"), ("/other.Service/Call", "UNIMPLEMENTED")}
    wait_for(lambda: expected <= {(r["rpc"], r["status"]) for r in records(log) if r["identity"] == "ward"})


def test_an_oversized_message_is_refused_by_the_gate_and_audited(gated: Any) -> None:
    """Row 12: a message over --max-message-mb was refused by gRPC before any handler, unaudited.
    Now one up to `receive_limit` is refused here (naming the limit) with identity, model and id
    in its record; one past it is still refused by gRPC (and not audited)."""
    server, log, tokens = gated
    stub = server.stub()
    over = infer_request(rows=(MIB + MIB // 4) // 16, request_id="big-1")
    assert MIB < over.ByteSize() < receive_limit(MIB)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(over, metadata=bearer(tokens["ward"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 1 MiB (--max-message-mb)" in info.value.details()
    assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"  # do not retry it
    streamed = list(stub.ModelStreamInfer(iter([over]), metadata=bearer(tokens["ward"]), timeout=30))
    assert streamed[0].infer_response.parameters["status_code"].string_param == "RESOURCE_EXHAUSTED"
    assert streamed[0].infer_response.id == "big-1"
    far_over = infer_request(rows=3 * MIB // 16, request_id="big-2")
    code, _ = code_of(lambda: stub.ModelInfer(far_over, metadata=bearer(tokens["ward"]), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # by gRPC itself
    wait_for(lambda: len([r for r in records(log) if r["request_id"] == "big-1"]) == 2)
    big = [r for r in records(log) if r["request_id"] == "big-1"]
    assert {(r["identity"], r["model"], r["status"]) for r in big} == {("ward", "ward", "RESOURCE_EXHAUSTED")}
    assert {r["rpc"] for r in big} == {"ModelInfer", "ModelStreamInfer"}


def test_a_response_over_the_send_limit_is_refused_and_audited_as_refused(gated: Any) -> None:
    """Row 12: before, the record said OK while gRPC refused the answer (RESOURCE_EXHAUSTED)."""
    server, log, tokens = gated
    stub = server.stub()
    request = infer_request(rows=int(0.9 * MIB) // 16, request_id="wide-answer")  # answer: 1.25 x the request
    assert request.ByteSize() < MIB
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=bearer(tokens["ward"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the response is over the message size limit of 1 MiB" in info.value.details()
    assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"  # it would run again
    streamed = list(stub.ModelStreamInfer(iter([request]), metadata=bearer(tokens["ward"]), timeout=30))
    assert streamed[0].infer_response.parameters["status_code"].string_param == "RESOURCE_EXHAUSTED"
    wait_for(lambda: len([r for r in records(log) if r["request_id"] == "wide-answer"]) == 2)
    assert {(r["status"], r["model"]) for r in records(log) if r["request_id"] == "wide-answer"} == {
        ("RESOURCE_EXHAUSTED", "ward")}


def test_a_forbidden_model_config_call_names_the_model_in_its_record(gated: Any) -> None:
    """Row 12: before, the record of a refused ModelConfig had an empty model field."""
    server, log, tokens = gated
    code, _ = code_of(lambda: server.stub().ModelConfig(pb.ModelConfigRequest(name="secret", version="1"),
                                                        metadata=bearer(tokens["ward"]), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND
    wait_for(lambda: any(r["rpc"] == "ModelConfig" for r in records(log)))
    record = next(r for r in records(log) if r["rpc"] == "ModelConfig")
    assert (record["identity"], record["model"], record["version"], record["status"]) == (
        "ward", "secret", "1", "NOT_FOUND")


FLOOD_CALLS = 3000


def flood_server(tmp_path: Path) -> tuple[Path, str, Path, dict[str, Any]]:
    """Row 3's setup: one model, one identity, a 1 MiB audit trail with one rotated file: the
    repository, the token, the trail and the server options."""
    onnx_models.affine(tmp_path / "repo" / "ward" / "1" / "model.onnx")
    ids = IdentityFile.load(tmp_path / "ids.json")
    token = str(ids.add("ward", ["ward"]))
    ids.save()
    options = audit_options(tmp_path)
    options.update(tokens_file=str(tmp_path / "ids.json"), audit_max_bytes=MIB, audit_retention=1)
    return tmp_path / "repo", token, Path(options["audit_log"]), options


def assert_flood_counted(log: Path, elapsed_s: float, transport: str, caplog: pytest.LogCaptureFixture) -> None:
    """The flood's ServerMetadata refusals add up to FLOOD_CALLS in at most two records a second,
    each naming the stranger's host and the transport; the one real call's record is kept; no
    INFO log line per refusal."""
    flood = [r for r in records(log) if r["rpc"] == "ServerMetadata"]
    print(f"{FLOOD_CALLS} unauthenticated calls ({transport}) in {elapsed_s:.2f} s: {len(flood)} records, "
          f"{log.stat().st_size} bytes of audit trail")
    assert sum(r["count"] for r in flood) == FLOOD_CALLS
    assert len(flood) <= 2 * (int(elapsed_s) + 2)  # at most two a second (the first at once, then the count)
    assert {(r["identity"], r["status"], r["peer"], r.get("transport", "grpc")) for r in flood} == {
        ("anonymous", "UNAUTHENTICATED", "ipv4:127.0.0.1", transport)}
    real = [r for r in records(log) if r["rpc"] == "ModelInfer"]
    assert [(r["request_id"], r["status"], r.get("transport", "grpc")) for r in real] == [
        ("the-real-one", "OK", transport)]
    assert not [r for r in caplog.records if "UNAUTHENTICATED" in r.getMessage() and r.levelno >= logging.INFO]


def test_a_flood_of_strangers_is_counted_and_cannot_push_a_real_record_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Row 3: `--audit-max-mb 1 --audit-retention 1`, one real call, then thousands of
    unauthenticated ServerMetadata calls: before, a line each (9,000 lines in 3 s pushed the real
    record out of both files). Now a handful of records whose counts add up to the calls, and
    no INFO log line per call either."""
    caplog.set_level(logging.INFO, logger="medserve")
    repo, token, log, options = flood_server(tmp_path)
    with running_server(repo, **options) as server:
        stub = server.stub()
        stub.ModelInfer(infer_request(request_id="the-real-one"), metadata=bearer(token), timeout=30)
        started = time.monotonic()
        for _ in range(FLOOD_CALLS // 500):
            futures = [stub.ServerMetadata.future(pb.ServerMetadataRequest(), timeout=30) for _ in range(500)]
            assert all(f.exception().code() == grpc.StatusCode.UNAUTHENTICATED for f in futures)  # type: ignore[union-attr]
        elapsed_s = time.monotonic() - started
    assert_flood_counted(log, elapsed_s, "grpc", caplog)


def test_a_flood_of_strangers_over_rest_is_counted_the_same_and_names_its_transport(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Row 3 over the second transport: thousands of unauthenticated REST calls on a kept-alive
    connection leave a handful of records whose counts add up to the calls, each naming
    `http`; the one real call's record survives the 1 MiB trail with one rotated file, and no
    INFO log line is written per call."""
    import http.client

    caplog.set_level(logging.INFO, logger="medserve")
    repo, token, log, options = flood_server(tmp_path)
    body = json.dumps({"id": "the-real-one", "inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}).encode()
    refused = 0
    with running_server(repo, http_port=0, **options) as server:
        port = server.server.http_port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v2/models/ward/infer", body, {"Authorization": f"Bearer {token}",
                                                                    "Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
        started = time.monotonic()
        for _ in range(FLOOD_CALLS):
            try:
                connection.request("GET", "/v2")
                answer = connection.getresponse()
                answer.read()
            except (http.client.HTTPException, ConnectionError):  # the server may close a connection
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("GET", "/v2")
                answer = connection.getresponse()
                answer.read()
            refused += answer.status == 401
        elapsed_s = time.monotonic() - started
        connection.close()
    assert refused == FLOOD_CALLS
    assert_flood_counted(log, elapsed_s, "http", caplog)


def test_refusal_tally_writes_the_first_at_once_and_then_one_count_per_second() -> None:
    now = [100.0]
    written: list[AuditEvent] = []
    tally = RefusalTally(written.append, clock=lambda: now[0], wall_clock=lambda: 1.7e9 + now[0], max_groups=2)
    for _ in range(5):
        tally.add("anonymous", "ipv4:10.0.0.1:5000", "ModelInfer", "UNAUTHENTICATED", 1.0)
    tally.add("anonymous", "ipv4:10.0.0.1:5001", "ModelInfer", "UNAUTHENTICATED", 3.0)  # another port, same peer
    assert [(e.peer, e.count) for e in written] == [("ipv4:10.0.0.1", 1)] and tally.pending
    assert tally.flush_ended() and len(written) == 1  # the second is not over: nothing more yet
    tally.add("anonymous", "ipv4:10.0.0.2:1", "ModelInfer", "UNAUTHENTICATED", 1.0)
    tally.add("anonymous", "ipv4:10.0.0.3:1", "ModelInfer", "UNAUTHENTICATED", 1.0)  # past max_groups: folded
    tally.add("anonymous", "ipv4:10.0.0.4:1", "ModelInfer", "UNAUTHENTICATED", 1.0)
    now[0] = 101.2
    assert not tally.flush_ended()
    assert [(e.peer, e.count, e.latency_ms) for e in written] == [
        ("ipv4:10.0.0.1", 1, 1.0), ("ipv4:10.0.0.2", 1, 1.0), (OTHER_PEERS, 1, 1.0), ("ipv4:10.0.0.1", 5, 3.0),
        (OTHER_PEERS, 1, 1.0)]
    assert peer_host("ipv6:[::1]:443") == "ipv6:[::1]" and peer_host("unix:/run/s") == "unix:/run/s"


def test_refusals_over_rest_are_counted_apart_and_name_their_transport() -> None:
    """The same stranger over gRPC and over REST: two groups, each record naming its transport
    (a counted REST flood must not read as gRPC calls in the audit trail)."""
    now = [100.0]
    written: list[AuditEvent] = []
    tally = RefusalTally(written.append, clock=lambda: now[0], wall_clock=lambda: 1.7e9 + now[0])
    for transport in ("grpc", "http", "http", "grpc", "http"):
        tally.add("anonymous", "ipv4:10.0.0.1:5000", "ModelInfer", "UNAUTHENTICATED", 1.0, transport)
    now[0] = 101.5
    tally.flush_ended()
    assert [(e.transport, e.count) for e in written] == [("grpc", 1), ("http", 1), ("grpc", 1), ("http", 2)]


def test_receive_limit_leaves_room_to_refuse_in_the_gate() -> None:
    assert receive_limit(MIB) == 2 * MIB and receive_limit(64 * MIB) == 72 * MIB
    assert receive_limit(2047 * MIB) == (1 << 31) - 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for test certificates")
def test_a_certificate_is_known_by_any_listed_subject_alternative_name(tmp_path: Path) -> None:
    """Row 16: a certificate whose first SAN is an e-mail address and whose next SAN is listed
    was refused (only the first SAN was looked up). Now any listed SAN, in order, then the CN."""
    certs = make_certs(tmp_path / "certs")
    mail_first = make_client_cert(tmp_path / "certs", "mailfirst", "gw common name",
                                  "email:ops@ward7.local,DNS:gw.ward7.local")
    cn_only = make_client_cert(tmp_path / "certs", "cnonly", "gw common name")
    stranger = make_client_cert(tmp_path / "certs", "stranger", "nobody", "DNS:nobody.local")
    onnx_models.affine(tmp_path / "repo" / "ward" / "1" / "model.onnx")
    (tmp_path / "ids.json").write_text(json.dumps({"version": 1, "identities": [
        {"name": "gateway", "certificate": "gw.ward7.local", "models": ["ward"]},
        {"name": "by-cn", "certificate": "gw common name", "models": ["ward"]},
    ]}))
    with running_server(tmp_path / "repo", tokens_file=str(tmp_path / "ids.json"), tls_cert=str(certs.server_cert),
                        tls_key=str(certs.server_key), tls_client_ca=str(certs.ca)) as server:
        def infer_as(cert: tuple[Path, Path]) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), cert[1].read_bytes(), cert[0].read_bytes())
            with grpc.secure_channel(f"localhost:{server.port}", creds) as channel:
                return code_of(lambda: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(),
                                                                                             timeout=30))[0]

        assert infer_as(mail_first) == grpc.StatusCode.OK
        assert infer_as(cn_only) == grpc.StatusCode.OK
        assert infer_as(stranger) == grpc.StatusCode.UNAUTHENTICATED
    names = {"x509_subject_alternative_name": [b"ops@ward7.local", b"gw.ward7.local"], "x509_common_name": [b"gw"]}
    assert certificate_names(names) == ["ops@ward7.local", "gw.ward7.local", "gw"]


class _Context:
    """What the gate reads of and writes to a call (a unit test of the gate alone)."""

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._peer, self._metadata = peer, metadata
        self.code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def test_refusals_while_the_audit_trail_is_behind_are_counted_not_queued_one_by_one(tmp_path: Path) -> None:
    """While the trail cannot take more (writes failing, buffer full), every call is refused
    UNAVAILABLE; a record each would grow the backlog without bound. They are counted instead."""
    import asyncio

    from medserve.server.audit import AuditLog
    from medserve.server.gate import Call, Gate
    from medserve.server.identities import ANONYMOUS
    from medserve.server.ratelimit import RateLimiter

    ids = IdentityFile.load(tmp_path / "ids.json")
    token = str(ids.add("ward", ["ward"]))
    ids.save()
    loaded = IdentityFile.load(tmp_path / "ids.json")
    log = tmp_path / "audit.jsonl"
    trail = AuditLog(log, key=b"k" * 32, max_pending=1)  # not started: nothing drains yet
    trail.record(AuditEvent(1.7e9, "ward", "ipv4:127.0.0.1:1", "ModelInfer", "OK", 1.0, request_id="before"))
    now = [50.0]
    gate = Gate(identities=lambda: loaded, plaintext=True, rate_limiter=RateLimiter(lambda: now[0]), audit=trail,
                clock=lambda: now[0])

    async def refuse_many(n: int) -> list[grpc.StatusCode | None]:
        codes = []
        for _ in range(n):
            context = _Context("ipv4:127.0.0.1:6000", bearer(token))
            call = Call("ModelInfer", ANONYMOUS, context.peer(), now[0], 10, audited=True)
            try:
                gate._admit(call, context)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the refusal under test
                await gate._refuse(context, call, exc)  # type: ignore[arg-type]
            codes.append(context.code)
        gate.close()
        return codes

    assert asyncio.run(refuse_many(100)) == [grpc.StatusCode.UNAVAILABLE] * 100
    trail.start()
    trail.close()
    behind = [r for r in records(log) if r["status"] == "UNAVAILABLE"]
    assert [(r["identity"], r["count"]) for r in behind] == [("ward", 1), ("ward", 99)]
