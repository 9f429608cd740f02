"""Property: no ModelInferRequest, however malformed, is answered INTERNAL or UNKNOWN.

Hypothesis generates requests over model names and versions, input names, datatypes, shapes
(0, negative, 2**31 and 2**62 dims, ranks up to 70), raw and typed contents (right-sized, wrong-
sized, both at once, the wrong typed field), BYTES length prefixes (valid and corrupt), requested
outputs and parameters, and sends each from a raw stub to a real server. Every answer must be OK
or one of the documented refusals, with a message; afterwards a valid request still succeeds.

The served models execute any well-typed input (no Gather with an out-of-range index: that one
fails inside onnxruntime and is INTERNAL by design), so an INTERNAL here is always a bug.
"""
from __future__ import annotations

import collections
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import DATATYPES, to_raw

import onnx_models
from conftest import RunningServer, running_server

EXAMPLES = 600
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
IDENTITY_TYPES = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.UINT8, TensorProto.DOUBLE,
                  TensorProto.FLOAT16, TensorProto.INT8, TensorProto.STRING)
# model -> its input names (what a request has to guess right to get past the name checks)
MODELS = {
    "affine": ("x",),
    "strings": ("text",),
    "varlen": ("seq",),
    "fixed": ("x",),
    "types": tuple(f"in_{i}" for i in range(len(IDENTITY_TYPES))),
    "refusing": ("x",),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("fuzz") / "repo"
    onnx_models.affine(root / "affine" / "1" / "model.onnx")
    onnx_models.write_config(root, "affine", "max_batch_size: 4\ndynamic_batching { }\n")
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    onnx_models.variable_length(root / "varlen" / "1" / "model.onnx")
    onnx_models.not_batching(root / "fixed" / "1" / "model.onnx")
    onnx_models.identity_types(root / "types" / "1" / "model.onnx", IDENTITY_TYPES)
    onnx_models.affine(root / "refusing" / "1" / "model.onnx")
    onnx_models.write_config(
        root, "refusing",
        'max_batch_size: 2\ndynamic_batching { priority_levels: 2 default_priority_level: 1 '
        'default_queue_policy { max_queue_size: 1 allow_timeout_override: true } }\n'
        'parameters { key: "oversized_requests" value: { string_value: "refuse" } }\n',
    )
    onnx_models.affine(root / "broken" / "1" / "model.onnx")
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    with running_server(root, exit_on_error=False, max_message_bytes=8 << 20) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Any:
    """One channel for the whole run (a new one per example would dominate its time)."""
    return server.stub()


@pytest.fixture(scope="module")
def seen() -> collections.Counter[str]:
    """Statuses answered, over the module's tests (printed at the end)."""
    return collections.Counter()


DIMS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 9]),
    st.sampled_from([-1, -7, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]),
    st.integers(min_value=0, max_value=64),
)
SHAPES = st.one_of(
    st.lists(DIMS, min_size=0, max_size=4),
    st.lists(st.just(1), min_size=60, max_size=70),  # past numpy's rank limit
)
DATATYPE_NAMES = st.one_of(st.sampled_from(sorted(DATATYPES)), st.sampled_from(["", "FP33", "float32", "STRING"]))
TEXT = st.text(max_size=12)


def _bytes_payload(count: int, draw: st.DrawFn) -> bytes:
    """BYTES raw contents: `count` elements with valid prefixes, then maybe corrupted."""
    items = [draw(st.binary(max_size=6)) for _ in range(min(count, 16))]
    raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
    corruption = draw(st.sampled_from(["none", "truncate", "overlong", "trailing", "non-utf8"]))
    if corruption == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif corruption == "overlong":
        raw += struct.pack("<I", 2**31) + b"ab"
    elif corruption == "trailing":
        raw += b"\x00\x01"
    elif corruption == "non-utf8":
        raw = struct.pack("<I", 2) + b"\xff\xfe" + raw
    return raw


def _fill_typed(tensor: pb.ModelInferRequest.InferInputTensor, count: int, draw: st.DrawFn) -> None:
    fields = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
              "fp32_contents", "fp64_contents", "bytes_contents"]
    entry = DATATYPES.get(tensor.datatype)
    field = entry.contents_field if entry is not None and entry.contents_field and draw(st.booleans()) else (
        draw(st.sampled_from(fields)))
    n = min(count, 16) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    n = max(0, n)
    values = {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": st.integers(-(2**63), 2**63 - 1),
        "uint_contents": st.integers(0, 2**32 - 1),
        "uint64_contents": st.integers(0, 2**64 - 1),
        "fp32_contents": st.floats(width=32, allow_nan=True),
        "fp64_contents": st.floats(allow_nan=True),
        "bytes_contents": st.binary(max_size=5),
    }[field]
    getattr(tensor.contents, field).extend(draw(st.lists(values, min_size=n, max_size=n)))


def _parameter(target: pb.InferParameter, draw: st.DrawFn) -> None:
    kind = draw(st.sampled_from(["int64_param", "uint64_param", "bool_param", "string_param", "double_param"]))
    value = {
        "int64_param": st.integers(-(2**63), 2**63 - 1),
        "uint64_param": st.integers(0, 2**64 - 1),
        "bool_param": st.booleans(),
        "string_param": TEXT,
        "double_param": st.floats(allow_nan=True),
    }[kind]
    setattr(target, kind, draw(value))


# model -> its inputs as (name, datatype, non-batch dims; -1 = variable); batch dim first if batched
SIGNATURES = {
    "affine": (True, (("x", "FP32", (4,)),)),
    "refusing": (True, (("x", "FP32", (4,)),)),
    "strings": (True, (("text", "BYTES", (1,)),)),
    "varlen": (True, (("seq", "FP32", (-1, 3)),)),
    "fixed": (False, (("x", "FP32", (3,)),)),
    "types": (True, tuple((f"in_{i}", d, (2,)) for i, d in enumerate(
        ("FP32", "INT64", "BOOL", "UINT8", "FP64", "FP16", "INT8", "BYTES")))),
}


def _valid_tensor(
    request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], raw: bool, draw: st.DrawFn
) -> None:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        array = np.array(draw(st.lists(st.text(max_size=4), min_size=count, max_size=count)), dtype=object)
    elif datatype == "BOOL":
        array = np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=bool)
    else:
        array = np.arange(count).astype(DATATYPES[datatype].dtype)
    array = array.reshape(shape)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(to_raw(array))
    else:
        values = [v.encode() if isinstance(v, str) else v for v in array.reshape(-1).tolist()]
        getattr(tensor.contents, str(DATATYPES[datatype].contents_field)).extend(values)


@st.composite
def nearly_valid_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A well-formed request for a served model, then maybe one thing changed."""
    model = draw(st.sampled_from(sorted(SIGNATURES)))
    batched, inputs = SIGNATURES[model]
    rows = draw(st.integers(1, 6))
    request = pb.ModelInferRequest(model_name=model, id=draw(TEXT))
    # Typed contents exist for every datatype but FP16/BF16: a request mixing them must go raw.
    raw = draw(st.booleans()) or any(DATATYPES[d].contents_field is None for _, d, _ in inputs)
    for name, datatype, dims in inputs:
        shape = ([rows] if batched else []) + [draw(st.integers(0, 4)) if d == -1 else d for d in dims]
        _valid_tensor(request, name, datatype, shape, raw, draw)
    mutation = draw(st.sampled_from(["none", "none", "none", "dim", "datatype", "drop", "param", "version"]))
    if mutation == "dim" and request.inputs:
        tensor = request.inputs[draw(st.integers(0, len(request.inputs) - 1))]
        if tensor.shape:
            tensor.shape[draw(st.integers(0, len(tensor.shape) - 1))] = draw(DIMS)
    elif mutation == "datatype" and request.inputs:
        request.inputs[0].datatype = draw(DATATYPE_NAMES)
    elif mutation == "drop" and request.inputs:
        del request.inputs[-1]
    elif mutation == "param":
        _parameter(request.parameters[draw(st.sampled_from(["priority", "timeout", "x"]))], draw)
    elif mutation == "version":
        request.model_version = draw(st.sampled_from(["1", "2", "0", "9" * 5000, "\u0661"]))
    return request


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    model = draw(st.one_of(st.sampled_from(sorted(MODELS) + ["broken"]), TEXT))
    version = draw(st.sampled_from(["", "", "1", "2", "0", "-1", "01", "1.0", "\u0661", "9" * 5000, " 1"]))
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=draw(TEXT))
    known = MODELS.get(model, ("x",))
    raw_mode = draw(st.sampled_from(["raw", "typed", "both", "mismatched"]))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(known), TEXT))
        tensor = request.inputs.add(name=name, datatype=draw(DATATYPE_NAMES), shape=draw(SHAPES))
        if draw(st.booleans()):
            tensor.parameters[draw(st.sampled_from(["shared_memory_region", "binary_data_size", "x"]))].int64_param = 1
        entry = DATATYPES.get(tensor.datatype)
        small = [d if 0 <= d <= 64 else 1 for d in tensor.shape]
        count = int(np.prod(small)) if len(small) < 8 else 1
        if raw_mode in ("raw", "both", "mismatched"):
            if tensor.datatype == "BYTES":
                raw = _bytes_payload(count, draw)
            else:
                size = (entry.itemsize if entry and entry.itemsize else 4) * count
                raw = draw(st.binary(min_size=size, max_size=size)) if size <= 4096 else b""
                raw += draw(st.sampled_from([b"", b"", b"\x00", b"\x01\x02\x03"]))
            request.raw_input_contents.append(raw)
        if raw_mode in ("typed", "both"):
            _fill_typed(tensor, count, draw)
    if raw_mode == "mismatched":
        request.raw_input_contents.append(b"extra")
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.one_of(st.sampled_from(["y", "s", "upper", "m", "out_0"]), TEXT)))
        if draw(st.integers(0, 4)) == 0:
            out.parameters[draw(st.sampled_from(["classification", "shared_memory_region", "binary_data"]))].int64_param = 1
    for _ in range(draw(st.integers(0, 3))):
        _parameter(request.parameters[draw(st.sampled_from(["priority", "timeout", "sequence_id", "x"]))], draw)
    return request


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(request=st.one_of(infer_requests(), nearly_valid_requests()))
def test_no_request_is_answered_internal_or_unknown(
    stub: Any, seen: collections.Counter[str], request: pb.ModelInferRequest
) -> None:
    try:
        stub.ModelInfer(request, timeout=20)
        seen["OK"] += 1
    except grpc.RpcError as err:
        seen[err.code().name] += 1
        assert err.code() in DOCUMENTED, f"{err.code().name}: {err.details()}"
        assert err.details(), err.code()


def test_the_server_still_answers_after_the_fuzz(stub: Any, seen: collections.Counter[str]) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(to_raw(x))
    response = stub.ModelInfer(request, timeout=20)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 4).tolist() == (2 * x + 1).tolist()
    total = sum(seen.values())
    print(f"\nfuzz: {total} requests; statuses: {dict(sorted(seen.items()))}")
    assert total >= EXAMPLES and seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0
