"""Every RPC of GRPCInferenceService against the real server with medserve's generated stubs
(tritonclient runs the same calls in tests/compat/). Results are compared with an in-process
onnxruntime run of the same file."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import model_config_pb2 as mc
from medserve.protos.wire import from_raw, to_raw

import onnx_models
from conftest import RunningServer, running_server

TYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rpcs") / "repo"
    onnx_models.affine(root / "affine" / "1" / "model.onnx")
    onnx_models.affine(root / "affine" / "2" / "model.onnx")
    onnx_models.write_config(root, "affine", "version_policy: { all: {} }\n")  # partial: rest from the graph
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    onnx_models.identity_types(root / "types" / "1" / "model.onnx", [t for t, _ in TYPES.values()])
    onnx_models.not_batching(root / "neg" / "1" / "model.onnx")
    onnx_models.write_config(root, "neg", 'name: "neg"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n')
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo, model_control_mode="explicit", load_models=("*",)) as srv:
        yield srv


def raw_request(model: str, inputs: dict[str, tuple[str, np.ndarray]], **fields: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    for name, (datatype, array) in inputs.items():
        req.inputs.add(name=name, datatype=datatype, shape=array.shape)
        req.raw_input_contents.append(to_raw(array))
    return req


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(response.raw_output_contents) == len(response.outputs)
    return {
        o.name: from_raw(raw, o.datatype, o.shape)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_health_and_server_metadata(server: RunningServer) -> None:
    stub = server.stub()
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "medserve" and "CPUExecutionProvider" in meta.version
    assert {"model_repository", "model_configuration", "statistics"} <= set(meta.extensions)
    assert not {"system_shared_memory", "cuda_shared_memory", "trace", "logging"} & set(meta.extensions)
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_model_ready_and_metadata(server: RunningServer) -> None:
    stub = server.stub()
    assert stub.ModelReady(pb.ModelReadyRequest(name="affine")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="affine", version="1")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="affine"))
    assert meta.name == "affine" and list(meta.versions) == ["1", "2"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("y", [-1, 4]), ("s", [-1, 1])]
    neg = stub.ModelMetadata(pb.ModelMetadataRequest(name="neg"))
    assert [list(t.shape) for t in neg.inputs] == [[3]]  # max_batch_size 0: no batch dim


def test_model_config_is_completed_from_the_graph(server: RunningServer) -> None:
    config = server.stub().ModelConfig(pb.ModelConfigRequest(name="affine")).config
    assert config.name == "affine" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 64
    assert config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", mc.TYPE_FP32, [4])]
    assert config.parameters["execution_providers"].string_value == "CPUExecutionProvider"
    assert len(config.parameters["model_sha256"].string_value) == 64


def test_infer_matches_onnxruntime_and_names_the_version(server: RunningServer, repo: Path) -> None:
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    response = server.stub().ModelInfer(raw_request("affine", {"x": ("FP32", x)}, id="req-42"))
    assert response.model_name == "affine" and response.model_version == "2" and response.id == "req-42"
    expected = ort.InferenceSession(str(repo / "affine" / "2" / "model.onnx")).run(None, {"x": x})
    got = outputs_of(response)
    np.testing.assert_array_equal(got["y"], expected[0])
    np.testing.assert_array_equal(got["s"], expected[1])
    assert len(response.parameters["model_sha256"].string_param) == 64


def test_explicit_version_and_output_subset_in_requested_order(server: RunningServer) -> None:
    x = np.ones((1, 4), np.float32)
    req = raw_request("affine", {"x": ("FP32", x)}, model_version="1")
    req.outputs.add(name="s")
    req.outputs.add(name="y")
    response = server.stub().ModelInfer(req)
    assert response.model_version == "1"
    assert [o.name for o in response.outputs] == ["s", "y"]
    req = raw_request("affine", {"x": ("FP32", x)})
    req.outputs.add(name="s")
    assert [o.name for o in server.stub().ModelInfer(req).outputs] == ["s"]


def test_typed_contents_are_accepted(server: RunningServer) -> None:
    req = pb.ModelInferRequest(model_name="affine")
    tensor = req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(range(8))
    got = outputs_of(server.stub().ModelInfer(req))
    np.testing.assert_array_equal(got["y"], 2 * np.arange(8, dtype=np.float32).reshape(2, 4) + 1)


@pytest.mark.parametrize("datatype", list(TYPES))
def test_every_datatype_round_trips(server: RunningServer, datatype: str) -> None:
    rng = np.random.default_rng(1)
    inputs = {}
    for i, (name, (_, dtype)) in enumerate(TYPES.items()):
        if name == "BYTES":
            array = np.array([["é", ""], ["abc", "x" * 300]], dtype=object)
        elif name == "BOOL":
            array = rng.integers(0, 2, size=(2, 2)).astype(bool)
        else:
            array = (rng.normal(size=(2, 2)) * 50).astype(dtype)
        inputs[f"in_{i}"] = (name, array)
    target = list(TYPES).index(datatype)
    req = raw_request("types", inputs)
    req.outputs.add(name=f"out_{target}")
    response = server.stub().ModelInfer(req)
    out = response.outputs[0]
    assert out.datatype == datatype
    got = from_raw(response.raw_output_contents[0], out.datatype, out.shape)
    sent = inputs[f"in_{target}"][1]
    if datatype == "BYTES":
        assert got.tolist() == [[s.encode() for s in row] for row in sent.tolist()]
    else:
        np.testing.assert_array_equal(got, sent)


def test_bytes_model(server: RunningServer) -> None:
    text = np.array([[b"sepsis"], [b"ok"]], dtype=object)
    got = outputs_of(server.stub().ModelInfer(raw_request("strings", {"text": ("BYTES", text)})))
    assert got["upper"].tolist() == [[b"SEPSIS"], [b"OK"]]


def test_not_batching_model(server: RunningServer) -> None:
    x = np.array([1, -2, 3], np.float32)
    got = outputs_of(server.stub().ModelInfer(raw_request("neg", {"x": ("FP32", x)})))
    np.testing.assert_array_equal(got["y"], -x)


def test_stream_infer_answers_each_request_in_band(server: RunningServer) -> None:
    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(5):
            yield raw_request("affine", {"x": ("FP32", np.full((1, 4), i, np.float32))}, id=f"s{i}")
        yield pb.ModelInferRequest(model_name="missing", id="bad")

    responses = list(server.stub().ModelStreamInfer(requests(), timeout=30))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"s0", "s1", "s2", "s3", "s4", "bad"}
    assert "'missing'" in by_id["bad"].error_message
    assert by_id["bad"].infer_response.parameters["status_code"].string_param == "NOT_FOUND"
    for i in range(5):
        r = by_id[f"s{i}"]
        assert r.error_message == ""
        np.testing.assert_array_equal(outputs_of(r.infer_response)["y"], np.full((1, 4), 2 * i + 1, np.float32))


def test_statistics_count_requests_and_batches(server: RunningServer) -> None:
    stub = server.stub()
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="affine", version="2")).model_stats[0]
    for _ in range(3):
        stub.ModelInfer(raw_request("affine", {"x": ("FP32", np.ones((2, 4), np.float32))}))
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="affine", version="2")).model_stats[0]
    assert after.name == "affine" and after.version == "2"
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 3
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert any(b.batch_size == 2 and b.compute_infer.count >= 3 for b in after.batch_stats)
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert {(s.name, s.version) for s in everything.model_stats} >= {("affine", "1"), ("affine", "2"), ("neg", "1")}


def test_repository_index_unload_and_load(server: RunningServer) -> None:
    stub = server.stub()
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} >= {("affine", "2", "READY"), ("neg", "1", "READY")}
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="neg"))
    assert not stub.ModelReady(pb.ModelReadyRequest(name="neg")).ready
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(raw_request("neg", {"x": ("FP32", np.zeros(3, np.float32))}))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert "neg" not in {m.name for m in ready_only.models}
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="neg"))
    assert stub.ModelReady(pb.ModelReadyRequest(name="neg")).ready
    with pytest.raises(grpc.RpcError) as info:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../escape"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="never_heard_of"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_and_unload_need_explicit_model_control(make_repo) -> None:  # type: ignore[no-untyped-def]
    """The default mode (none) serves what was there at start; nobody can unload a model."""
    repo = make_repo(affine=onnx_models.affine)
    with running_server(repo) as srv:
        stub = srv.stub()
        for call, request in ((stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="affine")),
                              (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="affine"))):
            with pytest.raises(grpc.RpcError) as info:
                call(request)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "--model-control-mode explicit" in info.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name="affine")).ready


def test_explicit_mode_loads_only_the_named_models(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(affine=onnx_models.affine, neg=onnx_models.not_batching)
    with running_server(repo, model_control_mode="explicit", load_models=("affine",)) as srv:
        stub = srv.stub()
        assert stub.ModelReady(pb.ModelReadyRequest(name="affine")).ready
        index = {m.name: m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index == {"affine": "READY", "neg": "UNAVAILABLE"}
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="neg"))
        assert stub.ModelReady(pb.ModelReadyRequest(name="neg")).ready


def test_the_grpc_health_service_answers_per_model(make_repo) -> None:  # type: ignore[no-untyped-def]
    """grpc.health.v1 with service = a model's name follows that model (load balancers and
    probes that speak gRPC health can route per model)."""
    repo = make_repo(affine=onnx_models.affine, neg=onnx_models.not_batching)
    with running_server(repo, model_control_mode="explicit", load_models=("affine",)) as srv:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.target))

        def status(name: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

        assert status("affine") == health_pb2.HealthCheckResponse.SERVING
        srv.stub().RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="neg"))
        assert status("neg") == health_pb2.HealthCheckResponse.SERVING
        srv.stub().RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="affine"))
        assert status("affine") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            status("no_such_model")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("method", "request_type"),
    [
        ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest),
        ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest),
        ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest),
        ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest),
        ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest),
        ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest),
        ("TraceSetting", pb.TraceSettingRequest),
        ("LogSettings", pb.LogSettingsRequest),
    ],
)
def test_unimplemented_extensions_say_so(server: RunningServer, method: str, request_type: type) -> None:
    with pytest.raises(grpc.RpcError) as info:
        getattr(server.stub(), method)(request_type())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not supported by medserve" in info.value.details()
