"""Two-class models with a known disagreement, for the label, canary and silent-trial tests.

`threshold(path, t)`: FP32 x [N, 1] -> probabilities [N, 2] = softmax((-z, z)) with z = 8 (x - t),
label INT64 [N] = the top class. Two versions with thresholds 0.5 and 0.6 disagree on exactly
the rows with 0.5 < x < 0.6: on `grid(n)` (x = (i + 0.5) / n), a tenth of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_models

CONFIG = "max_batch_size: 256\ndynamic_batching { }\nversion_policy { all { } }\n"


def threshold(path: Path, t: float) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    nodes = [
        helper.make_node("Sub", ["x", "t"], ["d"]),
        helper.make_node("Mul", ["d", "gain"], ["z"]),
        helper.make_node("Neg", ["z"], ["nz"]),
        helper.make_node("Concat", ["nz", "z"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    init = [numpy_helper.from_array(np.array(t, np.float32), "t"),
            numpy_helper.from_array(np.array(8.0, np.float32), "gain")]
    return onnx_models._save(helper.make_graph(nodes, "threshold", [x], [probabilities, label], init), path)


def grid(n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.float32) + 0.5) / n).reshape(n, 1)


def repo_with_versions(root: Path, name: str = "m", thresholds: tuple[float, ...] = (0.5, 0.6),
                       labels: str | None = None) -> Path:
    """A repository with model `name`, one version per threshold (1, 2, ...), all served."""
    for i, t in enumerate(thresholds, start=1):
        threshold(root / name / str(i) / "model.onnx", t)
    onnx_models.write_config(root, name, CONFIG)
    if labels is not None:
        (root / name / "labels.json").write_text(labels)
    return root


def slow_threshold(path: Path, t: float, width: int = 512, layers: int = 40) -> Path:
    """`threshold` with deliberately slow work added (it contributes 0): a shadow that cannot keep up."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    nodes = [helper.make_node("MatMul", ["x", "spread"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"h{layers}", "axes"], ["r"], keepdims=1),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Add", ["x", "r0"], ["x2"]),
        helper.make_node("Sub", ["x2", "t"], ["d"]),
        helper.make_node("Mul", ["d", "gain"], ["z"]),
        helper.make_node("Neg", ["z"], ["nz"]),
        helper.make_node("Concat", ["nz", "z"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    init = [numpy_helper.from_array(np.array(t, np.float32), "t"),
            numpy_helper.from_array(np.array(8.0, np.float32), "gain"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.ones((1, width), np.float32), "spread"),
            numpy_helper.from_array(np.full((width, width), 1.0 / width, np.float32), "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axes")]
    return onnx_models._save(helper.make_graph(nodes, "slow_threshold", [x], [probabilities, label], init), path)


def write_config_and_labels(root: Path, name: str, labels: str) -> None:
    onnx_models.write_config(root, name, CONFIG)
    (root / name / "labels.json").write_text(labels)


def request(version: str = "", x: np.ndarray | None = None, request_id: str = "",
            routing_key: str | None = None, model: str = "m") -> Any:
    """A ModelInferRequest (medserve's protos are imported here, not at the top: the tritonclient
    compatibility suite imports this module and must not load them)."""
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import to_raw

    x = grid(4) if x is None else x
    req = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    if routing_key is not None:
        req.parameters["routing_key"].string_param = routing_key
    return req


def label_of(response: Any) -> str:
    params = response.parameters
    return params["version_label"].string_param if "version_label" in params else ""
