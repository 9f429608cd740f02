"""Every scikit-learn family a hospital trains: export, parity figures, and a fresh onnxruntime
session on the published file answering like the source model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from medserve.exporters import export

from exporter_helpers import (
    assert_config_matches_graph,
    assert_within_recorded_tolerance,
    breast_cancer,
    diabetes,
    fit,
    read_card,
    served_answers,
)

CLASSIFIERS: dict[str, Callable[[], Any]] = {
    "logistic_regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    "svc_probability": lambda: make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)),
    "linear_svc": lambda: make_pipeline(StandardScaler(), LinearSVC(random_state=0)),
    "random_forest": lambda: RandomForestClassifier(n_estimators=25, random_state=0),
    "gradient_boosting": lambda: GradientBoostingClassifier(n_estimators=30, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=30, random_state=0),
    "imputer_scaler_pipeline": lambda: make_pipeline(
        SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=1000)
    ),
}
REGRESSORS: dict[str, Callable[[], Any]] = {
    "linear_regression": LinearRegression,
    "ridge": Ridge,
    "random_forest": lambda: RandomForestRegressor(n_estimators=25, random_state=0),
    "gradient_boosting": lambda: GradientBoostingRegressor(n_estimators=50, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingRegressor(max_iter=50, random_state=0),
}


def _with_missing(x: np.ndarray) -> np.ndarray:
    """Every 7th row misses two measurements (NaN), as real charts do."""
    x = x.copy()
    x[::7, 3] = np.nan
    x[3::7, 20 % x.shape[1]] = np.nan
    return x


@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_binary_classifier_family(family: str, tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = breast_cancer()
    if family in ("hist_gradient_boosting", "imputer_scaler_pipeline"):
        x_train, x_test = _with_missing(x_train), _with_missing(x_test)
    model = fit(CLASSIFIERS[family](), x_train, y_train)

    report = export(model, x_train[:20], tmp_path, "bc", class_labels=["malignant", "benign"], heldout=(x_test, y_test))

    by_output = {p.output: p for p in report.parity}
    score_output = "probabilities" if hasattr(model, "predict_proba") else "scores"
    assert set(by_output) == {"label", score_output}
    assert all(p.passed and p.n_samples == 20 + len(y_test) for p in report.parity)
    assert by_output["label"].max_abs_diff == 0 and by_output["label"].tolerance is None
    assert by_output[score_output].max_abs_diff is not None and by_output[score_output].max_abs_diff < 1e-4
    assert report.metrics["n_samples"] == len(y_test) and report.metrics["accuracy"] > 0.85
    assert report.metrics["roc_auc"] > 0.9

    answers = served_answers(tmp_path, "bc", {"input": x_test.astype(np.float32)})
    source_x = x_test.astype(np.float32).astype(np.float64)
    assert_within_recorded_tolerance(report, "label", answers["label"], model.predict(source_x))
    if score_output == "probabilities":
        assert answers["probabilities"].shape == (len(y_test), 2)
        assert_within_recorded_tolerance(report, "probabilities", answers["probabilities"], model.predict_proba(source_x))
    else:
        assert_within_recorded_tolerance(report, "scores", answers["scores"][:, 0], model.decision_function(source_x))
    assert read_card(report.card_path)["class_labels"] == ["malignant", "benign"]
    assert_config_matches_graph(tmp_path / "bc")


@pytest.mark.parametrize("family", sorted(REGRESSORS))
def test_regressor_family(family: str, tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = diabetes()
    if family == "hist_gradient_boosting":
        x_train, x_test = _with_missing(x_train), _with_missing(x_test)
    model = REGRESSORS[family]().fit(x_train, y_train)

    report = export(model, x_train[:20], tmp_path, "dia", heldout=(x_test, y_test))

    (parity,) = report.parity
    assert parity.output == "prediction" and parity.passed and parity.n_samples == 20 + len(y_test)
    assert parity.max_abs_diff is not None and parity.max_abs_diff < 1e-2  # targets are 25..346
    assert set(report.metrics) == {"r2", "mae", "rmse", "n_samples"} and report.metrics["r2"] > 0.2

    answers = served_answers(tmp_path, "dia", {"input": x_test.astype(np.float32)})
    expected = model.predict(x_test.astype(np.float32).astype(np.float64))
    assert answers["prediction"].shape == (len(y_test), 1)
    assert_within_recorded_tolerance(report, "prediction", answers["prediction"][:, 0], expected)
    assert_config_matches_graph(tmp_path / "dia")


def test_multiclass_string_labels(tmp_path: Path) -> None:
    """Classes trained as strings come back as BYTES labels and become the card's class_labels."""
    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    model = RandomForestClassifier(n_estimators=20, random_state=0).fit(x[::2], names[::2])

    report = export(model, x[::2][:10], tmp_path, "iris", heldout=(x[1::2], names[1::2]))

    assert {s.name: s.datatype for s in report.outputs} == {"label": "BYTES", "probabilities": "FP32"}
    answers = served_answers(tmp_path, "iris", {"input": x[1::2].astype(np.float32)})
    np.testing.assert_array_equal(answers["label"].astype(str), model.predict(x[1::2].astype(np.float32)))
    card = read_card(report.card_path)
    assert card["class_labels"] == ["setosa", "versicolor", "virginica"]
    assert report.metrics["accuracy"] > 0.85 and "roc_auc" in report.metrics
    assert_config_matches_graph(tmp_path / "iris")


def test_a_ward_of_169_patients_is_answered_in_one_request(tmp_path: Path) -> None:
    """More rows than max_batch_size: the server runs the request in parts of at most 64 rows and
    answers it once, equal to the source model's output."""
    from medserve.clients import Client

    from conftest import running_server

    x_train, y_train, x_test, _ = breast_cancer(n_train=400)
    model = fit(RandomForestClassifier(n_estimators=25, random_state=0), x_train, y_train)
    report = export(model, x_train[:32], tmp_path / "repo", "ward_rf", max_batch_size=64)
    ward = np.concatenate([x_test, x_train])[:169].astype(np.float32)
    with running_server(tmp_path / "repo") as server, Client(server.target, timeout_s=30) as client:
        result = client.infer("ward_rf", {report.inputs[0].name: ward})
        stats = client.model_statistics("ward_rf")[0]
    assert result["label"].shape == (169,) and result["probabilities"].shape == (169, 2)
    np.testing.assert_array_equal(result["label"], model.predict(ward))
    assert_within_recorded_tolerance(report, "probabilities", result["probabilities"], model.predict_proba(ward))
    assert stats.inference_count == 169 and stats.execution_count == 3  # 64 + 64 + 41 rows
