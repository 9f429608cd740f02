"""scikit-learn estimators and pipelines -> ONNX with skl2onnx; XGBoost, LightGBM and CatBoost
models, alone or ending a Pipeline, take the same path with the converters `gbm` registers.

Graph signature:
- a numeric table is one input `input`, FP32 [-1, n_features];
- a table whose leading ColumnTransformer encodes categories gets one input per kind of column
  (`numeric`, `categorical`, `categorical_int`; see `tabular.py`);
- classifiers answer `label` (the class as trained, INT64 or BYTES) and `probabilities`
  (FP32 [-1, n_classes], a plain tensor: zipmap off), or `scores` (decision function) when the
  model has no predict_proba (LinearSVC); regressors answer `prediction` (FP32 [-1, n_targets]).

Parity feeds the source model the float32-rounded values the FP32 input carries, so the check
measures the conversion rather than the input's precision. Labels must match exactly. What that
rounding itself changes in the source model's answers is reported beside it (`rounding.py`).
A model fitted on a pandas DataFrame takes frames (columns by name, `frames.py`) and its card
names the frame's columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import skl2onnx
import sklearn
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import is_classifier, is_regressor
from sklearn.pipeline import Pipeline

from . import frames, gbm, metrics, rounding, tabular
from .conversion import Arrays, Conversion
from .errors import ExportError, UnsupportedModelError
from .parity import Tolerance
from .skl2onnx_fixes import custom_converters
from .specs import graph_signature

DEFAULT_OPSET = 18
ML_OPSET = 3  # ai.onnx.ml 3: TreeEnsemble with missing-value routing, supported by onnxruntime >= 1.10
# float32 graph vs float64 scikit-learn: sums over hundreds of trees or features drift by ~1e-6 relative.
VALUE_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)


def _final_estimator(model: Any) -> Any:
    while isinstance(model, Pipeline):
        model = model.steps[-1][1]
    return model


def _rename_outputs(model: onnx.ModelProto, names: Mapping[str, str]) -> None:
    """Give graph outputs stable, readable names (every reference to them is renamed)."""
    for node in model.graph.node:
        node.output[:] = [names.get(n, n) for n in node.output]
        node.input[:] = [names.get(n, n) for n in node.input]
    for output in model.graph.output:
        output.name = names.get(output.name, output.name)


def _normalize_opsets(model: onnx.ModelProto) -> None:
    """One entry per domain, sorted: skl2onnx lists domains in set order, which changes with
    Python's per-process string hashing, and sometimes twice; the bytes must be reproducible."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    del model.opset_import[:]
    for domain in sorted(versions):
        model.opset_import.add(domain=domain, version=versions[domain])


def _single_input(layout: tabular.TableLayout) -> bool:
    return [g.name for g in layout.groups] == ["input"]


def _column_output(array: np.ndarray, rank: int) -> np.ndarray:
    return array.reshape(len(array), 1) if array.ndim == 1 and rank == 2 else array


def _numeric_table(n_features: int) -> Any:
    def feeds(table: Any) -> dict[str, np.ndarray]:
        try:
            array = np.asarray(table, dtype=np.float64).astype(np.float32)
        except (TypeError, ValueError):
            raise ExportError("the table has non-numeric values; this model takes one FP32 input") from None
        if array.ndim != 2 or array.shape[1] != n_features:
            raise ExportError(f"expected a table of shape [rows, {n_features}], got {list(array.shape)}")
        return {"input": array}

    return feeds


def convert(model: Any, sample: Any, *, opset: int | None = None) -> Conversion:
    """Convert a fitted estimator or Pipeline; `sample` is a 2-D table like the training data
    (a DataFrame too, when the model was fitted on one). XGBoost, LightGBM and CatBoost models,
    alone or ending a Pipeline, convert through the converters `gbm` registers."""
    if gbm.is_booster(model):
        model = gbm.as_estimator(model)
    library = gbm.library_of(_final_estimator(model))
    if library is not None:
        gbm.register()
        gbm.check_convertible(_final_estimator(model))
    if not (is_classifier(model) or is_regressor(model)):
        raise UnsupportedModelError(f"{type(model).__name__} is neither a classifier nor a regressor")
    classifier = is_classifier(model)
    has_proba = classifier and hasattr(model, "predict_proba")

    layout = tabular.find_layout(model)
    if layout is None and (frames.column_names(model) is not None or tabular.leading_column_transformer(model)):
        layout = tabular.numeric_layout(model)  # one FP32 input; the frame's names or selectors resolved
    if layout is None:
        n_features = int(model.n_features_in_)
        initial_types = [("input", FloatTensorType([None, n_features]))]
        feeds = _numeric_table(n_features)
        to_convert = model

        def source_table(table: Any) -> np.ndarray:
            return feeds(table)["input"].astype(np.float64)

        def given(table: Any) -> np.ndarray:
            feeds(table)
            return np.asarray(table, dtype=np.float64)

        def to_source(array: np.ndarray) -> Any:
            return array

        numeric = list(range(n_features))
    else:
        initial_types = layout.initial_types()
        feeds = layout.feeds
        to_convert = tabular.for_conversion(model, layout)
        source_table, given, to_source, numeric = layout.source_table, layout.given, layout.to_source, layout.numeric

    feeds(sample)  # a sample that does not fit the model fails here, before the conversion
    # Always name the classifier's options: inside a Pipeline skl2onnx otherwise asks for zipmap,
    # which converters without probabilities (LinearSVC) reject.
    options: dict[int, dict[str, Any]] = {id(_final_estimator(to_convert)): {"zipmap": False} if has_proba else {}}
    if not classifier:
        options = {}
    with warnings.catch_warnings(), gbm.converter_errors(library, _final_estimator(model)):
        # skl2onnx reads SVC.probA_/probB_, deprecated with SVC(probability=True) in scikit-learn 1.9.
        warnings.filterwarnings("ignore", message=r"Attribute `prob[AB]_` was deprecated", category=FutureWarning)
        onx = convert_sklearn(
            to_convert,
            initial_types=initial_types,
            name=type(model).__name__,  # skl2onnx's default is a random UUID: bytes must be reproducible
            target_opset={"": opset or DEFAULT_OPSET, "ai.onnx.ml": ML_OPSET},
            options=options or None,
            # Boosters: scalers in float64, as scikit-learn computes them (gbm.float64_scalers).
            custom_conversion_functions={**custom_converters(), **(gbm.float64_scalers() if library else {})},
        )
    renames = {"variable": "prediction"} if not classifier else ({} if has_proba else {"probabilities": "scores"})
    _rename_outputs(onx, renames)
    _normalize_opsets(onx)
    _, outputs = graph_signature(onx)
    ranks = {o.name: len(o.shape) for o in outputs}

    def reference(table: Any) -> dict[str, np.ndarray]:
        return predict(source_table(table))

    def predict(x: Any) -> dict[str, np.ndarray]:
        if not classifier:
            return {"prediction": _column_output(np.asarray(model.predict(x)), ranks.get("prediction", 2))}
        labels = np.asarray(model.predict(x))
        result = {"label": labels.ravel() if labels.ndim == 2 and labels.shape[1] == 1 else labels}  # CatBoost: [n, 1]
        if has_proba:
            result["probabilities"] = np.asarray(model.predict_proba(x))
        else:
            result["scores"] = _column_output(np.asarray(model.decision_function(x)), ranks.get("scores", 2))
        return result

    classes = list(getattr(model, "classes_", []))

    def measure(outputs: Arrays, targets: np.ndarray) -> dict[str, float | int]:
        if not classifier:
            return metrics.regression_metrics(targets, outputs["prediction"])
        index = {c: i for i, c in enumerate(classes)}
        try:
            y_true = np.array([index[t] for t in np.asarray(targets).ravel().tolist()])
        except KeyError:
            raise ExportError("held-out targets contain a class the model was not trained on") from None
        y_pred = np.array([index[p] for p in np.asarray(outputs["label"]).ravel().tolist()])
        scores = outputs.get("probabilities", outputs.get("scores"))
        if not has_proba and len(classes) > 2:
            scores = None  # decision scores do not sum to one: no multi-class ROC AUC
        return metrics.classification_metrics(y_true, y_pred, scores, len(classes))

    string_classes = classifier and all(isinstance(c, str) for c in classes)
    framework, framework_version, converter = "scikit-learn", sklearn.__version__, f"skl2onnx {skl2onnx.__version__}"
    if library is not None:
        framework_version, converter_name = gbm.versions(library)
        framework = library if not isinstance(model, Pipeline) else f"scikit-learn {sklearn.__version__} + {library}"
        converter = f"{converter_name} via skl2onnx {skl2onnx.__version__}"
    tolerances = {o.name: (None if o.name == "label" else VALUE_TOLERANCE) for o in outputs}
    found_names = frames.column_names(model)

    def input_rounding(datasets: Sequence[Any], feature_names: Sequence[str] | None) -> rounding.InputRounding:
        return rounding.float32_rounding(datasets, given, lambda t: predict(to_source(t)), numeric, tolerances,
                                         feature_names)

    return Conversion(
        model_bytes=onx.SerializeToString(),
        framework=framework,
        framework_version=framework_version,
        converter=converter,
        feeds=feeds,
        reference=reference,
        tolerances=tolerances,
        metrics=measure,
        task="classification" if classifier else "regression",
        feature_names=tuple(str(n) for n in found_names) if found_names is not None else None,
        class_labels=tuple(str(c) for c in classes) if string_classes else None,
        n_features=int(model.n_features_in_),
        n_classes=len(classes) if classifier else None,
        column_groups=None if layout is None or _single_input(layout) else {g.name: g.columns for g in layout.groups},
        input_rounding=input_rounding,
    )
