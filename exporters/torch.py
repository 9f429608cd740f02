"""PyTorch modules and `torch.export` programs -> ONNX with torch.onnx's dynamo exporter.

Why the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which needs onnxscript): with
torch 2.13 the legacy TorchScript tracer bakes the traced sequence length into
`nn.MultiheadAttention`'s reshapes, so a Transformer encoder exported with a "dynamic" sequence
axis fails at any other length; it also cannot take an `ExportedProgram` and is deprecated. The
dynamo exporter keeps symbolic dims through attention, GRU and LSTM, accepts `.pt2` programs as
they are, runs offline, and gives byte-identical graphs for identical weights.

Graph signature: inputs are named after the keys of the sample mapping, or after `forward`'s
parameters for a tuple sample `(vitals, labs)` (torch.onnx's convention; a single array is
`input`); dim 0 is always the dynamic batch axis, and `dynamic_axes` names the other variable
axes, e.g. {"ids": {1: "sequence"}, "mask": {1: "sequence"}}: one name = one shared length.
Outputs are `output` (or `output_0`, `output_1`... for a tuple) unless `output_names` says.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir
import torch

try:
    import onnxscript  # the dynamo exporter's translation library; torch does not require it
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        "medserve's torch exporter needs onnxscript for torch.onnx's dynamo exporter: pip install 'medserve[export]'"
    ) from exc

from . import metrics
from .conversion import Arrays, Conversion
from .errors import ExportError, UnsupportedModelError
from .parity import Tolerance
from .specs import TensorSpec, graph_signature

log = logging.getLogger(__name__)

# float32 on both sides, but different kernels and summation orders.
VALUE_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
DynamicAxes = Mapping[str, Mapping[int, str]]


def _as_mapping(data: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """User inputs (array, tensor, name -> array mapping, or a tuple of arrays in `forward`'s
    order, torch.onnx's own convention) as named numpy arrays."""
    if isinstance(data, Mapping):
        items = {str(k): v for k, v in data.items()}
    elif isinstance(data, tuple):
        if len(data) != len(names):
            raise ExportError(f"this model takes {len(names)} inputs {list(names)}, got a tuple of {len(data)}")
        items = dict(zip(names, data, strict=True))
    elif len(names) == 1:
        items = {names[0]: data}
    else:
        raise ExportError(f"this model takes {len(names)} inputs {list(names)}: pass a mapping name -> array")
    if list(items) != list(names):
        raise ExportError(f"expected inputs {list(names)} in that order, got {list(items)}")
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in items.items()}


def _flatten(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise UnsupportedModelError("the model must return a tensor or a tuple/list of tensors")


def _forward_names(module: torch.nn.Module, count: int) -> list[str]:
    """The first `count` parameters of `module.forward`, the names a tuple sample's inputs take."""
    parameters = [
        p for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(parameters) < count:
        raise ExportError(
            f"a tuple of {count} inputs, but forward() names {len(parameters)} positional parameter(s) "
            f"{[p.name for p in parameters]}; pass the sample as a mapping name -> array"
        )
    return [p.name for p in parameters[:count]]


def _input_names(model: torch.nn.Module | torch.export.ExportedProgram, sample: Any) -> list[str]:
    if isinstance(sample, Mapping):
        return [str(k) for k in sample]
    if isinstance(model, torch.export.ExportedProgram):
        names = list(model.graph_signature.user_inputs)
        if len(names) == 1 or (isinstance(sample, tuple) and len(sample) == len(names)):
            return names
        raise ExportError(f"this program takes inputs {names}: pass the sample as a mapping name -> array")
    if isinstance(sample, tuple):
        return _forward_names(model, len(sample))
    return ["input"]


def _dynamic_shapes(arrays: Mapping[str, np.ndarray], dynamic_axes: DynamicAxes) -> tuple[dict[int, Any], ...]:
    unknown = sorted(set(dynamic_axes) - set(arrays))
    if unknown:
        raise ExportError(f"dynamic_axes names inputs {unknown} the model does not have")
    dims: dict[str, Any] = {}
    shapes = []
    for name, array in arrays.items():
        axes = {0: "batch", **{int(a): str(n) for a, n in dynamic_axes.get(name, {}).items()}}
        for axis in axes:
            if not 0 <= axis < array.ndim:
                raise ExportError(f"input {name!r} has no axis {axis} (rank {array.ndim})")
            if array.shape[axis] < 2:
                # torch.export specializes sizes 0 and 1, so such an axis could not stay variable.
                raise ExportError(
                    f"input {name!r}: the sample needs a length of at least 2 along variable axis {axis}, "
                    f"got {array.shape[axis]}"
                )
        shapes.append({axis: dims.setdefault(n, torch.export.Dim(n)) for axis, n in axes.items()})
    return tuple(shapes)


def _check_variable_axes(inputs: Sequence[TensorSpec], shapes: Sequence[Mapping[int, Any]]) -> None:
    """torch.onnx relaxes the requested dims and, where an operation guards on a length,
    silently fixes it to the sample's size instead of failing; refuse such a graph."""
    for spec, axes in zip(inputs, shapes, strict=True):
        fixed = {axis: spec.shape[axis] for axis in axes if spec.shape[axis] != -1}
        for axis, size in fixed.items():
            raise ExportError(
                f"input {spec.name!r}: torch.export fixed variable axis {axis} ({axes[axis].__name__!r}) to {size}; "
                "an operation in the model does not accept another length there (MaxPool1d over time does "
                "not, in torch 2.13: use a strided convolution), or drop the axis from dynamic_axes"
            )


def name_outputs(model: onnx_ir.Model, names: Sequence[str]) -> None:
    """Name the graph's outputs `names`. torch.onnx's `output_names` only relabels the output
    values, so an output called like an operation inside (`embedding`, the token lookup of a
    Transformer) would leave two values of that name and a graph onnxruntime refuses; here an
    internal value of a wanted name is renamed first."""
    graph = model.graph
    outputs = list(graph.outputs)
    if len(outputs) != len(names):
        raise ExportError(f"the graph has {len(outputs)} output(s) for {len(names)} name(s)")
    values = [*graph.inputs, *graph.initializers.values()]
    values += [v for node in onnx_ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs]
    for node in onnx_ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            for sub in attr.value if attr.type == onnx_ir.AttributeType.GRAPHS else [attr.value]:
                if isinstance(sub, onnx_ir.Graph):
                    values += sub.inputs
    taken = {v.name for v in values if v.name}
    wanted = set(names)
    for value in values:
        if value.name in wanted and not any(value is o for o in outputs):
            if value.is_graph_input() or value.is_initializer():
                raise ExportError(f"output name {value.name!r} is already the name of a graph input or weight")
            n = 1
            while f"{value.name}_{n}" in taken or f"{value.name}_{n}" in wanted:
                n += 1
            value.name = f"{value.name}_{n}"
            taken.add(value.name)
    for value, name in zip(outputs, names, strict=True):
        value.metadata_props["pkg.torch.onnx.original_node_name"] = str(value.name)  # as torch.onnx records it
        value.name = name


def convert(
    model: torch.nn.Module | torch.export.ExportedProgram,
    sample: Any,
    *,
    dynamic_axes: DynamicAxes | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
) -> Conversion:
    """Export `model` in eval mode; `sample` (>= 2 rows) fixes input names, dtypes and ranks."""
    if isinstance(model, torch.export.ExportedProgram):
        if dynamic_axes:
            raise ExportError("an ExportedProgram carries its own dynamic shapes; do not pass dynamic_axes")
        module: torch.nn.Module = model.module()
    elif isinstance(model, torch.nn.Module):
        if any(m.training for m in model.modules()):
            raise ExportError(
                "call model.eval() first: a model in training mode (dropout, batch norm) is not what to serve"
            )
        module = model
    else:
        raise UnsupportedModelError(f"{type(model).__name__} is not a torch.nn.Module or ExportedProgram")

    names = _input_names(model, sample)
    arrays = _as_mapping(sample, names)

    def run_source(data: Any) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in _as_mapping(data, names).values()]
        with torch.no_grad():
            return [t.detach().cpu().numpy() for t in _flatten(module(*tensors))]

    n_outputs = len(run_source(arrays))
    if output_names is None:
        output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    if len(output_names) != n_outputs:
        raise ExportError(f"the model returns {n_outputs} output(s) but {len(output_names)} names were given")
    out_names = [str(n) for n in output_names]

    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays.values())
    shapes = None if isinstance(model, torch.export.ExportedProgram) else _dynamic_shapes(arrays, dynamic_axes or {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.onnx.export(
            model,
            args,
            input_names=names,
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    for w in caught:  # torch's internal deprecation notes; about code, never about data
        log.debug("torch.onnx: %s: %s", w.category.__name__, w.message)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    name_outputs(program.model, out_names)
    onx = program.model_proto
    inputs, outputs = graph_signature(onx)
    if [i.name for i in inputs] != names:
        raise ExportError(f"the graph's inputs {[i.name for i in inputs]} differ from the sample's {names}")
    if shapes is not None:
        _check_variable_axes(inputs, shapes)

    def feeds(data: Any) -> dict[str, np.ndarray]:
        return _as_mapping(data, names)

    def reference(data: Any) -> dict[str, np.ndarray]:
        return dict(zip(out_names, run_source(data), strict=True))

    first = outputs[0]
    n_classes = first.shape[1] if len(first.shape) == 2 and first.shape[1] > 1 else None

    def measure(outs: Arrays, targets: np.ndarray) -> dict[str, float | int]:
        return _metrics(outs[out_names[0]], np.asarray(targets))

    return Conversion(
        model_bytes=onx.SerializeToString(),
        framework="pytorch",
        framework_version=torch.__version__,
        converter=f"torch.onnx dynamo (torch {torch.__version__}, onnxscript {onnxscript.__version__})",
        feeds=feeds,
        reference=reference,
        tolerances={o.name: (VALUE_TOLERANCE if o.datatype.startswith(("FP", "BF")) else None) for o in outputs},
        metrics=measure,
        task=None,
        n_classes=n_classes,
    )


def _metrics(first: np.ndarray, targets: np.ndarray) -> dict[str, float | int]:
    """Integer targets: classification read from the first output, as logits over classes
    (n, k>1) or as one positive-class score (n, 1), a probability if every value lies in [0, 1]
    and a logit otherwise. Float targets: regression on the first output."""
    if targets.dtype.kind not in "iub":
        return metrics.regression_metrics(targets, first)
    y = targets.astype(np.int64).ravel()
    scores = np.asarray(first, dtype=np.float64).reshape(len(y), -1)
    if scores.shape[1] > 1:
        probabilities = metrics.softmax(scores)
        return metrics.classification_metrics(y, probabilities.argmax(axis=1), probabilities, scores.shape[1])
    positive = scores[:, 0]
    threshold = 0.5 if ((positive >= 0) & (positive <= 1)).all() else 0.0
    return metrics.classification_metrics(y, (positive > threshold).astype(np.int64), positive, 2)
