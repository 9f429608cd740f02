"""Tracing is configured by the standard OTEL_* variables alone: unset, `none` or
OTEL_SDK_DISABLED leave it off; `console` exports through the SDK with OTEL_SERVICE_NAME; an
exporter medserve does not support is named in a warning. End to end: a real `medserve serve`
started with OTEL_TRACES_EXPORTER=console prints its spans, carrying the caller's trace id."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw

import onnx_models

pytest.importorskip("opentelemetry.sdk")


def affine_request(rows: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(to_raw(np.ones((rows, 4), np.float32)))
    return req


@pytest.mark.parametrize("environ", [{}, {"OTEL_TRACES_EXPORTER": "none"},
                                     {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}])
def test_tracing_is_off_unless_an_exporter_is_named(environ: dict[str, str]) -> None:
    from medserve.server.tracing import Tracing

    assert not Tracing(environ=environ).enabled


def test_the_service_name_comes_from_the_environment_and_unknown_exporters_are_named(caplog) -> None:  # type: ignore[no-untyped-def]
    from medserve.server.tracing import _provider_from

    with caplog.at_level(logging.WARNING):
        provider = _provider_from({"OTEL_TRACES_EXPORTER": "console,zipkin", "OTEL_SERVICE_NAME": "icu-scores"})
    assert provider.resource.attributes["service.name"] == "icu-scores"
    assert "'zipkin' is not supported" in caplog.text
    provider.shutdown()


def test_a_server_started_with_otel_variables_exports_the_callers_trace(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    ready, out = tmp_path / "ready.json", tmp_path / "server.out"
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "medserve-trace-test",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "medserve.server.cli", "serve", "--repository", str(repo),
                                 "--port", "0", "--ready-file", str(ready)], stdout=sink, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(affine_request(1), metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),),
                            timeout=30)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    text = out.read_text()
    spans = [json.loads(chunk) for chunk in _json_objects(text)]
    ours = [s for s in spans if s.get("context", {}).get("trace_id") == f"0x{trace_id}"]
    assert ours, text[-3000:]
    server_span = next(s for s in ours if s["name"] == "inference.GRPCInferenceService/ModelInfer")
    assert server_span["parent_id"] == "0xb7ad6b7169203331"
    assert server_span["resource"]["attributes"]["service.name"] == "medserve-trace-test"
    assert {s["name"] for s in ours} >= {"queue", "compute"}


def _json_objects(text: str) -> list[str]:
    """The top-level JSON objects the console exporter printed among the log lines."""
    objects, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                objects.append(text[start:i + 1])
    return [o for o in objects if '"trace_id"' in o]
