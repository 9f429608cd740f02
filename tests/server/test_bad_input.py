"""Every row of the bad-input table, against the real server: the status code and a message that
names model, version, tensor, expected and got — and never a tensor value."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw

import onnx_models
from conftest import RunningServer, running_server, wait_for

SECRET = 987654.25  # a value that must never appear in an error message


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-input") / "repo"
    onnx_models.affine(root / "affine" / "1" / "model.onnx")
    onnx_models.write_config(
        root, "affine",
        'max_batch_size: 8\ndynamic_batching { }\nparameters { key: "oversized_requests" value: { string_value: "refuse" } }\n',
    )
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    onnx_models.gather(root / "gather" / "1" / "model.onnx")
    broken = root / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an onnx file")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo, exit_on_error=False) as srv:
        yield srv


def affine_request(x: np.ndarray | None = None, **fields: object) -> pb.ModelInferRequest:
    x = np.full((2, 4), SECRET, np.float32) if x is None else x
    req = pb.ModelInferRequest(model_name="affine", **fields)  # type: ignore[arg-type]
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


def refused(server: RunningServer, req: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        server.stub().ModelInfer(req, timeout=30)
    assert str(SECRET) not in info.value.details() and "987654" not in info.value.details()
    return info.value


def test_unknown_model_is_not_found(server: RunningServer) -> None:
    err = refused(server, pb.ModelInferRequest(model_name="no_such_model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'no_such_model'" in err.details()


def test_unknown_version_is_not_found(server: RunningServer) -> None:
    err = refused(server, affine_request(model_version="7"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'affine' has no version 7" in err.details() and "[1]" in err.details()


def test_model_that_failed_to_load_is_failed_precondition(server: RunningServer) -> None:
    err = refused(server, pb.ModelInferRequest(model_name="broken"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "broken" in err.details() and "model.onnx" in err.details()


def test_wrong_input_name(server: RunningServer) -> None:
    req = affine_request()
    req.inputs[0].name = "features"
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'affine' version 1" in err.details() and "unexpected input 'features'" in err.details()


def test_missing_input(server: RunningServer) -> None:
    err = refused(server, pb.ModelInferRequest(model_name="affine"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "missing input 'x'" in err.details()


def test_extra_input(server: RunningServer) -> None:
    req = affine_request()
    req.inputs.add(name="age", datatype="FP32", shape=[2, 1])
    req.raw_input_contents.append(to_raw(np.zeros((2, 1), np.float32)))
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unexpected input 'age'" in err.details()


def test_wrong_datatype(server: RunningServer) -> None:
    x = np.full((2, 4), SECRET, np.float64)
    req = pb.ModelInferRequest(model_name="affine")
    req.inputs.add(name="x", datatype="FP64", shape=[2, 4])
    req.raw_input_contents.append(to_raw(x))
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': expected datatype FP32, got FP64" in err.details()


@pytest.mark.parametrize(
    ("shape", "got"), [((2, 5), "[2, 5]"), ((2, 4, 1), "[2, 4, 1]"), ((8,), "[8]")], ids=["dim", "rank+", "rank-"]
)
def test_wrong_shape_or_rank(server: RunningServer, shape: tuple[int, ...], got: str) -> None:
    err = refused(server, affine_request(np.full(shape, SECRET, np.float32)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"input 'x': expected shape [-1, 4], got {got}" in err.details()


def test_raw_byte_size_not_matching_shape(server: RunningServer) -> None:
    req = affine_request()
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in err.details() and "needs 32 bytes" in err.details() and "got 28" in err.details()


def test_typed_and_raw_contents_together(server: RunningServer) -> None:
    req = affine_request()
    req.inputs[0].contents.fp32_contents.extend([SECRET] * 8)
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': contents must not be set when raw_input_contents is used" in err.details()


def test_malformed_bytes_length_prefix(server: RunningServer) -> None:
    req = pb.ModelInferRequest(model_name="strings")
    req.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(b"\x09\x00\x00\x00abc")  # claims 9 bytes, has 3
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'text'" in err.details() and "length prefix runs past the end" in err.details()
    assert "9" not in err.details()  # the declared length is read from the payload: never echoed
    assert "abc" not in err.details()


def test_batch_larger_than_max_batch_size(server: RunningServer) -> None:
    err = refused(server, affine_request(np.zeros((9, 4), np.float32)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': batch size 9 exceeds max_batch_size 8 (the model's config sets oversized_requests: refuse)" in (
        err.details()
    )


def test_requested_output_that_does_not_exist(server: RunningServer) -> None:
    req = affine_request()
    req.outputs.add(name="risk")
    err = refused(server, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown output 'risk'" in err.details() and "['s', 'y']" in err.details()


def test_runtime_failure_is_internal_with_the_op_and_a_correlation_id_but_never_the_engine_text(
    server: RunningServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    req = pb.ModelInferRequest(model_name="gather")
    req.inputs.add(name="idx", datatype="INT64", shape=[1, 1])
    req.raw_input_contents.append(to_raw(np.array([[987654]], np.int64)))  # outside the table
    with caplog.at_level("DEBUG"):
        err = refused(server, req)
    assert err.code() == grpc.StatusCode.INTERNAL
    details = err.details()
    assert details.startswith("model 'gather' version 1: a Gather node failed (onnxruntime INVALID_ARGUMENT)")
    correlation = details.rsplit("correlation id ", 1)[1].rstrip(")")
    assert len(correlation) == 16
    assert "Traceback" not in details and "idx=" not in details
    # The server's log has the same correlation id, and neither it nor onnxruntime's own output
    # (stderr) quotes the index that was sent.
    assert any(correlation in r.getMessage() for r in caplog.records)
    logged = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records) + "".join(capfd.readouterr())
    assert "987654" not in logged


def test_server_survives_and_still_answers(server: RunningServer) -> None:
    response = server.stub().ModelInfer(affine_request(np.ones((1, 4), np.float32)), timeout=30)
    assert response.model_version == "1"


def test_model_loading_is_unavailable(tmp_path: Path) -> None:
    """While a model loads (held at a gate in the factory that makes its version), requests for
    it get UNAVAILABLE; once loaded they succeed."""
    from medserve.server.wiring import build_repository

    gate = threading.Event()

    def hold(files, runner):  # type: ignore[no-untyped-def]
        if files.name == "late":
            gate.wait(30)
        return runner

    def GatedRepository(config, *, clock):  # type: ignore[no-untyped-def]  # noqa: N802 - a repository "class"
        return build_repository(config, clock=clock, wrap_runner=hold)

    root = tmp_path / "repo"
    onnx_models.affine(root / "early" / "1" / "model.onnx")
    with running_server(root, repository_cls=GatedRepository, model_control_mode="explicit", load_models=("*",)) as srv:
        onnx_models.affine(root / "late" / "1" / "model.onnx")
        load = srv.stub().RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="late"), timeout=60)
        wait_for(lambda: any(e.name == "late" for e in srv.server.repository.entries()))
        req = affine_request()
        req.model_name = "late"
        err = refused(srv, req)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "'late' is loading" in err.details()
        gate.set()
        load.result()
        assert srv.stub().ModelInfer(req, timeout=30).model_name == "late"
