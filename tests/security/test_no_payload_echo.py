"""No number or text derived from a payload in any error message or log line (issue #25, row 11):
random floats and strings sent under wrong datatypes to a real server with every logger at
DEBUG, every answer's message and every log line searched for their renderings (str, repr,
common float formats, and the integers a length prefix or a float's bits would be read as).

Before: an FP32 7731.55 sent as BYTES was refused with "declares 1173462118 bytes" (the float's
bits read as a BYTES length prefix), "CANARY-PATIENT-4242" without a prefix with 1095647555
(b"CANA"), and the same in the INFO log.
"""
from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc

import onnx_models
from conftest import running_server


class Collect(logging.Handler):
    """Every log record, formatted as a log line would be (exception text included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + " " + " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in logging.LogRecord("", 0, "", 0, "", (), None).__dict__))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pb_grpc.GRPCInferenceServiceStub, Collect]]:
    repo = tmp_path_factory.mktemp("echo") / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    onnx_models.strings(repo / "strings" / "1" / "model.onnx")
    collect = Collect()
    root = logging.getLogger()
    level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        with running_server(repo) as server, grpc.insecure_channel(server.target) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel), collect
    finally:
        root.removeHandler(collect)
        root.setLevel(level)


def raw_request(model: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="echo-test")
    request.inputs.add(name="text" if model == "strings" else "x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def typed_request(model: str, datatype: str, shape: list[int], field: str, values: list[object]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="echo-test")
    tensor = request.inputs.add(name="text" if model == "strings" else "x", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def words_of(data: bytes) -> list[int]:
    """The integers the first bytes of `data` would be read as (a length prefix, either sign or order)."""
    head = data[:4].ljust(4, b"\0")
    return [struct.unpack(f, head)[0] for f in ("<I", "<i", ">I", ">i")]


def float_renderings(value: float) -> set[str]:
    single = float(np.float32(value))
    out = set()
    for v in (value, single):
        out |= {str(v), repr(v), f"{v:.2f}", f"{v:.1f}", f"{v:g}", f"{v:.6g}", f"{v:e}", f"{v:.3e}"}
    out.add(str(np.float32(value)))
    bits = struct.pack("<f", single) + struct.pack("<d", value)
    out |= {str(n) for i in range(0, len(bits), 4) for n in words_of(bits[i:])}
    return {r for r in out if len(r.lstrip("-")) >= 5}  # shorter ones occur in any message (shapes, sizes)


def string_renderings(text: str) -> set[str]:
    data = text.encode()
    return {text, repr(text), repr(data), data.hex()} | {str(n) for n in words_of(data) if abs(n) >= 10_000}


def found(renderings: set[str], haystack: str) -> list[str]:
    """Renderings present in `haystack`; a number only where no digit adjoins it."""
    hits = []
    for r in renderings:
        if re.fullmatch(r"-?[0-9.e+]+", r):
            if re.search(rf"(?<![0-9.]){re.escape(r)}(?![0-9])", haystack):
                hits.append(r)
        elif r in haystack:
            hits.append(r)
    return hits


def attempts(floats: list[float], text: str) -> list[tuple[str, pb.ModelInferRequest]]:
    """Payloads under a datatype they are not: each a request the server must refuse."""
    f32, f64, data = np.asarray(floats, np.float32), np.asarray(floats, np.float64), text.encode()
    n = len(floats)
    return [
        ("FP32 bits as BYTES", raw_request("strings", "BYTES", [n, 1], f32.tobytes())),
        ("FP64 bits as BYTES", raw_request("strings", "BYTES", [n, 1], f64.tobytes())),
        ("FP32 bits as one BYTES element", raw_request("strings", "BYTES", [1, 1], f32.tobytes())),
        ("text without length prefix", raw_request("strings", "BYTES", [1, 1], data)),
        ("text as FP32", raw_request("affine", "FP32", [1, 4], data)),
        ("text as FP64", raw_request("affine", "FP64", [1, 4], data)),
        ("text as BYTES to an FP32 input", typed_request("affine", "BYTES", [1, 1], "bytes_contents", [data])),
        ("text in bytes_contents declared FP32", typed_request("affine", "FP32", [1, 4], "bytes_contents", [data] * 4)),
        ("floats in fp32_contents declared BYTES", typed_request("strings", "BYTES", [n, 1], "fp32_contents", floats)),
        ("floats as FP64 to an FP32 input", raw_request("affine", "FP64", [1, n], f64.tobytes())),
        ("floats as FP32 to a BYTES input", raw_request("strings", "FP32", [n, 1], f32.tobytes())),
        ("floats as INT8", typed_request("affine", "INT8", [1, n], "int_contents", [int(v) for v in floats])),
        ("floats of the wrong count", typed_request("affine", "FP32", [1, 4], "fp32_contents", floats * 3)),
    ]


def send(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    """The refusal's message ("" when the bytes happen to fit: 16 bytes of text are 4 FP32s)."""
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        return err.details() or ""
    return ""


def check(served: tuple[pb_grpc.GRPCInferenceServiceStub, Collect], floats: list[float], text: str,
          extra: Callable[[str], None] = lambda message: None) -> None:
    stub, collect = served
    renderings = set().union(*map(float_renderings, floats), string_renderings(text))
    for what, request in attempts(floats, text):
        collect.lines.clear()
        message = send(stub, request)
        extra(message)
        assert not found(renderings, message), (what, message, found(renderings, message))
        logged = "\n".join(collect.lines)
        assert not found(renderings, logged), (what, found(renderings, logged), logged[-2000:])


def test_the_issue_canaries(served: tuple[pb_grpc.GRPCInferenceServiceStub, Collect]) -> None:
    """Row 11 as reported: 1173462118 is FP32 7731.55's bits, 1095647555 is b"CANA"."""

    def no_prefix_integer(message: str) -> None:
        assert "1173462118" not in message and "1095647555" not in message, message

    check(served, [7731.55], "CANARY-PATIENT-4242", no_prefix_integer)


FLOATS = st.floats(min_value=1000.0, max_value=1e7, allow_nan=False, allow_infinity=False).filter(
    lambda v: v != int(v)) | st.floats(min_value=-1e7, max_value=-1000.0).filter(lambda v: v != int(v))
TEXT = st.text(st.sampled_from("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789-_ "), min_size=8, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(floats=st.lists(FLOATS, min_size=1, max_size=6), text=TEXT.map(lambda t: "PT-" + t))
def test_random_payloads_under_wrong_datatypes_are_never_echoed(
    served: tuple[pb_grpc.GRPCInferenceServiceStub, Collect], floats: list[float], text: str
) -> None:
    check(served, floats, text)


def test_the_log_is_captured(served: tuple[pb_grpc.GRPCInferenceServiceStub, Collect]) -> None:
    """The search above would be empty if nothing reached the handler: a refusal is logged."""
    stub, collect = served
    collect.lines.clear()
    send(stub, raw_request("strings", "BYTES", [1, 1], b"\x09\x00\x00\x00abc"))
    assert any("request refused: INVALID_ARGUMENT" in line for line in collect.lines), collect.lines
