"""`codec.decode_fixed`, the one-step decoding of a fixed-signature model's common request,
against the general path it stands in for (`decode_infer_request`, then `Signature.validate`):
whatever it accepts, the general path accepts as the same array; whatever it declines goes the
general path, which answers (refusals with their own messages)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medserve.protos import grpc_service_pb2 as pb
from medserve.server import service
from medserve.server.codec import DecodeLimits, decode_fixed, decode_infer_request
from medserve.server.config import ModelConfig, TensorConfig
from medserve.server.errors import InvalidInput
from medserve.server.signature import Signature

import onnx_models
from conftest import running_server

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


def test_a_served_model_answers_the_plain_request_exactly_as_through_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a real server: each request sent plain (decoded in one step) and again naming
    every output (the general path: `decode_fixed` declines it) gets the same outputs, version,
    model hash and out-of-range flags; refusals (a clinical limit, NaN) read the same either way;
    the statistics count both. The largest plain request the limits allow (max_batch_size rows)
    takes the one-step path."""
    path = onnx_models.affine(tmp_path / "repo" / "vitals" / "1" / "model.onnx")
    onnx_models.write_config(tmp_path / "repo", "vitals", 'max_batch_size: 8\ndynamic_batching { }\n'
                             'parameters { key: "refuse_non_finite" value: { string_value: "true" } }\n')
    card = {"model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "feature_names": ["a", "b", "c", "d"],
            "feature_ranges": {"a": [0, 1], "b": [0, 1]}, "feature_limits": {"c": [-100, 100]}}
    (path.parent / "model_card.json").write_text(json.dumps(card))
    taken: list[bool] = []
    real = service.decode_fixed

    def counted(*args: object, **kw: object) -> object:
        decoded = real(*args, **kw)  # type: ignore[arg-type]
        taken.append(decoded is not None)
        return decoded

    monkeypatch.setattr(service, "decode_fixed", counted)
    rng = np.random.default_rng(3)
    sent_rows = 0
    with running_server(tmp_path / "repo") as server:
        stub = server.stub()
        for rows in (1, 8, 3, 1, 2):
            x = rng.uniform(-0.5, 1.5, (rows, 4)).astype(np.float32)  # some rows out of range
            plain = message(x, name="x")
            plain.model_name = "vitals"
            named = pb.ModelInferRequest()
            named.CopyFrom(plain)
            for output in ("y", "s"):
                named.outputs.add(name=output)
            a, b = stub.ModelInfer(plain, timeout=30), stub.ModelInfer(named, timeout=30)
            assert list(a.raw_output_contents) == list(b.raw_output_contents)
            assert (a.model_version, list(a.outputs)) == (b.model_version, list(b.outputs))
            assert dict(a.parameters) == dict(b.parameters) and "model_sha256" in a.parameters
            assert np.array_equal(np.frombuffer(a.raw_output_contents[0], np.float32).reshape(rows, 4), 2 * x + 1)
            sent_rows += 2 * rows
        flagged = [dict(r.parameters) for r in (a, b)]
        assert flagged[0] == flagged[1]
        for bad in (np.array([[0.5, 0.5, 500.0, 0.5]], np.float32), np.array([[0.5, np.nan, 0.5, 0.5]], np.float32)):
            codes = []
            for outputs in ((), ("y", "s")):
                request = message(bad, name="x")
                request.model_name = "vitals"
                for output in outputs:
                    request.outputs.add(name=output)
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(request, timeout=30)
                codes.append((info.value.code(), info.value.details()))
            assert codes[0] == codes[1] and codes[0][0] == grpc.StatusCode.INVALID_ARGUMENT
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="vitals"), timeout=30).model_stats
    assert stats.inference_stats.success.count == 10 and stats.inference_count == sent_rows
    assert stats.inference_stats.fail.count == 4  # refused in the core both ways: the clinical limit, and NaN
    assert taken == [True, False] * 5 + [True, False, False, False]
