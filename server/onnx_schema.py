"""The few ONNX messages a reader of model files needs, declared by hand: the server does not
depend on the `onnx` package. A reader lists the messages and fields it reads (numbered as in
onnx.proto3) and gets a `ModelProto` class from a private descriptor pool; protobuf skips every
field not listed."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

Field = tuple[str, int, int, int, str | None]  # name, number, type, label, message type or None


def model_class(package: str, messages: Mapping[str, tuple[Field, ...]], syntax: str = "proto3") -> Any:
    """The `ModelProto` class of `messages`, in a pool of its own named `package`."""
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax=syntax)
    for name, fields in messages.items():
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            entry = message.field.add(name=field, number=number, type=kind, label=label)
            if type_name is not None:
                entry.type_name = f".{package}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelProto"))
