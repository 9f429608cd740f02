"""XGBoost, LightGBM and CatBoost models -> ONNX, through the scikit-learn path (`sklearn.py`).

The boosters become converters of skl2onnx, registered the documented way
(`skl2onnx.update_registered_converter`), so a model converts alone or as the last step of a
`Pipeline` (imputers, scalers, a ColumnTransformer with one-hot or ordinal encoders) with the
same code, the same graph signature (`label` + `probabilities`, or `prediction`), the same parity
proof, card and publication as scikit-learn's own estimators:

- XGBoost and LightGBM: onnxmltools' converters. LightGBM compares float64 inputs with float64
  thresholds; the graph compares float32 inputs, so each threshold is rounded in the direction
  that keeps every float32 input on the same side (`round_thresholds`), as for
  HistGradientBoosting (`skl2onnx_fixes`). XGBoost works in float32 itself.
- CatBoost: its own ONNX export (`save_model(format="onnx")`), whose one TreeEnsemble node is
  copied into the skl2onnx graph.
- A `Booster` (xgboost.Booster, lightgbm.Booster) is served through a thin estimator that
  predicts with the booster itself (`as_estimator`).

What the converters cannot express is refused before converting, naming the part
(`check_convertible`): an objective, a booster kind, a categorical mode, linear leaves. Anything
else that converts but answers differently is stopped by the parity check.

The libraries are imported only when one of their models is exported (`pip install
'medserve[gbm]'`). Registration is idempotent and happens once per process: skl2onnx keeps its
converters in a module-level registry, which is how its documentation extends it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from .errors import UnsupportedModelError

_LIBRARIES = ("xgboost", "lightgbm", "catboost")
_CLASSIFIER_OPTIONS = {"nocl": [True, False], "zipmap": [True, False, "columns"]}

# Objectives the converters reproduce (onnxmltools 1.16: XGBoost's and LightGBM's converters).
XGBOOST_OBJECTIVES = frozenset({
    "binary:logistic", "multi:softprob", "multi:softmax", "reg:logistic", "reg:squarederror",
    "reg:squaredlogerror", "reg:pseudohubererror", "reg:absoluteerror", "count:poisson", "reg:gamma", "reg:tweedie",
})
LIGHTGBM_OBJECTIVES = ("binary", "multiclass", "regression", "quantile", "huber", "poisson", "gamma", "tweedie")
CATBOOST_REFUSED_FEATURES = ("cat_features", "text_features", "embedding_features")  # get_<kind>_feature_indices


def library_of(model: Any) -> str | None:
    """'xgboost' | 'lightgbm' | 'catboost' for a model (or booster) of one of them, else None."""
    root = type(model).__module__.split(".")[0]
    if root in _LIBRARIES:
        return root
    return getattr(model, "medserve_library", None)


def is_booster(model: Any) -> bool:
    """A raw xgboost.Booster or lightgbm.Booster (not a scikit-learn estimator)."""
    xgboost, lightgbm = sys.modules.get("xgboost"), sys.modules.get("lightgbm")
    return (xgboost is not None and isinstance(model, xgboost.Booster)) or (
        lightgbm is not None and isinstance(model, lightgbm.Booster)
    )


def versions(library: str) -> tuple[str, str]:
    """(library version, converter description) for the card."""
    module = sys.modules[library]
    if library == "catboost":
        return module.__version__, f"catboost {module.__version__} ONNX export"
    import onnxmltools

    return module.__version__, f"onnxmltools {onnxmltools.__version__}"


# -- refusing what the converters cannot express --------------------------------------------------


def check_convertible(model: Any) -> None:
    """Raise UnsupportedModelError naming the part of `model` no converter expresses."""
    library = library_of(model)
    name = type(model).__name__
    if library == "xgboost":
        booster = model.get_booster() if hasattr(model, "get_booster") else model
        learner = json.loads(booster.save_config())["learner"]
        kind = learner["gradient_booster"]["name"]
        if kind not in ("gbtree", "dart"):
            raise UnsupportedModelError(f"{name}: booster {kind!r} has no ONNX tree converter (use 'gbtree')")
        objective = learner["objective"]["name"]
        if objective not in XGBOOST_OBJECTIVES:
            raise UnsupportedModelError(
                f"{name}: objective {objective!r} is not converted by onnxmltools; supported: {sorted(XGBOOST_OBJECTIVES)}"
            )
        if int(learner["learner_model_param"].get("num_target", "1")) > 1:
            raise UnsupportedModelError(f"{name}: multi-target regression is not converted by onnxmltools")
        missing = getattr(model, "missing", np.nan)
        if missing is not None and not np.isnan(missing):
            raise UnsupportedModelError(f"{name}: missing={missing!r}: only NaN as the missing value is converted")
        if getattr(model, "enable_categorical", False) or getattr(booster, "feature_types", None) and "c" in (
            booster.feature_types or []
        ):
            raise UnsupportedModelError(
                f"{name}: categorical mode enable_categorical (XGBoost's own category splits) is not converted; "
                "encode the categories in the pipeline (OneHotEncoder / OrdinalEncoder) instead"
            )
    elif library == "lightgbm":
        booster = model.booster_ if hasattr(model, "booster_") else model
        params = booster.params or {}
        objective = booster.dump_model(num_iteration=1).get("objective")  # normalized: 'l2' reads 'regression'
        if objective is None or not str(objective).startswith(LIGHTGBM_OBJECTIVES) or str(objective).startswith(
            "multiclassova"
        ):
            shown = "a custom function" if objective is None else repr(str(objective).split(" ")[0])
            raise UnsupportedModelError(
                f"{name}: objective {shown} is not converted by onnxmltools; supported: {list(LIGHTGBM_OBJECTIVES)}"
            )
        if params.get("linear_tree"):
            raise UnsupportedModelError(f"{name}: linear_tree (linear models in the leaves) is not converted")
        if params.get("zero_as_missing"):
            raise UnsupportedModelError(f"{name}: zero_as_missing is not converted (only NaN as missing)")
        if booster.pandas_categorical:
            raise UnsupportedModelError(
                f"{name}: categorical mode of pandas 'category' columns (LightGBM's own category splits) is not "
                "converted; encode the categories in the pipeline (OrdinalEncoder / OneHotEncoder) instead"
            )
    elif library == "catboost":
        params = model.get_all_params()
        for key in CATBOOST_REFUSED_FEATURES:
            if getattr(model, f"get_{key[:-1]}_indices")():
                raise UnsupportedModelError(
                    f"{name}: categorical mode {key} (CatBoost's own {key.split('_')[0]} features) is not supported "
                    "by CatBoost's ONNX export; encode them in the pipeline (OrdinalEncoder / OneHotEncoder) instead"
                )
        loss = str(params.get("loss_function", ""))
        if loss.startswith(("MultiRMSE", "MultiLogloss", "MultiCrossEntropy", "YetiRank", "PairLogit", "QueryRMSE")):
            raise UnsupportedModelError(f"{name}: loss_function {loss!r} is not converted")


@contextlib.contextmanager
def converter_errors(library: str | None, model: Any) -> Iterator[None]:
    """A booster converter's own failure (onnxmltools raises RuntimeError / NotImplementedError
    for what it does not handle) as UnsupportedModelError naming the model and the converter; the
    messages name model parts (objectives, features by index), never data."""
    if library is None:
        yield
        return
    try:
        yield
    except (RuntimeError, NotImplementedError, ValueError, TypeError, KeyError) as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {versions(library)[1]} cannot convert it: {type(exc).__name__}: {exc}"
        ) from exc


# -- boosters as estimators ------------------------------------------------------------------------


class LightGBMBooster(BaseEstimator):
    """A lightgbm.Booster seen as a scikit-learn estimator: predictions come from the booster
    itself; onnxmltools' converter reads `booster_` and `classes_` as from an LGBMClassifier."""

    medserve_library = "lightgbm"

    def __init__(self, booster: Any = None) -> None:
        self.booster = booster

    @property
    def booster_(self) -> Any:
        return self.booster

    @property
    def n_features_in_(self) -> int:
        return int(self.booster.num_feature())

    @property
    def boosting_type(self) -> str:
        """'rf' when the trees' outputs are averaged (random forest mode), as the converter reads it."""
        return "rf" if self.booster.dump_model(num_iteration=1).get("average_output") else "gbdt"

    def predict(self, x: Any) -> np.ndarray:
        return np.asarray(self.booster.predict(x))


class LightGBMBoosterClassifier(ClassifierMixin, LightGBMBooster):
    @property
    def classes_(self) -> np.ndarray:
        return np.arange(max(2, int(self.booster.dump_model(num_iteration=1)["num_class"])))

    def predict_proba(self, x: Any) -> np.ndarray:
        scores = np.asarray(self.booster.predict(x))
        return np.column_stack([1.0 - scores, scores]) if scores.ndim == 1 else scores

    def predict(self, x: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(x), axis=1)]


class LightGBMBoosterRegressor(RegressorMixin, LightGBMBooster):
    pass


def as_estimator(booster: Any) -> Any:
    """An xgboost.Booster as the XGBClassifier/XGBRegressor its objective makes it (loaded from
    the booster's own bytes), a lightgbm.Booster as a LightGBMBooster*."""
    register()
    library = type(booster).__module__.split(".")[0]
    if library == "xgboost":
        import xgboost

        objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
        estimator = xgboost.XGBClassifier() if objective.startswith(("binary:", "multi:")) else xgboost.XGBRegressor()
        estimator.load_model(bytearray(booster.save_raw("json")))
        return estimator
    objective = str((booster.params or {}).get("objective") or booster.dump_model(num_iteration=1)["objective"])
    classify = objective.startswith(("binary", "multiclass", "softmax", "cross_entropy", "xentropy"))
    return LightGBMBoosterClassifier(booster) if classify else LightGBMBoosterRegressor(booster)


# -- converters ------------------------------------------------------------------------------------


def _float32_toward(values: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Each float64 value as the largest float32 <= it (where `down`) or the smallest >= it."""
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, then stepped back to the largest float32
        nearest = values.astype(np.float32)
    wide = nearest.astype(np.float64)
    lower = down & (wide > values)
    upper = ~down & (wide < values)
    nearest[lower] = np.nextafter(nearest[lower], np.float32(-np.inf))
    nearest[upper] = np.nextafter(nearest[upper], np.float32(np.inf))
    return nearest


def round_thresholds(values: Any, modes: Any) -> np.ndarray:
    """float64 split thresholds as float32 thresholds that route every float32 input the same way:
    x <= t and x > t hold for float32 x exactly when they hold against the largest float32 <= t;
    x < t and x >= t against the smallest float32 >= t. Equality tests (category codes) keep t."""
    array = np.asarray(values, dtype=np.float64)
    names = [m.decode() if isinstance(m, bytes) else str(m) for m in modes]
    down = np.array([m in ("BRANCH_LEQ", "BRANCH_GT", "LEAF") for m in names], dtype=bool)
    rounded = _float32_toward(array, down)
    exact = np.array([m in ("BRANCH_EQ", "BRANCH_NEQ") for m in names], dtype=bool)
    rounded[exact] = array[exact].astype(np.float32)
    return rounded


class _ThresholdContainer:
    """Delegates to skl2onnx's container; a TreeEnsemble node gets `round_thresholds`."""

    def __init__(self, container: Any) -> None:
        self._container = container

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, op_type: str, *args: Any, **attrs: Any) -> Any:
        if op_type.startswith("TreeEnsemble") and "nodes_values" in attrs and "nodes_modes" in attrs:
            attrs["nodes_values"] = round_thresholds(attrs["nodes_values"], attrs["nodes_modes"])
        return self._container.add_node(op_type, *args, **attrs)


def _xgboost_converter(scope: Any, operator: Any, container: Any) -> None:
    """onnxmltools' converter reads split features as `f<index>`: a model fitted on a DataFrame
    names them after its columns, so a copy without the names is converted (same trees)."""
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost

    model = operator.raw_operator
    booster = model.get_booster()
    if booster.feature_names is None:
        convert_xgboost(scope, operator, container)
        return
    unnamed = type(model)()
    unnamed.load_model(bytearray(booster.save_raw("json")))
    unnamed.get_booster().feature_names = None
    operator.raw_operator = unnamed
    try:
        convert_xgboost(scope, operator, container)
    finally:
        operator.raw_operator = model


def _lightgbm_converter(scope: Any, operator: Any, container: Any) -> None:
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm

    convert_lightgbm(scope, operator, _ThresholdContainer(container))


def _catboost_converter(scope: Any, operator: Any, container: Any) -> None:
    """CatBoost's own ONNX export, its TreeEnsemble node copied into the skl2onnx graph."""
    from catboost.utils import convert_to_onnx_object
    from onnx.helper import get_attribute_value

    onx = convert_to_onnx_object(operator.raw_operator)
    nodes = list(onx.graph.node)
    if not nodes or not nodes[0].op_type.startswith("TreeEnsemble") or len(onx.graph.initializer) or any(
        n.op_type != "ZipMap" for n in nodes[1:]
    ):
        raise UnsupportedModelError(
            f"CatBoost's ONNX export gave nodes {[n.op_type for n in nodes]}; medserve takes one TreeEnsemble node"
        )
    node = nodes[0]
    attrs = {a.name: get_attribute_value(a) for a in node.attribute}
    attrs.pop("nodes_hitrates", None)
    outputs = [o.full_name for o in operator.outputs]
    if node.op_type == "TreeEnsembleRegressor":
        flat = scope.get_unique_variable_name("prediction_flat")
        container.add_node(node.op_type, [operator.inputs[0].full_name], [flat], op_domain="ai.onnx.ml",
                           name=scope.get_unique_operator_name("CatBoost"), op_version=3, **attrs)
        shape = scope.get_unique_variable_name("shape")
        container.add_initializer(shape, 7, [2], [-1, 1])  # INT64
        container.add_node("Reshape", [flat, shape], outputs[:1], name=scope.get_unique_operator_name("Reshape"))
        return
    container.add_node(node.op_type, [operator.inputs[0].full_name], outputs[:2], op_domain="ai.onnx.ml",
                       name=scope.get_unique_operator_name("CatBoost"), op_version=3, **attrs)


def _float64_scaler(scope: Any, operator: Any, container: Any) -> None:
    """StandardScaler / RobustScaler / MaxAbsScaler as scikit-learn computes them: (x - offset) /
    scale in float64, then float32. A booster casts the scaled float64 values to float32 and
    splits on float32 thresholds that are often those very values (its cut points come from the
    training data): skl2onnx's float32 Scaler op is an ulp off there and flips splits (a
    StandardScaler + XGBoost pipeline on the breast cancer data: 8 probabilities off by up to
    0.08 on 201 rows), while this is exact."""
    from onnx import TensorProto
    from sklearn.preprocessing import MaxAbsScaler, RobustScaler, StandardScaler

    scaler = operator.raw_operator
    if isinstance(scaler, StandardScaler):
        offset, scale = (scaler.mean_ if scaler.with_mean else None), (scaler.scale_ if scaler.with_std else None)
    elif isinstance(scaler, RobustScaler):
        offset = scaler.center_ if scaler.with_centering else None
        scale = scaler.scale_ if scaler.with_scaling else None
    elif isinstance(scaler, MaxAbsScaler):
        offset, scale = None, scaler.scale_
    else:  # pragma: no cover - registered for these three types only
        raise UnsupportedModelError(f"{type(scaler).__name__} is not a scaler medserve computes in float64")
    if len(operator.inputs) != 1:
        raise UnsupportedModelError(f"{type(scaler).__name__} over {len(operator.inputs)} inputs: expected one table")
    current = scope.get_unique_variable_name("scaler_float64")
    container.add_node("Cast", [operator.inputs[0].full_name], [current], to=TensorProto.DOUBLE,
                       name=scope.get_unique_operator_name("CastToDouble"))
    for op_type, values in (("Sub", offset), ("Div", scale)):
        if values is None:
            continue
        constant = scope.get_unique_variable_name(f"scaler_{op_type.lower()}")
        container.add_initializer(constant, TensorProto.DOUBLE, [len(values)], np.asarray(values, np.float64).tolist())
        result = scope.get_unique_variable_name("scaler_float64")
        container.add_node(op_type, [current, constant], [result], name=scope.get_unique_operator_name(op_type))
        current = result
    container.add_node("Cast", [current], [operator.outputs[0].full_name], to=TensorProto.FLOAT,
                       name=scope.get_unique_operator_name("CastToFloat"))


def float64_scalers() -> dict[type, Callable[..., None]]:
    """`custom_conversion_functions` for a pipeline ending in a booster (see `_float64_scaler`)."""
    from sklearn.preprocessing import MaxAbsScaler, RobustScaler, StandardScaler

    return {t: _float64_scaler for t in (StandardScaler, RobustScaler, MaxAbsScaler)}


def _catboost_classifier_parser(scope: Any, model: Any, inputs: Any, custom_parsers: Any = None) -> Any:
    """skl2onnx's classifier parser takes scikit-learn classifiers (ClassifierMixin); a CatBoost
    classifier is none, so its `label` and `probabilities` are declared here."""
    from skl2onnx._supported_operators import get_model_alias
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    operator = scope.declare_local_operator(get_model_alias(type(model)), model)
    operator.inputs = inputs
    operator.outputs.append(scope.declare_local_variable("label", Int64TensorType()))
    operator.outputs.append(scope.declare_local_variable("probabilities", FloatTensorType()))
    return operator.outputs


@functools.cache
def register() -> None:
    """Register the boosters' converters with skl2onnx (once per process)."""
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    def add(model: type, alias: str, converter: Callable[..., None], classifier: bool, parser: Any = None) -> None:
        if classifier:
            update_registered_converter(model, alias, calculate_linear_classifier_output_shapes, converter,
                                        options=_CLASSIFIER_OPTIONS, parser=parser)
        else:
            update_registered_converter(model, alias, calculate_linear_regressor_output_shapes, converter)

    if "xgboost" in sys.modules or _importable("xgboost"):
        import xgboost

        add(xgboost.XGBClassifier, "MedserveXGBClassifier", _xgboost_converter, True)
        add(xgboost.XGBRegressor, "MedserveXGBRegressor", _xgboost_converter, False)
    if "lightgbm" in sys.modules or _importable("lightgbm"):
        import lightgbm

        add(lightgbm.LGBMClassifier, "MedserveLGBMClassifier", _lightgbm_converter, True)
        add(lightgbm.LGBMRegressor, "MedserveLGBMRegressor", _lightgbm_converter, False)
        add(LightGBMBoosterClassifier, "MedserveLightGBMBoosterClassifier", _lightgbm_converter, True)
        add(LightGBMBoosterRegressor, "MedserveLightGBMBoosterRegressor", _lightgbm_converter, False)
    if "catboost" in sys.modules or _importable("catboost"):
        import catboost

        add(catboost.CatBoostClassifier, "MedserveCatBoostClassifier", _catboost_converter, True,
            _catboost_classifier_parser)
        add(catboost.CatBoostRegressor, "MedserveCatBoostRegressor", _catboost_converter, False)


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None
