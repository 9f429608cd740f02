"""Pure functions between the KServe V2 REST messages and the core: a JSON inference request
(tensors as JSON `data`, flat or nested, or as Triton's binary tensor extension: a JSON header of
`Inference-Header-Content-Length` bytes followed by each binary input's bytes, in order, sized by
its `binary_data_size` parameter) -> `InferRequest`, and `InferResult` -> the JSON answer with each
output as JSON `data` or, where asked (`binary_data` per output, `binary_data_output` for all),
as binary bytes after the header. No HTTP and no protobuf types here: `rest.py` is the front end.

Every tensor's name, datatype, shape and element count is checked against the server's
`DecodeLimits` before any tensor is converted. Errors are `InvalidInput` naming model, version and
tensor, expected and got, never a value (patient data).

JSON goes through orjson (parsing a 1,024-row request 5 x, writing its answer 20 x the standard
library's; perf/README.md). Two cases keep the standard library, as JSON callers expect: a body
with `NaN` / `Infinity` literals (which Python's `json`, and so `tritonclient.http`, writes for a
missing value; orjson refuses them), and an answer holding a non-finite number (orjson would write
null).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from medserve.protos.wire import DATATYPES, from_raw, to_raw

from .codec import SHARED_MEMORY_KEYS, DecodeLimits, check_tensor_limits
from .errors import InvalidInput, model_label
from .inference import InferRequest, InferResult

MAX_ROUTING_KEY_CHARS = 256  # as over gRPC (service.MAX_ROUTING_KEY_CHARS)


@dataclass(slots=True)
class RestRequest:
    """A decoded REST inference: the core's request, the caller's routing key, and which outputs
    go back as binary (`binary_all`: every output, the request parameter `binary_data_output`)."""

    request: InferRequest
    routing_key: str = ""
    binary: frozenset[str] = frozenset()
    binary_all: bool = False


def check_json_size(body: bytes, header_length: int | None, label: str, limits: DecodeLimits) -> None:
    """Refuse a JSON part over `limits.json_bytes` before it is read (see `DecodeLimits`); a
    binary request's header is named as such, and one longer than its body is refused as that."""
    if header_length is None:
        if len(body) > limits.json_bytes:
            raise InvalidInput(
                f"model {label}: the request's JSON is {len(body)} bytes; the server parses at most "
                f"{limits.json_bytes} (--max-json-mb); send large tensors as binary data "
                "(Inference-Header-Content-Length)")
        return
    _check_header_length(header_length, body, label)
    if header_length > limits.json_bytes:
        raise InvalidInput(
            f"model {label}: the request's JSON header (Inference-Header-Content-Length) is {header_length} bytes; "
            f"the server parses at most {limits.json_bytes} (--max-json-mb); send large tensors as binary data "
            "after the header, not as JSON in it")


def _check_header_length(header_length: int, body: bytes, label: str) -> None:
    if not 0 <= header_length <= len(body):
        raise InvalidInput(f"model {label}: Inference-Header-Content-Length {header_length} is not within "
                           f"the body of {len(body)} bytes")


def parse_header(body: bytes, header_length: int | None, label: str,
                 limits: DecodeLimits) -> tuple[dict[str, Any], memoryview]:
    """The JSON part of a request body and the binary bytes after it (Triton's extension); its
    arrays and objects are counted against `limits` before it is parsed (an upper bound:
    brackets inside strings count too)."""
    view = memoryview(body)
    if header_length is None:
        head, rest = view, view[len(view):]
    else:
        _check_header_length(header_length, body, label)
        head, rest = view[:header_length], view[header_length:]
    text = bytes(head)
    if text.count(b"{") + text.count(b"[") > limits.json_containers:
        raise InvalidInput(
            f"model {label}: the request's JSON holds more than {limits.json_containers} arrays and objects; send "
            f"tensor data as one flat array per input, or as binary data (Inference-Header-Content-Length)")
    document = loads(text, label)
    if not isinstance(document, dict):
        raise InvalidInput(f"model {label}: the request body must be a JSON object")
    return document, rest


def loads(text: bytes, label: str) -> Any:
    """A JSON document; NaN and Infinity literals (not JSON, but Python's json writes them) too."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"model {label}: the request body is not valid JSON") from None


def _parameters(where: str, raw: object) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: 'parameters' must be a JSON object")
    return raw


def _int(label: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"model {label}: parameter {key!r} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise InvalidInput(f"model {label}: parameter {key!r} must be >= 0")
    return value


def _bool(label: str, key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidInput(f"model {label}: parameter {key!r} must be true or false, got {type(value).__name__}")


def _shape(label: str, name: str, raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise InvalidInput(f"model {label}: input {name!r}: 'shape' must be a list of integers")
    return tuple(raw)


def _json_array(label: str, name: str, datatype: str, data: object, shape: tuple[int, ...], count: int,
                limits: DecodeLimits) -> np.ndarray:
    """A JSON `data` list (flat or nested, row-major) as an array of the datatype and shape."""
    if not isinstance(data, list):
        raise InvalidInput(f"model {label}: input {name!r}: 'data' must be a JSON list")
    if datatype == "BYTES":
        flat = _flatten(label, name, data)
        if len(flat) != count:
            raise InvalidInput(f"model {label}: input {name!r}: shape {list(shape)} needs {count} elements, "
                               f"'data' has {len(flat)}")
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"model {label}: input {name!r}: BYTES elements must be JSON strings")
        encoded = [v.encode("utf-8") for v in flat]
        if max(map(len, encoded), default=0) > limits.bytes_element_size:
            raise InvalidInput(f"model {label}: input {name!r}: a BYTES element is longer than "
                               f"{limits.bytes_element_size} bytes, the most accepted")
        array = np.empty(count, dtype=object)
        array[:] = encoded
        return array.reshape(shape)
    entry = DATATYPES[datatype]
    assert entry.dtype is not None
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"model {label}: input {name!r}: 'data' is a ragged nested list") from None
    if values.size != count:
        raise InvalidInput(f"model {label}: input {name!r}: shape {list(shape)} needs {count} elements, "
                           f"'data' has {values.size}")
    if count == 0:
        return np.zeros(shape, entry.dtype)
    kind = values.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"model {label}: input {name!r}: datatype BOOL needs JSON true/false values")
    elif kind not in "biuf" or (kind == "f" and entry.dtype.kind in "iu"):
        raise InvalidInput(f"model {label}: input {name!r}: datatype {datatype} needs JSON "
                           f"{'integers' if entry.dtype.kind in 'iu' else 'numbers'}")
    if entry.dtype.kind in "iu" and kind in "iu":
        bounds = np.iinfo(entry.dtype)
        if values.min() < bounds.min or values.max() > bounds.max:
            raise InvalidInput(f"model {label}: input {name!r}: a value does not fit datatype {datatype} "
                               f"({bounds.min}..{bounds.max})")
    return values.astype(entry.dtype, copy=False).reshape(shape)


def _flatten(label: str, name: str, data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            flat.append(v)
        else:
            stack.pop()
    return flat


def decode_request(model: str, version: str, document: Mapping[str, Any], binary: memoryview,
                   limits: DecodeLimits, deadline_s: float | None = None) -> RestRequest:
    """The JSON request (and its binary tail) as the core's request; every tensor checked against
    the limits before the first is converted."""
    label = model_label(model, version)
    inputs_raw = document.get("inputs")
    if not isinstance(inputs_raw, list):
        raise InvalidInput(f"model {label}: the request needs 'inputs', a JSON list")
    if len(inputs_raw) > limits.inputs:
        raise InvalidInput(f"model {label}: {len(inputs_raw)} inputs; the server accepts at most {limits.inputs} "
                           "per request")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"model {label}: 'id' must be a string")
    # 1. structure and limits of every tensor, nothing converted yet
    plan: list[tuple[str, str, tuple[int, ...], int, Any, int | None]] = []
    names: set[str] = set()
    text, offset = 0, 0
    for tensor in inputs_raw:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput(f"model {label}: each input must be a JSON object with a 'name'")
        name = tensor["name"]
        if name in names:
            raise InvalidInput(f"model {label}: input {name!r} is given twice")
        names.add(name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES or datatype == "BF16":
            raise InvalidInput(f"model {label}: input {name!r}: unsupported datatype {str(datatype)[:32]!r}; expected "
                               f"one of {', '.join(d for d in DATATYPES if d != 'BF16')}")
        shape = _shape(label, name, tensor.get("shape"))
        count = check_tensor_limits(model, version, name, datatype, shape, limits)
        params = _parameters(f"model {label}: input {name!r}", tensor.get("parameters"))
        if any(k in params for k in SHARED_MEMORY_KEYS):
            raise InvalidInput(f"model {label}: input {name!r}: shared memory is not supported by this server")
        size = params.get("binary_data_size")
        if size is not None:
            size = _int(label, f"{name}.binary_data_size", size)
            if "data" in tensor:
                raise InvalidInput(f"model {label}: input {name!r}: 'data' must not be set with binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(f"model {label}: input {name!r}: binary_data_size {size} runs past the "
                                   f"{len(binary)} binary bytes of the body")
            if datatype == "BYTES":
                text += max(0, size - 4 * count)
        elif "data" not in tensor:
            raise InvalidInput(f"model {label}: input {name!r} has no data (neither 'data' nor binary_data_size)")
        elif datatype == "BYTES" and isinstance(tensor["data"], list):
            text += sum(len(v.encode("utf-8", "replace")) for v in _flatten(label, name, tensor["data"])
                        if isinstance(v, str))
        if text > limits.text_bytes:
            raise InvalidInput(f"model {label}: the request's BYTES elements hold more than {limits.text_bytes} bytes "
                               "of text together, the most the server accepts per request (--max-text-bytes)")
        plan.append((name, datatype, shape, count, tensor.get("data"), size))
        if size is not None:
            offset += size
    if offset != len(binary):
        raise InvalidInput(f"model {label}: the body has {len(binary)} binary bytes after the JSON header; the "
                           f"inputs' binary_data_size add up to {offset}")
    # 2. conversion
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, datatype, shape, count, data, size in plan:
        if size is None:
            arrays[name] = _json_array(label, name, datatype, data, shape, count, limits)
            continue
        try:
            arrays[name] = from_raw(binary[offset:offset + size], datatype, shape, limits.bytes_element_size)
        except ValueError as exc:
            raise InvalidInput(f"model {label}: input {name!r}: {exc}") from None
        offset += size
    # 3. outputs and parameters
    outputs: list[str] = []
    binary_outputs: set[str] = set()
    outputs_raw = document.get("outputs") or []
    if not isinstance(outputs_raw, list):
        raise InvalidInput(f"model {label}: 'outputs' must be a JSON list")
    for out in outputs_raw:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput(f"model {label}: each requested output must be a JSON object with a 'name'")
        name = out["name"]
        params = _parameters(f"model {label}: output {name!r}", out.get("parameters"))
        if "classification" in params:
            raise InvalidInput(f"model {label}: output {name!r}: the classification extension is not supported")
        if any(k in params for k in SHARED_MEMORY_KEYS):
            raise InvalidInput(f"model {label}: output {name!r}: shared memory is not supported by this server")
        if name in outputs:
            raise InvalidInput(f"model {label}: output {name!r} is requested twice")
        outputs.append(name)
        if "binary_data" in params and _bool(label, f"{name}.binary_data", params["binary_data"]):
            binary_outputs.add(name)
    params = _parameters(f"model {label}", document.get("parameters"))
    priority, timeout_us, explain, binary_all, routing_key = 0, None, False, False, ""
    if params:
        if "priority" in params:
            priority = _int(label, "priority", params["priority"])
        if "timeout" in params:
            timeout_us = _int(label, "timeout", params["timeout"]) or None
        if "explain" in params:
            explain = _bool(label, "explain", params["explain"])
        if "binary_data_output" in params:
            binary_all = _bool(label, "binary_data_output", params["binary_data_output"])
        if "routing_key" in params:
            routing_key = params["routing_key"]
            if not isinstance(routing_key, str):
                raise InvalidInput(f"model {label}: parameter 'routing_key' must be a string")
            if len(routing_key) > MAX_ROUTING_KEY_CHARS:
                raise InvalidInput(f"model {label}: parameter 'routing_key' is {len(routing_key)} characters; "
                                   f"at most {MAX_ROUTING_KEY_CHARS}")
    request = InferRequest(model=model, version=version, inputs=arrays, outputs=tuple(outputs), id=request_id,
                           priority=priority, timeout_us=timeout_us, deadline_s=deadline_s, explain=explain)
    return RestRequest(request, routing_key, frozenset(binary_outputs), binary_all)


def _json_data(array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if datatype == "FP16":
        flat = flat.astype(np.float32)
    return list(flat.tolist())


def result_parameters(result: InferResult) -> dict[str, str]:
    """The answer's parameters, as over gRPC (`codec.encode_infer_response`)."""
    params = {"model_sha256": result.sha256}
    if result.out_of_range:
        params["out_of_range_features"] = json.dumps(list(result.out_of_range))
    params.update(result.parameters)
    return params


def encode_response(result: InferResult, binary: frozenset[str] = frozenset(), binary_all: bool = False
                    ) -> tuple[bytes, int | None]:
    """The JSON answer and, when any output goes back binary, the binary tail appended; returns
    (body, header length or None when the body is JSON alone)."""
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    finite = True
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if binary_all or out.name in binary:
            array = out.array
            raw = array.tobytes() if out.datatype != "BYTES" and array.dtype.byteorder != ">" else to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _json_data(out.array, out.datatype)
            if out.array.dtype.kind in "fc" and not np.isfinite(out.array).all():
                finite = False
        outputs.append(entry)
    document = {"model_name": result.model, "model_version": result.version, "id": result.id,
                "parameters": result_parameters(result), "outputs": outputs}
    if not result.id:
        del document["id"]
    # orjson would write a non-finite number as null: such an answer keeps Python's NaN / Infinity
    head = orjson.dumps(document) if finite else json.dumps(document, separators=(",", ":")).encode()
    if not tail:
        return head, None
    return b"".join([head, *tail]), len(head)
