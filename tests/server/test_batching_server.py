"""Dynamic batching through the real server: un-mixed results under concurrency, shape groups
without head-of-line blocking, queue limits, deadlines, cancellation, failure isolation and
statistics that add up. Outcomes never depend on timing luck: a test gate holds the single
instance busy (real onnxruntime runs once it opens), and the checks read statistics and queue
state."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw, to_raw

import onnx_models
from conftest import RunningServer, gated_repository, running_server, wait_for

SLOW_CONFIG = """
max_batch_size: 16
dynamic_batching { default_queue_policy { max_queue_size: 2 } }
"""
GATHER_CONFIG = "max_batch_size: 16\ndynamic_batching { }\n"
VARLEN_CONFIG = """
max_batch_size: 8
dynamic_batching { preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 60000000 }
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching") / "repo"
    onnx_models.slow(root / "slow" / "1" / "model.onnx")
    onnx_models.write_config(root, "slow", SLOW_CONFIG)
    onnx_models.gather(root / "gather" / "1" / "model.onnx", slow_layers=200)
    onnx_models.write_config(root, "gather", GATHER_CONFIG)
    onnx_models.variable_length(root / "varlen" / "1" / "model.onnx")
    onnx_models.write_config(root, "varlen", VARLEN_CONFIG)
    return root


GATES = {"gather": threading.Event(), "slow": threading.Event()}


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    for gate in GATES.values():
        gate.set()
    with running_server(repo, repository_cls=gated_repository(GATES)) as srv:
        yield srv
    for gate in GATES.values():
        gate.set()


@pytest.fixture
def hold() -> Iterator[dict[str, threading.Event]]:
    """Close a model's gate in a test; every gate is open again afterwards."""
    yield GATES
    for gate in GATES.values():
        gate.set()


def request(model: str, name: str, datatype: str, array: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    req.inputs.add(name=name, datatype=datatype, shape=array.shape)
    req.raw_input_contents.append(to_raw(array))
    return req


def output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    o = response.outputs[index]
    return from_raw(response.raw_output_contents[index], o.datatype, o.shape)


def stats(server: RunningServer, model: str) -> pb.ModelStatistics:
    return server.stub().ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]


def queued(server: RunningServer, model: str) -> int:
    batcher = server.server.repository.get(model).batcher
    return batcher.stats().queued


def in_flight(server: RunningServer, model: str) -> int:
    return server.server.repository.get(model).batcher.stats().in_flight_requests


def test_concurrent_clients_get_their_own_answers(server: RunningServer, repo: Path, hold) -> None:  # type: ignore[no-untyped-def]
    before = stats(server, "gather")
    session = ort.InferenceSession(str(repo / "gather" / "1" / "model.onnx"))
    stub = server.stub()
    rng = np.random.default_rng(3)
    payloads = [rng.integers(0, 8, size=(1 + i % 3, 1)).astype(np.int64) for i in range(48)]
    hold["gather"].clear()
    futures = [stub.ModelInfer.future(request("gather", "idx", "INT64", p), timeout=60) for p in payloads]
    wait_for(lambda: queued(server, "gather") + in_flight(server, "gather") == 48)
    hold["gather"].set()
    results = [f.result() for f in futures]
    for p, r in zip(payloads, results, strict=True):
        np.testing.assert_array_equal(output(r), session.run(None, {"idx": p})[0])
    after = stats(server, "gather")
    rows = sum(p.shape[0] for p in payloads)
    assert after.inference_stats.success.count - before.inference_stats.success.count == 48
    assert after.inference_count - before.inference_count == rows
    executed = after.execution_count - before.execution_count
    # One execution held at the gate, then the 47 queued requests in batches of <= 16 rows.
    assert executed <= 1 + -(-rows // 14), f"{executed} executions for {rows} rows: batches were not shared"
    sizes_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    grew = {b.batch_size: b.compute_infer.count - sizes_before.get(b.batch_size, 0) for b in after.batch_stats}
    assert sum(size * n for size, n in grew.items()) == rows
    assert sum(grew.values()) == executed
    assert max(size for size, n in grew.items() if n) > 3  # batches beyond one request's rows


def test_other_shape_does_not_close_or_delay_the_pending_batch(server: RunningServer) -> None:
    """Shape groups: A (T=5) waits for a companion; B (T=7) arrives and must neither close A's
    batch (Triton would run A alone) nor hold it; C (T=5) completes A's batch at once."""
    stub = server.stub()
    seq = lambda t, v: np.full((1, t, 3), v, np.float32)  # noqa: E731
    before = {b.batch_size: b.compute_infer.count for b in stats(server, "varlen").batch_stats}
    a = stub.ModelInfer.future(request("varlen", "seq", "FP32", seq(5, 1.0)), timeout=60)
    wait_for(lambda: queued(server, "varlen") == 1)
    b = stub.ModelInfer.future(request("varlen", "seq", "FP32", seq(7, 2.0)), timeout=60)
    wait_for(lambda: queued(server, "varlen") == 2)
    assert not a.done()
    c = stub.ModelInfer.future(request("varlen", "seq", "FP32", seq(5, 3.0)), timeout=60)
    np.testing.assert_allclose(output(a.result(30)), [[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(output(c.result(30)), [[3.0, 3.0, 3.0]])
    assert not b.done(), "B waits for its own companion (60 s delay), not A's"
    d = stub.ModelInfer.future(request("varlen", "seq", "FP32", seq(7, 4.0)), timeout=60)
    np.testing.assert_allclose(output(b.result(30)), [[2.0, 2.0, 2.0]])
    d.result(30)
    after = {b.batch_size: b.compute_infer.count for b in stats(server, "varlen").batch_stats}
    assert after.get(2, 0) - before.get(2, 0) == 2 and after.get(1, 0) == before.get(1, 0)


def test_queue_full_is_resource_exhausted(server: RunningServer, hold) -> None:  # type: ignore[no-untyped-def]
    stub = server.stub()
    x = np.ones((1, 1024), np.float32)
    hold["slow"].clear()
    accepted = [stub.ModelInfer.future(request("slow", "x", "FP32", x), timeout=120)]
    wait_for(lambda: in_flight(server, "slow") == 1)
    accepted += [stub.ModelInfer.future(request("slow", "x", "FP32", x), timeout=120) for _ in range(2)]
    wait_for(lambda: queued(server, "slow") == 2)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request("slow", "x", "FP32", x), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'slow' version 1" in info.value.details() and "queue full (2 requests queued)" in info.value.details()
    hold["slow"].set()
    for f in accepted:
        assert f.result().model_name == "slow"  # accepted requests are never lost


def test_deadline_that_cannot_be_met_is_refused_without_running(server: RunningServer) -> None:
    stub = server.stub()
    x = np.ones((1, 1024), np.float32)
    stub.ModelInfer(request("slow", "x", "FP32", x), timeout=60)  # the cost model has measurements
    before = stats(server, "slow")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request("slow", "x", "FP32", x), timeout=0.003)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: stats(server, "slow").inference_stats.fail.count > before.inference_stats.fail.count)
    after = stats(server, "slow")
    assert after.execution_count == before.execution_count
    assert after.inference_count == before.inference_count


def test_cancelled_client_request_leaves_the_queue_unexecuted(server: RunningServer, hold) -> None:  # type: ignore[no-untyped-def]
    stub = server.stub()
    x = np.ones((1, 1024), np.float32)
    before = stats(server, "slow")
    hold["slow"].clear()
    busy = stub.ModelInfer.future(request("slow", "x", "FP32", x), timeout=60)
    wait_for(lambda: in_flight(server, "slow") == 1)
    doomed = stub.ModelInfer.future(request("slow", "x", "FP32", x), timeout=60)
    wait_for(lambda: queued(server, "slow") == 1)
    doomed.cancel()
    wait_for(lambda: queued(server, "slow") == 0)
    hold["slow"].set()
    busy.result()
    wait_for(lambda: in_flight(server, "slow") == 0)
    after = stats(server, "slow")
    assert after.execution_count - before.execution_count == 1
    assert after.inference_count - before.inference_count == 1


def test_poisoned_request_fails_alone(server: RunningServer, hold) -> None:  # type: ignore[no-untyped-def]
    stub = server.stub()
    ok_payloads = [np.array([[i]], np.int64) for i in range(5)]
    poison = np.array([[99]], np.int64)
    before = stats(server, "gather")
    hold["gather"].clear()
    busy = stub.ModelInfer.future(request("gather", "idx", "INT64", np.array([[0]], np.int64)), timeout=60)
    wait_for(lambda: in_flight(server, "gather") == 1)
    futures = [stub.ModelInfer.future(request("gather", "idx", "INT64", p), timeout=60) for p in ok_payloads[:2]]
    bad = stub.ModelInfer.future(request("gather", "idx", "INT64", poison), timeout=60)
    futures += [stub.ModelInfer.future(request("gather", "idx", "INT64", p), timeout=60) for p in ok_payloads[2:]]
    wait_for(lambda: queued(server, "gather") == 6)
    hold["gather"].set()
    busy.result()
    for p, f in zip(ok_payloads, futures, strict=True):
        np.testing.assert_array_equal(output(f.result()), onnx_models.gather_answer(p))
    with pytest.raises(grpc.RpcError) as info:
        bad.result()
    assert info.value.code() == grpc.StatusCode.INTERNAL and "'gather' version 1" in info.value.details()
    after = stats(server, "gather")
    assert after.execution_count - before.execution_count == 2  # the busy one, then all six together
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def test_a_long_input_to_a_cheap_model_never_runs_on_the_event_loop(tmp_path: Path) -> None:
    """The cubic model costs microseconds at its warm-up sizes (T = 1 and 16) and about a second
    at T = 2600: larger than anything measured, so it runs on a worker thread, and health checks
    keep answering within 100 ms while it executes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    onnx_models.cubic(repo / "cubic" / "1" / "model.onnx")
    with running_server(repo) as srv:
        stub = srv.stub()
        small = request("cubic", "x", "FP32", np.full((1, 16), 1e-3, np.float32))
        for _ in range(20):  # cheap and measured: these normally run inline
            stub.ModelInfer(small, timeout=30)
        batcher = srv.server.repository.get("cubic").batcher
        inline = batcher.stats().inline_batches
        long = stub.ModelInfer.future(request("cubic", "x", "FP32", np.full((1, 2600), 1e-3, np.float32)), timeout=60)
        wait_for(lambda: in_flight(srv, "cubic") == 1)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.target))
        latencies = []
        while in_flight(srv, "cubic") == 1 and len(latencies) < 5:
            start = time.perf_counter()
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            latencies.append(time.perf_counter() - start)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert long.result().outputs[0].shape == [1, 1]
        assert latencies and max(latencies) < 0.100, latencies
        assert batcher.stats().inline_batches == inline  # the long one ran on the worker thread
