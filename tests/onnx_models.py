"""Small hand-built ONNX graphs for server tests, each with a known answer, and a writer for
Triton-layout repositories. Real ONNX files run by real onnxruntime sessions — only tiny."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def affine(path: Path, features: int = 4, batch: int | str = "N") -> Path:
    """y = 2 x + 1 and s = row sums: FP32 [batch, features] -> y [batch, features], s [batch, 1]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, features])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch, 1])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "one"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
    ]
    init = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    return _save(helper.make_graph(nodes, "affine", [x], [y, s], init), path)


def affine_answer(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": 2 * x + 1, "s": x.sum(axis=1, keepdims=True)}


def variable_length(path: Path) -> Path:
    """Mean over a variable-length axis: FP32 [N, T, 3] -> m [N, 3] (shape groups in batching)."""
    x = helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["N", "T", 3])
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("ReduceMean", ["seq"], ["m"], axes=[1], keepdims=0)]  # opset 17: attribute
    return _save(helper.make_graph(nodes, "varlen", [x], [m]), path)


def masked_mean(path: Path) -> Path:
    """A masked sequence model: seq FP32 [N, T, 3] and mask INT64 [N, T] -> m [N, 3] (the mean
    over the unmasked steps) and h [N, T, 3] (2 x seq: an output that carries the time axis).
    Padding with mask 0 changes neither answer for the real steps."""
    seq = helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["N", "T", 3])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "T"])
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 3])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", "T", 3])
    nodes = [
        helper.make_node("Cast", ["mask"], ["fm"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["fm", "last"], ["fm3"]),
        helper.make_node("Mul", ["seq", "fm3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "time"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["fm3", "time"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["m"]),
        helper.make_node("Mul", ["seq", "two"], ["h"]),
    ]
    init = [
        numpy_helper.from_array(np.array([2], np.int64), "last"),
        numpy_helper.from_array(np.array([1], np.int64), "time"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    return _save(helper.make_graph(nodes, "masked_mean", [seq, mask], [m, h], init), path)


def gather(path: Path, table_size: int = 8, slow_layers: int = 0) -> Path:
    """Looks up rows of a fixed table: INT64 idx [N, 1] -> v [N, 1, 2]. An index outside the table
    makes onnxruntime fail at run time: the poisoned request of failure-isolation tests. With
    `slow_layers`, each execution also costs that many 512-wide matmuls (so batches form)."""
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 1, 2])
    table = np.arange(table_size * 2, dtype=np.float32).reshape(table_size, 2)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["g"], axis=0)]
    init = [numpy_helper.from_array(table, "table")]
    if slow_layers:
        # h0 = float(idx) broadcast to [N, 512]; h_{i+1} = h_i @ 0; v = g + rowsum(h_last) (= g).
        # The chain depends on the input, so onnxruntime cannot fold it away at load.
        nodes += [
            helper.make_node("Cast", ["idx"], ["fidx"], to=TensorProto.FLOAT),
            helper.make_node("Expand", ["fidx", "hshape"], ["h0"]),
            helper.make_node(
                "ConstantOfShape", ["wshape"], ["w"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
            ),
        ]
        init += [
            numpy_helper.from_array(np.array([512, 512], np.int64), "wshape"),
            numpy_helper.from_array(np.array([1, 512], np.int64), "hshape"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "rshape"),
        ]
        for i in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"h{slow_layers}", "axes"], ["rowsum"], keepdims=1),
            helper.make_node("Reshape", ["rowsum", "rshape"], ["r3"]),
            helper.make_node("Add", ["g", "r3"], ["v"]),
        ]
    else:
        nodes[0].output[0] = "v"
    return _save(helper.make_graph(nodes, "gather", [idx], [v], init), path)


def gather_answer(idx: np.ndarray, table_size: int = 8) -> np.ndarray:
    table = np.arange(table_size * 2, dtype=np.float32).reshape(table_size, 2)
    return table[idx]


def slow(path: Path, width: int = 1024, layers: int = 200) -> Path:
    """A deliberately slow model (tens of ms per row on 2 cores): `layers` matmuls with a
    `width`-square weight built at load time, so the file stays tiny. FP32 [N, width] -> z."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", width])
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["wshape"], ["w"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1e-3])
        )
    ]
    prev = "x"
    for i in range(layers):
        out = "z" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    init = [numpy_helper.from_array(np.array([width, width], np.int64), "wshape")]
    return _save(helper.make_graph(nodes, "slow", [x], [z], init), path)


def cubic(path: Path) -> Path:
    """Work that grows with the cube of a variable dim, no batch dim: FP32 [1, T] -> FP32 [1, 1]
    = sum((x^T x) @ (x^T x)). Microseconds at T = 16, about a second at T = 1200 on one thread:
    a normally cheap model sent one long input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"]),
        helper.make_node("MatMul", ["xt", "x"], ["a"]),
        helper.make_node("MatMul", ["a", "a"], ["b"]),
        helper.make_node("ReduceSum", ["b"], ["s"], keepdims=0),
        helper.make_node("Reshape", ["s", "shape"], ["y"]),
    ]
    init = [numpy_helper.from_array(np.array([1, 1], np.int64), "shape")]
    return _save(helper.make_graph(nodes, "cubic", [x], [y], init), path)


def strings(path: Path) -> Path:
    """BYTES in, BYTES and INT64 out: upper-cased text? ONNX has StringNormalizer: t [N, 1] -> u."""
    t = helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1])
    u = helper.make_tensor_value_info("upper", TensorProto.STRING, ["N", 1])
    nodes = [
        helper.make_node("Reshape", ["text", "flat"], ["t1"]),
        helper.make_node("StringNormalizer", ["t1"], ["n1"], case_change_action="UPPER", locale="C"),
        helper.make_node("Reshape", ["n1", "back"], ["upper"]),
    ]
    init = [
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "back"),
    ]
    return _save(helper.make_graph(nodes, "strings", [t], [u], init), path)


def identity_types(path: Path, onnx_types: Sequence[int]) -> Path:
    """One Identity per datatype: in_<i> [N, 2] -> out_<i> [N, 2] (datatype round trips)."""
    inputs, outputs, nodes = [], [], []
    for i, elem in enumerate(onnx_types):
        inputs.append(helper.make_tensor_value_info(f"in_{i}", elem, ["N", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{i}", elem, ["N", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{i}"], [f"out_{i}"]))
    return _save(helper.make_graph(nodes, "identity", inputs, outputs), path)


def not_batching(path: Path) -> Path:
    """Fixed shape, no batch dim: FP32 [3] -> FP32 [3] (max_batch_size 0)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    nodes = [helper.make_node("Neg", ["x"], ["y"])]
    return _save(helper.make_graph(nodes, "neg", [x], [y]), path)


def write_config(repo: Path, name: str, text: str) -> Path:
    path = repo / name / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def keyword(path: Path, token: int = 7) -> Path:
    """A keyword detector over token ids: input_ids, attention_mask INT64 [N, L] ->
    probabilities [N, 2], the second sigmoid(6 * (token attended anywhere) - 3)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"])
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    nodes = [
        helper.make_node("Equal", ["input_ids", "token"], ["is_token"]),
        helper.make_node("Cast", ["is_token"], ["is_token_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["is_token_f", "mask_f"], ["hit"]),
        helper.make_node("ReduceMax", ["hit"], ["seen"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["seen", "six"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "three"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["p0"]),
        helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1),
    ]
    init = [
        numpy_helper.from_array(np.array(token, np.int64), "token"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    return _save(helper.make_graph(nodes, "keyword", [ids, mask], [out], init), path)
