"""Input/output signatures read from an ONNX graph, in the Open Inference Protocol's terms.

The card, config.pbtxt and the report all describe tensors through `TensorSpec`, read from the
serialized graph itself, so what we publish cannot drift from what onnxruntime will load.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from medserve.protos.wire import datatype_of


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One graph input or output. `shape` includes the batch dim; -1 marks a variable dim."""

    name: str
    datatype: str  # V2 datatype: FP32, INT64, BYTES...
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    datatype = datatype_of(dtype)  # strings (object dtype) are BYTES
    dims = tensor_type.shape.dim if tensor_type.HasField("shape") else []
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)
    return TensorSpec(value.name, datatype, shape)


def graph_signature(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the graph, initializers excluded, in graph order."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return inputs, outputs


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ("ai.onnx") operator set the graph imports."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
