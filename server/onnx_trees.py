"""Tree ensembles read out of an ONNX graph (`ai.onnx.ml` TreeEnsembleClassifier /
TreeEnsembleRegressor), as flat numpy arrays for exact Shapley values (`treeshap.py`).

A graph qualifies when its one 2-D input reaches the ensemble through per-feature elementwise
nodes only (Identity, Cast, Scaler, Imputer, and Sub / Add / Mul / Div by a constant of one value
per feature or one for all, as the exporters' float64 scalers write them: input column j is
ensemble feature j, so attributions carry over) and the explained output is the ensemble's
score output (through Identity nodes at most). Anything else (one-hot, concatenation across inputs, the opset-5
`TreeEnsemble`, MIN/MAX aggregation) is not read: those models keep KernelSHAP.

The server does not depend on the `onnx` package: as in `onnx_refs.py`, the few ONNX messages and
fields needed (numbered as in onnx.proto3) are declared in a private descriptor pool.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2

from .onnx_schema import Field, model_class

_T = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "medserve_onnx_trees"
_MSG, _STR, _I64, _F32, _F64, _BYTES, _I32 = (_T.TYPE_MESSAGE, _T.TYPE_STRING, _T.TYPE_INT64, _T.TYPE_FLOAT,
                                              _T.TYPE_DOUBLE, _T.TYPE_BYTES, _T.TYPE_INT32)
_ONE, _MANY = _T.LABEL_OPTIONAL, _T.LABEL_REPEATED
_MESSAGES: dict[str, tuple[Field, ...]] = {
    "ModelProto": (("graph", 7, _MSG, _ONE, "GraphProto"),),
    "GraphProto": (("node", 1, _MSG, _MANY, "NodeProto"), ("initializer", 5, _MSG, _MANY, "TensorProto"),
                   ("input", 11, _MSG, _MANY, "ValueInfoProto"), ("output", 12, _MSG, _MANY, "ValueInfoProto")),
    "ValueInfoProto": (("name", 1, _STR, _ONE, None), ("type", 2, _MSG, _ONE, "TypeProto")),
    "TypeProto": (("tensor_type", 1, _MSG, _ONE, "TensorTypeProto"),),
    "TensorTypeProto": (("shape", 2, _MSG, _ONE, "TensorShapeProto"),),
    "TensorShapeProto": (("dim", 1, _MSG, _MANY, "DimensionProto"),),
    "DimensionProto": (("dim_value", 1, _I64, _ONE, None), ("dim_param", 2, _STR, _ONE, None)),
    "NodeProto": (("input", 1, _STR, _MANY, None), ("output", 2, _STR, _MANY, None),
                  ("op_type", 4, _STR, _ONE, None), ("attribute", 5, _MSG, _MANY, "AttributeProto"),
                  ("domain", 7, _STR, _ONE, None)),
    "AttributeProto": (("name", 1, _STR, _ONE, None), ("f", 2, _F32, _ONE, None), ("i", 3, _I64, _ONE, None),
                       ("s", 4, _BYTES, _ONE, None), ("t", 5, _MSG, _ONE, "TensorProto"),
                       ("floats", 7, _F32, _MANY, None), ("ints", 8, _I64, _MANY, None),
                       ("strings", 9, _BYTES, _MANY, None)),
    "TensorProto": (("dims", 1, _I64, _MANY, None), ("data_type", 2, _I32, _ONE, None), ("name", 8, _STR, _ONE, None),
                    ("float_data", 4, _F32, _MANY, None), ("int64_data", 7, _I64, _MANY, None),
                    ("raw_data", 9, _BYTES, _ONE, None), ("double_data", 10, _F64, _MANY, None),
                    ("data_location", 14, _I32, _ONE, None)),
}
_FLOAT, _DOUBLE = 1, 11  # TensorProto.DataType
_EXTERNAL = 1  # TensorProto.DataLocation
_AFFINE = {"Sub": np.subtract, "Add": np.add, "Mul": np.multiply, "Div": np.divide}  # by a per-feature constant
MODES = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ")
LINEAR = "NONE"  # the post_transform under which the served output is affine in the trees' sums
MAX_PATH_FEATURES = 64  # distinct features on one root-to-leaf path: one bit each in a uint64


_MODEL = model_class(_PACKAGE, _MESSAGES, syntax="proto2")


@dataclass(frozen=True, slots=True)
class Trees:
    """One ensemble, flattened. Internal nodes [N]; leaves [L] with their root-to-leaf paths
    padded to the deepest [L, D] (padding: bit 0) and their distinct path features [L, U]
    (padding: 0, with no bit); the served output is `offset + scale * (raw sums) @ matrix.T` per target."""

    feature: np.ndarray  # [N] int64
    threshold: np.ndarray  # [N] float32 or float64 (compared in the input's type, as onnxruntime does)
    mode: np.ndarray  # [N] int8, index into MODES
    missing_true: np.ndarray  # [N] bool: NaN goes to the true child
    leaf_values: np.ndarray  # [L, C] float64: the leaf's weight per raw channel (class or target id)
    path_node: np.ndarray  # [L, D] int64
    path_true: np.ndarray  # [L, D] bool: the path takes the true child there
    path_bit: np.ndarray  # [L, D] uint64: 1 << the node's feature's slot among the leaf's distinct features
    leaf_features: np.ndarray  # [L, U] int64 (0 past the path's own: no bit of `full` there)
    full: np.ndarray  # [L] uint64: every slot's bit
    trees: int
    features: int
    post_transform: str
    offset: np.ndarray  # [T]
    matrix: np.ndarray  # [T, C]
    scale: float  # 1 / trees for AVERAGE, else 1
    preprocess: tuple[Callable[[np.ndarray], np.ndarray], ...]  # per-feature steps before the ensemble
    input: str
    output: str

    def features_of(self, x: np.ndarray) -> np.ndarray:
        """The ensemble's features for the graph input `x` [rows, F]."""
        for step in self.preprocess:
            x = step(x)
        return x


class NotTrees(ValueError):
    """The graph is not one this module reads (said why, for a debug log; never a value)."""


def read_trees(model_bytes: bytes, input_name: str, output_name: str) -> Trees:
    """The ensemble behind `output_name` of the model, fed by `input_name`; NotTrees if the
    graph is not a tree ensemble over per-feature preprocessing of that one input."""
    graph = _MODEL.FromString(model_bytes).graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if [i.name for i in inputs] != [input_name]:
        raise NotTrees("not one graph input")
    producer = {out: node for node in graph.node for out in node.output}
    constants = _Constants(initializers, producer, _width(inputs[0]))
    # Walk back from the explained output through Identity nodes to the ensemble.
    name = output_name
    node = producer.get(name)
    while node is not None and node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
        name = node.input[0]
        node = producer.get(name)
    if node is None or node.domain != "ai.onnx.ml" or node.op_type not in ("TreeEnsembleClassifier",
                                                                            "TreeEnsembleRegressor"):
        raise NotTrees("the explained output does not come from a TreeEnsembleClassifier/Regressor")
    classifier = node.op_type == "TreeEnsembleClassifier"
    if classifier and list(node.output).index(name) != 1:
        raise NotTrees("the explained output is the label, not the scores")
    ensemble = node
    # Walk back from the ensemble's input through per-feature elementwise nodes to the graph input.
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    name = ensemble.input[0]
    while name != input_name:
        node = producer.get(name)
        if node is None:
            raise NotTrees("the ensemble's input is not the graph input")
        if len(steps) > len(graph.node):
            raise NotTrees("a cycle between the input and the ensemble")
        if node.op_type in _AFFINE and node.domain in ("", "ai.onnx"):
            step, name = _affine(node, constants)
            steps.append(step)
            continue
        steps.append(_elementwise(node))
        name = node.input[0]
    return _flatten(_attributes(ensemble), classifier, tuple(reversed(steps)), input_name, output_name)


def _attributes(node: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for a in node.attribute:
        if a.HasField("t"):
            found[a.name] = _tensor(a.t)
        elif len(a.floats):
            found[a.name] = np.asarray(a.floats, np.float32)
        elif len(a.ints):
            found[a.name] = np.asarray(a.ints, np.int64)
        elif len(a.strings):
            found[a.name] = [s.decode() for s in a.strings]
        elif a.HasField("s"):
            found[a.name] = a.s.decode()
        elif a.HasField("i"):
            found[a.name] = int(a.i)
        elif a.HasField("f"):
            found[a.name] = float(a.f)
    return found


def _tensor(t: Any) -> np.ndarray:
    if t.data_location == _EXTERNAL:
        raise NotTrees("a tensor attribute stored as external data")
    if t.data_type == _FLOAT:
        return np.frombuffer(t.raw_data, "<f4").copy() if t.raw_data else np.asarray(t.float_data, np.float32)
    if t.data_type == _DOUBLE:
        return np.frombuffer(t.raw_data, "<f8").copy() if t.raw_data else np.asarray(t.double_data, np.float64)
    raise NotTrees("a tensor attribute of an unexpected type")


def _width(value: Any) -> int | None:
    """The declared last dimension of a graph input (None: not a fixed number)."""
    dims = value.type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if len(dims) == 2 and dims[-1].HasField("dim_value") else None


@dataclass(frozen=True, slots=True)
class _Constants:
    """Where a binary node's other operand may come from: an initializer or a Constant node."""

    initializers: Mapping[str, Any]
    producer: Mapping[str, Any]
    width: int | None  # the graph input's features, when declared

    def get(self, name: str) -> np.ndarray | None:
        """The constant named `name` with its shape (None: computed from the input)."""
        if name in self.initializers:
            t = self.initializers[name]
            return _tensor(t).reshape(tuple(t.dims))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is None:
                raise NotTrees("a Constant node of no tensor value")
            return _tensor(value).reshape(tuple(value.dims))
        return None

    def per_feature(self, c: np.ndarray) -> np.ndarray:
        """`c` as a row broadcast over the features: [features], [1, features] or one value."""
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise NotTrees("an elementwise constant that is not one value per feature")
        if c.size != 1 and c.size != self.width:
            raise NotTrees("an elementwise constant of another width than the input's declared features")
        return c.reshape(-1) if c.size != 1 else c.reshape(())


def _affine(node: Any, constants: _Constants) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(step, the data operand's name) of Sub / Add / Mul / Div with a per-feature constant on
    either side, computed in the constant's type (ONNX's operands share one) as onnxruntime
    does: one IEEE operation per element."""
    if len(node.input) != 2:
        raise NotTrees(f"a {node.op_type} node of {len(node.input)} inputs")
    left, right = (constants.get(n) for n in node.input)
    if (left is None) == (right is None):
        raise NotTrees(f"a {node.op_type} node whose operands are not one computed and one constant")
    op = _AFFINE[node.op_type]
    flipped = right is None
    constant = left if right is None else right
    assert constant is not None
    c = constants.per_feature(constant)

    def step(x: np.ndarray) -> np.ndarray:
        x = x.astype(c.dtype, copy=False)
        with np.errstate(all="ignore"):  # x / 0 is inf (0 / 0 NaN) there too, without a warning
            return op(c, x) if flipped else op(x, c)

    return step, node.input[1 if flipped else 0]


def _elementwise(node: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A per-feature elementwise node as a numpy function, as onnxruntime computes it."""
    attrs = _attributes(node)
    if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
        return lambda x: x
    if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and attrs.get("to") in (_FLOAT, _DOUBLE):
        dtype = np.float32 if attrs["to"] == _FLOAT else np.float64
        return lambda x: x.astype(dtype)
    if node.op_type == "Scaler" and node.domain == "ai.onnx.ml":
        offset = np.asarray(attrs.get("offset", [0.0]), np.float32)
        scale = np.asarray(attrs.get("scale", [1.0]), np.float32)
        return lambda x: ((x.astype(np.float32) - offset) * scale).astype(np.float32)
    if node.op_type == "Imputer" and node.domain == "ai.onnx.ml" and "imputed_value_floats" in attrs:
        values = np.asarray(attrs["imputed_value_floats"], np.float32)
        replaced = float(attrs.get("replaced_value_float", np.nan))

        def impute(x: np.ndarray) -> np.ndarray:
            x = x.astype(np.float32)
            hit = np.isnan(x) if np.isnan(replaced) else x == np.float32(replaced)
            return np.where(hit, np.broadcast_to(values, x.shape), x)

        return impute
    raise NotTrees(f"a {node.op_type} node between the input and the ensemble")


def _flatten(a: dict[str, Any], classifier: bool, steps: tuple[Callable[[np.ndarray], np.ndarray], ...],
             input_name: str, output_name: str) -> Trees:
    tree_ids, node_ids = a["nodes_treeids"], a["nodes_nodeids"]
    modes = a["nodes_modes"]
    values = a.get("nodes_values_as_tensor", a.get("nodes_values"))
    if values is None:
        raise NotTrees("no node thresholds")
    feature, true_ids, false_ids = a["nodes_featureids"], a["nodes_truenodeids"], a["nodes_falsenodeids"]
    missing = a.get("nodes_missing_value_tracks_true", np.zeros(len(tree_ids), np.int64))
    prefix = "class" if classifier else "target"
    w_tree, w_node, w_id = a[f"{prefix}_treeids"], a[f"{prefix}_nodeids"], a[f"{prefix}_ids"]
    weights = a.get(f"{prefix}_weights_as_tensor", a.get(f"{prefix}_weights"))
    aggregate = a.get("aggregate_function", "SUM")
    if aggregate not in ("SUM", "AVERAGE"):
        raise NotTrees(f"aggregate_function {aggregate}")
    tl, nl, fl = np.asarray(tree_ids).tolist(), np.asarray(node_ids).tolist(), np.asarray(feature).tolist()
    tl_true, tl_false = np.asarray(true_ids).tolist(), np.asarray(false_ids).tolist()
    index = {(t, n): i for i, (t, n) in enumerate(zip(tl, nl, strict=True))}
    if len(index) != len(tl):
        raise NotTrees("repeated node ids")
    leaf_list = [m == "LEAF" for m in modes]
    is_leaf = np.asarray(leaf_list)
    unknown = {m for m in modes if m != "LEAF" and m not in MODES}
    if unknown:
        raise NotTrees(f"node modes {sorted(unknown)}")
    if classifier:
        labels = a.get("classlabels_int64s", a.get("classlabels_strings"))
        channels = len(labels) if labels is not None else 0
    else:
        channels = int(a.get("n_targets", 1))
    if channels < 1 or (len(w_id) and int(np.max(w_id)) >= channels):
        raise NotTrees("leaf weights for a class or target the node does not list")
    per_node = np.zeros((len(tl), channels))
    try:
        rows_of = [index[(t, n)] for t, n in zip(np.asarray(w_tree).tolist(), np.asarray(w_node).tolist(), strict=True)]
        # Each tree's root (the node no other node points to), then every root-to-leaf path.
        children = {index[(t, c)] for t, c, leaf in zip(tl, tl_true, leaf_list, strict=True) if not leaf}
        children |= {index[(t, c)] for t, c, leaf in zip(tl, tl_false, leaf_list, strict=True) if not leaf}
    except KeyError:
        raise NotTrees("a leaf weight or child for a node the tree does not have") from None
    np.add.at(per_node, (rows_of, w_id), np.asarray(weights, np.float64))
    roots = [i for i in range(len(tl)) if i not in children]
    trees = len(set(tl))
    if len(roots) != trees:
        raise NotTrees("a tree without one root")
    leaves: list[int] = []
    paths: list[list[tuple[int, bool]]] = []
    stack: list[tuple[int, list[tuple[int, bool]]]] = [(r, []) for r in reversed(roots)]
    while stack:
        node, path = stack.pop()
        if leaf_list[node]:
            leaves.append(node)
            paths.append(path)
            continue
        if len(path) > len(tl):
            raise NotTrees("a cycle in a tree")
        tree = tl[node]
        stack.append((index[(tree, tl_false[node])], path + [(node, False)]))
        stack.append((index[(tree, tl_true[node])], path + [(node, True)]))
    depth = max(1, max(len(p) for p in paths))
    leaf_count = len(leaves)
    nodes_of: list[list[int]] = []
    bits_of: list[list[int]] = []
    slots: list[list[int]] = []
    for path in paths:
        distinct: list[int] = []
        bits: list[int] = []
        for node, _ in path:
            f = fl[node]
            if f not in distinct:
                distinct.append(f)
            bits.append(1 << distinct.index(f))
        if len(distinct) > MAX_PATH_FEATURES:
            raise NotTrees(f"a path over more than {MAX_PATH_FEATURES} distinct features")
        pad = depth - len(path)
        nodes_of.append([node for node, _ in path] + [0] * pad)
        bits_of.append(bits + [0] * pad)
        slots.append(distinct)
    path_node = np.asarray(nodes_of, np.int64).reshape(leaf_count, depth)
    path_true = np.asarray([[t for _, t in p] + [False] * (depth - len(p)) for p in paths], bool).reshape(leaf_count, depth)
    path_bit = np.asarray(bits_of, np.uint64).reshape(leaf_count, depth)
    width = max(1, max(len(s) for s in slots))
    leaf_features = np.zeros((leaf_count, width), np.int64)
    for i, s in enumerate(slots):
        leaf_features[i, :len(s)] = s
    full = np.asarray([(1 << len(s)) - 1 for s in slots], np.uint64)
    post_transform = str(a.get("post_transform", LINEAR))
    offset, matrix = _output_map(a, classifier, channels, np.unique(w_id), np.asarray(weights, np.float64),
                                 post_transform)
    return Trees(
        feature=np.asarray(feature, np.int64), threshold=np.asarray(values),
        mode=np.asarray([MODES.index(m) if m in MODES else -1 for m in modes], np.int8),
        missing_true=np.asarray(missing, bool), leaf_values=per_node[leaves], path_node=path_node,
        path_true=path_true, path_bit=path_bit, leaf_features=leaf_features, full=full, trees=trees,
        features=int(np.max(feature[~is_leaf])) + 1 if (~is_leaf).any() else 1,
        post_transform=post_transform, offset=offset, matrix=matrix,
        scale=1.0 / trees if aggregate == "AVERAGE" else 1.0, preprocess=steps, input=input_name, output=output_name)


def _output_map(a: Mapping[str, Any], classifier: bool, channels: int, used: np.ndarray,
                weights: np.ndarray, post_transform: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset [T], matrix [T, C]): the scores onnxruntime writes before its post_transform, as
    an affine map of the raw sums per class or target id. Two classes with weights for one of
    them only are onnxruntime's binary case: that class's score s becomes [1 - s, s] when every
    weight is positive and nothing follows, [-s, s] otherwise (base_values then has one entry,
    added to s): under LOGISTIC, each class's log-odds."""
    base = a.get("base_values_as_tensor", a.get("base_values"))
    base = np.zeros(0) if base is None else np.asarray(base, np.float64)
    eye = np.eye(channels)
    if not classifier or channels > 2:
        return (base if len(base) == channels else np.zeros(channels)), eye
    if len(used) != 1:  # binary as two columns of scores
        return (base if len(base) == 2 else np.zeros(2)), eye
    column = np.zeros(2)
    column[int(used[0])] = 1.0
    b = float(base[0]) if len(base) else 0.0
    if post_transform == LINEAR and bool((weights >= 0).all()):
        return np.array([1.0 - b, b]), np.stack([-column, column])
    return np.array([-b, b]), np.stack([-column, column])


def post_transform(name: str, scores: np.ndarray) -> np.ndarray | None:
    """The served output from the scores [rows, T] (None: a transform not computed here)."""
    if name == LINEAR:
        return scores
    if name == "LOGISTIC":
        return 1.0 / (1.0 + np.exp(-scores))
    if name == "SOFTMAX":
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return None


def decisions(trees: Trees, x: np.ndarray) -> np.ndarray:
    """Whether each row of ensemble features `x` [rows, F] takes each node's true child:
    [rows, N] (leaves: False), compared in `x`'s type as onnxruntime does."""
    v = x[:, trees.feature.clip(0, x.shape[1] - 1)]
    t = trees.threshold.astype(x.dtype)
    out = np.zeros(v.shape, bool)
    tests: Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]] = (
        np.less_equal, np.less, np.greater_equal, np.greater, np.equal, np.not_equal)
    internal = trees.mode >= 0
    modes = np.unique(trees.mode[internal])
    if len(modes) == 1:  # the usual case: one mode for every split
        out = tests[int(modes[0])](v, t) & internal
    for m in modes if len(modes) > 1 else ():
        where = trees.mode == m
        out[:, where] = tests[int(m)](v[:, where], t[where])
    if trees.missing_true.any():
        out |= trees.missing_true & np.isnan(v)
    return out
