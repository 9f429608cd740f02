"""The codec's pure functions, without a server: ModelInferRequest -> InferRequest (arrays,
outputs, parameters) and InferResult -> ModelInferResponse, with every refusal's message."""
from __future__ import annotations

import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw, to_raw
from medserve.server.codec import decode_infer_request, encode_infer_response
from medserve.server.errors import InvalidInput
from medserve.server.inference import InferResult, OutputTensor

SECRET = 31337.5


def request(**fields: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", model_version="2", **fields)  # type: ignore[arg-type]


def with_raw(array: np.ndarray, datatype: str = "FP32", name: str = "x") -> pb.ModelInferRequest:
    req = request()
    req.inputs.add(name=name, datatype=datatype, shape=array.shape)
    req.raw_input_contents.append(to_raw(array))
    return req


def refused(req: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(req)
    message = str(info.value)
    assert message.startswith("model 'm' version 2: ") or message.startswith("model 'm' version latest: ")
    assert "31337" not in message
    return message


def test_raw_contents_decode_to_zero_copy_views_with_deadline_and_parameters() -> None:
    x = np.array([[1.5, SECRET]], np.float32)
    req = with_raw(x)
    req.id = "enc-1"
    req.parameters["priority"].uint64_param = 2
    req.parameters["timeout"].int64_param = 500
    req.outputs.add(name="y")
    decoded = decode_infer_request(req, deadline_s=12.5)
    assert decoded.model == "m" and decoded.version == "2" and decoded.id == "enc-1"
    assert decoded.outputs == ("y",) and decoded.priority == 2 and decoded.timeout_us == 500
    assert decoded.deadline_s == 12.5
    np.testing.assert_array_equal(decoded.inputs["x"], x)
    assert not decoded.inputs["x"].flags.writeable  # a view over the message's bytes


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [1.0, 2.5], np.float32),
        ("INT8", "int_contents", [-3, 7], np.int8),
        ("UINT64", "uint64_contents", [2**64 - 1, 0], np.uint64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("BYTES", "bytes_contents", [b"a", b"\xff"], object),
    ],
)
def test_typed_contents_decode_with_their_datatype(datatype: str, field: str, values: list[object], dtype: type) -> None:
    req = request()
    tensor = req.inputs.add(name="x", datatype=datatype, shape=[1, 2])
    getattr(tensor.contents, field).extend(values)
    array = decode_infer_request(req).inputs["x"]
    assert array.shape == (1, 2) and array.dtype == np.dtype(dtype)
    assert array.reshape(-1).tolist() == values


@pytest.mark.parametrize("shape", [[2**62, 0], [0, 2**62], [2**40, 2**40, 0], [1] * 65])
def test_an_impossible_empty_shape_is_refused_on_both_paths(shape: list[int]) -> None:
    raw = request()
    raw.inputs.add(name="x", datatype="FP32", shape=shape)
    raw.raw_input_contents.append(b"")
    typed = request()
    typed.inputs.add(name="x", datatype="FP32", shape=shape).contents.SetInParent()
    for req in (raw, typed):
        message = refused(req)
        assert "input 'x'" in message and ("too large" in message or "dimensions" in message)


def test_structural_refusals_name_the_tensor_and_what_was_expected() -> None:
    x = np.full((1, 2), SECRET, np.float32)
    twice = with_raw(x)
    twice.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    twice.raw_input_contents.append(to_raw(x))
    assert "input 'x' is given twice" in refused(twice)

    assert "unsupported datatype 'FP33'" in refused(with_raw(x, datatype="FP33"))
    short = with_raw(np.zeros((1, 1), np.float32))
    short.inputs[0].shape[:] = [1, 2]
    assert "needs 8 bytes (2 x 4), got 4" in refused(short)
    negative = request()
    negative.inputs.add(name="x", datatype="FP32", shape=[-1, 2])
    negative.raw_input_contents.append(b"")
    assert "negative dimension" in refused(negative)

    both = with_raw(x)
    both.inputs[0].contents.fp32_contents.append(1.0)
    assert "contents must not be set when raw_input_contents is used" in refused(both)

    count = request()
    count.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([SECRET, SECRET])
    assert "shape [1, 3] needs 3 elements, fp32_contents has 2" in refused(count)

    fp16 = request()
    fp16.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    assert "datatype FP16 can only be sent as raw_input_contents" in refused(fp16)

    overflow = request()
    overflow.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(1000)
    assert "a value does not fit datatype INT8 (-128..127)" in refused(overflow)

    wrong_field = request()
    wrong_field.inputs.add(name="x", datatype="INT64", shape=[1]).contents.fp32_contents.append(SECRET)
    assert "datatype INT64 is sent in int64_contents, got fp32_contents" in refused(wrong_field)

    empty = request()
    empty.inputs.add(name="x", datatype="FP32", shape=[1])
    assert "has no data" in refused(empty)

    extra = with_raw(x)
    extra.raw_input_contents.append(b"")
    assert "1 inputs but 2 raw_input_contents entries" in refused(extra)


def test_bytes_prefixes_and_output_and_parameter_refusals() -> None:
    corrupt = request()
    corrupt.inputs.add(name="t", datatype="BYTES", shape=[1])
    corrupt.raw_input_contents.append(b"\x09\x00\x00\x00abc")
    assert "input 't'" in refused(corrupt) and "length prefix runs past the end" in refused(corrupt)
    assert "9" not in refused(corrupt).replace("version 2", "")  # the declared length is payload: never echoed

    x = np.zeros((1, 2), np.float32)
    twice = with_raw(x)
    twice.outputs.add(name="y")
    twice.outputs.add(name="y")
    assert "output 'y' is requested twice" in refused(twice)
    classification = with_raw(x)
    classification.outputs.add(name="y").parameters["classification"].int64_param = 3
    assert "classification extension is not supported" in refused(classification)
    shm = with_raw(x)
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r"
    assert "shared memory is not supported" in refused(shm)

    priority = with_raw(x)
    priority.parameters["priority"].string_param = "high"
    assert "parameter 'priority' must be an integer, got string_param" in refused(priority)
    timeout = with_raw(x)
    timeout.parameters["timeout"].int64_param = -5
    assert "parameter 'timeout' must be >= 0, got -5" in refused(timeout)


def test_responses_carry_raw_outputs_in_order_with_version_and_sha256() -> None:
    big_endian = np.array([[1.0, 2.0]], dtype=">f4")
    result = InferResult(
        model="m", version="2", id="enc-1", sha256="ab" * 32,
        outputs=(
            OutputTensor("p", "FP32", np.array([[0.25, 0.75]], np.float32)),
            OutputTensor("label", "BYTES", np.array([b"yes"], dtype=object)),
            OutputTensor("be", "FP32", big_endian),
        ),
    )
    response = encode_infer_response(result)
    assert (response.model_name, response.model_version, response.id) == ("m", "2", "enc-1")
    assert response.parameters["model_sha256"].string_param == "ab" * 32
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("p", "FP32", [1, 2]), ("label", "BYTES", [1]), ("be", "FP32", [1, 2])
    ]
    decoded = [from_raw(raw, o.datatype, o.shape) for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)]
    assert decoded[0].tolist() == [[0.25, 0.75]] and decoded[1].tolist() == [b"yes"]
    assert decoded[2].tolist() == [[1.0, 2.0]]  # converted to little-endian on the wire


def test_every_budget_is_checked_before_the_first_tensor_is_decoded() -> None:
    """The header pass refuses on the count, a later tensor's shape or the text budget even when
    an earlier tensor is malformed: nothing was decoded before the refusal."""
    from medserve.server.codec import DecodeLimits

    limits = DecodeLimits(tensor_elements=100, bytes_elements=10, bytes_element_size=64, text_bytes=32, inputs=3)
    many = request()
    for i in range(4):
        many.inputs.add(name=f"t{i}", datatype="FP32", shape=[1]).contents.fp32_contents.append(SECRET)
    with pytest.raises(InvalidInput, match="4 inputs; the server accepts at most 3 per request"):
        decode_infer_request(many, limits=limits)

    def broken_then(second: pb.ModelInferRequest.InferInputTensor, raw: bytes) -> pb.ModelInferRequest:
        req = request()
        req.inputs.add(name="broken", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(b"\xff\xff\xff\x7f" + b"ab")  # a prefix past the end: a decode error
        req.inputs.append(second)
        req.raw_input_contents.append(raw)
        return req

    big = pb.ModelInferRequest.InferInputTensor(name="big", datatype="FP32", shape=[101])
    with pytest.raises(InvalidInput, match="'big': shape \\[101\\] has 101 elements"):
        decode_infer_request(broken_then(big, b"\0" * 404), limits=limits)
    text = pb.ModelInferRequest.InferInputTensor(name="notes", datatype="BYTES", shape=[2])
    raw = b"".join(len(t).to_bytes(4, "little") + t for t in (b"a" * 20, b"b" * 20))
    with pytest.raises(InvalidInput, match="more than 32 bytes of text together.*--max-text-bytes"):
        decode_infer_request(broken_then(text, raw), limits=limits)
    dup = broken_then(pb.ModelInferRequest.InferInputTensor(name="broken", datatype="FP32", shape=[1]), b"\0" * 4)
    with pytest.raises(InvalidInput, match="'broken' is given twice"):
        decode_infer_request(dup, limits=limits)


def test_the_text_budget_counts_every_bytes_tensor_raw_and_typed() -> None:
    from medserve.server.codec import DecodeLimits

    limits = DecodeLimits(text_bytes=10)
    fits = request()
    fits.inputs.add(name="a", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x" * 5)
    fits.inputs.add(name="b", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"y" * 5)
    assert decode_infer_request(fits, limits=limits).inputs["b"][0] == b"yyyyy"
    over = request()
    over.inputs.add(name="a", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x" * 5)
    over.inputs.add(name="b", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"y" * 6)
    message = refused_with(over, limits)
    assert "more than 10 bytes of text" in message and "11" not in message  # the limit, never the size sent
    raw = request()
    raw.inputs.add(name="a", datatype="BYTES", shape=[2])
    raw.raw_input_contents.append(b"\x05\0\0\0xxxxx\x06\0\0\0yyyyyy")
    assert "more than 10 bytes of text" in refused_with(raw, limits)


def refused_with(req: pb.ModelInferRequest, limits: object) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(req, limits=limits)  # type: ignore[arg-type]
    return str(info.value)
