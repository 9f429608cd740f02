"""`--workers N` (several processes on one port), Prometheus metrics, and draining on SIGTERM."""
from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw

import onnx_models
from conftest import running_server, server_handle, server_process, wait_for


def affine_request(rows: int = 1, width: int = 4, model: str = "m") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, width])
    req.raw_input_contents.append(to_raw(np.ones((rows, width), np.float32)))
    return req


def test_two_workers_share_the_port_and_report_per_worker(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=onnx_models.affine)
    with server_process(repo, "--workers", "2") as (port, _proc):
        seen: dict[str, int] = {}
        for _ in range(64):  # each new channel is a new connection; the kernel spreads them
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                name = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name
                stub.ModelInfer(affine_request(), timeout=10)
                seen[name] = seen.get(name, 0) + 1
            if len(seen) == 2 and min(seen.values()) >= 2:
                break
        assert set(seen) == {"medserve-w0", "medserve-w1"}
        # Per-worker statistics: each worker counts only what it answered. Reaching a given
        # worker takes new connections until the kernel routes one there (bounded: with two
        # workers, 200 misses in a row would mean the kernel does not spread connections).
        for name in seen:
            for _ in range(200):
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    if stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name != name:
                        continue
                    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"), timeout=10).model_stats[0]
                    assert stats.inference_stats.success.count >= seen[name]
                    break
            else:
                pytest.fail(f"no connection reached worker {name} in 200 attempts")


def test_two_workers_with_any_free_metrics_port_name_each_workers_port_in_the_ready_file(
        make_repo) -> None:  # type: ignore[no-untyped-def]
    """`--workers 2 --metrics-port 0`: each worker binds a port of its own, which only it knows;
    the supervisor's ready file lists them, and each answers for its own worker."""
    repo = make_repo(m=onnx_models.affine)
    with server_handle(repo, "--workers", "2", "--metrics-port", "0") as handle:
        assert len(handle.metrics_ports) == 2 and len(set(handle.metrics_ports)) == 2
        workers = set()
        for port in handle.metrics_ports:
            labels = {dict(key[1])["worker"] for key in _scrape(port) if key[0] == "medserve_model_state"}
            workers |= labels
            assert len(labels) == 1
    assert workers == {"medserve-w0", "medserve-w1"}


def _scrape(port: int | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics, keyed by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_batches_handed_to_an_instance_are_not_counted_on_the_event_loop(make_repo) -> None:  # type: ignore[no-untyped-def]
    """With nothing cheap enough for the loop (--inline-below-us 0) every batch runs on an
    instance's thread: the operator's view of what the cost model decided."""
    repo = make_repo(m=onnx_models.affine)
    with running_server(repo, metrics_port=0, inline_below_us=0) as srv:
        for rows in (1, 3):
            srv.stub().ModelInfer(affine_request(rows), timeout=10)
        samples = _scrape(srv.server.metrics_port)
    base = (("model", "m"), ("version", "1"), ("worker", "medserve"))
    assert samples[("medserve_executions_total", base)] == 2
    assert samples[("medserve_executions_on_event_loop_total", base)] == 0


def test_prometheus_metrics_come_from_the_statistics(make_repo) -> None:  # type: ignore[no-untyped-def]
    delayed = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n"
    repo = make_repo(m=onnx_models.affine, d=(onnx_models.affine, delayed))
    with running_server(repo, metrics_port=0) as srv:
        stub = srv.stub()
        for rows in (1, 3):
            stub.ModelInfer(affine_request(rows), timeout=10)
        stub.ModelInfer(affine_request(2, model="d"), timeout=10)  # alone: d learns to close at 2 rows
        samples = _scrape(srv.server.metrics_port)
    base = (("model", "m"), ("version", "1"), ("worker", "medserve"))

    def value(name: str, **extra: str) -> float:
        return samples[(name, tuple(sorted(base + tuple(extra.items()))))]

    assert value("medserve_requests_total", outcome="success") == 2
    assert value("medserve_requests_total", outcome="fail") == 0
    assert value("medserve_inferences_total") == 4 and value("medserve_executions_total") == 2
    assert value("medserve_executions_on_event_loop_total") == 2  # a 4-feature affine map: cheaper than a hand-off
    assert value("medserve_batches_total", batch_size="3") == 1
    assert value("medserve_phase_seconds_total", phase="compute_infer") > 0
    assert value("medserve_queue_depth") == 0
    # 4 rows x 4 features, no padding: what the requests carried is what the batches ran
    assert value("medserve_input_elements_total", kind="requested") == value("medserve_input_elements_total",
                                                                            kind="executed") == 16
    assert ("medserve_batch_close_rows", base) not in samples  # m has no queue delay
    d = (("model", "d"), ("version", "1"), ("worker", "medserve"))
    assert samples[("medserve_batch_close_rows", d)] == 2


def test_sigterm_drains(make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=onnx_models.affine)
    with server_process(repo, "--drain-grace-s", "5") as (port, proc):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(affine_request(), timeout=10).model_name == "m"
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.poll() is not None, timeout_s=30)
        assert proc.returncode == 0
        channel.close()


def test_draining_finishes_in_flight_work_and_refuses_new(make_repo) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import gated_repository

    repo = make_repo(m=onnx_models.slow)  # slow enough to run on a worker thread, not the event loop
    gate = threading.Event()
    with running_server(repo, repository_cls=gated_repository({"m": gate}), drain_announce_s=1.0) as srv:
        stub = srv.stub()
        in_flight = stub.ModelInfer.future(affine_request(width=1024), timeout=60)
        wait_for(lambda: srv.server.repository.get("m").batcher.stats().in_flight_requests == 1)
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(60.0), srv.loop)
        wait_for(lambda: srv.server.lifecycle.draining)
        try:
            stub.ModelInfer(affine_request(width=1024), timeout=10)
            raise AssertionError("a draining server accepted new work")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.target))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        assert in_flight.result().model_name == "m"  # accepted work is never lost
        stopping.result(60)


def test_sighup_while_workers_start_kills_none_of_them(make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP to the supervisor every 20 ms from the moment it handles one until its workers are ready
    (an operator's `kill -HUP` racing a start or a restart): the supervisor forwards each, a worker
    that cannot handle it yet holds it (it starts with SIGHUP blocked), so no process dies and
    none is restarted. On the code before, the first SIGHUP killed the supervisor."""
    import json
    import os
    import subprocess
    import sys
    import time

    from credentials import write_tokens

    repo = make_repo(m=onnx_models.affine)
    tokens = write_tokens(tmp_path / "identities.json", {"t0123456789": ["m"]})
    ready, log = tmp_path / "ready.json", tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medserve.server.cli", "--log-level", "INFO", "serve", "--repository", str(repo),
             "--port", "0", "--workers", "2", "--tokens", str(tokens), "--ready-file", str(ready)],
            stdout=out, stderr=subprocess.STDOUT)
    def handles_sighup() -> bool:  # SIGHUP (bit 0) ignored or caught, from /proc/<pid>/status
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & 1)

    try:
        wait_for(handles_sighup, timeout_s=30)  # Python's own start-up: a SIGHUP there would kill any program
        deadline = time.monotonic() + 120
        sent = 0
        while not ready.exists():
            assert proc.poll() is None, f"the supervisor died after {sent} SIGHUPs:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline
            os.kill(proc.pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGHUP)
        pids = json.loads(ready.read_text())["workers"]
        wait_for(lambda: log.read_text().count("identities reloaded") >= 2, timeout_s=10)  # the last one, each
        text = log.read_text()
        print(f"{sent} SIGHUPs during start-up; {text.count('identities reloaded')} reloads logged")
        assert proc.poll() is None and all(os.path.exists(f"/proc/{pid}") for pid in pids)
        assert "exited" not in text and "restarted" not in text
        with grpc.insecure_channel(f"127.0.0.1:{json.loads(ready.read_text())['port']}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(affine_request(), metadata=(("authorization", "Bearer t0123456789"),),
                                   timeout=10).model_name == "m"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_metrics_negotiate_openmetrics_and_gzip_as_prometheus_asks(make_repo) -> None:  # type: ignore[no-untyped-def]
    """What prometheus_client's own WSGI app did and a Prometheus scrape asks for: OpenMetrics by
    the Accept header, gzip by Accept-Encoding; a plain GET gets the text format uncompressed."""
    import gzip

    repo = make_repo(m=onnx_models.affine)
    with running_server(repo, metrics_port=0) as srv:
        url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
        scrape = urllib.request.Request(url, headers={
            "Accept-Encoding": "gzip",
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        with urllib.request.urlopen(scrape, timeout=10) as resp:
            kind, encoding, body = resp.headers["Content-Type"], resp.headers["Content-Encoding"], resp.read()
        with urllib.request.urlopen(url, timeout=10) as resp:
            plain_kind, plain = resp.headers["Content-Type"], resp.read()
    assert kind.startswith("application/openmetrics-text") and encoding == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")
    assert plain_kind.startswith("text/plain") and b'medserve_requests_total{model="m"' in plain
