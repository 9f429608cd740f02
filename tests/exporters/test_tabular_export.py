"""Mixed numeric/categorical tables through a ColumnTransformer: one typed graph input per kind
of column (numeric FP32, categorical BYTES, categorical_int INT64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from medserve.exporters import ExportError, export
from medserve.protos import model_config_pb2 as mc

from exporter_helpers import (
    assert_config_matches_graph,
    assert_within_recorded_tolerance,
    read_card,
    read_config,
    served_answers,
)

COLUMNS = ["age", "ward", "heart_rate", "sex", "triage_grade", "lactate"]


def admissions(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An object table as a hospital extract gives it: numbers, text codes and integer codes."""
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 12, n)
    ward = rng.choice(["icu", "emergency", "general"], n)
    heart_rate = rng.normal(85, 12, n)
    sex = rng.choice(["f", "m"], n)
    grade = rng.integers(1, 4, n)
    lactate = rng.gamma(2.0, 1.0, n)
    table = np.empty((n, len(COLUMNS)), dtype=object)
    for j, column in enumerate([age, ward, heart_rate, sex, grade, lactate]):
        table[:, j] = column.tolist()
    signal = (age - 60) / 12 + (heart_rate - 85) / 12 + 1.5 * (ward == "icu") + 0.8 * grade + lactate
    y = (signal + rng.normal(0, 0.7, n) > np.median(signal)).astype(np.int64)
    return table, y


def mixed_pipeline(classifier: object) -> Pipeline:
    prep = ColumnTransformer(
        [
            ("numbers", make_pipeline(SimpleImputer(), StandardScaler()), [0, 2, 5]),
            ("codes", OneHotEncoder(handle_unknown="ignore"), [1, 3]),
            ("grade", OneHotEncoder(handle_unknown="ignore"), [4]),
        ]
    )
    return Pipeline([("prep", prep), ("model", classifier)])


@pytest.mark.parametrize("classifier", [LogisticRegression(max_iter=1000), RandomForestClassifier(30, random_state=0)])
def test_mixed_table_becomes_typed_inputs(classifier: object, tmp_path: Path) -> None:
    x_train, y_train = admissions(0, 400)
    x_test, y_test = admissions(1, 150)
    model = mixed_pipeline(classifier).fit(x_train, y_train)

    report = export(model, x_train[:16], tmp_path, "admission", feature_names=COLUMNS, heldout=(x_test, y_test))

    assert {s.name: (s.datatype, s.shape) for s in report.inputs} == {
        "numeric": ("FP32", (-1, 3)),
        "categorical": ("BYTES", (-1, 2)),
        "categorical_int": ("INT64", (-1, 1)),
    }
    assert all(p.passed and p.n_samples == 166 for p in report.parity)
    card = read_card(report.card_path)
    assert card["input_columns"] == {
        "numeric": ["age", "heart_rate", "lactate"],
        "categorical": ["ward", "sex"],
        "categorical_int": ["triage_grade"],
    }
    assert card["feature_names"] == COLUMNS
    config = read_config(tmp_path / "admission" / "config.pbtxt")
    assert {t.name: t.data_type for t in config.input} == {
        "numeric": mc.TYPE_FP32,
        "categorical": mc.TYPE_STRING,
        "categorical_int": mc.TYPE_INT64,
    }
    assert_config_matches_graph(tmp_path / "admission")
    # A mixed table is a table: its max_batch_size is measured on the sample's rows (text included).
    assert card["batching"]["chosen_by"] == "measured"
    assert config.max_batch_size == card["batching"]["max_batch_size"] >= 64

    # A client sends the columns grouped by kind, as the card lists them.
    feeds = {
        "numeric": x_test[:, [0, 2, 5]].astype(np.float32),
        "categorical": x_test[:, [1, 3]].astype(str).astype(object),
        "categorical_int": x_test[:, [4]].astype(np.int64),
    }
    answers = served_answers(tmp_path, "admission", feeds)
    source = x_test.copy()
    source[:, [0, 2, 5]] = feeds["numeric"].astype(np.float64)
    assert_within_recorded_tolerance(report, "label", answers["label"], model.predict(source))
    assert_within_recorded_tolerance(report, "probabilities", answers["probabilities"], model.predict_proba(source))


def test_wrong_kind_of_value_is_reported_without_the_value(tmp_path: Path) -> None:
    x_train, y_train = admissions(0, 200)
    model = mixed_pipeline(LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    bad = x_train[:8].copy()
    bad[3, 2] = "tachycardic-137"  # text in the numeric heart_rate column
    with pytest.raises(ExportError, match="'numeric'") as caught:
        export(model, bad, tmp_path, "admission")
    assert "tachycardic" not in str(caught.value) and "137" not in str(caught.value)
    assert not (tmp_path / "admission").exists()
