"""The files an ONNX model reads besides itself: the `location` of every tensor stored as
external data, in the main graph, in subgraphs (If/Loop/Scan bodies) and in functions.

The server does not depend on the `onnx` package, so this declares the few ONNX messages and
fields it needs (numbered as in onnx.proto3) in a private descriptor pool and lets protobuf
skip the rest of the file. Used at load, before onnxruntime sees the model, so that a model can
only read files that are inside its version folder and listed, with their SHA-256, in its card.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import descriptor_pb2

from .onnx_schema import Field, model_class

_T = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "medserve_onnx_refs"
# message -> (field name, number, type, label, message type or None)
_MESSAGES: dict[str, tuple[Field, ...]] = {
    "ModelProto": (("graph", 7, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL, "GraphProto"),
                   ("functions", 25, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "FunctionProto")),
    "GraphProto": (("node", 1, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "NodeProto"),
                   ("initializer", 5, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "TensorProto"),
                   ("sparse_initializer", 15, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "SparseTensorProto")),
    "FunctionProto": (("node", 7, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "NodeProto"),),
    "NodeProto": (("attribute", 5, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "AttributeProto"),),
    "AttributeProto": (("t", 5, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL, "TensorProto"),
                       ("g", 6, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL, "GraphProto"),
                       ("tensors", 10, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "TensorProto"),
                       ("graphs", 11, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "GraphProto"),
                       ("sparse_tensor", 22, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL, "SparseTensorProto"),
                       ("sparse_tensors", 23, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "SparseTensorProto")),
    "TensorProto": (("name", 8, _T.TYPE_STRING, _T.LABEL_OPTIONAL, None),
                    ("external_data", 13, _T.TYPE_MESSAGE, _T.LABEL_REPEATED, "StringStringEntryProto"),
                    ("data_location", 14, _T.TYPE_INT32, _T.LABEL_OPTIONAL, None)),
    "SparseTensorProto": (("values", 1, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL, "TensorProto"),
                          ("indices", 2, _T.TYPE_MESSAGE, _T.LABEL_OPTIONAL, "TensorProto")),
    "StringStringEntryProto": (("key", 1, _T.TYPE_STRING, _T.LABEL_OPTIONAL, None),
                               ("value", 2, _T.TYPE_STRING, _T.LABEL_OPTIONAL, None)),
}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


_MODEL = model_class(_PACKAGE, _MESSAGES)


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        yield attr.t
        yield from attr.tensors
        for sparse in (attr.sparse_tensor, *attr.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        for graph in (attr.g, *attr.graphs):
            yield from _tensors(graph)


def external_files(model_bytes: bytes) -> set[str]:
    """The `location` of every externally stored tensor of the model (as written in the file)."""
    model = _MODEL.FromString(model_bytes)
    tensors = list(_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors += list(_node_tensors(node))
    found: set[str] = set()
    for tensor in tensors:
        if tensor.data_location == EXTERNAL:
            found |= {e.value for e in tensor.external_data if e.key == "location"}
    return found
