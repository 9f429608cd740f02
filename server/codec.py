"""Pure functions between the wire messages and the domain: ModelInferRequest -> InferRequest
(numpy arrays, zero-copy views over raw contents) and InferResult -> ModelInferResponse (always
`raw_output_contents`, one entry per output, same order: what tritonclient and perf_analyzer
read). Errors are `InvalidInput` naming model, version, tensor, expected and got — never values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import DATATYPES, element_count, from_raw, to_raw

from .errors import InvalidInput, model_label
from .inference import InferRequest, InferResult
from .signature import FixedInput

SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def _label(request: pb.ModelInferRequest) -> str:
    return model_label(request.model_name, request.model_version)


def _int_param(label: str, key: str, param: pb.InferParameter) -> int:
    which = param.WhichOneof("parameter_choice")
    if which in ("int64_param", "uint64_param"):
        value = int(getattr(param, which))
    else:
        raise InvalidInput(f"model {label}: parameter {key!r} must be an integer, got {which or 'nothing'}")
    if value < 0:
        raise InvalidInput(f"model {label}: parameter {key!r} must be >= 0, got {value}")
    return value


def _bool_param(label: str, key: str, param: pb.InferParameter) -> bool:
    which = param.WhichOneof("parameter_choice")
    if which == "bool_param":
        return bool(param.bool_param)
    if which == "string_param" and param.string_param.lower() in ("true", "false"):
        return param.string_param.lower() == "true"
    raise InvalidInput(f"model {label}: parameter {key!r} must be true or false, got {which or 'nothing'}")


def _typed_array(
    label: str, tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], limits: DecodeLimits
) -> np.ndarray:
    entry = DATATYPES[tensor.datatype]
    if entry.contents_field is None:
        raise InvalidInput(
            f"model {label}: input {tensor.name!r}: datatype {tensor.datatype} can only be sent as raw_input_contents"
        )
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != entry.contents_field]
    if others:
        raise InvalidInput(
            f"model {label}: input {tensor.name!r}: datatype {tensor.datatype} is sent in {entry.contents_field}, "
            f"got {', '.join(others)}"
        )
    values = getattr(tensor.contents, entry.contents_field)
    try:
        count = element_count(shape, entry.dtype.itemsize if entry.dtype is not None else 8)
    except ValueError as exc:
        raise InvalidInput(f"model {label}: input {tensor.name!r}: {exc}") from None
    if len(values) != count:
        raise InvalidInput(
            f"model {label}: input {tensor.name!r}: shape {list(shape)} needs {count} elements, "
            f"{entry.contents_field} has {len(values)}"
        )
    if tensor.datatype == "BYTES":
        if max(map(len, values), default=0) > limits.bytes_element_size:
            raise InvalidInput(
                f"model {label}: input {tensor.name!r}: a BYTES element is longer than {limits.bytes_element_size} "
                "bytes, the most accepted"
            )
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    assert entry.dtype is not None and entry.contents_dtype is not None
    if not count:
        return np.zeros(shape, entry.dtype)
    # The field's own width first: numpy would wrap 1000 into an INT8 silently.
    wide: np.ndarray = np.asarray(values, dtype=entry.contents_dtype)
    if entry.dtype.kind in "iu" and entry.dtype.itemsize < wide.dtype.itemsize:
        bounds = np.iinfo(entry.dtype)
        if wide.min() < bounds.min or wide.max() > bounds.max:
            raise InvalidInput(
                f"model {label}: input {tensor.name!r}: a value does not fit datatype {tensor.datatype} "
                f"({bounds.min}..{bounds.max})"
            )
    return wide.astype(entry.dtype, copy=False).reshape(shape)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Caps checked before any tensor is decoded (`--max-tensor-elements`, `--max-bytes-elements`,
    `--max-bytes-element-size`, `--max-text-bytes`, and the input count): a request within the
    message size can still ask for millions of tiny BYTES elements, each a Python object (and a
    row to tokenize), 60 MiB of text, or 200,000 tensors of one element."""

    tensor_elements: int = 1 << 26
    bytes_elements: int = 1 << 16
    bytes_element_size: int = 1 << 20
    text_bytes: int = 8 << 20  # `--max-text-bytes`: the bytes of all of a request's BYTES elements together
    inputs: int = 1024  # input tensors in one request
    # REST: the JSON part of a body is parsed holding the GIL (16 MiB of numbers: 0.2-0.25 s, every
    # other call stalled), so it is bounded apart from the message (`--max-json-mb`), and so are
    # its arrays and objects (each a tracked object: a body of tiny ones parses 3x slower, in the
    # garbage collector). Large tensors go in Triton's binary extension.
    json_bytes: int = 2 << 20
    json_containers: int = 1 << 16


DEFAULT_LIMITS = DecodeLimits()


def check_tensor_limits(model: str, version: str, name: str, datatype: str, shape: tuple[int, ...],
                        limits: DecodeLimits) -> int:
    """The tensor's element count, refused over the limits (`--max-tensor-elements`,
    `--max-bytes-elements`); shared by both front ends' codecs (this one and `rest_codec`)."""
    entry = DATATYPES[datatype]
    try:
        count = element_count(shape, entry.itemsize or 8)
    except ValueError as exc:
        raise InvalidInput(f"model {model_label(model, version)}: input {name!r}: {exc}") from None
    if count > limits.tensor_elements:
        raise InvalidInput(
            f"model {model_label(model, version)}: input {name!r}: shape {list(shape)} has {count} elements; the "
            f"server accepts at most {limits.tensor_elements} per tensor"
        )
    if datatype == "BYTES" and count > limits.bytes_elements:
        raise InvalidInput(
            f"model {model_label(model, version)}: input {name!r}: {count} BYTES elements; the server accepts at most "
            f"{limits.bytes_elements} per tensor"
        )
    return count


def _check_tensors(request: pb.ModelInferRequest, limits: DecodeLimits) -> list[tuple[tuple[int, ...], int]]:
    """Every tensor's name, datatype, shape and size against the limits, and the request's text
    against its budget, before the first tensor is decoded (a refusal costs no decoding).
    Returns each tensor's shape and element count, for the decoding that follows."""
    raw = request.raw_input_contents
    names: set[str] = set()
    sizes: list[tuple[tuple[int, ...], int]] = []
    text = 0
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in names:
            raise InvalidInput(f"model {_label(request)}: input {name!r} is given twice")
        names.add(name)
        if datatype not in DATATYPES or datatype == "BF16":
            raise InvalidInput(
                f"model {_label(request)}: input {name!r}: unsupported datatype {datatype!r}; expected one of "
                f"{', '.join(d for d in DATATYPES if d != 'BF16')}"
            )
        if tensor.parameters and any(k in tensor.parameters for k in SHARED_MEMORY_KEYS):
            raise InvalidInput(f"model {_label(request)}: input {name!r}: shared memory is not supported by this server")
        shape = tuple(tensor.shape)
        count = check_tensor_limits(request.model_name, request.model_version, name, datatype, shape, limits)
        sizes.append((shape, count))
        has_contents = tensor.HasField("contents")
        if raw and has_contents:
            raise InvalidInput(
                f"model {_label(request)}: input {name!r}: contents must not be set when raw_input_contents is used"
            )
        if not raw and not has_contents:
            raise InvalidInput(f"model {_label(request)}: input {name!r} has no data (neither contents nor raw_input_contents)")
        if datatype == "BYTES":
            # The text's size without decoding it: a raw tensor's bytes less one 4-byte prefix per
            # element (exact when well formed; decoding refuses the rest); typed, the elements' sizes
            # (their count is capped already).
            if raw:
                text += max(0, len(raw[i]) - 4 * count)
            elif len(tensor.contents.bytes_contents) == count:  # otherwise refused when decoded
                text += sum(map(len, tensor.contents.bytes_contents))
            if text > limits.text_bytes:
                raise InvalidInput(
                    f"model {_label(request)}: the request's BYTES elements hold more than {limits.text_bytes} bytes of text "
                    "together, the most the server accepts per request (--max-text-bytes)"
                )
    return sizes


def decode_infer_request(
    request: pb.ModelInferRequest, deadline_s: float | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> InferRequest:
    """Validate the message's structure and turn it into arrays (the model checks the rest).
    This runs for every request: checks are ordered so the common, valid case does the least."""
    raw = request.raw_input_contents
    tensors = request.inputs
    if len(tensors) > limits.inputs:
        raise InvalidInput(
            f"model {_label(request)}: {len(tensors)} inputs; the server accepts at most {limits.inputs} per request"
        )
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"model {_label(request)}: {len(tensors)} inputs but {len(raw)} raw_input_contents entries; "
            "expected one per input, in order"
        )
    sizes = _check_tensors(request, limits)
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        shape, count = sizes[i]
        if raw:
            try:
                inputs[name] = from_raw(raw[i], tensor.datatype, shape, limits.bytes_element_size, count=count)
            except ValueError as exc:
                raise InvalidInput(f"model {_label(request)}: input {name!r}: {exc}") from None
        else:
            inputs[name] = _typed_array(_label(request), tensor, shape, limits)

    outputs: list[str] = []
    for out in request.outputs:
        if out.parameters:
            if "classification" in out.parameters:
                raise InvalidInput(
                    f"model {_label(request)}: output {out.name!r}: the classification extension is not supported"
                )
            if any(k in out.parameters for k in SHARED_MEMORY_KEYS):
                raise InvalidInput(
                    f"model {_label(request)}: output {out.name!r}: shared memory is not supported by this server"
                )
        if out.name in outputs:
            raise InvalidInput(f"model {_label(request)}: output {out.name!r} is requested twice")
        outputs.append(out.name)

    priority, timeout_us, explain = 0, None, False
    params = request.parameters
    if params:  # most requests carry none
        if "priority" in params:
            priority = _int_param(_label(request), "priority", params["priority"])
        if "timeout" in params:
            timeout_us = _int_param(_label(request), "timeout", params["timeout"]) or None
        if "explain" in params:
            explain = _bool_param(_label(request), "explain", params["explain"])
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=inputs,
        outputs=tuple(outputs),
        id=request.id,
        priority=priority,
        timeout_us=timeout_us,
        deadline_s=deadline_s,
        explain=explain,
    )


FIXED_INLINE_ELEMENTS = 1 << 16  # a larger request takes the general path (its checks may leave the loop)


def decode_fixed(request: pb.ModelInferRequest, fixed: FixedInput, deadline_s: float | None = None,
                 limits: DecodeLimits = DEFAULT_LIMITS) -> InferRequest | None:
    """A request of a fixed-signature model (`FixedInput`) decoded and validated in one step:
    one raw tensor of the input's name, datatype and dims, rows within the batch limit, its bytes
    exactly the shape's, no parameters, no outputs named. The array is the one
    `decode_infer_request` and `Signature.validate` would make of it; anything else answers None
    and takes the general path, which refuses what is wrong with its own message."""
    if request.parameters or request.outputs or len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
        return None
    tensor = request.inputs[0]
    shape = tensor.shape
    if (tensor.name != fixed.name or tensor.datatype != fixed.datatype or tensor.parameters
            or tuple(shape[1:]) != fixed.dims or not shape or tensor.HasField("contents")):
        return None
    rows = shape[0]
    count = rows * fixed.row_elements
    raw = request.raw_input_contents[0]
    if (not 0 < rows <= fixed.max_rows or count > FIXED_INLINE_ELEMENTS or count > limits.tensor_elements
            or limits.inputs < 1 or len(raw) != count * fixed.dtype.itemsize):
        return None
    array = np.frombuffer(raw, fixed.dtype, count).reshape((rows, *fixed.dims))
    if fixed.finite and not np.isfinite(array).all():
        return None
    return InferRequest(model=request.model_name, version=request.model_version, inputs={fixed.name: array},
                        id=request.id, deadline_s=deadline_s, validated=fixed)


def encode_infer_response(result: InferResult) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
    response.parameters["model_sha256"].string_param = result.sha256
    if result.out_of_range:
        response.parameters["out_of_range_features"].string_param = json.dumps(list(result.out_of_range))
    for key, value in result.parameters:
        response.parameters[key].string_param = value
    outputs = response.outputs
    raw = response.raw_output_contents
    for out in result.outputs:
        array = out.array
        outputs.add(name=out.name, datatype=out.datatype, shape=array.shape)
        # Fast path: a native little-endian numeric array is already in wire layout.
        if out.datatype != "BYTES" and array.dtype.byteorder != ">":
            raw.append(array.tobytes())
        else:
            raw.append(to_raw(array))
    return response
