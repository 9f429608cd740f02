"""Datatype table and raw tensor encoding (medserve.protos.wire)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from medserve.protos import wire

SECRET = "patient-4711-diagnosis"  # must never appear in an error message

FIXED = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 255], dtype=np.uint8),
    "UINT16": np.array([0, 1, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 1, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 1, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 0, 2**15 - 1], dtype=np.int16),
    "INT32": np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25], [np.inf, 65504.0]], dtype=np.float16),
    "FP32": np.array([[1.5, -2.0, np.nan]], dtype=np.float32),
    "FP64": np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7,
}


def test_table_covers_every_v2_datatype() -> None:
    assert set(wire.DATATYPES) == {*FIXED, "BYTES", "BF16"}
    assert wire.DATATYPES["BYTES"].config_enum == "TYPE_STRING"
    assert wire.DATATYPES["FP32"].config_enum == "TYPE_FP32"
    assert wire.DATATYPES["BYTES"].itemsize is None
    assert wire.DATATYPES["BF16"].dtype is None and wire.DATATYPES["BF16"].itemsize == 2
    assert wire.DATATYPES["FP16"].contents_field is None
    assert wire.DATATYPES["BF16"].contents_field is None
    assert wire.DATATYPES["INT16"].contents_field == "int_contents"
    assert wire.DATATYPES["UINT8"].contents_field == "uint_contents"


def test_table_names_the_onnx_types_the_server_serves() -> None:
    """What server/runtime.py kept as its own table, now read from this one."""
    assert dict(wire.ONNX_TYPES) == {
        "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
        "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
        "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
        "tensor(string)": "BYTES",
    }
    assert wire.DATATYPES["BF16"].onnx_type is None  # numpy has no bfloat16: such a graph is refused


def test_contents_dtype_is_the_protobuf_fields_own_type() -> None:
    """What server/codec.py kept as its own table (a typed field is decoded at its own width
    first, so 1000 sent for an INT8 is refused, not wrapped), checked against the generated
    descriptor rather than restated."""
    from google.protobuf.descriptor import FieldDescriptor as F

    from medserve.protos import grpc_service_pb2 as pb

    by_cpp_type = {F.CPPTYPE_BOOL: np.dtype(np.bool_), F.CPPTYPE_INT32: np.dtype(np.int32),
                   F.CPPTYPE_INT64: np.dtype(np.int64), F.CPPTYPE_UINT32: np.dtype(np.uint32),
                   F.CPPTYPE_UINT64: np.dtype(np.uint64), F.CPPTYPE_FLOAT: np.dtype(np.float32),
                   F.CPPTYPE_DOUBLE: np.dtype(np.float64)}
    fields = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    for entry in wire.DATATYPES.values():
        if entry.contents_field is None or entry.name == "BYTES":
            assert entry.contents_dtype is None, entry.name
            continue
        assert entry.contents_dtype == by_cpp_type[fields[entry.contents_field].cpp_type], entry.name


@pytest.mark.parametrize("datatype", sorted(FIXED))
def test_fixed_size_round_trip(datatype: str) -> None:
    array = FIXED[datatype]
    assert wire.datatype_of(array.dtype) == datatype
    assert wire.numpy_dtype(datatype) == array.dtype
    raw = wire.to_raw(array)
    assert len(raw) == array.size * wire.DATATYPES[datatype].itemsize
    back = wire.from_raw(raw, datatype, array.shape)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("datatype", sorted(FIXED))
def test_zero_element_tensors(datatype: str) -> None:
    empty = np.empty((0, 3), dtype=FIXED[datatype].dtype)
    assert wire.to_raw(empty) == b""
    assert wire.from_raw(b"", datatype, [0, 3]).shape == (0, 3)


def test_raw_is_little_endian_and_row_major() -> None:
    big_endian = np.array([1, 2], dtype=">i4")
    assert wire.to_raw(big_endian) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    fortran = np.asfortranarray(np.array([[1, 2], [3, 4]], dtype=np.uint8))
    assert wire.to_raw(fortran) == b"\x01\x02\x03\x04"
    assert wire.to_raw(np.array([[1, 2], [3, 4]], dtype=np.uint8).T) == b"\x01\x03\x02\x04"


def test_from_raw_is_zero_copy() -> None:
    raw = bytearray(wire.to_raw(np.arange(4, dtype=np.float32)))
    view = wire.from_raw(raw, "FP32", [2, 2])
    raw[0:4] = struct.pack("<f", 9.0)
    assert view[0, 0] == 9.0


def test_from_raw_rejects_wrong_byte_size() -> None:
    with pytest.raises(ValueError, match=r"needs 24 bytes \(6 x 4\), got 20"):
        wire.from_raw(b"\x00" * 20, "FP32", [2, 3])


def test_from_raw_rejects_bad_shape_and_datatype() -> None:
    with pytest.raises(ValueError, match="negative"):
        wire.from_raw(b"", "FP32", [-1, 3])
    with pytest.raises(ValueError, match="'FP8'"):
        wire.from_raw(b"", "FP8", [0])
    with pytest.raises(ValueError, match="BF16"):
        wire.from_raw(b"\x00\x00", "BF16", [1])


def test_from_raw_rejects_non_boolean_bytes() -> None:
    with pytest.raises(ValueError, match="BOOL"):
        wire.from_raw(b"\x00\x02", "BOOL", [2])


def test_datatype_of_strings_and_objects() -> None:
    assert wire.datatype_of(np.dtype(object)) == "BYTES"
    assert wire.datatype_of(np.dtype("S5")) == "BYTES"
    assert wire.datatype_of(np.dtype("U5")) == "BYTES"
    assert wire.datatype_of(np.dtype(">f8")) == "FP64"


@pytest.mark.parametrize("dtype", [np.complex64, "datetime64[s]", np.dtype([("a", "i4")])])
def test_datatype_of_unsupported(dtype: object) -> None:
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        wire.datatype_of(np.dtype(dtype))  # type: ignore[call-overload]


def test_numpy_dtype_unknown() -> None:
    with pytest.raises(ValueError, match="'fp32'"):
        wire.numpy_dtype("fp32")
    assert wire.numpy_dtype("BYTES") == np.dtype(object)


def test_bytes_round_trip_with_empty_and_non_ascii() -> None:
    array = np.array([[b"hello", b""], ["Grüße, 東京", b"\x00\xff"]], dtype=object)
    raw = wire.to_raw(array)
    back = wire.from_raw(raw, "BYTES", [2, 2])
    assert back.shape == (2, 2) and back.dtype == object
    assert back.tolist() == [[b"hello", b""], ["Grüße, 東京".encode(), b"\x00\xff"]]


def test_bytes_wire_example_from_the_reference() -> None:
    # perf_analyzer --string-data hello, shape [1, 2]
    raw = wire.to_raw(np.array([["hello", "hello"]], dtype=object))
    assert raw == bytes.fromhex("0500000068656c6c6f0500000068656c6c6f")


def test_bytes_from_numpy_string_dtypes() -> None:
    assert wire.serialize_bytes(np.array(["ab", "c"])) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert wire.serialize_bytes(np.array([b"ab", b"c"])) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_bytes_zero_elements() -> None:
    assert wire.to_raw(np.empty((0, 2), dtype=object)) == b""
    assert wire.from_raw(b"", "BYTES", [0, 2]).shape == (0, 2)
    assert wire.deserialize_bytes(b"").shape == (0,)


def test_deserialize_without_count_reads_everything() -> None:
    raw = wire.serialize_bytes([b"a", b"", b"bc"])
    assert wire.deserialize_bytes(memoryview(raw)).tolist() == [b"a", b"", b"bc"]


def test_serialize_rejects_non_string_elements_without_their_value() -> None:
    with pytest.raises(TypeError, match="element 1 is int") as info:
        wire.serialize_bytes(np.array([b"a", 4711], dtype=object))
    assert "4711" not in str(info.value)


_SECRET_ELEMENT = struct.pack("<I", len(SECRET)) + SECRET.encode()

MALFORMED = {
    "truncated prefix": (_SECRET_ELEMENT + b"\x01\x00", None, "element 1: its 4-byte length prefix is cut off"),
    "length past end": (_SECRET_ELEMENT + struct.pack("<I", 100) + b"xy", None, "element 1: its length prefix runs"),
    "length past end, count": (_SECRET_ELEMENT + struct.pack("<I", 9) + b"xy", 2, "runs past the end"),
    "trailing garbage": (_SECRET_ELEMENT + b"\x00\x00\x00\x00" + SECRET.encode(), 2, "left over after its 2"),
    "count beyond buffer": (_SECRET_ELEMENT + b"\x00\x00\x00\x00" * 2, 10, "needs at least 40 bytes, got 34"),
    "fewer than count": (_SECRET_ELEMENT + b"\x00\x00\x00\x00", 3, "expected 3 elements, found 2"),
    "negative count": (_SECRET_ELEMENT, -1, ">= 0"),
    "huge count": (_SECRET_ELEMENT, 2**40, "needs at least"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bytes_raise_without_leaking_data(case: str) -> None:
    raw, count, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message) as info:
        wire.deserialize_bytes(raw, count)
    assert SECRET not in str(info.value)
    assert "patient" not in str(info.value)
    # Nothing read from the payload: neither a declared length nor an offset it leads to.
    assert "declares" not in str(info.value) and "offset" not in str(info.value)
    assert "100" not in str(info.value) and "9 bytes" not in str(info.value)


def test_from_raw_bytes_checks_element_count() -> None:
    raw = wire.serialize_bytes([SECRET, SECRET, SECRET])
    with pytest.raises(ValueError) as info:
        wire.from_raw(raw, "BYTES", [2])
    assert SECRET not in str(info.value)
