"""Issue 29's measuring side: the minimal handler (the second ceiling) answers like medserve, the
shared-engine prototype answers like onnxruntime, and the ratio functions read the sweeps as the
issue states its targets. Speed is never asserted."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from medserve.perf.bench_batching import TARGETS, ceiling_ratios, executions
from medserve.perf.bench_rows import rows_ratios, text_ratio
from medserve.perf.shared_engine import compare_rows
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw

import onnx_models
from conftest import running_server, server_handle, wait_for

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _request(model: str, x: np.ndarray, request_id: str = "r-1") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {o.name: np.frombuffer(raw, np.float32).reshape(tuple(o.shape))
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}


def _call(address: str, body: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)(body, timeout=10)


@contextmanager
def _minimal(model_file: Path, tmp_path: Path) -> Iterator[str]:
    """The minimal handler in this process, on its own event loop thread, port 0."""
    from medserve.perf.minimal_server import Handler, serve

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stop = asyncio.Event()
    ready = tmp_path / "minimal.json"
    serving = asyncio.run_coroutine_threadsafe(serve(Handler(model_file, "affine", "1"), ready_file=ready, stop=stop),
                                               loop)
    try:
        wait_for(ready.exists)
        yield f"127.0.0.1:{json.loads(ready.read_text())['port']}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        serving.result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_executions_sum_every_workers_batches_and_those_on_the_event_loop(make_repo) -> None:  # type: ignore[no-untyped-def]
    """What bench_batching prints beside its figures: per model, the batches of every worker of a
    `--workers 2 --metrics-port 0` server (each on a port of its own), and how many ran on the
    event loop. Each request here is a batch of its own, and the cheap model's run inline."""
    repo = make_repo(affine=onnx_models.affine, other=onnx_models.affine)
    with server_handle(repo, "--workers", "2", "--metrics-port", "0") as handle:
        sent = {"affine": 0, "other": 0}
        for i in range(24):  # new connections: the kernel spreads them over both workers
            model = "affine" if i % 3 else "other"
            _call(handle.address, _request(model, np.ones((1, 4), np.float32)).SerializeToString())
            sent[model] += 1
        counted = executions(handle.metrics_urls)
    assert {m: x["batches"] for m, x in counted.items()} == sent
    assert all(0 < x["on_event_loop"] <= x["batches"] for x in counted.values())


def test_minimal_handler_answers_with_onnxruntimes_outputs_in_medserves_layout(make_repo, tmp_path: Path) -> None:
    """One real ModelInfer: the outputs are onnxruntime's in process, bit for bit, and the
    response is medserve's for the same request (names, datatypes, shapes, raw bytes, the
    model_sha256 parameter), so the two ceilings' message sizes are medserve's."""
    repo = make_repo(affine=onnx_models.affine)
    model_file = repo / "affine" / "1" / "model.onnx"
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    body = _request("affine", x).SerializeToString()
    with _minimal(model_file, tmp_path) as address:
        mine = pb.ModelInferResponse.FromString(_call(address, body))
        asks_y = _request("affine", x)
        asks_y.outputs.add(name="y")
        only_y = pb.ModelInferResponse.FromString(_call(address, asks_y.SerializeToString()))
        # What parsing needs: a raw content that does not fit its shape, or an unknown output,
        # is INVALID_ARGUMENT naming the model and tensor, never a value.
        short = _request("affine", x)
        short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
        unknown = _request("affine", x)
        unknown.outputs.add(name="nope")
        for bad in (short, unknown):
            with pytest.raises(grpc.RpcError) as refused:
                _call(address, bad.SerializeToString())
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert "affine" in refused.value.details()  # type: ignore[attr-defined]
        with grpc.insecure_channel(address) as channel:
            meta = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                       request_serializer=pb.ModelMetadataRequest.SerializeToString,
                                       response_deserializer=pb.ModelMetadataResponse.FromString)(
                pb.ModelMetadataRequest(name="affine"), timeout=10)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x}), strict=True))
    got = _outputs(mine)
    assert list(got) == ["y", "s"]
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("x", [-1, 4])]
    assert [o.name for o in only_y.outputs] == ["y"]
    np.testing.assert_array_equal(_outputs(only_y)["y"], expected["y"])

    with running_server(repo) as srv:
        theirs = pb.ModelInferResponse.FromString(_call(srv.target, body))
    print(f"response bytes: medserve {theirs.ByteSize()}, minimal {mine.ByteSize()}")
    assert mine == theirs


def test_shared_engine_answers_each_front_end_with_its_own_rows(make_repo, tmp_path: Path) -> None:
    """Two front ends, one engine: concurrent requests of different row counts come back with
    onnxruntime's outputs for their own rows, and the engine's counters add up."""
    from medserve.perf.shared_engine import shared_server

    repo = make_repo(affine=onnx_models.affine)
    model_file = repo / "affine" / "1" / "model.onnx"
    rng = np.random.default_rng(1)
    xs = [rng.random((n, 4), dtype=np.float32) for n in (1, 3, 2, 5, 1, 4)]

    async def send(address: str) -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            return list(await asyncio.gather(*(call(_request("affine", x, f"r-{i}"), timeout=10)
                                               for i, x in enumerate(xs))))

    with shared_server(model_file, 2, tmp_path) as handle:
        responses = asyncio.run(send(handle.address))
        with grpc.insecure_channel(handle.address) as channel:
            stats = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics",
                                        request_serializer=pb.ModelStatisticsRequest.SerializeToString,
                                        response_deserializer=pb.ModelStatisticsResponse.FromString)(
                pb.ModelStatisticsRequest(), timeout=10)
    assert len(handle.worker_pids) == 2
    for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
        assert response.id == f"r-{i}"
        got = _outputs(response)
        np.testing.assert_allclose(got["y"], 2 * x + 1, rtol=1e-6)
        np.testing.assert_allclose(got["s"], x.sum(axis=1, keepdims=True), rtol=1e-5)
    (s,) = stats.model_stats
    assert s.inference_stats.success.count == len(xs) and s.inference_count == sum(len(x) for x in xs)
    assert 1 <= s.execution_count <= len(xs)


def _level(level: float, rps: float, p50: float = 1000.0, batch: float | None = None) -> dict:
    return {"level": level, "throughput_rps": rps, "latency_us": {"p50": p50, "p99": p50 * 2},
            "server_models": {"m:1": {"mean_batch": batch}} if batch else {}, "statuses": {"OK": 10},
            "server_cpu_cores": 1.0}


def _sweep(configs: dict[str, list[dict]]) -> dict:
    return {"configs": [{"name": n, "levels": lv} for n, lv in configs.items()]}


def test_ceiling_ratios_read_the_issues_targets() -> None:
    """medserve / minimal is targeted for the forest, batching on, one worker, c=64 and 256;
    medserve / fixed with 2 workers at 0.9; on/off from c=8; c=1 against the minimal p50 + 100 µs."""
    levels = (1.0, 8.0, 64.0)
    w1 = _sweep({
        "rf_on": [_level(1, 900, 1150, 1.0), _level(8, 2000, batch=2.0), _level(64, 1900, batch=5.0)],
        "rf_off": [_level(1, 950, 1000), _level(8, 2100), _level(64, 1800)],
        "fixed": [_level(1, 3000, 300), _level(8, 4000), _level(64, 4000)],
        "minimal": [_level(1, 1100, 1000), _level(8, 2000), _level(64, 2000)],
    })
    w2 = _sweep({
        "rf_on": [_level(64, 3700, batch=3.0)], "rf_off": [_level(64, 3000)],
        "fixed": [_level(64, 4000)], "minimal": [_level(64, 3500)],
    })
    r = ceiling_ratios({1: w1, 2: w2}, levels, ("rf",))
    minimal = {(x["workers"], x["variant"]): x for x in r["minimal"]}
    assert minimal[1, "on"]["ratio"] == 0.95 and minimal[1, "on"]["met"] is True
    assert minimal[1, "on"]["target"] == TARGETS["minimal_ratio_1w"] == 0.9
    assert minimal[1, "off"]["met"] is None and minimal[2, "on"]["target"] is None
    fixed = {(x["workers"], x["variant"]): x for x in r["fixed"]}
    assert fixed[2, "on"]["ratio"] == 0.925 and fixed[2, "on"]["target"] == 0.9 and fixed[2, "on"]["met"] is True
    assert fixed[1, "on"]["ratio"] == 0.475 and fixed[1, "on"]["met"] is False
    on_off = {(x["workers"], x["level"]): x for x in r["on_off"]}
    assert on_off[1, 1.0]["met"] is None and on_off[1, 1.0]["target"] is None
    assert on_off[1, 8.0]["met"] is False and on_off[1, 64.0]["met"] is True  # 2000/2100 and 1900/1800
    assert [x["mean_batch"] for x in r["batch"]] == [5.0, 3.0] and [x["met"] for x in r["batch"]] == [True, False]
    c1 = {x["variant"]: x for x in r["c1_minimal"]}
    assert c1["on"]["overhead_us"] == 150.0 and c1["on"]["met"] is False
    assert c1["off"]["overhead_us"] == 0.0 and c1["off"]["met"] is True
    assert {(x["workers"], x["level"]): x["ratio"] for x in r["ceilings"]} == {(1, 64.0): 0.5, (2, 64.0): 0.875}


def test_rows_and_text_ratios() -> None:
    points = [{"model": "rf", "level": 1.0, "throughput_rps": 100.0}, {"model": "cnn", "level": 8.0, "throughput_rps": 50.0}]
    out = rows_ratios(points, {"rf": 4000.0, "cnn": 1000.0}, rows=32)
    assert [(p["rows_per_s"], p["ratio"], p["met"]) for p in out] == [(3200.0, 0.8, True), (1600.0, 1.6, True)]
    assert rows_ratios(points[:1], {"rf": 4001.0}, rows=32)[0]["met"] is False
    assert rows_ratios(points[:1], {}, rows=32)[0]["ratio"] is None
    ceilings = [{"model": "rf:fixed", "level": 1.0, "throughput_rps": 110.0},
                {"model": "rf:minimal", "level": 1.0, "throughput_rps": 105.0}]
    (rf,) = rows_ratios(points[:1] + ceilings, {"rf": 8000.0}, rows=32)  # the ceilings are no rows of their own
    assert (rf["fixed_rows_per_s"], rf["fixed_ratio"], rf["minimal_ratio"]) == (3520.0, 0.44, 0.42)
    assert rf["transport_bound"] is True and rf["met"] is False  # even the fixed response is under 0.8
    (rf,) = rows_ratios(points[:1] + ceilings, {"rf": 4000.0}, rows=32)
    assert rf["transport_bound"] is False
    text = {"points": [
        {"model": "notes_transformer", "variant": "padded", "concurrency": 8, "throughput_rps": 1.0, "mean_batch": 1.0},
        {"model": "notes_transformer", "variant": "shape groups", "concurrency": 64, "throughput_rps": 9.0,
         "mean_batch": 2.0, "ratio_to_in_process": 0.9},
        {"model": "notes_transformer", "variant": "padded", "concurrency": 64, "throughput_rps": 300.0,
         "mean_batch": 20.0, "ratio_to_in_process": 0.3, "in_process": {"rows_per_s": 1000.0}},
    ]}
    t = text_ratio(text, 64)
    assert (t["ratio"], t["target"], t["met"], t["in_process_rows_per_s"]) == (0.3, 0.5, False, 1000.0)
    with pytest.raises(StopIteration):
        text_ratio(text, 256)


def test_shared_engine_comparison_rows() -> None:
    results = {"configs": [
        {"name": "independent", "levels": [_level(64, 2000)]},
        {"name": "shared", "levels": [_level(64, 3000, batch=6.5)]},
    ]}
    (row,) = compare_rows(results, 2)
    assert row["independent"]["mean_batch"] == 1.0 and row["shared"]["mean_batch"] == 6.5
    assert row["shared_over_independent"] == 1.5
