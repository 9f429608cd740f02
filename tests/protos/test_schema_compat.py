"""Our generated schema must be field-for-field compatible with tritonclient 2.41's.

tritonclient's modules and ours register the same ``inference.*`` names in protobuf's default
descriptor pool, so importing both in one process fails ("duplicate symbol"). tritonclient's side
therefore runs in a subprocess; this process must never import tritonclient.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2

from medserve.protos import grpc_service_pb2, model_config_pb2

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="tritonclient (dev extra) not installed"
)

# Our one deliberate, wire-compatible addition (and the map entry type protoc makes for it).
EXTRA_FIELDS = {".inference.ModelMetadataResponse.parameters"}
EXTRA_MESSAGES = {".inference.ModelMetadataResponse.ParametersEntry"}

_DUMP_THEIRS = """
import base64, json, sys
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
out = {}
for module in (model_config_pb2, service_pb2):
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    out[proto.name] = base64.b64encode(proto.SerializeToString()).decode()
json.dump(out, sys.stdout)
"""

_PARSE_IN_THEIRS = """
import sys
from tritonclient.grpc import service_pb2
response = service_pb2.ModelMetadataResponse.FromString(sys.stdin.buffer.read())
print(response.name, list(response.versions), response.inputs[0].name, list(response.inputs[0].shape))
"""


def _run_with_tritonclient(code: str, stdin: bytes = b"") -> bytes:
    done = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@pytest.fixture(scope="module")
def theirs() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    dumped = json.loads(_run_with_tritonclient(_DUMP_THEIRS))
    return {
        name: descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(data))
        for name, data in dumped.items()
    }


def _ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = {}
    for module in (model_config_pb2, grpc_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files[proto.name] = proto
    return files


def _messages(
    scope: str, messages: Iterator[descriptor_pb2.DescriptorProto] | list[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        name = f"{scope}.{message.name}"
        yield name, message
        yield from _messages(name, list(message.nested_type))


def _flatten(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> dict[str, tuple[object, ...]]:
    """Every schema element under its full name, with the attributes that decide wire compatibility."""
    flat: dict[str, tuple[object, ...]] = {}
    for file in files.values():
        scope = f".{file.package}"
        enums = [(f"{scope}.{e.name}", e) for e in file.enum_type]
        for name, message in _messages(scope, list(file.message_type)):
            flat[name] = ("message", message.options.map_entry)
            enums += [(f"{name}.{e.name}", e) for e in message.enum_type]
            oneofs = [o.name for o in message.oneof_decl]
            for field in message.field:
                flat[f"{name}.{field.name}"] = (
                    "field",
                    field.number,
                    field.type,
                    field.label,
                    field.type_name,
                    oneofs[field.oneof_index] if field.HasField("oneof_index") else None,
                    field.proto3_optional,
                    field.default_value,
                    field.options.SerializeToString(),
                )
        for name, enum in enums:
            flat[name] = ("enum", tuple((v.name, v.number) for v in enum.value))
        for service in file.service:
            for method in service.method:
                flat[f"{scope}.{service.name}/{method.name}"] = (
                    "rpc",
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                )
    return flat


def test_files_match(theirs: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    ours = _ours()
    assert set(ours) == set(theirs) == {"model_config.proto", "grpc_service.proto"}
    for name, their_file in theirs.items():
        assert (ours[name].package, ours[name].syntax) == (their_file.package, their_file.syntax)
        assert list(ours[name].dependency) == list(their_file.dependency)


def test_every_tritonclient_element_is_identical_in_ours(
    theirs: dict[str, descriptor_pb2.FileDescriptorProto],
) -> None:
    ours, expected = _flatten(_ours()), _flatten(theirs)
    missing = sorted(set(expected) - set(ours))
    differing = sorted(name for name in set(expected) & set(ours) if expected[name] != ours[name])
    assert not missing, f"missing in ours: {missing}"
    assert not differing, "differ: " + "; ".join(
        f"{n}: theirs {expected[n]} ours {ours[n]}" for n in differing
    )


def test_only_extra_is_model_metadata_parameters(
    theirs: dict[str, descriptor_pb2.FileDescriptorProto],
) -> None:
    ours, expected = _flatten(_ours()), _flatten(theirs)
    extra = {
        name
        for name in set(ours) - set(expected)
        if not any(name.startswith(f"{message}.") for message in EXTRA_MESSAGES)  # key, value
    }
    assert extra == EXTRA_FIELDS | EXTRA_MESSAGES
    # Same shape as the other parameter maps: map<string, InferParameter> parameters = 6.
    field = grpc_service_pb2.ModelMetadataResponse.DESCRIPTOR.fields_by_name["parameters"]
    assert field.number == 6 and field.message_type.GetOptions().map_entry
    entry = field.message_type.fields_by_name
    assert entry["key"].type == entry["key"].TYPE_STRING
    assert entry["value"].message_type.full_name == "inference.InferParameter"


def test_all_twenty_rpcs() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(service.methods) == 20
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming


def test_tritonclient_parses_metadata_with_our_extra_parameters() -> None:
    response = grpc_service_pb2.ModelMetadataResponse(
        name="sepsis", versions=["3"], platform="onnxruntime_onnx"
    )
    response.inputs.add(name="vitals", datatype="FP32", shape=[-1, 12])
    response.parameters["class_labels"].string_param = '["no", "yes"]'
    printed = _run_with_tritonclient(_PARSE_IN_THEIRS, response.SerializeToString())
    assert printed.decode().split() == ["sepsis", "['3']", "vitals", "[-1,", "12]"]
