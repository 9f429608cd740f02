"""`codec.decode_fixed`, the one-step decoding of a fixed-signature model's common request,
against the general path it stands in for (`decode_infer_request`, then `Signature.validate`):
whatever it accepts, the general path accepts as the same array; whatever it declines goes the
general path, which answers (refusals with their own messages)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medserve.protos import grpc_service_pb2 as pb
from medserve.server.codec import DecodeLimits, decode_fixed, decode_infer_request
from medserve.server.config import ModelConfig, TensorConfig
from medserve.server.errors import InvalidInput
from medserve.server.signature import Signature

LABEL = "'m' version 1"


def config(datatype: str = "FP32", dims: tuple[int, ...] = (3,), refuse_non_finite: bool = True,
           **kw: object) -> ModelConfig:
    return ModelConfig(name="m", max_batch_size=4, inputs=(TensorConfig("x", datatype, dims),),
                       outputs=(TensorConfig("y", "FP32", (1,)),), refuse_non_finite=refuse_non_finite, **kw)  # type: ignore[arg-type]


def message(array: np.ndarray, name: str = "x", datatype: str = "FP32", shape: list[int] | None = None,
            raw: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    tensor = request.inputs.add(name=name, datatype=datatype)
    tensor.shape.extend(list(array.shape) if shape is None else shape)
    request.raw_input_contents.append(array.tobytes() if raw is None else raw)
    return request


def general(request: pb.ModelInferRequest, signature: Signature) -> np.ndarray:
    """What the general path makes of the request (raises its refusal)."""
    inputs, _ = signature.validate(LABEL, decode_infer_request(request).inputs)
    return inputs["x"]


def test_the_common_request_is_decoded_and_validated_in_one_step_as_the_general_path_would() -> None:
    signature = Signature.of(config())
    assert signature.fixed_input is not None
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    decoded = decode_fixed(message(x), signature.fixed_input, deadline_s=5.0)
    assert decoded is not None and decoded.validated is signature.fixed_input and decoded.deadline_s == 5.0
    assert (decoded.model, decoded.version, decoded.id, decoded.outputs) == ("m", "", "r1", ())
    got = decoded.inputs["x"]
    assert got.dtype == general(message(x), signature).dtype and np.array_equal(got, general(message(x), signature))


def test_models_without_one_fixed_numeric_input_have_no_fixed_input() -> None:
    assert Signature.of(config("BYTES")).fixed_input is None
    assert Signature.of(config("BOOL")).fixed_input is None
    assert Signature.of(config(dims=(-1,))).fixed_input is None  # a variable dim
    assert Signature.of(ModelConfig(name="m", max_batch_size=0, inputs=(TensorConfig("x", "FP32", (3,)),),
                                    outputs=())).fixed_input is None  # no batching
    two = ModelConfig(name="m", max_batch_size=4, inputs=(TensorConfig("x", "FP32", (3,)), TensorConfig("z", "FP32", (1,))),
                      outputs=())
    assert Signature.of(two).fixed_input is None
    assert Signature.of(config(refuse_non_finite=False)).fixed_input.finite is False  # type: ignore[union-attr]
    assert Signature.of(config("INT64", refuse_non_finite=True)).fixed_input.finite is False  # type: ignore[union-attr]


def declined(request: pb.ModelInferRequest, signature: Signature, limits: DecodeLimits | None = None) -> None:
    assert signature.fixed_input is not None
    kw = {} if limits is None else {"limits": limits}
    assert decode_fixed(request, signature.fixed_input, **kw) is None  # type: ignore[arg-type]


def test_anything_but_the_plain_request_is_left_to_the_general_path() -> None:
    signature = Signature.of(config())
    x = np.ones((2, 3), np.float32)
    declined(message(x, name="other"), signature)
    declined(message(x, datatype="FP64"), signature)
    declined(message(x, shape=[2, 4]), signature)
    declined(message(x, shape=[6]), signature)
    declined(message(x, shape=[]), signature)
    declined(message(x, raw=x.tobytes()[:-4]), signature)  # bytes short of the shape
    declined(message(np.ones((5, 3), np.float32)), signature)  # over max_batch_size
    declined(message(np.ones((0, 3), np.float32)), signature)  # no rows
    declined(message(np.array([[1, np.nan, 2]], np.float32)), signature)  # refused there, with its message
    declined(message(x), signature, DecodeLimits(tensor_elements=5))
    for change in ("parameters", "outputs", "tensor parameters", "contents", "two raw"):
        request = message(x)
        if change == "parameters":
            request.parameters["priority"].int64_param = 1
        elif change == "outputs":
            request.outputs.add(name="y")
        elif change == "tensor parameters":
            request.inputs[0].parameters["shared_memory_region"].string_param = "r"
        elif change == "contents":
            request.inputs[0].contents.fp32_contents.extend([1.0] * 6)
        else:
            request.raw_input_contents.append(b"")
        declined(request, signature)
    with pytest.raises(InvalidInput, match="NaN"):  # the general path still refuses what was declined
        general(message(np.array([[1, np.nan, 2]], np.float32)), signature)


@settings(max_examples=300, deadline=None)
@given(
    datatype=st.sampled_from(["FP32", "FP64", "INT64", "FP16", "INT32"]),
    sent_type=st.sampled_from(["FP32", "FP64", "INT64", "FP16", "INT32"]),
    rows=st.integers(-1, 6),
    width=st.integers(0, 5),
    cut=st.integers(-3, 3),
    nonfinite=st.booleans(),
    refuse=st.booleans(),
)
def test_whatever_is_decoded_in_one_step_the_general_path_accepts_as_the_same_array(
    datatype: str, sent_type: str, rows: int, width: int, cut: int, nonfinite: bool, refuse: bool
) -> None:
    signature = Signature.of(config(datatype, (3,), refuse))
    fixed = signature.fixed_input
    assert fixed is not None
    dtype = np.dtype(fixed.dtype if sent_type == datatype else Signature.of(config(sent_type)).fixed_input.dtype)  # type: ignore[union-attr]
    array = np.ones((max(rows, 0), width), dtype)
    if nonfinite and array.size and dtype.kind == "f":
        array[0, 0] = np.inf
    raw = array.tobytes()
    raw = raw[:len(raw) + cut] if cut < 0 else raw + b"\0" * cut
    request = message(array, datatype=sent_type, shape=[rows, width], raw=raw)
    decoded = decode_fixed(request, fixed)
    try:
        expected = general(request, signature)
    except InvalidInput:
        assert decoded is None  # never accepted where the general path refuses
        return
    if decoded is None:  # declined: only where the plain rules do not hold
        assert not (rows in range(1, 5) and width == 3 and cut == 0 and sent_type == datatype)
        return
    got = decoded.inputs["x"]
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.tobytes() == expected.tobytes()
