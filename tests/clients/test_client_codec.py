"""The client's pure conversions: numpy <-> wire messages, and records -> a 2-D input."""
from __future__ import annotations

import numpy as np
import pytest

from medserve.clients import InvalidInputError, ModelMetadata, TensorMetadata
from medserve.clients._codec import (
    decode_infer_response,
    encode_infer_request,
    record_schema,
    records_to_array,
    records_to_inputs,
)
from medserve.clients._types import RecordSchema
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw


def test_every_input_travels_raw_with_its_v2_datatype() -> None:
    inputs = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "big_endian": np.arange(2, dtype=">i8"),
        "flags": np.array([True, False]),
        "half": np.ones((1,), np.float16),
        "text": np.array(["héllo", "x"], dtype=object),
        "fixed": np.array([b"ab", b"c"]),
    }
    request = encode_infer_request("m", inputs, version=3, outputs=["y"], request_id="r", priority=2)
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r")
    assert request.parameters["priority"].uint64_param == 2
    assert [o.name for o in request.outputs] == ["y"]
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("f", "FP32", [2, 3]), ("big_endian", "INT64", [2]), ("flags", "BOOL", [2]), ("half", "FP16", [1]),
        ("text", "BYTES", [2]), ("fixed", "BYTES", [2]),
    ]
    assert not any(t.HasField("contents") for t in request.inputs)
    assert len(request.raw_input_contents) == len(inputs)
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        back = from_raw(raw, tensor.datatype, tensor.shape)
        expected = inputs[tensor.name]
        if tensor.datatype == "BYTES":
            assert [e if isinstance(e, bytes) else e.encode() for e in expected] == list(back)
        else:
            np.testing.assert_array_equal(back, expected)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({}, "non-empty mapping"),
        ({"z": np.array([1j])}, "input 'z'.*complex128"),
        ({"o": np.array([1, "a"], dtype=object)}, "input 'o'.*BYTES element 0 is int"),
    ],
)
def test_unsendable_inputs_are_refused_before_sending(inputs: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        encode_infer_request("m", inputs)


def test_priority_must_be_a_non_negative_int() -> None:
    with pytest.raises(InvalidInputError, match="priority"):
        encode_infer_request("m", {"x": np.zeros(1)}, priority=-1)


def test_outputs_decode_as_zero_copy_views_and_bytes() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="2", id="r1")
    response.parameters["model_sha256"].string_param = "ab" * 32
    response.outputs.add(name="y", datatype="FP32", shape=[2, 2])
    response.raw_output_contents.append(np.arange(4, dtype="<f4").tobytes())
    response.outputs.add(name="t", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(b"\x01\x00\x00\x00a\x00\x00\x00\x00")
    response.outputs.add(name="b", datatype="BF16", shape=[1])
    response.raw_output_contents.append(np.array([1.5], "<f4").view("<u2")[1:].tobytes())
    result = decode_infer_response(response)
    assert (result.model_name, result.model_version, result.request_id) == ("m", "2", "r1")
    assert result.model_sha256 == "ab" * 32
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.tolist() == [[0, 1], [2, 3]]
    assert not y.flags.writeable and not y.flags.owndata  # a view over the received bytes
    assert result["t"].tolist() == [b"a", b""]
    assert result["b"].tolist() == [1.5]
    assert set(result) == {"y", "t", "b"} and len(result) == 3
    with pytest.raises(KeyError, match="no output 'nope'"):
        result["nope"]


def test_typed_contents_are_read_when_the_server_sends_no_raw_bytes() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    out = response.outputs.add(name="y", datatype="INT32", shape=[3])
    out.contents.int_contents.extend([1, 2, 3])
    assert decode_infer_response(response)["y"].tolist() == [1, 2, 3]


# -- records ----------------------------------------------------------------------------------------

SCHEMA = RecordSchema(("c", "a", "b"), "x", "FP32", None)


def test_records_follow_the_models_column_order() -> None:
    array = records_to_array("'m'", SCHEMA, [{"a": 1, "b": 2, "c": 3}, {"b": 5.5, "c": 6, "a": np.float64(4)}])
    assert array.dtype == np.float32
    assert array.tolist() == [[3, 1, 2], [6, 4, 5.5]]


def test_missing_and_unknown_features_are_named() -> None:
    records = [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3, "mean radius": 9}]
    with pytest.raises(InvalidInputError) as info:
        records_to_array("'m'", SCHEMA, records)
    message = str(info.value)
    assert "record 1: missing ['c']" in message
    assert "record 2: unknown ['mean radius']" in message
    assert "record 0" not in message and "9" not in message.split("(")[0]


@pytest.mark.parametrize(
    ("value", "datatype", "match"),
    [
        ("1.5", "FP32", "record 0 feature 'a': a str value cannot be sent as FP32"),
        (None, "FP32", "a NoneType value"),
        ([1, 2], "FP64", "a list value"),
        (1.5, "INT64", "a float value cannot be sent as INT64"),
        (300, "UINT8", "out of range for UINT8"),
    ],
)
def test_non_numeric_values_are_refused_without_quoting_them(value: object, datatype: str, match: str) -> None:
    schema = RecordSchema(("a",), "x", datatype, None)
    with pytest.raises(InvalidInputError, match=match) as info:
        records_to_array("'m'", schema, [{"a": value}])
    assert "300" not in str(info.value)


def test_no_records_or_a_bare_mapping_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="no records"):
        records_to_array("'m'", SCHEMA, [])
    with pytest.raises(InvalidInputError, match="wrap a single record in a list"):
        records_to_array("'m'", SCHEMA, {"a": 1, "b": 2, "c": 3})  # type: ignore[arg-type]


def _metadata(params: dict[str, str], *inputs: TensorMetadata) -> ModelMetadata:
    return ModelMetadata("m", ("1",), "onnxruntime_onnx", inputs or (TensorMetadata("x", "FP64", (-1, 2)),), (), params)


def test_record_schema_comes_from_metadata_or_config() -> None:
    schema = record_schema("'m'", _metadata({"feature_names": '["p", "q"]', "model_sha256": "h"}), None)
    assert schema == RecordSchema(("p", "q"), "x", "FP64", "h")
    assert record_schema("'m'", _metadata({}), ["u", "v"]).feature_names == ("u", "v")


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        (_metadata({}), "publishes no feature_names"),
        (_metadata({"feature_names": '["p", "p"]'}), "repeat a name"),
        (_metadata({"feature_names": '["p", "q", "r"]'}), r"shape \[-1, 2\].*3 features"),
        (
            _metadata({"feature_names": '["p", "q"]'}, TensorMetadata("a", "FP32", (-1, 2)), TensorMetadata("b", "FP32", (-1, 2))),
            "2 inputs",
        ),
        (_metadata({"feature_names": '["p"]'}, TensorMetadata("t", "BYTES", (-1, 1))), "BYTES"),
    ],
)
def test_record_schema_refusals(metadata: ModelMetadata, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        record_schema("'m'", metadata, None)


MIXED = _metadata(
    {"feature_names": '["age", "ward", "grade"]', "input_columns": '{"numeric": ["age"], "categorical": ["ward"], '
                                                                 '"categorical_int": ["grade"]}'},
    TensorMetadata("numeric", "FP32", (-1, 1)), TensorMetadata("categorical", "BYTES", (-1, 1)),
    TensorMetadata("categorical_int", "INT64", (-1, 1)),
)


def test_records_fill_each_input_of_a_mixed_table_with_its_columns() -> None:
    schema = record_schema("'m'", MIXED, None)
    arrays = records_to_inputs("'m'", schema, [{"ward": "icu", "grade": 3, "age": 71.5}])
    assert {k: (v.dtype.kind, v.tolist()) for k, v in arrays.items()} == {
        "numeric": ("f", [[71.5]]), "categorical": ("O", [["icu"]]), "categorical_int": ("i", [[3]])}
    with pytest.raises(InvalidInputError, match="record 0 feature 'ward': a int value cannot be sent as BYTES"):
        records_to_inputs("'m'", schema, [{"ward": 7, "grade": 3, "age": 71.5}])


def test_a_model_of_several_inputs_without_input_columns_is_refused_by_name() -> None:
    bare = _metadata({"feature_names": '["age", "ward"]'}, TensorMetadata("numeric", "FP32", (-1, 1)),
                     TensorMetadata("categorical", "BYTES", (-1, 1)))
    with pytest.raises(InvalidInputError, match="publishes no input_columns"):
        record_schema("'m'", bare, None)
    partial = _metadata({"feature_names": '["age", "ward"]', "input_columns": '{"numeric": ["age"], "categorical": []}'},
                        TensorMetadata("numeric", "FP32", (-1, 1)), TensorMetadata("categorical", "BYTES", (-1, 1)))
    with pytest.raises(InvalidInputError, match="do not cover its feature_names"):
        record_schema("'m'", partial, None)
