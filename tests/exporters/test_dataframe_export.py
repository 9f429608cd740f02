"""Pipelines fitted on pandas DataFrames, as data scientists build them: a ColumnTransformer that
selects columns by name (it used to end in scikit-learn's "Specifying the columns using strings
is only supported for dataframes") or by dtype (make_column_selector). The graph keeps medserve's
one-input-per-kind-of-column layout (tabular.py); the card names the frame's columns, and
`infer_records` sends records by those names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from sklearn.compose import ColumnTransformer, make_column_selector  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402

from medserve.exporters import ExportError, export  # noqa: E402

from conftest import running_server  # noqa: E402
from exporter_helpers import assert_config_matches_graph, read_card, run_published  # noqa: E402

NUMBERS = ["f0", "f1", "f2"]


def frame(seed: int, n: int, wards: tuple[str, ...] = ("icu", "general", "emergency")) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"f0": rng.normal(size=n), "ward": rng.choice(list(wards), n), "f1": rng.normal(size=n),
                       "f2": rng.normal(size=n)})
    df.loc[rng.random(n) < 0.1, "f1"] = np.nan
    y = (df.f0 + df.f1.fillna(0) + (df.ward == "icu") > 0.5).astype(np.int64).to_numpy()
    return df, y


def by_name() -> Any:
    """The issue's pipeline, verbatim: columns selected by name."""
    return make_pipeline(
        ColumnTransformer([("num", make_pipeline(SimpleImputer(), StandardScaler()), NUMBERS),
                           ("cat", OneHotEncoder(handle_unknown="ignore"), ["ward"])]),
        LogisticRegression(),
    )


def by_dtype() -> Any:
    return make_pipeline(
        ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(), StandardScaler()), make_column_selector(dtype_include=np.number)),
            ("cat", OneHotEncoder(handle_unknown="ignore"), make_column_selector(dtype_exclude=np.number)),
        ]),
        LogisticRegression(),
    )


@pytest.mark.parametrize("make", [by_name, by_dtype], ids=["by-name", "by-dtype"])
def test_a_pipeline_fitted_on_a_dataframe_exports(make: Any, tmp_path: Path) -> None:
    train, y = frame(0, 300)
    test, y_test = frame(1, 100, wards=("icu", "general", "oncology"))  # oncology: never seen
    model = make().fit(train, y)

    report = export(model, train[:64], tmp_path, "admission", heldout=(test, y_test), max_batch_size=64)

    assert all(p.passed and p.n_samples == 164 for p in report.parity), report.parity_table()
    card = read_card(report.card_path)
    assert card["feature_names"] == ["f0", "ward", "f1", "f2"]  # the frame's columns, in its order
    assert card["input_columns"] == {"numeric": NUMBERS, "categorical": ["ward"]}
    assert set(card["feature_deciles"]) == set(card["feature_ranges"]) == set(NUMBERS)
    assert_config_matches_graph(tmp_path / "admission")
    answers = run_published(report.model_path, {
        "numeric": test[NUMBERS].to_numpy(np.float32),
        "categorical": test[["ward"]].to_numpy(dtype=object).astype(str).astype(object),
    })
    rounded = test.astype({c: np.float32 for c in NUMBERS}).astype({c: np.float64 for c in NUMBERS})
    np.testing.assert_array_equal(answers["label"], model.predict(rounded))
    np.testing.assert_allclose(answers["probabilities"], model.predict_proba(rounded), atol=1e-4, rtol=1e-4)


def test_infer_records_sends_the_columns_by_name(tmp_path: Path) -> None:
    from medserve.clients import Client

    train, y = frame(2, 300)
    model = by_name().fit(train, y)
    export(model, train[:64], tmp_path, "admission", max_batch_size=64)
    test, _ = frame(3, 8)
    records = test.to_dict("records")  # NaN where a value is missing
    shuffled = [dict(reversed(list(r.items()))) for r in records]  # key order is irrelevant: names decide

    with running_server(tmp_path) as server, Client(server.target) as client:
        result = client.infer_records("admission", shuffled)

    rounded = test.astype({c: np.float32 for c in NUMBERS}).astype({c: np.float64 for c in NUMBERS})
    np.testing.assert_array_equal(result["label"], model.predict(rounded))
    np.testing.assert_allclose(result["probabilities"], model.predict_proba(rounded), atol=1e-4, rtol=1e-4)


def test_numeric_columns_by_name_make_one_table_input(tmp_path: Path) -> None:
    train, _ = frame(4, 200)
    target = (2 * train.f0 - train.f2).to_numpy()
    model = make_pipeline(ColumnTransformer([("num", make_pipeline(SimpleImputer(), StandardScaler()), ["f2", "f0"])]),
                          Ridge()).fit(train[NUMBERS], target)
    test, _ = frame(5, 50)

    report = export(model, train[NUMBERS][:32], tmp_path, "score", heldout=test[NUMBERS], max_batch_size=64)

    assert [(s.name, s.shape) for s in report.inputs] == [("input", (-1, 3))]
    assert read_card(report.card_path)["feature_names"] == NUMBERS
    assert all(p.passed for p in report.parity), report.parity_table()
    # Held-out frames may list the columns in another order: they are picked by name.
    report2 = export(model, train[NUMBERS][:32], tmp_path, "score", heldout=test[["f2", "f1", "f0"]], max_batch_size=64)
    assert report2.version == 2 and all(p.passed for p in report2.parity)


def test_a_frame_without_a_training_column_is_refused_by_name(tmp_path: Path) -> None:
    train, y = frame(6, 200)
    model = by_name().fit(train, y)
    with pytest.raises(ExportError, match=r"lacks the model's columns \['f2'\]"):
        export(model, train.drop(columns=["f2"])[:16], tmp_path, "admission")
    assert not (tmp_path / "admission").exists()
