"""Nothing of the patient in any log: sentinel values (numeric, integer, text) and the caller's
token go through every path — success, each kind of refusal, a batch failing inside
onnxruntime (a Gather given an out-of-range index), an expired deadline, a cancelled call —
against a server with DEBUG logging, the audit trail and metrics on. Then every log line, audit
record, metric and error message is searched: no sentinel occurs anywhere."""
from __future__ import annotations

import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from medserve.perf.serverproc import start_process
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw

import onnx_models
from conftest import wait_for

FLOAT = 987654.25
INDEX = 7777777
TEXT = "CANARY-PATIENT-7731"
# The text's tail is searched with its non-hex prefix: "7731" alone turns up in one run in
# a few dozen inside the audit log's SHA-256 chain, which is hex.
SENTINELS = ("987654", "7777777", "CANARY", "PATIENT-7731")


def tensor(req: pb.ModelInferRequest, name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    req.inputs.add(name=name, datatype=datatype, shape=array.shape)
    req.raw_input_contents.append(to_raw(array))
    return req


def test_no_sentinel_reaches_a_log_an_audit_record_a_metric_or_a_message(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    onnx_models.write_config(repo, "affine", "max_batch_size: 4\ndynamic_batching { }\n"
                             'parameters { key: "refuse_non_finite" value: { string_value: "true" } }\n')
    onnx_models.strings(repo / "strings" / "1" / "model.onnx")
    onnx_models.gather(repo / "gather" / "1" / "model.onnx")
    onnx_models.slow(repo / "slow" / "1" / "model.onnx", layers=400)
    onnx_models.write_config(repo, "slow", "max_batch_size: 1\ndynamic_batching { }\n")
    ids = tmp_path / "ids.json"
    token = subprocess.run([sys.executable, "-m", "medserve.server.cli", "tokens", "add", "ward", "--models", "*",
                            "--file", str(ids)], capture_output=True, text=True, check=True).stdout.strip()
    audit, log, ready = tmp_path / "audit.jsonl", tmp_path / "server.log", tmp_path / "ready.json"
    subprocess.run([sys.executable, "-m", "medserve.server.cli", "audit", "keygen", str(tmp_path / "audit.key")],
                   capture_output=True, check=True)
    cmd = [sys.executable, "-m", "medserve.server.cli", "--log-level", "DEBUG", "serve", "--repository", str(repo),
           "--port", "0", "--ready-file", str(ready), "--tokens", str(ids), "--audit-log", str(audit),
           "--audit-key", str(tmp_path / "audit.key"),
           "--metrics-port", "0", "--max-bytes-elements", "4"]
    messages: list[str] = []
    with start_process(cmd, ready, log) as handle:
        channel = grpc.insecure_channel(handle.address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        auth = (("authorization", f"Bearer {token}"),)

        def call(req: pb.ModelInferRequest, metadata: tuple = auth, timeout: float = 30) -> None:
            try:
                stub.ModelInfer(req, metadata=metadata, timeout=timeout)
            except grpc.RpcError as err:
                messages.append(f"{err.code().name} {err.details()} {err.trailing_metadata()}")

        secret = np.full((2, 4), FLOAT, np.float32)
        words = np.array([[TEXT.encode()], [TEXT.encode()]], dtype=object)
        call(tensor(pb.ModelInferRequest(model_name="affine", id="ok"), "x", "FP32", secret))  # success
        call(tensor(pb.ModelInferRequest(model_name="strings"), "text", "BYTES", words))  # success, text
        call(tensor(pb.ModelInferRequest(model_name="affine"), "x", "FP32", np.full((1, 5), FLOAT, np.float32)))
        call(tensor(pb.ModelInferRequest(model_name="affine"), "x", "FP64", np.full((1, 4), FLOAT)))
        call(tensor(pb.ModelInferRequest(model_name="no_such"), "x", "FP32", secret))
        nan = secret.copy()
        nan[0, 0] = np.nan
        call(tensor(pb.ModelInferRequest(model_name="affine"), "x", "FP32", nan))  # refuse_non_finite
        bad_utf8 = pb.ModelInferRequest(model_name="strings")
        bad_utf8.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
        payload = TEXT.encode() + b"\xff"
        bad_utf8.raw_input_contents.append(struct.pack("<I", len(payload)) + payload)
        call(bad_utf8)
        call(tensor(pb.ModelInferRequest(model_name="strings"), "text", "BYTES",
                    np.array([[TEXT.encode()]] * 5, dtype=object)))  # over the BYTES element cap
        typed = pb.ModelInferRequest(model_name="affine")
        typed.inputs.add(name="x", datatype="INT8", shape=[1, 1]).contents.int_contents.append(INDEX)
        call(typed)
        call(tensor(pb.ModelInferRequest(model_name="gather"), "idx", "INT64", np.array([[INDEX]], np.int64)))  # ORT
        call(tensor(pb.ModelInferRequest(model_name="affine"), "x", "FP32", secret), metadata=())  # no token
        call(tensor(pb.ModelInferRequest(model_name="affine"), "x", "FP32", secret),
             metadata=(("authorization", f"Bearer {TEXT}"),))  # unknown token
        slow = tensor(pb.ModelInferRequest(model_name="slow"), "x", "FP32", np.full((1, 1024), FLOAT, np.float32))
        held = stub.ModelInfer.future(slow, metadata=auth, timeout=30)
        call(slow, timeout=0.005)  # deadline: it cannot wait behind the one executing
        cancelled = stub.ModelInfer.future(slow, metadata=auth, timeout=30)
        cancelled.cancel()
        held.result()
        with urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(log)}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        channel.close()
        wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) >= 14, timeout_s=20)
    server_log = log.read_text(errors="replace")
    assert "DEBUG" in server_log and "request refused" in server_log  # logging was on at DEBUG
    assert len(messages) >= 11 and any("INTERNAL" in m and "Gather" in m for m in messages)
    assert any("DEADLINE_EXCEEDED" in m for m in messages)
    everything = {"server log": server_log, "audit": audit.read_text(), "metrics": metrics,
                  "messages": "\n".join(messages)}
    for where, text in everything.items():
        for sentinel in (*SENTINELS, token):
            assert sentinel not in text, f"{sentinel!r} found in the {where}"


def _metrics_port(log: Path) -> int:
    """The metrics port the server chose (it logs the address once ready)."""
    for line in log.read_text().splitlines():
        if "metrics on http://" in line:
            return int(line.rsplit(":", 1)[1].split("/")[0])
    raise AssertionError("the server did not log its metrics address")
