"""Publishing a new version while serving: RepositoryModelLoad brings it in once it is warm, the
old version drains (its in-flight request still gets its answer) and then stops serving."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw

import onnx_models
from conftest import gated_repository, running_server, wait_for


def slow_request(version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", model_version=version)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 1024])
    req.raw_input_contents.append(to_raw(np.ones((1, 1024), np.float32)))
    return req


def test_new_version_replaces_the_old_one_without_losing_requests(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=onnx_models.slow)
    gate = threading.Event()
    gate.set()
    with running_server(repo, repository_cls=gated_repository({"m": gate}), model_control_mode="explicit", load_models=("*",)) as srv:
        stub = srv.stub()
        assert stub.ModelInfer(slow_request(), timeout=60).model_version == "1"
        gate.clear()
        in_flight = stub.ModelInfer.future(slow_request(), timeout=60)
        wait_for(lambda: srv.server.repository.get("m").batcher.stats().in_flight_requests == 1)
        onnx_models.slow(repo / "m" / "2" / "model.onnx")  # a new version is published
        load = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="m"), timeout=60)
        # version 2 serves as soon as it is loaded, while version 1 still drains its request
        wait_for(lambda: srv.server.repository.get("m").version == 2, timeout_s=60)
        gate.set()
        assert in_flight.result().model_version == "1"
        load.result()
        assert stub.ModelInfer(slow_request(), timeout=60).model_version == "2"
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="m")).versions) == ["2"]
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(slow_request("1"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
