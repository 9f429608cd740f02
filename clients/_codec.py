"""Pure conversions between the caller's values (numpy, dicts, dataclasses) and the wire
messages. No I/O here, so all of it is shared by the sync and the asyncio client.

The datatype table and the raw tensor codec are `medserve.protos.wire`'s, shared with the server.
Messages name models, tensors, features and record positions, never values (patient data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import model_config_pb2
from medserve.protos.wire import DATATYPES, datatype_of, from_raw, numpy_dtype, to_raw

from ._types import (
    BatchStatistics,
    Duration,
    InferResult,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    ParamValue,
    RecordSchema,
    RepositoryModel,
    ServerMetadata,
    TensorConfig,
    TensorMetadata,
)
from .errors import Internal, InvalidInputError

_V2_BY_ENUM: dict[str, str] = {d.config_enum: d.name for d in DATATYPES.values()}
_MAX_LISTED = 5


def model_label(model: str, version: str | int | None) -> str:
    return f"{model!r} version {version}" if version not in (None, "") else repr(model)


def version_string(version: str | int | None) -> str:
    return "" if version is None else str(version)


# -- inference -------------------------------------------------------------------------------


def encode_infer_request(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    *,
    version: str | int | None = None,
    outputs: Sequence[str] | str | None = None,
    request_id: str | None = None,
    priority: int | None = None,
    explain: bool = False,
    routing_key: str | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying every input as ``raw_input_contents`` (one entry per input).

    On the hot path of every call: fields are set only when they differ from their defaults and
    the error label is formatted only when there is an error.
    """
    if not isinstance(model, str) or not model:
        raise InvalidInputError("a model name is required")
    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidInputError(
            f"model {model_label(model, version)}: inputs must be a non-empty mapping of input name -> array"
        )
    request = pb.ModelInferRequest(model_name=model)
    if version is not None and version != "":
        request.model_version = str(version)
    if request_id:
        request.id = request_id
    tensors = request.inputs
    raw_contents = request.raw_input_contents
    for name, value in inputs.items():
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        try:
            datatype = datatype_of(array.dtype)
            raw = to_raw(array)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"model {model_label(model, version)}: input {name!r}: {exc}") from None
        tensors.add(name=name, datatype=datatype, shape=array.shape)
        raw_contents.append(raw)
    if outputs is not None:
        for out in (outputs,) if isinstance(outputs, str) else outputs:
            request.outputs.add(name=out)
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise InvalidInputError(
                f"model {model_label(model, version)}: priority must be an integer >= 0 (1 = highest), got {priority!r}"
            )
        request.parameters["priority"].uint64_param = priority
    if explain:
        request.parameters["explain"].bool_param = True
    if routing_key:
        if not isinstance(routing_key, str):
            raise InvalidInputError(f"model {model_label(model, version)}: routing_key must be a string")
        request.parameters["routing_key"].string_param = routing_key
    return request


def param_value(param: pb.InferParameter) -> ParamValue:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        return ""
    value: ParamValue = getattr(param, which)
    return value


def _params(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    return {key: param_value(value) for key, value in params.items()}


def _bf16(raw: bytes, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    halves = np.frombuffer(raw, dtype="<u2")
    if halves.size != int(np.prod(shape)):
        raise ValueError(f"BF16 tensor of shape {list(shape)} needs {2 * int(np.prod(shape))} bytes, got {len(raw)}")
    return (halves.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _typed_output(tensor: pb.ModelInferResponse.InferOutputTensor, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    entry = DATATYPES.get(tensor.datatype)
    if entry is None or entry.contents_field is None:
        raise ValueError(f"datatype {tensor.datatype!r} cannot travel as typed contents")
    values = getattr(tensor.contents, entry.contents_field)
    if tensor.datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    return np.asarray(values, dtype=numpy_dtype(tensor.datatype)).reshape(shape)


def decode_infer_response(response: pb.ModelInferResponse) -> InferResult:
    """Outputs as numpy arrays: zero-copy views over the raw bytes for fixed-size datatypes."""
    raw = response.raw_output_contents
    n_raw = len(raw)
    outputs: dict[str, npt.NDArray[Any]] = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        try:
            if i < n_raw:
                if tensor.datatype == "BF16":
                    outputs[tensor.name] = _bf16(raw[i], shape)
                else:
                    outputs[tensor.name] = from_raw(raw[i], tensor.datatype, shape)
            else:
                outputs[tensor.name] = _typed_output(tensor, shape)
        except ValueError as exc:
            raise Internal(
                f"model {model_label(response.model_name, response.model_version)}: malformed output "
                f"{tensor.name!r} in the response: {exc}",
                request_id=response.id or None,
            ) from None
    return InferResult(
        model_name=response.model_name,
        model_version=response.model_version,
        request_id=response.id,
        outputs=outputs,
        parameters=_params(response.parameters) if response.parameters else {},
    )


# -- metadata --------------------------------------------------------------------------------


def server_metadata(response: pb.ServerMetadataResponse) -> ServerMetadata:
    return ServerMetadata(response.name, response.version, tuple(response.extensions))


def _tensors(items: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items)


def model_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=_tensors(response.inputs),
        outputs=_tensors(response.outputs),
        parameters=_params(response.parameters),
    )


def _datatype(enum_value: model_config_pb2.DataType.ValueType) -> str:
    name = str(model_config_pb2.DataType.Name(enum_value))
    return _V2_BY_ENUM.get(name, name)


def model_config(response: pb.ModelConfigResponse) -> ModelConfig:
    cfg = response.config
    return ModelConfig(
        name=cfg.name,
        platform=cfg.platform,
        backend=cfg.backend,
        max_batch_size=int(cfg.max_batch_size),
        inputs=tuple(TensorConfig(t.name, _datatype(t.data_type), tuple(int(d) for d in t.dims)) for t in cfg.input),
        outputs=tuple(TensorConfig(t.name, _datatype(t.data_type), tuple(int(d) for d in t.dims)) for t in cfg.output),
        dynamic_batching=cfg.HasField("dynamic_batching"),
        parameters={key: p.string_value for key, p in cfg.parameters.items()},
        raw=cfg,
    )


def _duration(d: pb.StatisticDuration) -> Duration:
    return Duration(int(d.count), int(d.ns))


def model_statistics(response: pb.ModelStatisticsResponse) -> tuple[ModelStatistics, ...]:
    result = []
    for s in response.model_stats:
        i = s.inference_stats
        result.append(
            ModelStatistics(
                name=s.name,
                version=s.version,
                last_inference_ms=int(s.last_inference),
                inference_count=int(s.inference_count),
                execution_count=int(s.execution_count),
                success=_duration(i.success),
                fail=_duration(i.fail),
                queue=_duration(i.queue),
                compute_input=_duration(i.compute_input),
                compute_infer=_duration(i.compute_infer),
                compute_output=_duration(i.compute_output),
                batches=tuple(
                    BatchStatistics(
                        int(b.batch_size),
                        _duration(b.compute_input),
                        _duration(b.compute_infer),
                        _duration(b.compute_output),
                    )
                    for b in s.batch_stats
                ),
            )
        )
    return tuple(result)


def repository_index(response: pb.RepositoryIndexResponse) -> tuple[RepositoryModel, ...]:
    return tuple(RepositoryModel(m.name, m.version, m.state, m.reason) for m in response.models)


# -- records (infer_records) -----------------------------------------------------------------


def record_schema(label: str, metadata: ModelMetadata, config_features: Sequence[str] | None) -> RecordSchema:
    """Column order and input of a tabular model, from its model card (via metadata or config)."""
    names = metadata.feature_names or (tuple(config_features) if config_features else None)
    if not names:
        raise InvalidInputError(
            f"model {label} publishes no feature_names (model_card.json); send an array with infer() instead"
        )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"model {label}: its feature_names repeat a name; refusing an ambiguous column order")
    if len(metadata.inputs) != 1:
        return _mixed_schema(label, metadata, names)
    tensor = metadata.inputs[0]
    if tensor.datatype in ("BYTES", "BF16") or tensor.datatype not in DATATYPES:
        raise InvalidInputError(
            f"model {label}: input {tensor.name!r} is {tensor.datatype}; infer_records builds numeric inputs only"
        )
    if len(tensor.shape) != 2 or tensor.shape[1] not in (-1, len(names)):
        raise InvalidInputError(
            f"model {label}: input {tensor.name!r} has shape {list(tensor.shape)}, but its model card lists "
            f"{len(names)} features; expected shape [-1, {len(names)}]"
        )
    return RecordSchema(names, tensor.name, tensor.datatype, metadata.model_sha256)


def _mixed_schema(label: str, metadata: ModelMetadata, names: tuple[str, ...]) -> RecordSchema:
    """A mixed table: each input carries the columns the card's `input_columns` gives it."""
    columns = metadata.input_columns
    inputs = {t.name: t for t in metadata.inputs}
    if columns is None or set(columns) != set(inputs):
        raise InvalidInputError(
            f"model {label} has {len(inputs)} inputs and publishes no input_columns for them (model_card.json); "
            "send arrays with infer() instead"
        )
    if sorted(c for cols in columns.values() for c in cols) != sorted(names):
        raise InvalidInputError(f"model {label}: its input_columns do not cover its feature_names once each")
    parts = []
    for name in sorted(inputs):
        tensor, cols = inputs[name], columns[name]
        if tensor.datatype == "BF16" or tensor.datatype not in DATATYPES:
            raise InvalidInputError(f"model {label}: input {name!r} is {tensor.datatype}; records cannot fill it")
        if len(tensor.shape) != 2 or tensor.shape[1] not in (-1, len(cols)):
            raise InvalidInputError(
                f"model {label}: input {name!r} has shape {list(tensor.shape)}, but input_columns gives it "
                f"{len(cols)} columns; expected shape [-1, {len(cols)}]"
            )
        parts.append((name, tensor.datatype, cols))
    return RecordSchema(names, "", "", metadata.model_sha256, tuple(parts))


def _listed(names: Sequence[str]) -> str:
    shown = [repr(n) for n in names[:_MAX_LISTED]]
    more = len(names) - _MAX_LISTED
    return "[" + ", ".join(shown) + (f", ... {more} more" if more > 0 else "") + "]"


def records_to_inputs(label: str, schema: RecordSchema,
                      records: Sequence[Mapping[str, Any]]) -> dict[str, npt.NDArray[Any]]:
    """One [len(records), n_columns] array per input, in the model's column order; refuses
    missing or unknown features and values of the wrong kind, naming record positions and
    features (never values)."""
    names = schema.feature_names
    expected = set(names)
    if isinstance(records, Mapping):
        raise InvalidInputError(
            f"model {label}: records must be a sequence of mappings; wrap a single record in a list"
        )
    if len(records) == 0:
        raise InvalidInputError(f"model {label}: no records given")
    problems: list[str] = []
    bad = 0
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            bad += 1
            if len(problems) < _MAX_LISTED:
                problems.append(f"record {i} is a {type(record).__name__}, not a mapping")
            continue
        keys = record.keys()
        if len(keys) == len(names) and keys == expected:
            continue
        bad += 1
        if len(problems) < _MAX_LISTED:
            missing = [n for n in names if n not in record]
            unknown = sorted(str(k) for k in keys if k not in expected)
            parts = []
            if missing:
                parts.append(f"missing {_listed(missing)}")
            if unknown:
                parts.append(f"unknown {_listed(unknown)}")
            problems.append(f"record {i}: " + " and ".join(parts))
    if problems:
        more = f"; {bad - len(problems)} more bad records" if bad > len(problems) else ""
        raise InvalidInputError(
            f"model {label}: "
            + "; ".join(problems)
            + more
            + f" (the model takes {len(names)} features: {_listed(list(names))})"
        )
    return {name: _column_array(label, [[record[n] for n in columns] for record in records], columns, datatype)
            for name, datatype, columns in schema.inputs()}


def records_to_array(label: str, schema: RecordSchema, records: Sequence[Mapping[str, Any]]) -> npt.NDArray[Any]:
    """The one input of a single-input model, from records (see `records_to_inputs`)."""
    return records_to_inputs(label, schema, records)[schema.input_name]


def _column_array(label: str, rows: list[list[Any]], names: Sequence[str], datatype: str) -> npt.NDArray[Any]:
    if datatype == "BYTES":  # text codes: str (sent as UTF-8) or bytes
        if not all(isinstance(value, (str, bytes)) for row in rows for value in row):
            raise InvalidInputError(f"model {label}: {_first_bad_value(rows, names, (str, bytes), datatype)}")
        return np.array(rows, dtype=object)
    dtype = numpy_dtype(datatype)
    allowed = _INTEGRAL if dtype.kind in "iub" else _NUMERIC
    if not all(isinstance(value, allowed) for row in rows for value in row):
        raise InvalidInputError(f"model {label}: {_first_bad_value(rows, names, allowed, datatype)}")
    try:
        return np.array(rows, dtype=dtype)
    except (TypeError, ValueError, OverflowError):  # the message would quote the value: not ours to log
        raise InvalidInputError(f"model {label}: a record value is out of range for {datatype}") from None


_NUMERIC = (bool, int, float, np.bool_, np.integer, np.floating)
_INTEGRAL = (bool, int, np.bool_, np.integer)


def _first_bad_value(rows: list[list[Any]], names: Sequence[str], allowed: tuple[type, ...], datatype: str) -> str:
    for i, row in enumerate(rows):
        for name, value in zip(names, row, strict=True):
            if not isinstance(value, allowed):
                return f"record {i} feature {name!r}: a {type(value).__name__} value cannot be sent as {datatype}"
    return f"the records cannot be converted to {datatype}"
