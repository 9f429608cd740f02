"""TreeSHAP read from the ONNX graph: ground truth by exact enumeration of every coalition run
through onnxruntime itself, additivity against the served output, agreement with the `shap`
package's interventional TreeExplainer, every node mode and missing-value rule onnxruntime
applies, and the graphs it must leave to KernelSHAP."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from medserve.server.explain import _all_masks, _shapley_weights
from medserve.server.onnx_trees import NotTrees, read_trees
from medserve.server.treeshap import TreeShap

pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")


def to_onnx(model: Any, features: int) -> bytes:
    from skl2onnx.common.data_types import FloatTensorType

    from medserve.exporters.skl2onnx_fixes import custom_converters  # as the exporters convert

    options = {id(model): {"zipmap": False}} if hasattr(model, "predict_proba") else None
    proto = skl2onnx.convert_sklearn(model, initial_types=[("input", FloatTensorType([None, features]))],
                                     options=options, target_opset={"": 17, "ai.onnx.ml": 3},
                                     custom_conversion_functions=custom_converters())
    return proto.SerializeToString()


def served_output(model_bytes: bytes) -> str:
    names = [o.name for o in ort.InferenceSession(model_bytes).get_outputs()]
    return "probabilities" if "probabilities" in names else names[0]


def exact_enumeration(model_bytes: bytes, output: str, x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Shapley values [rows, targets, F] of v(S) = mean over the reference rows of the served
    output with S from x: every coalition through onnxruntime, the server's exact weights."""
    session = ort.InferenceSession(model_bytes)
    masks = _all_masks(x.shape[1])
    weights = _shapley_weights(masks)  # [F, K]
    found = []
    for row in x:
        mixed = np.where(masks[:, None, :], row[None, None, :], reference[None, :, :])  # [K, M, F]
        values = session.run([output], {"input": mixed.reshape(-1, x.shape[1]).astype(np.float32)})[0]
        v = np.asarray(values, np.float64).reshape(len(masks), len(reference), -1).mean(axis=1)  # [K, T]
        found.append((weights @ v).T)
    return np.stack(found)


def data(rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Continuous features (no value sits on a threshold) and a target with interactions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = x[:, 0] * x[:, 1] + np.sin(2 * x[:, 2]) + 0.5 * x[:, 3 % features] + 0.1 * rng.normal(size=rows)
    return x, y


def forests() -> dict[str, tuple[Any, bool]]:
    from sklearn.ensemble import (
        GradientBoostingRegressor,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    return {  # name -> (model, classifier)
        "random forest, binary": (RandomForestClassifier(12, max_depth=5, random_state=0), True),
        "random forest, three classes": (RandomForestClassifier(8, max_depth=4, random_state=0), True),
        "random forest regressor": (RandomForestRegressor(10, max_depth=6, random_state=0), False),
        "gradient boosting regressor": (GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0), False),
        "histogram GBM regressor (NaN)": (HistGradientBoostingRegressor(max_iter=15, random_state=0), False),
        "imputer + scaler + tree": (make_pipeline(SimpleImputer(), StandardScaler(),
                                                  DecisionTreeClassifier(max_depth=6, random_state=0)), True),
    }


@pytest.mark.parametrize("name", list(forests()))
def test_tree_shap_equals_exact_enumeration_and_adds_up_to_the_served_output(name: str) -> None:
    model, classifier = forests()[name]
    features = 7
    x, y = data(400, features)
    if "NaN" in name or "imputer" in name:
        x[np.random.default_rng(1).random(x.shape) < 0.1] = np.nan
    target = (y > np.median(y)).astype(int) + (y > np.quantile(y, 0.8)) * ("three" in name) if classifier else y
    model.fit(x, target)
    model_bytes = to_onnx(model, features)
    output = served_output(model_bytes)
    reference = np.nan_to_num(x[:6]) if "imputer" in name else x[:6]
    rows = x[200:204]
    explainer = TreeShap(read_trees(model_bytes, "input", output), reference)
    phi, out = explainer.explain(rows)
    served = ort.InferenceSession(model_bytes).run([output], {"input": rows})[0].reshape(len(rows), -1)
    np.testing.assert_allclose(out, served, rtol=1e-5, atol=1e-5)  # the trees as onnxruntime runs them
    np.testing.assert_allclose(phi.sum(axis=2) + explainer.base_value, served, rtol=1e-5, atol=1e-5)
    truth = exact_enumeration(model_bytes, output, rows, reference)
    assert phi.shape == truth.shape
    np.testing.assert_allclose(phi, truth, atol=1e-5)
    assert np.abs(phi).max() > 1e-3  # not trivially zero


def hand_built(modes: list[str], missing_true: list[int]) -> bytes:
    """One regression tree over three features whose three splits use `modes`, with NaN sent
    where `missing_true` says; leaves 1..4 plus base value 0.5, averaged with a second tree."""
    from onnx import TensorProto, helper

    # tree 0: n0 (f0 vs 0.5) -> n1 (f1 vs -0.25) -> leaves 3, 4 | n2 (f2 vs 0.0) -> leaves 5, 6
    # tree 1: n0 (f1 vs 0.0) -> leaves 1, 2
    node = helper.make_node(
        "TreeEnsembleRegressor", ["input"], ["prediction"], domain="ai.onnx.ml",
        nodes_treeids=[0] * 7 + [1] * 3, nodes_nodeids=[0, 1, 2, 3, 4, 5, 6, 0, 1, 2],
        nodes_featureids=[0, 1, 2, 0, 0, 0, 0, 1, 0, 0],
        nodes_modes=modes + ["LEAF"] * 4 + ["BRANCH_LEQ", "LEAF", "LEAF"],
        nodes_values=[0.5, -0.25, 0.0, 0, 0, 0, 0, 0.0, 0, 0],
        nodes_truenodeids=[1, 3, 5, 0, 0, 0, 0, 1, 0, 0], nodes_falsenodeids=[2, 4, 6, 0, 0, 0, 0, 2, 0, 0],
        nodes_missing_value_tracks_true=missing_true + [0] * 4 + [1, 0, 0],
        target_treeids=[0, 0, 0, 0, 1, 1], target_nodeids=[3, 4, 5, 6, 1, 2], target_ids=[0] * 6,
        target_weights=[1.0, 2.0, 3.0, 4.0, -1.0, 1.5], base_values=[0.5], n_targets=1,
        aggregate_function="AVERAGE", post_transform="NONE")
    graph = helper.make_graph(
        [node], "tree", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize(("modes", "missing"), [
    (["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE"], [1, 0, 1]),
    (["BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"], [0, 1, 0]),
])
def test_every_node_mode_and_missing_value_rule_as_onnxruntime_runs_them(modes: list[str], missing: list[int]) -> None:
    model_bytes = hand_built(modes, missing)
    rng = np.random.default_rng(0)
    # Values on the thresholds (EQ/NEQ and LEQ/LT tell them apart) and NaN.
    grid = np.array([0.5, -0.25, 0.0, 1.0, -1.0, np.nan], np.float32)
    x = grid[rng.integers(0, len(grid), size=(40, 3))]
    reference = grid[rng.integers(0, len(grid), size=(5, 3))]
    explainer = TreeShap(read_trees(model_bytes, "input", "prediction"), reference)
    phi, out = explainer.explain(x)
    served = ort.InferenceSession(model_bytes).run(["prediction"], {"input": x})[0]
    np.testing.assert_allclose(out, served, rtol=1e-6)
    np.testing.assert_allclose(phi, exact_enumeration(model_bytes, "prediction", x, reference), atol=1e-6)


def affine_chain(thresholds: list[float]) -> bytes:
    """`hand_built`'s trees (BRANCH_LEQ, NaN to the true child at node 0) behind a chain of
    per-feature affine nodes as exporters write them, in both types and with the constant on
    either side: Cast(double), Mul by [1, 3], Sub from a scalar Constant node (c - x), Div by
    [3], Add [3], Cast(float), Sub a float32 scalar initializer."""
    from onnx import TensorProto, helper, numpy_helper

    trees = onnx_graph(hand_built(["BRANCH_LEQ"] * 3, [1, 0, 0]))
    ensemble = trees.node[0]
    for a in ensemble.attribute:
        if a.name == "nodes_values":
            a.floats[:3] = thresholds
    ensemble.input[0] = "scaled"
    f64 = {"mul": np.array([[1.5, -2.0, 0.1]]), "div": np.array([0.3, 7.0, -1.1]), "add": np.array([1e-3, 0.0, 5.0])}
    initializers = [numpy_helper.from_array(v, n) for n, v in f64.items()]
    initializers.append(numpy_helper.from_array(np.array(0.25, np.float32), "shift"))
    nodes = [
        helper.make_node("Cast", ["input"], ["x64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["x64", "mul"], ["a"]),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0), "two")),
        helper.make_node("Sub", ["two", "a"], ["b"]),
        helper.make_node("Div", ["b", "div"], ["c"]),
        helper.make_node("Add", ["add", "c"], ["d"]),
        helper.make_node("Cast", ["d"], ["d32"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["d32", "shift"], ["scaled"]),
        ensemble,
    ]
    graph = helper.make_graph(nodes, "affine", list(trees.input), list(trees.output), initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    return model.SerializeToString()


def onnx_graph(model_bytes: bytes) -> Any:
    import onnx

    return onnx.load_from_string(model_bytes).graph


def chain_in_numpy(x: np.ndarray) -> np.ndarray:
    """`affine_chain`'s arithmetic, written out (to place thresholds on values rows reach)."""
    d = (2.0 - x.astype(np.float64) * np.array([1.5, -2.0, 0.1])) / np.array([0.3, 7.0, -1.1]) + np.array([1e-3, 0.0, 5.0])
    return d.astype(np.float32) - np.float32(0.25)


def test_per_feature_affine_nodes_before_the_ensemble_are_read_as_onnxruntime_computes_them() -> None:
    """Sub / Add / Mul / Div by constants broadcast per feature, in float64 and float32, with
    the constant on either side and from an initializer or a Constant node, between the input
    and the trees: each row is transformed as onnxruntime transforms it (the thresholds sit
    exactly on values rows reach, where one rounding off would flip a split), so TreeSHAP
    equals every coalition run through onnxruntime and adds up to the served output."""
    rng = np.random.default_rng(2)
    grid = np.array([0.5, -0.25, 0.0, 1.0, -1.0, 0.1, np.nan], np.float32)
    x = grid[rng.integers(0, len(grid), size=(40, 3))]
    on_grid = chain_in_numpy(np.array([[0.5, -0.25, 0.1]], np.float32))[0]
    model_bytes = affine_chain([float(on_grid[0]), float(on_grid[1]), float(on_grid[2])])
    trees = read_trees(model_bytes, "input", "prediction")
    assert len(trees.preprocess) == 7
    np.testing.assert_array_equal(trees.features_of(x), chain_in_numpy(x))
    reference = grid[rng.integers(0, len(grid), size=(5, 3))]
    explainer = TreeShap(trees, reference)
    phi, out = explainer.explain(x)
    served = ort.InferenceSession(model_bytes).run(["prediction"], {"input": x})[0]
    np.testing.assert_allclose(out, served, rtol=1e-6)
    np.testing.assert_allclose(phi.sum(axis=2) + explainer.base_value, served, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(phi, exact_enumeration(model_bytes, "prediction", x, reference), atol=1e-5)
    assert np.abs(phi).max() > 1e-3


def test_affine_nodes_that_are_not_per_feature_constants_are_not_read() -> None:
    """A constant of another width than the input's features, one of one value per row, and
    a node whose operands are both computed from the input map columns across features or
    rows: refused by name (KernelSHAP stays)."""
    from onnx import numpy_helper

    model_bytes = affine_chain([0.0, 0.0, 0.0])
    for name, value in (("div", np.array([0.3, 7.0])), ("div", np.ones((4, 1))), ("mul", np.ones((1, 1, 3)))):
        model = __import__("onnx").load_from_string(model_bytes)
        target = next(t for t in model.graph.initializer if t.name == name)
        target.CopyFrom(numpy_helper.from_array(value, name))
        with pytest.raises(NotTrees, match="one value per feature|another width"):
            read_trees(model.SerializeToString(), "input", "prediction")
    model = __import__("onnx").load_from_string(model_bytes)
    next(n for n in model.graph.node if n.op_type == "Div").input[1] = "b"  # b / b
    with pytest.raises(NotTrees, match="not one computed and one constant"):
        read_trees(model.SerializeToString(), "input", "prediction")


def test_a_float64_scaler_before_lightgbm_as_the_exporter_writes_it_is_explained_exactly() -> None:
    """StandardScaler + LightGBM exported by medserve (the scaler in float64: Cast, Sub, Div,
    Cast before the trees), with missing values: TreeSHAP equals every coalition through
    onnxruntime, and the version's load check (the trees beside its own session on the
    reference rows) keeps it on `tree_shap`."""
    pytest.importorskip("lightgbm")
    from lightgbm import LGBMRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medserve.exporters.sklearn import convert
    from medserve.server.card import ModelCard
    from medserve.server.config import ModelConfig, TensorConfig
    from medserve.server.explain import Explainer

    x, y = data(400, 7, seed=6)
    x[np.random.default_rng(6).random(x.shape) < 0.1] = np.nan
    pipe = make_pipeline(StandardScaler(), LGBMRegressor(n_estimators=30, num_leaves=8, random_state=0, n_jobs=1,
                                                         verbose=-1)).fit(x.astype(np.float64), y)
    model_bytes = convert(pipe, x[:32].astype(np.float64)).model_bytes
    assert [n.op_type for n in onnx_graph(model_bytes).node][:4] == ["Cast", "Sub", "Div", "Cast"]
    reference, rows = x[:6], x[200:206]
    explainer = TreeShap(read_trees(model_bytes, "input", "prediction"), reference)
    phi, out = explainer.explain(rows)
    served = ort.InferenceSession(model_bytes).run(["prediction"], {"input": rows})[0].reshape(len(rows), -1)
    np.testing.assert_allclose(out, served, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(phi.sum(axis=2) + explainer.base_value, served, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(phi, exact_enumeration(model_bytes, "prediction", rows, reference), atol=1e-5)
    assert np.abs(phi).max() > 1e-3

    async def never(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("no model rows are run here")

    session = ort.InferenceSession(model_bytes)
    config = ModelConfig(name="m", max_batch_size=8, inputs=(TensorConfig("input", "FP32", (7,)),),
                         outputs=(TensorConfig("prediction", "FP32", (1,)),))
    loaded = Explainer("m", config, ModelCard(reference={"input": reference}), never)
    loaded.use_graph(model_bytes, lambda feeds: dict(zip(["prediction"], session.run(["prediction"], feeds),
                                                         strict=True)))
    assert loaded.method == "tree_shap"


def shap_values(model: Any, reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The `shap` package's interventional TreeSHAP as [rows, targets, F]."""
    shap = pytest.importorskip("shap")
    explainer = shap.TreeExplainer(model, data=reference.astype(np.float64), feature_perturbation="interventional")
    values = np.asarray(explainer.shap_values(x.astype(np.float64), check_additivity=False))
    return values[:, None, :] if values.ndim == 2 else values.transpose(0, 2, 1)


@pytest.mark.parametrize("family", ["random forest classifier", "random forest regressor", "GBM regressor"])
def test_agrees_with_the_shap_package_on_scikit_learn(family: str) -> None:
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier, RandomForestRegressor

    x, y = data(600, 12, seed=3)
    model = {"random forest classifier": RandomForestClassifier(40, max_depth=8, random_state=0),
             "random forest regressor": RandomForestRegressor(40, max_depth=8, random_state=0),
             "GBM regressor": GradientBoostingRegressor(n_estimators=60, max_depth=4, random_state=0)}[family]
    model.fit(x, (y > 0).astype(int) if "classifier" in family else y)
    model_bytes = to_onnx(model, 12)
    reference, rows = x[:8], x[300:308]
    phi, _ = TreeShap(read_trees(model_bytes, "input", served_output(model_bytes)), reference).explain(rows)
    np.testing.assert_allclose(phi, shap_values(model, reference, rows), atol=1e-4)


def onnxmltools_regressor(library: str) -> tuple[Any, bytes]:
    pytest.importorskip(library)
    onnxmltools = pytest.importorskip("onnxmltools")
    from onnxmltools.convert.common.data_types import FloatTensorType

    x, y = data(600, 10, seed=4)
    if library == "xgboost":
        import xgboost

        model = xgboost.XGBRegressor(n_estimators=50, max_depth=4, random_state=0).fit(x, y)
        proto = onnxmltools.convert_xgboost(model, initial_types=[("input", FloatTensorType([None, 10]))])
    else:
        import lightgbm

        model = lightgbm.LGBMRegressor(n_estimators=50, num_leaves=15, random_state=0, verbose=-1).fit(x, y)
        proto = onnxmltools.convert_lightgbm(model, initial_types=[("input", FloatTensorType([None, 10]))])
    return model, proto.SerializeToString()


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_agrees_with_the_shap_package_on_xgboost_and_lightgbm(library: str) -> None:
    model, model_bytes = onnxmltools_regressor(library)
    x, _ = data(600, 10, seed=4)
    reference, rows = x[:8], x[300:306]
    output = served_output(model_bytes)
    explainer = TreeShap(read_trees(model_bytes, "input", output), reference)
    phi, out = explainer.explain(rows)
    served = ort.InferenceSession(model_bytes).run([output], {"input": rows})[0].reshape(len(rows), -1)
    np.testing.assert_allclose(phi.sum(axis=2) + explainer.base_value, served, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(phi, shap_values(model, reference, rows), atol=1e-4)


def test_graphs_that_are_not_one_tree_ensemble_over_per_feature_steps_are_not_read() -> None:
    """One-hot encoding maps one column to several tree features; a linear model has no trees;
    the label is not the scores: each is refused by name (the explainer keeps KernelSHAP)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    x, y = data(200, 4)
    target = (y > 0).astype(int)
    linear = to_onnx(LogisticRegression().fit(x, target), 4)
    with pytest.raises(NotTrees, match="does not come from a TreeEnsemble"):
        read_trees(linear, "input", "probabilities")
    onehot = make_pipeline(ColumnTransformer([("c", OneHotEncoder(handle_unknown="ignore"), [0])], remainder="passthrough"),
                           RandomForestClassifier(5, random_state=0)).fit(np.round(x), target)
    with pytest.raises(NotTrees, match="between the input and the ensemble|not the graph input|not one graph input"):
        read_trees(to_onnx(onehot, 4), "input", "probabilities")
    forest = to_onnx(RandomForestClassifier(5, random_state=0).fit(x, target), 4)
    with pytest.raises(NotTrees, match="the label"):
        read_trees(forest, "input", "label")


def classifiers() -> dict[str, Any]:
    from sklearn.ensemble import GradientBoostingClassifier

    found: dict[str, Any] = {"GBM binary": GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0),
                             "GBM three classes": GradientBoostingClassifier(n_estimators=15, max_depth=3, random_state=0)}
    try:
        import xgboost

        found["XGBoost binary"] = xgboost.XGBClassifier(n_estimators=40, max_depth=4, random_state=0)
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("name", ["GBM binary", "GBM three classes", "XGBoost binary"])
def test_a_boosted_classifier_is_explained_in_its_margin_and_agrees_with_shap(name: str) -> None:
    """A logistic (softmax) of the trees' sum: its Shapley values in log-odds (logits) are the
    trees', equal to every coalition run through the library's own margin, the served
    probabilities are the logistic (softmax) of base value plus attributions, and `shap`
    explains the same raw margin (binary)."""
    model = classifiers().get(name)
    if model is None:
        pytest.skip("xgboost is not installed")
    x, y = data(600, 9, seed=5)
    target = (y > np.median(y)).astype(int) + ((y > np.quantile(y, 0.8)) if "three" in name else 0)
    model.fit(x, target)
    if name.startswith("XGBoost"):
        onnxmltools = pytest.importorskip("onnxmltools")
        from onnxmltools.convert.common.data_types import FloatTensorType

        model_bytes = onnxmltools.convert_xgboost(model, initial_types=[("input", FloatTensorType([None, 9]))]
                                                  ).SerializeToString()
    else:
        model_bytes = to_onnx(model, 9)
    output = served_output(model_bytes)
    trees = read_trees(model_bytes, "input", output)
    assert trees.post_transform == ("SOFTMAX" if "three" in name else "LOGISTIC")
    reference, rows = x[:8], x[300:306]
    explainer = TreeShap(trees, reference)
    phi, margin = explainer.explain(rows)
    served = ort.InferenceSession(model_bytes).run([output], {"input": rows})[0]
    from medserve.server.onnx_trees import post_transform

    np.testing.assert_allclose(post_transform(trees.post_transform, phi.sum(axis=2) + explainer.base_value), served,
                               atol=1e-5)
    # Ground truth: every coalition through the library's own margin (log-odds, logits).
    library_margin = ((lambda a: model.predict(a, output_margin=True)) if name.startswith("XGBoost")
                      else model.decision_function)
    masks = _all_masks(9)
    truth = []
    for row in rows:
        mixed = np.where(masks[:, None, :], row[None, None, :], reference[None]).reshape(-1, 9)
        v = np.asarray(library_margin(mixed), np.float64).reshape(len(masks), len(reference), -1).mean(axis=1)
        truth.append((_shapley_weights(masks) @ v).T)
    expected = np.stack(truth)
    if expected.shape[1] == 1:  # binary: the positive class's log-odds; the other's is its negative
        np.testing.assert_allclose(phi[:, 1:], expected, atol=1e-4)
        np.testing.assert_allclose(phi[:, 0], -phi[:, 1], atol=1e-12)
        np.testing.assert_allclose(phi[:, 1:], shap_values(model, reference, rows), atol=1e-4)
    else:
        np.testing.assert_allclose(phi, expected, atol=1e-4)


def test_trees_that_do_not_reproduce_what_onnxruntime_serves_are_not_used() -> None:
    """At load the trees read are run on the reference rows beside the version's own sessions:
    where the two differ (a reading this module got wrong), explanations stay with KernelSHAP,
    and `explain_output: margin`, which only the trees can give, refuses the load."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor

    from medserve.server.card import ModelCard
    from medserve.server.config import ModelConfig, TensorConfig
    from medserve.server.errors import ModelLoadFailed
    from medserve.server.explain import Explainer

    x, y = data(300, 7)

    async def never(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("no model rows are run here")

    def explainer(model_bytes: bytes, output: str, width: int, **parameters: str) -> Explainer:
        config = ModelConfig(name="m", max_batch_size=8, inputs=(TensorConfig("input", "FP32", (7,)),),
                             outputs=(TensorConfig(output, "FP32", (width,)),), parameters=parameters)
        return Explainer("m", config, ModelCard(reference={"input": x[:5]}), never)

    def sessions(model_bytes: bytes, shift: float) -> Any:
        session = ort.InferenceSession(model_bytes)
        return lambda feeds: {o.name: v + shift for o, v in zip(session.get_outputs(), session.run(None, feeds),
                                                                  strict=True)}

    forest = to_onnx(RandomForestRegressor(5, max_depth=4, random_state=0).fit(x, y), 7)
    honest, lying = explainer(forest, "variable", 1), explainer(forest, "variable", 1)
    honest.use_graph(forest, sessions(forest, 0.0))
    lying.use_graph(forest, sessions(forest, 0.01))
    assert honest.method == "tree_shap" and lying.method is None
    gbm = to_onnx(GradientBoostingClassifier(n_estimators=5, random_state=0).fit(x, y > 0), 7)
    margin = explainer(gbm, "probabilities", 2, explain_output="margin")
    margin.use_graph(gbm, sessions(gbm, 0.0))
    assert margin.method == "tree_shap"
    with pytest.raises(ModelLoadFailed, match="parameters\\['explain_output'\\] 'margin'"):
        explainer(gbm, "probabilities", 2, explain_output="margin").use_graph(gbm, sessions(gbm, 0.01))
