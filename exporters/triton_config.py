"""config.pbtxt for a published model: Triton's `inference.ModelConfig` in protobuf text format.

Dims leave out the batch dim when max_batch_size > 0 (Triton's convention) and use -1 for
variable dims. Dynamic batching is on with max_queue_delay_microseconds 0 on purpose: the
server does not hold a lone request back; requests that arrive while an execution is in flight
queue up and run together next, so batches form exactly when there is load. version_policy is
left unset: the server's default (latest 1) applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import text_format

from medserve.protos import model_config_pb2 as mc
from medserve.protos.wire import DATATYPES

from .errors import SignatureMismatchError
from .specs import TensorSpec

MAX_QUEUE_SIZE = 1024

Signature = tuple[tuple[tuple[str, int, tuple[int, ...]], ...], tuple[tuple[str, int, tuple[int, ...]], ...]]


def _data_type(datatype: str) -> int:
    return mc.DataType.Value(DATATYPES[datatype].config_enum)


def build_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """The config for a model whose graph has these inputs/outputs (shapes with the batch dim).

    For a text model `inputs` is what clients send (`text`, BYTES [-1, 1]) rather than the
    graph's token tensors, and `parameters` tell the server how to tokenize (string values)."""
    batched = max_batch_size > 0
    config = mc.ModelConfig(
        name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=max_batch_size
    )
    for spec in inputs:
        config.input.add(
            name=spec.name,
            data_type=_data_type(spec.datatype),
            dims=spec.shape[1:] if batched else spec.shape,
        )
    for spec in outputs:
        config.output.add(
            name=spec.name,
            data_type=_data_type(spec.datatype),
            dims=spec.shape[1:] if batched else spec.shape,
        )
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = 0
        config.dynamic_batching.default_queue_policy.max_queue_size = MAX_QUEUE_SIZE
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


_HEADER = "# Written by medserve.exporters. Inputs and outputs must match every version's model.onnx.\n"
_TEXT_HEADER = (
    "# A text model: clients send `text`; the server tokenizes it with the version's tokenizer file into the\n"
    "# graph inputs named by `tokenizer_inputs` and pads a batch as `pad` says (input:axis:value).\n"
)


def render(config: mc.ModelConfig) -> str:
    """Text format, with the deliberate zero queue delay spelled out (proto3 omits zeros)."""
    text = text_format.MessageToString(config)
    if config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 0:
        text = text.replace("dynamic_batching {\n", "dynamic_batching {\n  max_queue_delay_microseconds: 0\n", 1)
    if "tokenizer" in config.parameters:
        return _HEADER + _TEXT_HEADER + text
    return _HEADER + text


def read(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())


def signature(config: mc.ModelConfig) -> Signature:
    """What clients depend on: each tensor's name, type and dims, plus the batching convention."""

    def tensors(
        items: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput],
    ) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
        return tuple(sorted((t.name, int(t.data_type), tuple(t.dims)) for t in items))

    batch = (("<batch>", int(config.max_batch_size > 0), ()),)
    return tensors(config.input) + batch, tensors(config.output)


def _describe(tensors: tuple[tuple[str, int, tuple[int, ...]], ...]) -> str:
    return ", ".join(
        f"{n} {mc.DataType.Name(t)} {list(d)}" if n != "<batch>" else f"batched={bool(t)}" for n, t, d in tensors
    )


# The parameters that describe how every version is fed (a text model's tokenizer and padding).
VERSION_PARAMETERS = ("tokenizer", "tokenizer_max_length", "tokenizer_truncation", "tokenizer_inputs", "pad", "pad_mask")


def text_parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: config.parameters[key].string_value for key in VERSION_PARAMETERS if key in config.parameters}


def check_signature(path: Path, existing: mc.ModelConfig, new: mc.ModelConfig) -> None:
    """Refuse to publish a version whose inputs/outputs differ from the model's config, or whose
    tokenizer parameters do (they hold for every version the config serves)."""
    old_sig, new_sig = signature(existing), signature(new)
    old_params, new_params = text_parameters(existing), text_parameters(new)
    if old_sig == new_sig and old_params != new_params:
        changed = sorted(k for k in {*old_params, *new_params} if old_params.get(k) != new_params.get(k))
        raise SignatureMismatchError(
            f"{path} has other tokenizer parameters than the new version of model {new.name!r} ({', '.join(changed)}):\n"
            f"  config: {old_params}\n  new:    {new_params}\n"
            "every version of a model is served with its config's parameters: publish under a new model name"
        )
    if old_sig != new_sig:
        raise SignatureMismatchError(
            f"{path} describes a different signature than the new version of model {new.name!r}:\n"
            f"  config inputs:  {_describe(old_sig[0])}\n  new inputs:     {_describe(new_sig[0])}\n"
            f"  config outputs: {_describe(old_sig[1])}\n  new outputs:    {_describe(new_sig[1])}\n"
            "publish it under a new model name, or remove the old model deliberately"
        )
