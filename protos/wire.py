"""V2 datatypes and the raw tensor encoding, shared by server and client.

One table (``DATATYPES``) ties each Open Inference Protocol datatype string to its numpy dtype,
element size, typed ``InferTensorContents`` field (and that field's own element type), model_config
``DataType`` enum name and ONNX tensor type, so the two ends cannot drift apart: the server's
codec and runtime and the client derive their lookups from it rather than keeping their own. Raw layout: row-major (C order), little-endian, no padding; BYTES
elements are a 4-byte little-endian uint32 length followed by the data.

Pure numpy + stdlib (no protobuf) so it can be tested and reused without the generated stubs.
Error messages name counts, indexes and buffer sizes only, never tensor contents (patient data)
nor anything read from them (a declared length, an offset it leads to).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATATYPES",
    "MAX_RANK",
    "ONNX_TYPES",
    "Datatype",
    "datatype_of",
    "deserialize_bytes",
    "element_count",
    "from_raw",
    "numpy_dtype",
    "serialize_bytes",
    "to_raw",
]

ByteBuffer = bytes | bytearray | memoryview

_LENGTH = struct.Struct("<I")  # BYTES element length prefix

MAX_RANK = 64  # numpy's limit on an array's dimensions
_MAX_BYTES = (1 << 63) - 1  # numpy refuses arrays whose non-zero dims address more bytes than this


@dataclass(frozen=True, slots=True)
class Datatype:
    """One V2 datatype and its counterparts elsewhere in the protocol."""

    name: str  # V2 string, e.g. "FP32"
    dtype: np.dtype[Any] | None  # little-endian numpy dtype; None for BF16 (numpy has none)
    itemsize: int | None  # bytes per element in raw form; None for variable-size BYTES
    contents_field: str | None  # typed InferTensorContents field; None: raw only (FP16, BF16)
    config_enum: str  # model_config DataType enum name (BYTES <-> TYPE_STRING)
    # The typed field's own element type (the protocol's: INT8 travels in int32 `int_contents`);
    # None where there is no typed field, and for BYTES (its elements are bytes).
    contents_dtype: np.dtype[Any] | None
    onnx_type: str | None  # the ONNX tensor type as onnxruntime names it; None: not served (BF16)


_CONTENTS_DTYPES = {
    "bool_contents": "|b1",
    "int_contents": "<i4",
    "int64_contents": "<i8",
    "uint_contents": "<u4",
    "uint64_contents": "<u8",
    "fp32_contents": "<f4",
    "fp64_contents": "<f8",
}


def _entry(name: str, dtype: str | None, itemsize: int | None, field: str | None, onnx: str | None) -> Datatype:
    enum = "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"
    contents = _CONTENTS_DTYPES.get(field or "")
    return Datatype(name, None if dtype is None else np.dtype(dtype), itemsize, field, enum,
                    None if contents is None else np.dtype(contents), None if onnx is None else f"tensor({onnx})")


DATATYPES: Mapping[str, Datatype] = MappingProxyType(
    {
        d.name: d
        for d in (
            _entry("BOOL", "|b1", 1, "bool_contents", "bool"),
            _entry("UINT8", "|u1", 1, "uint_contents", "uint8"),
            _entry("UINT16", "<u2", 2, "uint_contents", "uint16"),
            _entry("UINT32", "<u4", 4, "uint_contents", "uint32"),
            _entry("UINT64", "<u8", 8, "uint64_contents", "uint64"),
            _entry("INT8", "|i1", 1, "int_contents", "int8"),
            _entry("INT16", "<i2", 2, "int_contents", "int16"),
            _entry("INT32", "<i4", 4, "int_contents", "int32"),
            _entry("INT64", "<i8", 8, "int64_contents", "int64"),
            _entry("FP16", "<f2", 2, None, "float16"),
            _entry("FP32", "<f4", 4, "fp32_contents", "float"),
            _entry("FP64", "<f8", 8, "fp64_contents", "double"),
            _entry("BYTES", "O", None, "bytes_contents", "string"),
            _entry("BF16", None, 2, None, None),  # numpy has no bfloat16, so no graph of it is served
        )
    }
)

# ONNX tensor type (onnxruntime's NodeArg.type, e.g. "tensor(float)") -> V2 name.
ONNX_TYPES: Mapping[str, str] = MappingProxyType(
    {d.onnx_type: d.name for d in DATATYPES.values() if d.onnx_type is not None}
)

# (kind, itemsize) -> V2 name; byte order deliberately ignored (to_raw converts to little-endian).
_BY_KIND = {
    (d.dtype.kind, d.dtype.itemsize): d.name
    for d in DATATYPES.values()
    if d.dtype is not None and d.name != "BYTES"
}


def datatype_of(dtype: npt.DTypeLike) -> str:
    """The V2 datatype string for a numpy dtype; object, bytes and str dtypes map to BYTES."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((dt.kind, dt.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {dt} has no Open Inference Protocol datatype")
    return name


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The (little-endian) numpy dtype for a V2 datatype string; BYTES -> object."""
    entry = DATATYPES.get(datatype)
    if entry is None:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    if entry.dtype is None:
        raise ValueError(f"datatype {datatype} has no numpy dtype")
    return entry.dtype


def element_count(shape: Sequence[int], itemsize: int = 8) -> int:
    """The elements of a tensor of `shape`, refusing (ValueError) any shape no array can have:
    a negative dim, more than `MAX_RANK` dims, or non-zero dims addressing more bytes than numpy
    can (it refuses those even when another dim is 0, so an empty tensor [2**62, 0] is refused
    here, before anything is allocated)."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {dims} has a negative dimension")
    if len(dims) > MAX_RANK:
        raise ValueError(f"shape has {len(dims)} dimensions; at most {MAX_RANK} are supported")
    if math.prod(d for d in dims if d) * max(1, itemsize) > _MAX_BYTES:
        raise ValueError(f"shape {dims} is too large for any tensor")
    return math.prod(dims)


def serialize_bytes(array: npt.ArrayLike) -> bytes:
    """Encode a BYTES tensor (bytes or str elements, str as UTF-8) in raw form, row-major."""
    parts: list[bytes] = []
    for index, element in enumerate(np.asarray(array, dtype=object).flat):
        if isinstance(element, str):
            data = element.encode("utf-8")
        elif isinstance(element, (bytes, bytearray, memoryview)):
            data = bytes(element)
        else:
            raise TypeError(f"BYTES element {index} is {type(element).__name__}; expected bytes or str")
        if len(data) > 0xFFFFFFFF:
            raise ValueError(f"BYTES element {index} is {len(data)} bytes; the limit is 4 GiB - 1")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(
    buf: ByteBuffer, count: int | None = None, max_element_bytes: int | None = None
) -> npt.NDArray[np.object_]:
    """Decode raw BYTES into a 1-D object array of ``bytes``, validating every length prefix.

    ``count``, when given, is the element count the shape promises; the buffer must hold exactly
    that many elements. ``max_element_bytes`` caps one element's length. Raises ValueError on a
    truncated prefix, a length running past the end or over the cap, trailing bytes or a count
    mismatch.
    """
    view = memoryview(buf).cast("B")
    size = view.nbytes
    if count is not None:
        if count < 0:
            raise ValueError(f"BYTES element count must be >= 0, got {count}")
        # Each element needs at least its 4-byte prefix: refuse before allocating for a huge count.
        if count * _LENGTH.size > size:
            raise ValueError(
                f"BYTES tensor of {count} elements needs at least {count * _LENGTH.size} bytes, got {size}"
            )
    # The loop runs once per element (65,536 of them at the server's default cap): names bound
    # locally, elements sliced from bytes (one copy each, no memoryview per element).
    data = buf if isinstance(buf, bytes) else view.tobytes()
    unpack = _LENGTH.unpack_from
    limit = size if max_element_bytes is None else max_element_bytes
    wanted = size if count is None else count
    elements: list[bytes] = []
    append = elements.append
    offset = 0
    while offset < size and len(elements) < wanted:
        if size - offset < 4:
            raise ValueError(
                f"BYTES element {len(elements)}: its 4-byte length prefix is cut off by the end of the tensor")
        (length,) = unpack(data, offset)
        start = offset + 4
        end = start + length
        # Never the declared length or an offset in a message: a prefix that is not one (a float
        # sent as BYTES, text without prefixes) is payload, and its integer would echo it.
        if end > size:
            raise ValueError(
                f"BYTES element {len(elements)}: its length prefix runs past the end of the tensor "
                "(each element is a 4-byte little-endian length, then that many bytes)"
            )
        if length > limit:
            raise ValueError(
                f"BYTES element {len(elements)} is longer than {max_element_bytes} bytes, the most accepted")
        append(data[start:end])
        offset = end
    if count is not None and len(elements) != count:
        raise ValueError(f"BYTES tensor: expected {count} elements, found {len(elements)}")
    if offset != size:
        raise ValueError(f"BYTES tensor: bytes left over after its {len(elements)} elements")
    result = np.empty(len(elements), dtype=object)
    result[:] = elements
    return result


def to_raw(array: npt.ArrayLike) -> bytes:
    """Encode a tensor in raw form: little-endian, C order; BYTES via serialize_bytes."""
    arr = np.asarray(array)
    if datatype_of(arr.dtype) == "BYTES":
        return serialize_bytes(arr)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return little.tobytes(order="C")


def from_raw(
    buf: ByteBuffer, datatype: str, shape: Sequence[int], max_element_bytes: int | None = None, *,
    count: int | None = None,
) -> npt.NDArray[Any]:
    """Decode a raw tensor of the given V2 datatype and (concrete) shape (`max_element_bytes`
    caps a BYTES element).

    Fixed-size types come back as a zero-copy ``np.frombuffer`` view (read-only when ``buf`` is
    immutable, e.g. protobuf ``bytes``); copy before writing to it.
    """
    dims = tuple(int(d) for d in shape)
    dtype = numpy_dtype(datatype)
    if count is None:  # a caller that checked the shape passes its count
        count = element_count(dims, dtype.itemsize)
    if datatype == "BYTES":
        return deserialize_bytes(buf, count, max_element_bytes).reshape(dims)
    got = memoryview(buf).nbytes
    expected = count * dtype.itemsize
    if got != expected:
        raise ValueError(
            f"{datatype} tensor of shape {list(dims)} needs {expected} bytes "
            f"({count} x {dtype.itemsize}), got {got}"
        )
    if datatype == "BOOL" and got and np.frombuffer(buf, dtype=np.uint8).max() > 1:
        # Other byte values would give numpy bools that compare unequal to True.
        raise ValueError("BOOL tensor holds bytes other than 0 and 1")
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(dims)
