"""The KServe V2 REST data plane against a real server on real ports (server/rest.py): JSON and
binary tensors answer what gRPC answers for several demo families; bad input is 400 naming the
tensor (never a value); a missing and a forbidden model are the same 404; a rate-limited caller
gets 429 with Retry-After; an oversized body is refused from its Content-Length before a byte of
it is read; deadlines, explanations, labels and the audit record naming the transport."""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medserve.clients import Client
from medserve.protos.wire import to_raw

import onnx_models
from conftest import RunningServer, running_server
from credentials import write_tokens

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("breast_cancer_rf", "diabetes_linear", "risk_mlp", "notes_triage")


def _demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkout = ROOT / "demo-repository"
    if all((checkout / m).is_dir() for m in FAMILIES):
        return checkout
    from medserve.exporters.demo import build_demo_repository

    path = tmp_path_factory.mktemp("demo") / "demo-repository"
    build_demo_repository(path, seed=0, models=list(FAMILIES))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(_demo(tmp_path_factory), http_port=0, model_control_mode="explicit",
                        load_models=FAMILIES) as server:
        yield server


def http(server: RunningServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}{path}", data=body,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def _json_tensor(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    data = [v.decode() for v in array.reshape(-1)] if datatype == "BYTES" else array.tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def _rows(client: Client, model: str) -> dict[str, tuple[np.ndarray, str]]:
    """Two rows for each input of a demo model (from its metadata)."""
    meta = client.model_metadata(model)
    rng = np.random.default_rng(1)
    inputs = {}
    for t in meta.inputs:
        shape = [2 if d == -1 else d for d in t.shape]
        if t.datatype == "BYTES":
            inputs[t.name] = (np.array(["chest pain, fever", "routine follow-up"], dtype=object).reshape(shape)
                              .astype(bytes).astype(object), "BYTES")
        else:
            inputs[t.name] = (rng.normal(size=shape).astype(np.float32), t.datatype)
    return inputs


@pytest.mark.parametrize("model", FAMILIES)
def test_json_and_binary_answers_equal_grpc(demo: RunningServer, model: str) -> None:
    with Client(demo.target, timeout_s=30) as client:
        inputs = _rows(client, model)
        # the same request id: a model with a canary routes both to the same version
        grpc_answer = client.infer(model, {k: v for k, (v, _) in inputs.items()}, request_id="r1")
    # JSON tensors in, JSON out
    body = json.dumps({"id": "r1", "inputs": [_json_tensor(k, v, d) for k, (v, d) in inputs.items()]}).encode()
    status, headers, raw = http(demo, "POST", f"/v2/models/{model}/infer", body)
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["id"] == "r1" and answer["model_name"] == model
    assert answer["model_version"] == grpc_answer.model_version
    assert len(answer["parameters"]["model_sha256"]) == 64
    for out in answer["outputs"]:
        expected = np.asarray(grpc_answer.outputs[out["name"]])
        if out["datatype"] == "BYTES":
            assert [v.encode() for v in out["data"]] == list(expected.reshape(-1))
        else:
            np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), expected, rtol=1e-6)
    # binary tensors in, binary out (Triton's extension as tritonclient.http sends it)
    binaries = [to_raw(v) for v, _ in inputs.values()]
    header = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": d,
                                     "parameters": {"binary_data_size": len(b)}}
                                    for (k, (v, d)), b in zip(inputs.items(), binaries, strict=True)],
                         "id": "r1", "parameters": {"binary_data_output": True}}).encode()
    status, headers, raw = http(demo, "POST", f"/v2/models/{model}/infer", header + b"".join(binaries),
                                {"Inference-Header-Content-Length": str(len(header)),
                                 "Content-Type": "application/octet-stream"})
    assert status == 200, raw
    length = int(headers["Inference-Header-Content-Length"])
    answer, offset = json.loads(raw[:length]), length
    for out in answer["outputs"]:
        size = out["parameters"]["binary_data_size"]
        expected = np.asarray(grpc_answer.outputs[out["name"]])
        if out["datatype"] != "BYTES":
            got = np.frombuffer(raw[offset:offset + size], expected.dtype).reshape(out["shape"])
            np.testing.assert_array_equal(got, expected)
        offset += size
    assert offset == len(raw)


def test_bad_input_is_400_naming_the_tensor_never_a_value(demo: RunningServer) -> None:
    secret = 4242.125
    body = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [secret, 1.0, 2.0]}]}
    status, _, raw = http(demo, "POST", "/v2/models/breast_cancer_rf/infer", json.dumps(body).encode())
    assert status == 400
    error = json.loads(raw)["error"]
    assert "'input'" in error and "breast_cancer_rf" in error and "4242" not in error
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": ["a"] * 30}]}
    status, _, raw = http(demo, "POST", "/v2/models/breast_cancer_rf/infer", json.dumps(body).encode())
    assert status == 400 and "'input'" in json.loads(raw)["error"]
    status, _, raw = http(demo, "POST", "/v2/models/breast_cancer_rf/infer", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]


def test_a_binary_header_over_the_json_limit_or_past_its_body_is_refused_as_such(demo: RunningServer) -> None:
    """Triton's binary extension: a header (Inference-Header-Content-Length) over --max-json-mb
    is refused naming the header, before it is parsed; one claiming more bytes than the body holds
    is refused as that, not as a JSON too large."""
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 120}}],
                         "parameters": {"pad": "x" * (3 << 20)}}).encode()  # a 3 MiB header
    path, kind = "/v2/models/breast_cancer_rf/infer", {"Content-Type": "application/octet-stream"}
    status, _, raw = http(demo, "POST", path, header + bytes(120),
                          {**kind, "Inference-Header-Content-Length": str(len(header))})
    error = json.loads(raw)["error"]
    assert status == 400 and f"JSON header (Inference-Header-Content-Length) is {len(header)} bytes" in error, error
    assert "at most 2097152 (--max-json-mb)" in error and "after the header" in error
    status, _, raw = http(demo, "POST", path, bytes(100), {**kind, "Inference-Header-Content-Length": str(3 << 20)})
    error = json.loads(raw)["error"]
    assert status == 400 and f"Inference-Header-Content-Length {3 << 20} is not within the body of 100 bytes" in error


def test_a_request_id_over_128_characters_is_refused_without_echo(demo: RunningServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """gRPC's row 3 over REST: a 100,000-character id is refused 400 naming the limit, the same
    answer for a served and a missing model, and neither the answer nor any log line carries it."""
    caplog.set_level(logging.DEBUG)
    long_id = "ID-" + "x" * 100_000
    body = json.dumps({"id": long_id, "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32",
                                                  "data": [0.0] * 30}]}).encode()
    answers = []
    for model in ("breast_cancer_rf", "no_such_model"):
        status, _, raw = http(demo, "POST", f"/v2/models/{model}/infer", body)
        assert status == 400 and "longer than 128 characters" in json.loads(raw)["error"]
        assert b"xxxx" not in raw
        answers.append(raw)
    assert answers[0] == answers[1]
    assert "xxxx" not in caplog.text


def test_unknown_model_404_and_probes(demo: RunningServer) -> None:
    status, _, raw = http(demo, "GET", "/v2/models/no_such_model")
    assert status == 404 and "no_such_model" in json.loads(raw)["error"]
    status, _, raw = http(demo, "POST", "/v2/models/no_such_model/infer", b'{"inputs": []}')
    assert status == 404
    assert http(demo, "GET", "/v2/health/live")[0] == 200
    assert http(demo, "GET", "/v2/health/ready")[0] == 200
    assert http(demo, "GET", "/v2/models/risk_mlp/ready")[0] == 200
    assert http(demo, "GET", "/v2/models/risk_mlp/versions/1/ready")[0] == 200


def test_a_version_label_in_the_path_reaches_its_version_and_is_named(demo: RunningServer) -> None:
    body = json.dumps({"inputs": [_json_tensor("input", np.zeros((1, 30), np.float32), "FP32")]}).encode()
    for label, version in (("stable", "1"), ("canary", "2")):
        status, _, raw = http(demo, "POST", f"/v2/models/breast_cancer_rf/versions/{label}/infer", body)
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["model_version"] == version and answer["parameters"]["version_label"] == label
        assert http(demo, "GET", f"/v2/models/breast_cancer_rf/versions/{label}/ready")[0] == 200
    meta = json.loads(http(demo, "GET", "/v2/models/breast_cancer_rf")[2])
    assert json.loads(meta["parameters"]["version_labels"]) == {"canary": 2, "stable": 1}


def test_timeout_header_expired_is_504(demo: RunningServer) -> None:
    body = {"inputs": [_json_tensor("input", np.zeros((1, 30), np.float32), "FP32")]}
    status, _, raw = http(demo, "POST", "/v2/models/breast_cancer_rf/infer", json.dumps(body).encode(),
                          {"Timeout-Ms": "0.000001"})
    assert status == 504, raw
    status, _, raw = http(demo, "POST", "/v2/models/breast_cancer_rf/infer", json.dumps(body).encode(),
                          {"Timeout-Ms": "nope"})
    assert status == 400 and "Timeout-Ms" in json.loads(raw)["error"]


def test_explanations_over_rest(demo: RunningServer) -> None:
    x = np.random.default_rng(0).normal(size=(1, 10)).astype(np.float32)
    with Client(demo.target, timeout_s=30) as client:
        name = client.model_metadata("diabetes_linear").inputs[0].name
    body = {"inputs": [_json_tensor(name, x, "FP32")], "parameters": {"explain": True}}
    status, _, raw = http(demo, "POST", "/v2/models/diabetes_linear/infer", json.dumps(body).encode())
    assert status == 200, raw
    answer = json.loads(raw)
    assert "explain_method" in answer["parameters"]
    assert len(answer["outputs"]) > 1  # the prediction and its attributions


@contextlib.contextmanager
def gated(tmp_path: Path) -> Iterator[RunningServer]:
    """Two models, one identity (ward-token: `ward` only; 1 call/s, burst 3), an audit trail, 1 MiB messages."""
    from medserve.server.audit import keygen  # type: ignore[attr-defined]

    repo = tmp_path / "repo"
    for name in ("ward", "secret"):
        onnx_models.affine(repo / name / "1" / "model.onnx")
    tokens = write_tokens(tmp_path / "ids.json", {"ward-token": ["ward"]})
    raw = json.loads(tokens.read_text())
    for identity in raw["identities"]:
        identity.update(rate_per_s=1, burst=3)
    tokens.write_text(json.dumps(raw))
    keygen(tmp_path / "audit.key")
    with running_server(repo, http_port=0, tokens_file=str(tokens), audit_log=str(tmp_path / "audit.jsonl"),
                        audit_key=str(tmp_path / "audit.key"), max_message_bytes=1 << 20) as server:
        yield server


AFFINE = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}).encode()


def test_forbidden_answers_as_missing_and_rate_limit_429(tmp_path: Path) -> None:
    token = {"Authorization": "Bearer ward-token"}
    with gated(tmp_path) as server:
        assert http(server, "POST", "/v2/models/ward/infer", AFFINE)[0] == 401  # no credentials
        answers = []
        for model in ("secret", "no_such_model"):
            status, _, raw = http(server, "POST", f"/v2/models/{model}/infer", AFFINE, token)
            answers.append((status, json.loads(raw)["error"].replace(model, "<m>")))
        assert answers[0] == answers[1] and answers[0][0] == 404
        # burst 3: two used above; the third passes, the fourth is over the rate
        status, _, raw = http(server, "POST", "/v2/models/ward/infer", AFFINE, token)
        assert status == 200, raw
        status, headers, raw = http(server, "POST", "/v2/models/ward/infer", AFFINE, token)
        assert status == 429 and int(headers["Retry-After"]) >= 1 and "rate limit" in json.loads(raw)["error"]
        time.sleep(1.1)  # a token again: an unknown path passes the gate, then 501, audited
        status, _, raw = http(server, "GET", "/v2/nothing/here", None, token)
        assert status == 501 and "not a route" in json.loads(raw)["error"], raw
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    calls = [r for r in records if r.get("rpc") == "ModelInfer" and r.get("identity") == "ward-token"]
    assert [(r["model"], r["status"], r.get("transport")) for r in calls] == [
        ("secret", "NOT_FOUND", "http"), ("no_such_model", "NOT_FOUND", "http"), ("ward", "OK", "http"),
        ("ward", "RESOURCE_EXHAUSTED", "http")]
    strangers = [r for r in records if r.get("identity") == "anonymous"]
    assert [(r["rpc"], r["status"], r["count"], r.get("transport")) for r in strangers] == [
        ("ModelInfer", "UNAUTHENTICATED", 1, "http")]
    unknown = [(r["rpc"], r["status"]) for r in records if r.get("rpc") == "UnknownPath"]
    assert unknown == [("UnknownPath", "UNIMPLEMENTED")]


def test_a_response_over_the_send_limit_is_refused_and_audited_as_refused(tmp_path: Path) -> None:
    """Row 12 over REST: a binary request under the 1 MiB limit whose answer is over it is
    refused with the limit named, and its audit record says so (never OK), naming the model; a
    forbidden model's configuration is refused as missing and its record names the model asked."""
    token = {"Authorization": "Bearer ward-token"}
    rows = int(0.9 * (1 << 20)) // 16
    data = np.zeros((rows, 4), np.float32).tobytes()
    header = json.dumps({"id": "wide-answer", "inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                                          "parameters": {"binary_data_size": len(data)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    assert len(header) + len(data) < 1 << 20
    with gated(tmp_path) as server:
        status, _, raw = http(server, "POST", "/v2/models/ward/infer", header + data,
                              {**token, "Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream"})
        assert status == 413, (status, raw[:200])  # retrying cannot help (429 would say it can)
        error = json.loads(raw)["error"]
        assert "the response is over the message size limit of 1 MiB" in error and "--max-message-mb" in error
        status, _, raw = http(server, "GET", "/v2/models/secret/versions/1/config", None, token)
        assert status == 404, raw
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    wide = [r for r in records if r.get("request_id") == "wide-answer"]
    assert [(r["status"], r["model"], r.get("transport")) for r in wide] == [("RESOURCE_EXHAUSTED", "ward", "http")]
    config = [r for r in records if r.get("rpc") == "ModelConfig"]
    assert [(r["identity"], r["model"], r["version"], r["status"], r.get("transport")) for r in config] == [
        ("ward-token", "secret", "1", "NOT_FOUND", "http")]


def test_oversized_body_refused_from_its_length_before_it_is_read(tmp_path: Path) -> None:
    with gated(tmp_path) as server:
        # Headers announcing 64 MiB against a 1 MiB limit, and not one byte of the body: the
        # answer comes at once (the server never waits for the body it would refuse).
        with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=5) as sock:
            sock.sendall(b"POST /v2/models/ward/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ward-token\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 67108864\r\n\r\n")
            started = time.monotonic()
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"message size limit of 1 MiB" in answer and time.monotonic() - started < 2
        # A chunked body (no length) is cut off at the limit while it is read.
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": [0.0] * (1 << 18)}]}).encode()

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 1 << 16):
                yield body[i:i + (1 << 16)]

        request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}/v2/models/ward/infer",
                                         data=chunks(), method="POST",
                                         headers={"Authorization": "Bearer ward-token",
                                                  "Transfer-Encoding": "chunked"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        info.value.close()
        assert info.value.code == 413


def test_a_rest_call_continues_the_callers_trace(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from medserve.server.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    onnx_models.affine(tmp_path / "repo" / "m" / "1" / "model.onnx")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with running_server(tmp_path / "repo", tracing=Tracing(provider), http_port=0) as server:
        status, _, raw = http(server, "POST", "/v2/models/m/infer", AFFINE,
                              {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert status == 200, raw
        assert http(server, "POST", "/v2/models/nope/infer", AFFINE)[0] == 404
    spans = {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == int(trace_id, 16)}
    server_span = spans["inference.GRPCInferenceService/ModelInfer"]
    assert server_span.parent is not None and server_span.parent.span_id == 0x00f067aa0ba902b7
    assert server_span.attributes["medserve.transport"] == "http" and server_span.attributes["medserve.rows"] == 1
    assert {"queue", "compute"} <= set(spans)
    failed = [s for s in exporter.get_finished_spans() if s.context.trace_id != int(trace_id, 16)]
    assert failed and failed[0].attributes["rpc.grpc.status_code"] == "NOT_FOUND"


@pytest.mark.parametrize(("body", "limit", "words"), [
    ({"inputs": [{"name": "x", "shape": [1, 1 << 20], "datatype": "FP32", "data": []}]},
     {"max_tensor_elements": 1 << 16}, "at most 65536 per tensor"),
    ({"inputs": [{"name": "t", "shape": [300, 1], "datatype": "BYTES", "data": ["a"] * 300}]},
     {"max_bytes_elements": 256}, "at most 256 per tensor"),
    ({"inputs": [{"name": "t", "shape": [2, 1], "datatype": "BYTES", "data": ["a" * 600, "b" * 600]}]},
     {"max_text_bytes": 1000}, "--max-text-bytes"),
    ({"inputs": [{"name": f"x{i}", "shape": [1], "datatype": "FP32", "data": [0]} for i in range(1025)]},
     {}, "at most 1024 per request"),
])
def test_tensor_limits_are_checked_before_decoding(tmp_path: Path, body: dict[str, Any], limit: dict[str, int],
                                                   words: str) -> None:
    """The DecodeLimits of the gRPC path, from the JSON header, before any tensor is converted:
    400 naming the tensor (where one) and the limit."""
    onnx_models.affine(tmp_path / "repo" / "m" / "1" / "model.onnx")
    with running_server(tmp_path / "repo", http_port=0, **limit) as server:
        status, _, raw = http(server, "POST", "/v2/models/m/infer", json.dumps(body).encode())
    assert status == 400 and words in json.loads(raw)["error"], raw


def test_past_the_connection_cap_the_oldest_close_and_a_malformed_request_is_not_echoed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The REST port holds at most --max-concurrent-rpcs connections (the oldest closed past it:
    a flood of idle or half-sent connections cannot lock callers out), and a request aiohttp
    cannot parse is answered with the status's phrase, its bytes neither echoed nor logged."""
    import logging

    onnx_models.affine(tmp_path / "repo" / "m" / "1" / "model.onnx")
    with running_server(tmp_path / "repo", http_port=0, max_concurrent_rpcs=4) as server:
        port = server.server.http_port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
        time.sleep(0.3)
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""  # closed by the server
        assert http(server, "POST", "/v2/models/m/infer", AFFINE)[0] == 200
        for sock in idle:
            sock.close()
        with caplog.at_level(logging.DEBUG, logger="medserve"), \
                socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nX-Secret-4242: \x01\x02\r\n"
                         b"Content-Length: nope4242\r\n\r\n")
            answer = sock.recv(4096)
    assert b" 400 Bad Request" in answer.split(b"\r\n")[0] and b"4242" not in answer
    assert "4242" not in caplog.text


def test_nan_from_pythons_json_is_accepted_and_answered_as_nan(tmp_path: Path) -> None:
    """Python's json (and so tritonclient.http) writes a missing value as the literal NaN, which
    strict JSON parsers refuse; an answer holding NaN is written the same way, not as null."""
    onnx_models.affine(tmp_path / "repo" / "m" / "1" / "model.onnx")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [float("nan"), 1.0, 2.0, 3.0]}]}).encode()
    assert b"NaN" in body
    with running_server(tmp_path / "repo", http_port=0) as server:
        status, _, raw = http(server, "POST", "/v2/models/m/infer", body)
        assert status == 200, raw
        assert b"NaN" in raw and b"null" not in raw
        status, _, raw = http(server, "POST", "/v2/models/m/infer", AFFINE)
        assert status == 200 and b"NaN" not in raw
