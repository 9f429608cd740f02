"""`config.pbtxt` (protobuf text format of Triton's `inference.ModelConfig`) <-> frozen
`ModelConfig`, and completion of a missing or partial config from the ONNX graph.

Everything wrong is a `ConfigError` naming the file and the field, raised at load: a broken
config never loads silently.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message

from medserve.protos import model_config_pb2 as mc
from medserve.protos.wire import DATATYPES

from .config import (
    BatchingConfig,
    InstanceGroup,
    ModelConfig,
    PadSpec,
    QueuePolicy,
    TensorConfig,
    TimeoutAction,
    TokenizerConfig,
    VersionPolicy,
)
from .errors import ConfigError
from .runtime import GraphTensor

log = logging.getLogger(__name__)

SUPPORTED_PLATFORMS = {"", "onnxruntime_onnx"}
SUPPORTED_BACKENDS = {"", "onnxruntime"}
DEFAULT_MAX_BATCH_SIZE = 64  # when the config is missing and the graph's dim 0 is dynamic

_V2_BY_ENUM = {mc.DataType.Value(d.config_enum): d.name for d in DATATYPES.values()}

# The fields of each config message that medserve honours; a set field outside these is named
# in a warning at load (Triton features medserve does not implement are never silently ignored).
# Fields that cannot be honoured safely are refused in `from_proto` instead.
HONOURED_FIELDS: Mapping[str, frozenset[str]] = {
    "inference.ModelConfig": frozenset({
        "name", "platform", "backend", "max_batch_size", "input", "output", "version_policy",
        "instance_group", "dynamic_batching", "default_model_filename", "parameters",
    }),
    "inference.ModelInput": frozenset({"name", "data_type", "dims", "optional"}),
    "inference.ModelOutput": frozenset({"name", "data_type", "dims"}),
    "inference.ModelInstanceGroup": frozenset({"name", "kind", "count", "gpus"}),
    "inference.ModelDynamicBatching": frozenset({
        "preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering", "priority_levels",
        "default_priority_level", "default_queue_policy", "priority_queue_policy",
    }),
    "inference.ModelQueuePolicy": frozenset({
        "timeout_action", "default_timeout_microseconds", "allow_timeout_override", "max_queue_size",
    }),
    "inference.ModelVersionPolicy": frozenset({"latest", "all", "specific"}),
    "inference.ModelVersionPolicy.Latest": frozenset({"num_versions"}),
    "inference.ModelVersionPolicy.Specific": frozenset({"versions"}),
}

# medserve's own config parameters (`parameters { key: ... value: { string_value: ... } }`) and
# the values each takes; any other key is kept and reported by ModelConfig, with a warning.
MEDSERVE_PARAMETERS: Mapping[str, tuple[str, ...]] = {
    "oversized_requests": ("split", "refuse"),
    "refuse_non_finite": ("false", "true"),  # NaN/Inf in a floating-point input: INVALID_ARGUMENT
}
# medserve's parameters that take a value of their own (parsed by `_tokenizer` and `_padding`, and
# the explanation's by `explain.Explainer`, which refuses the load when one does not parse).
FREE_PARAMETERS = frozenset({"tokenizer", "tokenizer_max_length", "tokenizer_truncation", "tokenizer_inputs", "pad",
                             "pad_mask", "explain_output", "explain_max_evaluations", "explain_max_rows",
                             "explain_max_elements"})
TOKENIZER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")
TRUNCATIONS = ("longest_first", "only_first", "only_second")


def _v2_datatype(enum_value: int) -> str:
    return _V2_BY_ENUM[enum_value]


def _enum_datatype(datatype: str) -> int:
    return mc.DataType.Value(DATATYPES[datatype].config_enum)


def unhonoured_fields(message: Message, prefix: str = "") -> list[str]:
    """Paths of the set fields of a config message (recursively, through the messages listed in
    `HONOURED_FIELDS`) that medserve does not honour."""
    honoured = HONOURED_FIELDS[message.DESCRIPTOR.full_name]
    found: list[str] = []
    for descriptor, value in message.ListFields():
        path = f"{prefix}{descriptor.name}"
        if descriptor.name not in honoured:
            found.append(path)
            continue
        kind = descriptor.message_type
        if kind is not None and kind.GetOptions().map_entry:
            kind = kind.fields_by_name["value"].message_type
            items = dict(value.items()) if kind is not None else {}
        else:
            items = dict(enumerate(value)) if descriptor.is_repeated else {None: value}
        if kind is None or kind.full_name not in HONOURED_FIELDS:
            continue
        for key, item in items.items():
            found += unhonoured_fields(item, f"{path}." if key is None else f"{path}[{key}].")
    return found


def read_config_proto(path: Path, shown: Path | None = None) -> mc.ModelConfig:
    """Parse a config.pbtxt; a syntax error names the file (as `shown`), line and column."""
    shown = shown or path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{shown}: cannot read: {type(exc).__name__}") from exc
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{shown}: {exc}") from exc


def _queue_policy(path: Path, where: str, p: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=TimeoutAction.DELAY if p.timeout_action == mc.ModelQueuePolicy.DELAY else TimeoutAction.REJECT,
        default_timeout_us=int(p.default_timeout_microseconds),
        allow_timeout_override=bool(p.allow_timeout_override),
        max_queue_size=int(p.max_queue_size),
    )


def _tensors(path: Path, field: str, items: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput]) -> tuple[TensorConfig, ...]:
    out: list[TensorConfig] = []
    seen: set[str] = set()
    for i, t in enumerate(items):
        where = f"{field}[{i}]"
        if not t.name:
            raise ConfigError(f"{path}: {where}.name is empty")
        if t.name in seen:
            raise ConfigError(f"{path}: {where}.name {t.name!r} is listed twice")
        seen.add(t.name)
        if t.data_type == mc.TYPE_INVALID:
            raise ConfigError(f"{path}: {where} ({t.name!r}).data_type is missing or TYPE_INVALID")
        if t.data_type == mc.TYPE_BF16:
            raise ConfigError(f"{path}: {where} ({t.name!r}).data_type TYPE_BF16 is not supported by medserve")
        if t.HasField("reshape"):
            raise ConfigError(f"{path}: {where} ({t.name!r}).reshape is not supported by medserve")
        if any(d < -1 or d == 0 for d in t.dims):
            raise ConfigError(f"{path}: {where} ({t.name!r}).dims {list(t.dims)}: each dim must be > 0 or -1")
        optional = bool(getattr(t, "optional", False))
        out.append(TensorConfig(t.name, _v2_datatype(t.data_type), tuple(int(d) for d in t.dims), optional))
    return tuple(out)


def from_proto(path: Path, proto: mc.ModelConfig, model_name: str) -> ModelConfig:
    """Validate a parsed config (fields the graph cannot tell us about) into a ModelConfig."""
    if proto.name and proto.name != model_name:
        raise ConfigError(f"{path}: name {proto.name!r} does not match the model folder {model_name!r}")
    if proto.platform not in SUPPORTED_PLATFORMS:
        raise ConfigError(f"{path}: platform {proto.platform!r} is not served by medserve (only onnxruntime_onnx)")
    if proto.backend not in SUPPORTED_BACKENDS:
        raise ConfigError(f"{path}: backend {proto.backend!r} is not served by medserve (only onnxruntime)")
    if proto.max_batch_size < 0:
        raise ConfigError(f"{path}: max_batch_size {proto.max_batch_size} must be >= 0")
    if proto.HasField("sequence_batching") or proto.HasField("ensemble_scheduling"):
        raise ConfigError(f"{path}: sequence_batching / ensemble_scheduling are not supported by medserve")

    policy = VersionPolicy()
    which = proto.version_policy.WhichOneof("policy_choice")
    if which == "latest":
        n = proto.version_policy.latest.num_versions
        if n < 1:
            raise ConfigError(f"{path}: version_policy.latest.num_versions must be >= 1, got {n}")
        policy = VersionPolicy("latest", num_versions=int(n))
    elif which == "all":
        policy = VersionPolicy("all")
    elif which == "specific":
        versions = tuple(int(v) for v in proto.version_policy.specific.versions)
        if not versions:
            raise ConfigError(f"{path}: version_policy.specific.versions is empty")
        policy = VersionPolicy("specific", versions=versions)

    groups = _instance_groups(path, proto.instance_group)
    medserve_parameters = _medserve_parameters(path, proto)
    padding, pad_mask = _padding(path, proto)
    split_oversized = medserve_parameters["oversized_requests"] == "split"
    ignored = unhonoured_fields(proto)
    if ignored:
        log.warning(
            "%s: medserve does not implement %s; %s ignored", path, ", ".join(ignored),
            "this field is" if len(ignored) == 1 else "these fields are",
        )

    batching: BatchingConfig | None = None
    if proto.HasField("dynamic_batching"):
        db = proto.dynamic_batching
        if proto.max_batch_size == 0:
            raise ConfigError(f"{path}: dynamic_batching needs max_batch_size > 0")
        for p in db.preferred_batch_size:
            if not 0 < p <= proto.max_batch_size:
                raise ConfigError(
                    f"{path}: dynamic_batching.preferred_batch_size {p} must be in 1..max_batch_size "
                    f"({proto.max_batch_size})"
                )
        levels = int(db.priority_levels)
        default_level = int(db.default_priority_level)
        if levels and not 1 <= default_level <= levels:
            raise ConfigError(
                f"{path}: dynamic_batching.default_priority_level {default_level} must be in 1..{levels}"
            )
        per_level: dict[int, QueuePolicy] = {}
        for level, qp in db.priority_queue_policy.items():
            if not 1 <= level <= levels:
                raise ConfigError(f"{path}: dynamic_batching.priority_queue_policy key {level} must be in 1..{levels}")
            per_level[int(level)] = _queue_policy(path, f"priority_queue_policy[{level}]", qp)
        batching = BatchingConfig(
            max_batch_rows=int(proto.max_batch_size),
            preferred_batch_sizes=tuple(int(p) for p in db.preferred_batch_size),
            max_queue_delay_us=int(db.max_queue_delay_microseconds),
            preserve_ordering=bool(db.preserve_ordering),
            priority_levels=levels,
            default_priority_level=default_level,
            default_queue_policy=_queue_policy(path, "default_queue_policy", db.default_queue_policy),
            priority_queue_policies=per_level,
        )

    return ModelConfig(
        name=model_name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=int(proto.max_batch_size),
        inputs=_tensors(path, "input", proto.input),
        outputs=_tensors(path, "output", proto.output),
        version_policy=policy,
        batching=batching,
        instance_groups=groups,
        default_model_filename=proto.default_model_filename or "model.onnx",
        parameters={k: v.string_value for k, v in proto.parameters.items()},
        split_oversized=split_oversized,
        refuse_non_finite=medserve_parameters["refuse_non_finite"] == "true",
        tokenizer=_tokenizer(path, proto),
        padding=padding,
        pad_mask=pad_mask,
    )


def _instance_groups(path: Path, groups: Sequence[mc.ModelInstanceGroup]) -> tuple[InstanceGroup, ...]:
    """Triton's instance groups, honoured: KIND_CPU and KIND_GPU (with `gpus`) pin the provider."""
    out: list[InstanceGroup] = []
    for i, group in enumerate(groups):
        where = f"{path}: instance_group[{i}]"
        if group.count < 0:
            raise ConfigError(f"{where}.count {group.count} must be >= 0")
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind == "KIND_MODEL":
            raise ConfigError(f"{where}.kind KIND_MODEL is not supported by medserve (use KIND_CPU, KIND_GPU or KIND_AUTO)")
        gpus = tuple(int(g) for g in group.gpus)
        if gpus and kind != "KIND_GPU":
            raise ConfigError(f"{where}.gpus is only valid with kind KIND_GPU, got {kind}")
        if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
            raise ConfigError(f"{where}.gpus {list(gpus)}: device ids must be distinct and >= 0")
        out.append(InstanceGroup(kind, group.count or 1, gpus))  # type: ignore[arg-type]
    return tuple(out) or (InstanceGroup(),)


def _param(proto: mc.ModelConfig, key: str) -> str | None:
    return proto.parameters[key].string_value if key in proto.parameters else None


def _tokenizer(path: Path, proto: mc.ModelConfig) -> TokenizerConfig | None:
    file = _param(proto, "tokenizer")
    if file is None:
        return None
    where = f"{path}: parameters"
    if not file or "/" in file or file.startswith("."):
        raise ConfigError(f"{where}['tokenizer'] {file!r}: expected a file name in the version folder")
    try:
        max_length = int(_param(proto, "tokenizer_max_length") or "")
    except ValueError:
        raise ConfigError(f"{where}['tokenizer_max_length']: expected an integer (the truncation length)") from None
    if max_length < 1:
        raise ConfigError(f"{where}['tokenizer_max_length'] {max_length}: expected >= 1")
    truncation = _param(proto, "tokenizer_truncation") or "longest_first"
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"{where}['tokenizer_truncation'] {truncation!r}: expected one of {', '.join(TRUNCATIONS)}")
    inputs = tuple(i.strip() for i in (_param(proto, "tokenizer_inputs") or "").split(",") if i.strip())
    if not inputs or any(i not in TOKENIZER_OUTPUTS for i in inputs):
        raise ConfigError(f"{where}['tokenizer_inputs'] {inputs}: expected graph inputs among {', '.join(TOKENIZER_OUTPUTS)}")
    return TokenizerConfig(file, max_length, truncation, inputs)


def _padding(path: Path, proto: mc.ModelConfig) -> tuple[tuple[PadSpec, ...], str | None]:
    """Parameter `pad` = "input:axis:value,..." and `pad_mask` = the mask input."""
    text = _param(proto, "pad")
    if text is None:
        if _param(proto, "pad_mask") is not None:
            raise ConfigError(f"{path}: parameters['pad_mask'] needs parameters['pad']")
        return (), None
    specs = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        parts = entry.split(":")
        try:
            name, axis, value = parts[0], int(parts[1]), float(parts[2])
            if len(parts) != 3 or not name:
                raise ValueError
        except (ValueError, IndexError):
            raise ConfigError(f"{path}: parameters['pad'] entry {entry!r}: expected input:axis:value") from None
        specs.append(PadSpec(name, axis, value))
    mask = _param(proto, "pad_mask")
    if mask is None:  # the one padded input named as a mask
        masks = [p.input for p in specs if "mask" in p.input]
        mask = masks[0] if len(masks) == 1 else None
    if mask is None or mask not in {p.input for p in specs}:
        raise ConfigError(
            f"{path}: parameters['pad'] pads {[p.input for p in specs]} but names no mask input among them "
            "(parameters['pad_mask']): padding is only correct for a graph that masks it out"
        )
    if next(p for p in specs if p.input == mask).value != 0:
        raise ConfigError(f"{path}: parameters['pad']: the mask input {mask!r} must be padded with 0")
    return tuple(specs), mask


def _medserve_parameters(path: Path, proto: mc.ModelConfig) -> dict[str, str]:
    """medserve's own parameters, validated (the first allowed value is the default)."""
    values = {key: allowed[0] for key, allowed in MEDSERVE_PARAMETERS.items()}
    for key, param in proto.parameters.items():
        allowed = MEDSERVE_PARAMETERS.get(key)
        if allowed is None and key in FREE_PARAMETERS:
            continue
        if allowed is None:
            log.warning("%s: parameters[%r] is not a medserve parameter; it is ignored", path, key)
            continue
        if param.string_value not in allowed:
            raise ConfigError(
                f"{path}: parameters[{key!r}] is {param.string_value!r}; expected one of {', '.join(allowed)}"
            )
        values[key] = param.string_value
    return values


def _complete_tensors(
    path: Path,
    field: str,
    declared: tuple[TensorConfig, ...],
    graph: tuple[GraphTensor, ...],
    batching: bool,
    require_all: bool,
) -> tuple[TensorConfig, ...]:
    by_name = {g.name: g for g in graph}
    if not declared:
        return tuple(TensorConfig(g.name, g.datatype, g.shape[1:] if batching else g.shape) for g in graph)
    for i, t in enumerate(declared):
        g = by_name.get(t.name)
        if g is None:
            raise ConfigError(
                f"{path}: {field}[{i}] {t.name!r} is not a {field} of the ONNX graph (graph has {sorted(by_name)})"
            )
        if g.datatype != t.datatype:
            raise ConfigError(
                f"{path}: {field}[{i}] ({t.name!r}).data_type: config says {t.datatype}, the graph has {g.datatype}"
            )
        graph_dims = g.shape[1:] if batching else g.shape
        if len(graph_dims) != len(t.dims) or any(
            gd != -1 and td != -1 and gd != td for gd, td in zip(graph_dims, t.dims, strict=False)
        ):
            raise ConfigError(
                f"{path}: {field}[{i}] ({t.name!r}).dims: config says {list(t.dims)}, the graph has "
                f"{list(graph_dims)}{' after the batch dim' if batching else ''}"
            )
    if require_all:
        missing = [g.name for g in graph if g.name not in {t.name for t in declared}]
        if missing:
            raise ConfigError(f"{path}: {field} is missing graph {field}s {missing}")
    return declared


def complete(
    path: Path,
    config: ModelConfig,
    graph_inputs: tuple[GraphTensor, ...],
    graph_outputs: tuple[GraphTensor, ...],
) -> ModelConfig:
    """Fill what the config leaves out from the graph, and check what it states against it.

    With no inputs/outputs declared and no explicit max_batch_size, a graph whose every tensor
    has a dynamic dim 0 is served with `DEFAULT_MAX_BATCH_SIZE` and dynamic batching on."""
    max_batch = config.max_batch_size
    batching = config.batching
    tensors = graph_inputs + graph_outputs
    dim0_dynamic = all(t.shape and t.shape[0] == -1 for t in tensors)
    if max_batch == 0 and not config.inputs and dim0_dynamic:
        max_batch = DEFAULT_MAX_BATCH_SIZE
        batching = batching or BatchingConfig(max_batch_rows=max_batch)
    if max_batch > 0:
        not_batchable = [t.name for t in tensors if not t.shape or t.shape[0] != -1]
        if not_batchable:
            raise ConfigError(
                f"{path}: max_batch_size {max_batch} > 0 but dim 0 of {not_batchable} in the ONNX graph is "
                "not dynamic; set max_batch_size: 0 or export with a dynamic batch axis"
            )
    batched = max_batch > 0
    if config.tokenizer is not None:
        inputs = _text_inputs(path, config)
        graph = _complete_tensors(path, "input", (), graph_inputs, batched, require_all=True)
        if {g.name for g in graph} != set(config.tokenizer.inputs):
            raise ConfigError(f"{path}: parameters['tokenizer_inputs'] {list(config.tokenizer.inputs)} must be the "
                              f"graph's inputs {[g.name for g in graph]}")
        if any(g.datatype != "INT64" for g in graph):
            raise ConfigError(f"{path}: the tokenizer feeds INT64 token ids; the graph's inputs are "
                              f"{[(g.name, g.datatype) for g in graph]}")
    else:
        inputs = graph = _complete_tensors(path, "input", config.inputs, graph_inputs, batched, require_all=True)
    outputs = _complete_tensors(path, "output", config.outputs, graph_outputs, batched, require_all=False)
    _check_padding(path, config, graph, batched)
    return replace(config, max_batch_size=max_batch, batching=batching, inputs=inputs, outputs=outputs,
                   graph_inputs=graph)


def _text_inputs(path: Path, config: ModelConfig) -> tuple[TensorConfig, ...]:
    """A tokenizer model's client-facing input: one BYTES string per row."""
    if len(config.inputs) != 1 or config.inputs[0].datatype != "BYTES" or config.inputs[0].dims != (1,):
        raise ConfigError(f"{path}: a model with parameters['tokenizer'] takes one input of data_type TYPE_STRING "
                          "and dims [ 1 ] (the text, one string per row)")
    if config.max_batch_size <= 0:
        raise ConfigError(f"{path}: a model with parameters['tokenizer'] must batch (max_batch_size > 0)")
    return config.inputs


def _check_padding(path: Path, config: ModelConfig, graph: tuple[TensorConfig, ...], batched: bool) -> None:
    by_name = {t.name: t for t in graph}
    for spec in config.padding:
        tensor = by_name.get(spec.input)
        if tensor is None:
            raise ConfigError(f"{path}: parameters['pad'] names {spec.input!r}, not an input of the graph "
                              f"({sorted(by_name)})")
        dims = ((-1,) if batched else ()) + tensor.dims
        if not batched or not 1 <= spec.axis < len(dims) or dims[spec.axis] != -1:
            raise ConfigError(f"{path}: parameters['pad'] {spec.input}:{spec.axis}: the axis must be a variable "
                              f"dim after the batch dim (the input's dims are {list(dims)})")


def to_proto(config: ModelConfig, extra_parameters: Mapping[str, str] | None = None) -> mc.ModelConfig:
    """The ModelConfig RPC's view of a loaded model (the completed config)."""
    proto = mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        default_model_filename=config.default_model_filename,
    )
    vp = config.version_policy
    if vp.kind == "all":
        proto.version_policy.all.SetInParent()
    elif vp.kind == "specific":
        proto.version_policy.specific.versions.extend(vp.versions)
    else:
        proto.version_policy.latest.num_versions = vp.num_versions
    for t in config.inputs:
        proto.input.add(name=t.name, data_type=_enum_datatype(t.datatype), dims=t.dims, optional=t.optional)
    for t in config.outputs:
        proto.output.add(name=t.name, data_type=_enum_datatype(t.datatype), dims=t.dims)
    for i, group in enumerate(config.instance_groups):
        proto.instance_group.add(
            name=f"{config.name}_{i}", kind=mc.ModelInstanceGroup.Kind.Value(group.kind), count=group.count,
            gpus=group.gpus,
        )
    b = config.batching
    if b is not None:
        db = proto.dynamic_batching
        db.preferred_batch_size.extend(b.preferred_batch_sizes)
        db.max_queue_delay_microseconds = b.max_queue_delay_us
        db.preserve_ordering = b.preserve_ordering
        db.priority_levels = b.priority_levels
        db.default_priority_level = b.default_priority_level
        _fill_policy(db.default_queue_policy, b.default_queue_policy)
        for level, qp in b.priority_queue_policies.items():
            _fill_policy(db.priority_queue_policy[level], qp)
    for key, value in {**config.parameters, **(extra_parameters or {})}.items():
        proto.parameters[key].string_value = value
    return proto


def _fill_policy(target: mc.ModelQueuePolicy, qp: QueuePolicy) -> None:
    target.timeout_action = (
        mc.ModelQueuePolicy.DELAY if qp.timeout_action is TimeoutAction.DELAY else mc.ModelQueuePolicy.REJECT
    )
    target.default_timeout_microseconds = qp.default_timeout_us
    target.allow_timeout_override = qp.allow_timeout_override
    target.max_queue_size = qp.max_queue_size
