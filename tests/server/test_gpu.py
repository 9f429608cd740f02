"""The CUDA execution provider, where a GPU and its libraries are really usable (skipped
otherwise: CI has no GPU). The server must pick CUDA by itself, say so, and answer like the CPU."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw, to_raw
from medserve.server.runtime import CUDA, usable_providers

import onnx_models
from conftest import running_server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA not in usable_providers(), reason="no usable CUDA execution provider on this machine"),
]


def test_model_runs_on_cuda_and_matches_the_cpu(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=onnx_models.slow)
    x = np.random.default_rng(0).normal(size=(8, 1024)).astype(np.float32)
    with running_server(repo) as srv:
        stub = srv.stub()
        config = stub.ModelConfig(pb.ModelConfigRequest(name="m")).config
        assert config.parameters["execution_providers"].string_value.split(",")[0] == CUDA
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="x", datatype="FP32", shape=x.shape)
        req.raw_input_contents.append(to_raw(x))
        out = stub.ModelInfer(req, timeout=60)
    got = from_raw(out.raw_output_contents[0], out.outputs[0].datatype, out.outputs[0].shape)
    cpu = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, cpu.run(None, {"x": x})[0], rtol=1e-3, atol=1e-6)
