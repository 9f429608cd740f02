"""What an on-call team relies on, against real servers: HTTP health through the lifecycle while
gRPC needs mutual TLS, histograms that add up, JSON logs, traces that continue the caller's,
poll mode swapping versions under load, workers that come back, and draining and overload that
end every call in a documented status."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.perf.serverproc import start_process
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import from_raw, to_raw

import onnx_models
from conftest import running_server, wait_for
from credentials import make_certs

DRAIN_OK = {"OK", "UNAVAILABLE"}


def affine_request(rows: int = 1, model: str = "m", value: float = 1.0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(to_raw(np.full((rows, 4), value, np.float32)))
    return req


def http(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Load:
    """Callers on their own channels, calling until stopped; every outcome is counted."""

    def __init__(self, target: str, request: Callable[[], pb.ModelInferRequest], callers: int = 4,
                 timeout_s: float = 10.0, check: Callable[[pb.ModelInferResponse], None] | None = None) -> None:
        self.statuses: Counter[str] = Counter()
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(target, request, timeout_s, check), daemon=True)
                         for _ in range(callers)]

    def _run(self, target: str, request: Callable[[], pb.ModelInferRequest], timeout_s: float,
             check: Callable[[pb.ModelInferResponse], None] | None) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self._stop.is_set():
                try:
                    response = stub.ModelInfer(request(), timeout=timeout_s)
                    if check is not None:
                        check(response)
                    status = "OK"
                except grpc.RpcError as err:
                    status = err.code().name
                    if status not in ("UNAVAILABLE",):
                        self.problems.append(f"{status}: {err.details()}")
                except AssertionError as err:
                    status = "WRONG"
                    self.problems.append(str(err))
                with self._lock:
                    self.statuses[status] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, n: int) -> None:
        target = sum(self.statuses.values()) + n
        wait_for(lambda: sum(self.statuses.values()) >= target, timeout_s=60)

    def stop(self) -> Counter[str]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.statuses

    def __exit__(self, *exc: object) -> None:
        self.stop()


def test_http_health_through_loading_ready_and_draining_while_grpc_needs_mtls(tmp_path: Path) -> None:
    from medserve.server.wiring import build_repository

    certs = make_certs(tmp_path / "certs")
    gate = threading.Event()

    def slow_to_load(files, runner):  # type: ignore[no-untyped-def]
        gate.wait(30)  # in the factory, while the version is made
        return runner

    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    from medserve.server.app import MedserveServer
    from medserve.server.config import ServerConfig

    config = ServerConfig(repository=str(repo), port=0, metrics_port=0, tls_cert=str(certs.server_cert),
                          tls_key=str(certs.server_key), tls_client_ca=str(certs.ca), drain_announce_s=1.0,
                          drain_grace_s=5.0)
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = MedserveServer(config, repository=build_repository(config, clock=time.monotonic,
                                                                wrap_runner=slow_to_load))
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        wait_for(lambda: server.metrics_port is not None)
        port = server.metrics_port
        assert port is not None
        assert http(port, "/v2/health/live") == (200, {"live": True})
        assert http(port, "/v2/health/ready") == (503, {"ready": False})  # loading
        gate.set()
        starting.result(60)
        assert http(port, "/v2/health/ready") == (200, {"ready": True})
        assert http(port, "/v2/models/m/ready") == (200, {"name": "m", "ready": True})
        assert http(port, "/v2/models/nope/ready")[0] == 404
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"medserve_request_duration_seconds" in r.read()
        stopping = asyncio.run_coroutine_threadsafe(server.stop(), loop)
        wait_for(lambda: http(port, "/v2/health/ready")[0] == 503, timeout_s=5)  # draining
        assert http(port, "/v2/health/live")[0] == 200
        stopping.result(30)
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.stop(0.1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_histograms_add_up_to_the_traffic_sent(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    with running_server(repo, metrics_port=0) as server:
        stub = server.stub()
        for rows in (1, 2, 3, 3):
            stub.ModelInfer(affine_request(rows), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(affine_request(0), timeout=30)  # INVALID_ARGUMENT
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    base = {"worker": "medserve", "model": "m", "version": "1"}

    def value(name: str, **extra: str) -> float:
        return samples[(name, tuple(sorted({**base, **extra}.items())))]

    assert value("medserve_request_duration_seconds_count") == 5  # every answered request
    assert value("medserve_batch_rows_count") == 4 and value("medserve_batch_rows_sum") == 9
    assert value("medserve_batch_rows_bucket", le="2.0") == 2 and value("medserve_batch_rows_bucket", le="+Inf") == 4
    assert value("medserve_queue_duration_seconds_count") == 4
    assert value("medserve_compute_duration_seconds_count") == 4
    assert value("medserve_request_failures_total", code="INVALID_ARGUMENT") == 1
    assert value("medserve_requests_in_flight") == 0
    assert value("medserve_model_state", state="READY") == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)


def test_json_logs_parse_line_by_line_with_the_model_on_lifecycle_lines(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    ready, log = tmp_path / "ready.json", tmp_path / "server.log"
    cmd = [sys.executable, "-m", "medserve.server.cli", "--log-format", "json", "serve", "--repository", str(repo),
           "--port", "0", "--ready-file", str(ready)]
    with start_process(cmd, ready, log) as handle:
        with grpc.insecure_channel(handle.address) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(affine_request(), timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    loaded = [r for r in records if "READY" in r["message"]]
    assert loaded and loaded[0]["model"] == "m" and loaded[0]["version"] == 1 and len(loaded[0]["model_sha256"]) == 64
    assert any(r["message"] == "medserve stopped" for r in records)


def test_a_trace_continues_the_callers_trace_id_with_queue_and_compute(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from medserve.server.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with running_server(repo, tracing=Tracing(provider)) as server:
        metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
        server.stub().ModelInfer(affine_request(2), metadata=metadata, timeout=30)
        with pytest.raises(grpc.RpcError):
            server.stub().ModelInfer(affine_request(2, model="nope"), timeout=30)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == int(trace_id, 16)}
    server_span = spans["inference.GRPCInferenceService/ModelInfer"]
    assert server_span.parent is not None and server_span.parent.span_id == 0x00f067aa0ba902b7
    assert server_span.attributes["medserve.model"] == "m" and server_span.attributes["medserve.rows"] == 2
    for phase in ("queue", "compute"):
        assert spans[phase].parent.span_id == server_span.context.span_id
        assert server_span.start_time <= spans[phase].start_time <= spans[phase].end_time <= server_span.end_time
    failed = [s for s in exporter.get_finished_spans() if s.context.trace_id != int(trace_id, 16)]
    assert failed and failed[0].attributes["rpc.grpc.status_code"] == "NOT_FOUND"


def _publish(repo: Path, version: int, scale_by: float | None = None, broken: bool = False) -> None:
    """A new version folder, written aside and renamed in (as the exporters publish)."""
    aside = repo / "m" / f".tmp-{version}"
    if broken:
        aside.mkdir(parents=True)
        (aside / "model.onnx").write_bytes(b"not onnx")
    else:
        onnx_models.affine(aside / "model.onnx")
    os.replace(aside, repo / "m" / str(version))


def test_poll_mode_swaps_a_version_under_load_without_a_failed_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    seen_versions: set[str] = set()

    def check(response: pb.ModelInferResponse) -> None:
        seen_versions.add(response.model_version)
        assert from_raw(response.raw_output_contents[0], "FP32", [1, 4]).tolist() == [[3.0] * 4]

    with running_server(repo, model_control_mode="poll", repository_poll_s=0.2) as server:
        with Load(server.target, affine_request, check=check) as load:
            load.wait_for(50)
            _publish(repo, 2)
            wait_for(lambda: "2" in seen_versions, timeout_s=30)
            load.wait_for(50)
            _publish(repo, 3, broken=True)  # does not load: version 2 keeps serving
            wait_for(lambda: any(r.reason for r in server.server.repository.index() if r.name == "m"), timeout_s=30)
            load.wait_for(50)
            statuses = load.stop()
        index = {(r.version, r.state) for r in server.server.repository.index()}
    assert statuses["OK"] >= 150 and set(statuses) == {"OK"}, (statuses, load.problems[:3])
    assert seen_versions == {"1", "2"} and ("2", "READY") in index


def test_poll_mode_loads_a_new_model_and_unloads_a_removed_one_while_the_rest_serve(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("m", "leaving"):
        onnx_models.affine(repo / name / "1" / "model.onnx")
    with running_server(repo, model_control_mode="poll", repository_poll_s=0.2) as server:
        stub = server.stub()

        def ready(name: str) -> bool:
            try:
                return stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30).ready
            except grpc.RpcError as err:  # a model the repository does not hold
                assert err.code() == grpc.StatusCode.NOT_FOUND
                return False

        assert ready("m") and ready("leaving") and not ready("arriving")
        with Load(server.target, affine_request) as load:
            load.wait_for(50)
            onnx_models.affine(tmp_path / "aside" / "1" / "model.onnx")
            os.replace(tmp_path / "aside", repo / "arriving")
            wait_for(lambda: ready("arriving"), timeout_s=30)
            assert stub.ModelInfer(affine_request(model="arriving"), timeout=30).model_version == "1"
            os.replace(repo / "leaving", tmp_path / "gone")
            wait_for(lambda: not ready("leaving"), timeout_s=30)
            load.wait_for(50)
            statuses = load.stop()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(affine_request(model="leaving"), timeout=30)
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        names = {r.name for r in server.server.repository.index() if r.state == "READY"}
    assert names == {"m", "arriving"}
    assert statuses["OK"] >= 100 and set(statuses) == {"OK"}, (statuses, load.problems[:3])


def test_a_killed_worker_is_replaced_while_the_port_keeps_answering(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    ready, log = tmp_path / "ready.json", tmp_path / "server.log"
    cmd = [sys.executable, "-m", "medserve.server.cli", "serve", "--repository", str(repo), "--port", "0",
           "--workers", "2", "--ready-file", str(ready), "--metrics-port", "0"]
    with start_process(cmd, ready, log) as handle:
        victim = json.loads(ready.read_text())["workers"][0]
        with Load(handle.address, affine_request, callers=4) as load:
            load.wait_for(40)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: "worker 0 restarted" in log.read_text(), timeout_s=60)
            load.wait_for(40)

            def answering_worker() -> str:
                # A connection of its own each time (not one shared with the callers' channels).
                with grpc.insecure_channel(handle.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    return pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                        pb.ServerMetadataRequest(), timeout=10).name

            wait_for(lambda: answering_worker() == "medserve-w0", timeout_s=60)  # the replacement serves
            statuses = load.stop()
        # The ready file is rewritten for the replacement: its pid, and the metrics port it bound.
        wait_for(lambda: victim not in json.loads(ready.read_text())["workers"], timeout_s=30)
        announced = json.loads(ready.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{announced['metrics_ports'][0]}/metrics", timeout=10) as page:
            assert 'worker="medserve-w0"' in page.read().decode()
    # Calls on the killed worker's connections fail UNAVAILABLE (the client retries); none other.
    assert set(statuses) <= {"OK", "UNAVAILABLE"} and statuses["OK"] >= 80, (statuses, load.problems[:3])


def test_sigterm_under_load_answers_every_call_ok_or_unavailable(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.gather(repo / "m" / "1" / "model.onnx", slow_layers=60)
    onnx_models.write_config(repo, "m", "max_batch_size: 8\ndynamic_batching { }\n")
    ready, log = tmp_path / "ready.json", tmp_path / "server.log"
    cmd = [sys.executable, "-m", "medserve.server.cli", "serve", "--repository", str(repo), "--port", "0",
           "--ready-file", str(ready), "--drain-grace-s", "2", "--drain-announce-s", "0.2"]

    def gather_request() -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="idx", datatype="INT64", shape=[1, 1])
        req.raw_input_contents.append(to_raw(np.array([[1]], np.int64)))
        return req

    with start_process(cmd, ready, log) as handle:
        assert handle.process is not None
        with Load(handle.address, gather_request, callers=16) as load:
            load.wait_for(100)
            handle.process.send_signal(signal.SIGTERM)
            assert handle.process.wait(30) == 0
            time.sleep(0.5)  # callers see the closed port
            statuses = load.stop()
    assert statuses["OK"] >= 100 and set(statuses) <= DRAIN_OK, (statuses, load.problems[:5])


def test_overload_answers_only_ok_resource_exhausted_deadline_or_unavailable(tmp_path: Path) -> None:
    """Far more callers than the model can serve, a small queue and 1 s deadlines, for a few
    seconds (the long run with goodput figures is `python -m medserve.perf.bench_overload`)."""
    repo = tmp_path / "repo"
    onnx_models.gather(repo / "m" / "1" / "model.onnx", slow_layers=60)
    onnx_models.write_config(repo, "m", "max_batch_size: 4\ndynamic_batching { default_queue_policy { max_queue_size: 16 } }\n")

    def gather_request() -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="idx", datatype="INT64", shape=[1, 1])
        req.raw_input_contents.append(to_raw(np.array([[2]], np.int64)))
        return req

    with running_server(repo) as server:
        with Load(server.target, gather_request, callers=48, timeout_s=1.0) as load:
            time.sleep(4)
            statuses = load.stop()
    allowed = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert statuses["OK"] > 0 and statuses["RESOURCE_EXHAUSTED"] > 0, statuses
    assert set(statuses) <= allowed, (statuses, [p for p in load.problems if not p.startswith(("RESOURCE", "DEADLINE"))][:5])


def test_a_burst_past_grpcs_pending_call_limit_is_never_cancelled(tmp_path: Path) -> None:
    """2,400 calls arriving at once over three connections: more than gRPC's default limit on
    calls it holds before the asyncio server picks them up (1,000, then random early drops),
    past which gRPC itself ends calls CANCELLED. Every call ends OK or RESOURCE_EXHAUSTED."""
    import asyncio

    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    onnx_models.write_config(repo, "m", "max_batch_size: 64\ndynamic_batching { }\n")

    async def burst(target: str) -> Counter[str]:
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.channel_id", i)]) for i in range(3)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        request = affine_request()

        async def one(i: int) -> str:
            try:
                await stubs[i % 3].ModelInfer(request, timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as err:
                return err.code().name

        try:
            return Counter(await asyncio.gather(*(one(i) for i in range(2400))))
        finally:
            for c in channels:
                await c.close()

    with running_server(repo) as server:
        statuses = asyncio.run(burst(server.target))
    assert statuses["OK"] > 0 and set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
