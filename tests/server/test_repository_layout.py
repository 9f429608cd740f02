"""Model repository layout: a hand-written Triton repository loads unchanged, a repository with
no config.pbtxt is completed from the graph, version policies, and broken entries fail loudly at
start-up naming the file and the field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import model_config_pb2 as mc
from medserve.protos.wire import to_raw
from medserve.server.errors import ModelLoadFailed, ModelNotFound

import onnx_models
from conftest import running_server, server_process

TRITON_CONFIG = """
name: "sepsis_risk"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 4 ]
  },
  {
    name: "s"
    data_type: TYPE_FP32
    dims: [ 1 ]
  }
]
version_policy: { latest: { num_versions: 2 } }
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 64 }
}
"""


def infer_x(stub, model: str, rows: int = 1, version: str = "") -> pb.ModelInferResponse:  # type: ignore[no-untyped-def]
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(to_raw(np.ones((rows, 4), np.float32)))
    return stub.ModelInfer(req, timeout=30)


def test_hand_written_triton_repository(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(sepsis_risk=(onnx_models.affine, TRITON_CONFIG))
    for version in (2, 3):
        onnx_models.affine(repo / "sepsis_risk" / str(version) / "model.onnx")
    with running_server(repo) as srv:
        stub = srv.stub()
        config = stub.ModelConfig(pb.ModelConfigRequest(name="sepsis_risk")).config
        assert config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.dynamic_batching.priority_levels == 2
        assert config.instance_group[0].count == 2 and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="sepsis_risk"))
        assert list(meta.versions) == ["2", "3"]  # latest 2 of 1, 2, 3
        assert infer_x(stub, "sepsis_risk", rows=3).model_version == "3"
        assert infer_x(stub, "sepsis_risk", version="2").model_version == "2"
        with pytest.raises(grpc.RpcError) as info:
            infer_x(stub, "sepsis_risk", version="1")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_repository_without_any_config(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(plain=onnx_models.affine, fixed=onnx_models.not_batching)
    with running_server(repo) as srv:
        stub = srv.stub()
        plain = stub.ModelConfig(pb.ModelConfigRequest(name="plain")).config
        assert plain.max_batch_size > 0 and [list(i.dims) for i in plain.input] == [[4]]
        fixed = stub.ModelConfig(pb.ModelConfigRequest(name="fixed")).config
        assert fixed.max_batch_size == 0 and [list(i.dims) for i in fixed.input] == [[3]]
        assert infer_x(stub, "plain", rows=5).outputs[0].shape == [5, 4]


def test_specific_version_policy(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=(onnx_models.affine, "version_policy: { specific: { versions: [1, 3] } }"))
    for version in (2, 3, 4):
        onnx_models.affine(repo / "m" / str(version) / "model.onnx")
    with running_server(repo) as srv:
        assert list(srv.stub().ModelMetadata(pb.ModelMetadataRequest(name="m")).versions) == ["1", "3"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("max_batch_size: 8\ninput [ { name: 'x' data_type: TYPE_FP32 dims: [ 5 ] } ]", "input[0] ('x').dims: config says [5], the graph has [4]"),
        ("max_batch_size: 8\ninput [ { name: 'x' data_type: TYPE_INT32 dims: [ 4 ] } ]", "input[0] ('x').data_type: config says INT32, the graph has FP32"),
        ("max_batch_size: 8\ninput [ { name: 'age' data_type: TYPE_FP32 dims: [ 1 ] } ]", "input[0] 'age' is not a input of the ONNX graph"),
        ("max_batch_size: 4\ndynamic_batching { preferred_batch_size: [ 8 ] }", "dynamic_batching.preferred_batch_size 8 must be in 1..max_batch_size (4)"),
        ("max_batch_size: 8\nmax_batch_size_typo: 3", "config.pbtxt: 2:1"),
        ("platform: 'tensorflow_savedmodel'", "platform 'tensorflow_savedmodel' is not served"),
        ("name: 'other'", "name 'other' does not match the model folder 'm'"),
        ("version_policy: { specific: { versions: [ 9 ] } }", "no version folder selected by version_policy specific"),
        ("instance_group [ { kind: KIND_MODEL } ]", "instance_group[0].kind KIND_MODEL is not supported"),
        ("instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]", "instance_group[0].gpus is only valid with kind KIND_GPU"),
        ("instance_group [ { kind: KIND_GPU } ]", "instance_group kind KIND_GPU, but no GPU execution provider is usable"),
        ("parameters { key: 'oversized_requests' value: { string_value: 'clip' } }",
         "parameters['oversized_requests'] is 'clip'; expected one of split, refuse"),
        ("parameters { key: 'explain_max_rows' value: { string_value: 'many' } }",
         "parameters['explain_max_rows'] must be an integer"),
    ],
    ids=["dims", "datatype", "unknown-input", "preferred", "syntax", "platform", "name", "no-version", "kind-model",
         "cpu-gpus", "gpu-without-gpu", "bad-parameter", "bad-explain-parameter"],
)
def test_broken_config_fails_at_start_naming_file_and_field(make_repo, config: str, message: str) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=(onnx_models.affine, config))
    with pytest.raises(ModelLoadFailed) as info, running_server(repo):
        pass
    assert message in str(info.value)
    assert str(info.value).startswith("m/config.pbtxt: ") or str(info.value).startswith("m: ")  # relative to it
    assert str(repo) not in str(info.value)  # messages never show the host's layout


def test_broken_model_stops_the_cli_with_a_clear_message(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(good=onnx_models.affine)
    bad = repo / "bad" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00garbage")
    done = subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "serve", "--repository", str(repo), "--port", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1
    assert "cannot start" in done.stderr and "bad/1/model.onnx: not a valid ONNX model file" in done.stderr
    assert str(repo) not in done.stderr.split("cannot start", 1)[1]


def test_model_path_escaping_the_repository_is_refused(make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(good=onnx_models.affine)
    outside = tmp_path / "outside" / "1" / "model.onnx"
    onnx_models.affine(outside)
    (repo / "sneaky").mkdir()
    os.symlink(outside.parent, repo / "sneaky" / "1")
    with pytest.raises(ModelLoadFailed, match="resolves outside the model repository"), running_server(repo):
        pass


def test_model_names_are_single_segments(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(good=onnx_models.affine)
    with running_server(repo) as srv:
        for name in ("../good", "good/1", ".", ""):
            with pytest.raises(ModelNotFound):
                srv.server.repository.model_dir(name)


def test_tampered_model_is_refused_naming_both_hashes(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=onnx_models.affine)
    card = repo / "m" / "1" / "model_card.json"
    card.write_text(json.dumps({"model_sha256": "0" * 64, "feature_names": ["a", "b", "c", "d"]}))
    with running_server(repo, exit_on_error=False) as srv:
        with pytest.raises(grpc.RpcError) as info:
            infer_x(srv.stub(), "m")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'m' version 1" in info.value.details() and "0" * 64 in info.value.details()
        assert "does not match model_card.json" in info.value.details()


def test_card_feature_names_and_hash_are_exposed(make_repo) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    repo = make_repo(m=onnx_models.affine)
    model = repo / "m" / "1" / "model.onnx"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    names = ["age", "heart rate", "lactate", "temp"]
    (model.parent / "model_card.json").write_text(
        json.dumps({"model_sha256": digest, "feature_names": names, "class_labels": ["no", "yes"]})
    )
    with running_server(repo) as srv:
        stub = srv.stub()
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))
        assert json.loads(meta.parameters["feature_names"].string_param) == names
        config = stub.ModelConfig(pb.ModelConfigRequest(name="m")).config
        assert json.loads(config.parameters["class_labels"].string_value) == ["no", "yes"]
        assert infer_x(stub, "m").parameters["model_sha256"].string_param == digest


def test_serve_cli_reports_port_and_answers(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(m=onnx_models.affine)
    with server_process(repo) as (port, _proc):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        from medserve.protos import grpc_service_pb2_grpc

        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert infer_x(stub, "m").model_name == "m"




def test_kind_cpu_instances_run_on_the_cpu_provider_only(make_repo) -> None:  # type: ignore[no-untyped-def]
    """KIND_CPU is honoured even where a GPU provider is usable (on a CPU-only host this still
    checks that each group's instances are built and reported)."""
    config = "instance_group [ { count: 2, kind: KIND_CPU }, { count: 1, kind: KIND_AUTO } ]"
    repo = make_repo(m=(onnx_models.affine, config))
    with running_server(repo) as srv:
        loaded = srv.server.repository.get("m")
        assert loaded.config.instance_count == 3
        assert len(loaded.config.instance_groups) == 2
        reported = srv.stub().ModelConfig(pb.ModelConfigRequest(name="m")).config
        assert [(g.kind, g.count) for g in reported.instance_group] == [
            (mc.ModelInstanceGroup.KIND_CPU, 2), (mc.ModelInstanceGroup.KIND_AUTO, 1)
        ]
        assert infer_x(srv.stub(), "m").model_name == "m"


def test_kind_cpu_sessions_ask_for_the_cpu_provider_alone() -> None:
    from medserve.server.runtime import CPU, CUDA, SessionOptions, instance_providers

    gpu_host = SessionOptions(providers=(CUDA, CPU))
    assert instance_providers(gpu_host, "KIND_CPU", (), 2) == [[CPU], [CPU]]
    assert instance_providers(gpu_host, "KIND_AUTO", (), 1) == [[CUDA, CPU]]
    assert instance_providers(gpu_host, "KIND_GPU", (0, 1), 1) == [
        [(CUDA, {"device_id": "0"}), CPU], [(CUDA, {"device_id": "1"}), CPU]
    ]


def test_unimplemented_triton_fields_are_named_in_a_warning(make_repo, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    config = (
        "optimization { graph { level: 1 } }\n"
        "model_warmup [ { name: 'w' batch_size: 1 } ]\n"
        "response_cache { enable: true }\n"
        "instance_group [ { count: 1 kind: KIND_CPU rate_limiter { priority: 2 } } ]\n"
        "parameters { key: 'intra_op_thread_count' value: { string_value: '4' } }\n"
        "parameters { key: 'explain_max_rows' value: { string_value: '4' } }\n"
    )
    repo = make_repo(m=(onnx_models.affine, config))
    with caplog.at_level("WARNING"), running_server(repo) as srv:
        assert infer_x(srv.stub(), "m").model_name == "m"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    (unimplemented,) = [w for w in warnings if "medserve does not implement" in w]
    for field in ("optimization", "model_warmup", "response_cache", "instance_group[0].rate_limiter"):
        assert field in unimplemented
    assert any("parameters['intra_op_thread_count'] is not a medserve parameter" in w for w in warnings), warnings
    assert not any("explain_max_rows" in w for w in warnings), warnings  # medserve's own: read, not ignored


def test_a_version_is_made_whole_and_frozen_and_runs_what_the_factory_was_given(make_repo) -> None:  # type: ignore[no-untyped-def]
    """The loader checks a version's files once and the factory makes it complete (batcher,
    explainer, signature, warm-up figures are there when it is made; nothing is set later):
    its batches run on what `wrap_runner` returned, its warm-up on the sessions themselves."""
    import asyncio
    import time
    from dataclasses import FrozenInstanceError

    from medserve.server.batching import BatchRequest
    from medserve.server.config import ServerConfig
    from medserve.server.loader import RepositoryFiles
    from medserve.server.wiring import VersionFactory

    calls: list[int] = []

    class Counting:
        def __init__(self, runner) -> None:  # type: ignore[no-untyped-def]
            self._runner = runner
            self.engine_clock = runner.engine_clock

        def __call__(self, inputs):  # type: ignore[no-untyped-def]
            calls.append(len(next(iter(inputs.values()))))
            return self._runner(inputs)

    def counting(files, runner):  # type: ignore[no-untyped-def]
        assert (files.name, files.version) == ("m", 1)
        return Counting(runner)

    repo = make_repo(m=onnx_models.affine)
    files = RepositoryFiles(repo)
    base, versions = files.versions("m")
    factory = VersionFactory(ServerConfig(repository=str(repo), port=0), clock=time.monotonic, wrap_runner=counting)
    loaded = factory(files.version(base, versions[0]))
    assert loaded.label == "'m' version 1" and loaded.warmups and loaded.explainer.output == "y"
    assert calls == []  # the warm-up ran on the sessions, not on the injected runner
    with pytest.raises(FrozenInstanceError):
        loaded.batcher = None  # type: ignore[misc]

    async def one() -> dict[str, np.ndarray]:
        loaded.start()
        try:
            return await loaded.batcher.submit(BatchRequest({"x": np.ones((2, 4), np.float32)}, rows=2))
        finally:
            await loaded.close(1.0)

    out = asyncio.run(one())
    np.testing.assert_allclose(out["y"], onnx_models.affine_answer(np.ones((2, 4), np.float32))["y"], rtol=1e-6)
    assert calls == [2]
