"""XGBoost, LightGBM and CatBoost (medserve[gbm]): every family x task through a Pipeline fitted
on a DataFrame, alone on plain arrays, as raw Boosters; NaN routed as the library routes it,
categories unseen in training, threshold rounding for float32 inputs, and the converter gaps
refused by name before anything is published. Models are small (<= 50 trees) to stay quick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")
catboost = pytest.importorskip("catboost")

from sklearn.compose import ColumnTransformer, make_column_selector  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder  # noqa: E402

from medserve.exporters import UnsupportedModelError, export  # noqa: E402
from medserve.exporters.gbm import round_thresholds  # noqa: E402

from exporter_helpers import (  # noqa: E402
    assert_config_matches_graph,
    assert_within_recorded_tolerance,
    read_card,
    run_published,
    served_answers,
)

COLUMNS = ["age", "ward", "heart_rate", "lactate", "grade"]


def admissions(seed: int, n: int, wards: tuple[str, ...] = ("icu", "emergency", "general")) -> tuple[Any, dict[str, np.ndarray]]:
    """A hospital extract as a DataFrame: numbers with gaps (NaN), a text code, an integer code;
    targets for the three tasks."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.normal(60, 12, n),
        "ward": rng.choice(list(wards), n),
        "heart_rate": rng.normal(85, 12, n),
        "lactate": rng.gamma(2.0, 1.0, n),
        "grade": rng.integers(1, 4, n),
    })
    frame.loc[rng.random(n) < 0.15, "heart_rate"] = np.nan
    frame.loc[rng.random(n) < 0.15, "lactate"] = np.nan
    signal = (frame.age - 60) / 12 + (frame.heart_rate.fillna(85) - 85) / 12 + 1.5 * (frame.ward == "icu") + 0.5 * frame.grade
    noise = rng.normal(0, 0.5, n)
    binary = (signal + noise > 1.0).astype(np.int64).to_numpy()
    multi = binary + (frame.lactate.fillna(0) > 2.5).astype(np.int64).to_numpy()
    return frame, {"binary": binary, "multiclass": multi, "regression": (10 * signal + frame.lactate.fillna(1) + noise).to_numpy()}


def boosters(task: str) -> dict[str, Any]:
    small = {"n_estimators": 40, "max_depth": 4}
    if task == "regression":
        return {
            "xgboost": xgboost.XGBRegressor(**small),
            "lightgbm": lightgbm.LGBMRegressor(**small, num_leaves=15, verbose=-1),
            "catboost": catboost.CatBoostRegressor(iterations=40, depth=4, verbose=0, thread_count=1,
                                                   allow_writing_files=False, random_seed=0),
        }
    return {
        "xgboost": xgboost.XGBClassifier(**small),
        "lightgbm": lightgbm.LGBMClassifier(**small, num_leaves=15, verbose=-1),
        "catboost": catboost.CatBoostClassifier(iterations=40, depth=4, verbose=0, thread_count=1,
                                                allow_writing_files=False, random_seed=0),
    }


def pipeline(estimator: Any) -> Pipeline:
    """Columns picked by dtype (the numbers) and by name (the codes), as data scientists write it;
    the numbers keep their NaN for the booster to route."""
    prep = ColumnTransformer([
        ("numbers", "passthrough", make_column_selector(dtype_include=np.floating)),
        ("ward", OneHotEncoder(handle_unknown="ignore"), ["ward"]),
        ("grade", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), ["grade"]),
    ])
    return Pipeline([("prep", prep), ("model", estimator)])


def source_answers(model: Any, frame: Any, task: str) -> dict[str, np.ndarray]:
    """The source pipeline on the float32 values the FP32 input carries."""
    rounded = frame.copy()
    for column in ("age", "heart_rate", "lactate"):
        rounded[column] = rounded[column].astype(np.float32).astype(np.float64)
    if task == "regression":
        return {"prediction": np.asarray(model.predict(rounded)).reshape(-1, 1)}
    return {"label": np.asarray(model.predict(rounded)).ravel(), "probabilities": model.predict_proba(rounded)}


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
@pytest.mark.parametrize("library", ["xgboost", "lightgbm", "catboost"])
def test_pipeline_on_a_dataframe_exports_with_parity(library: str, task: str, tmp_path: Path) -> None:
    train, targets = admissions(0, 500)
    test, test_targets = admissions(1, 160, wards=("icu", "emergency", "general", "oncology"))  # oncology: unseen
    test.loc[test.index[:3], "grade"] = 7  # an unseen integer code
    model = pipeline(boosters(task)[library]).fit(train, targets[task])

    report = export(model, train[:32], tmp_path, "risk", heldout=(test, test_targets[task]), max_batch_size=64)

    assert report.framework == f"scikit-learn 1.9.1 + {library}" and "via skl2onnx" in report.converter
    assert {s.name: (s.datatype, s.shape) for s in report.inputs} == {
        "numeric": ("FP32", (-1, 3)), "categorical": ("BYTES", (-1, 1)), "categorical_int": ("INT64", (-1, 1)),
    }
    assert all(p.passed and p.n_samples == 192 for p in report.parity), report.parity_table()
    card = read_card(report.card_path)
    assert card["feature_names"] == COLUMNS
    assert card["input_columns"] == {"numeric": ["age", "heart_rate", "lactate"], "categorical": ["ward"],
                                     "categorical_int": ["grade"]}
    assert card["task"] == ("regression" if task == "regression" else "classification")
    assert card["reference"] and card["feature_deciles"]
    assert_config_matches_graph(tmp_path / "risk")

    # Independently: a fresh onnxruntime session on the published file, rows with NaN and unseen codes.
    feeds = {
        "numeric": test[["age", "heart_rate", "lactate"]].to_numpy(np.float32),
        "categorical": test[["ward"]].to_numpy(dtype=object).astype(str).astype(object),
        "categorical_int": test[["grade"]].to_numpy(np.int64),
    }
    assert np.isnan(feeds["numeric"]).any(axis=1).sum() > 20 and (test.ward == "oncology").sum() > 20
    answers = run_published(report.model_path, feeds)
    for output, expected in source_answers(model, test, task).items():
        assert_within_recorded_tolerance(report, output, answers[output], expected)


@pytest.mark.parametrize("library", ["xgboost", "lightgbm", "catboost"])
def test_a_booster_alone_on_an_array_with_nan(library: str, tmp_path: Path) -> None:
    train, targets = admissions(2, 400)
    x = train[["age", "heart_rate", "lactate", "grade"]].to_numpy(np.float64)
    model = boosters("binary")[library].fit(x, targets["binary"])
    test, test_targets = admissions(3, 120)
    x_test = test[["age", "heart_rate", "lactate", "grade"]].to_numpy(np.float64)

    report = export(model, x[:32], tmp_path, "alone", heldout=(x_test, test_targets["binary"]),
                    feature_names=["age", "heart_rate", "lactate", "grade"], class_labels=["no", "yes"])

    assert report.framework == library and [s.name for s in report.inputs] == ["input"]
    assert all(p.passed for p in report.parity), report.parity_table()
    assert report.batching.chosen_by == "measured" and report.batching.max_batch_size >= 64
    rounded = x_test.astype(np.float32)
    answers = run_published(report.model_path, {"input": rounded})
    assert_within_recorded_tolerance(report, "probabilities", answers["probabilities"],
                                     model.predict_proba(rounded.astype(np.float64)))
    assert report.metrics["roc_auc"] > 0.8


def test_raw_boosters_are_served_through_their_own_predictions(tmp_path: Path) -> None:
    train, targets = admissions(4, 400)
    x = train[["age", "heart_rate", "lactate", "grade"]].to_numpy(np.float64)
    xgb_binary = xgboost.train({"objective": "binary:logistic", "max_depth": 3}, xgboost.DMatrix(x, targets["binary"]), 30)
    xgb_regression = xgboost.train({"objective": "reg:squarederror", "max_depth": 3},
                                   xgboost.DMatrix(x, targets["regression"]), 30)
    lgb_multi = lightgbm.train({"objective": "multiclass", "num_class": 3, "num_leaves": 7, "verbose": -1},
                               lightgbm.Dataset(x, targets["multiclass"]), 30)
    lgb_regression = lightgbm.train({"objective": "regression", "num_leaves": 7, "verbose": -1},
                                    lightgbm.Dataset(x, targets["regression"]), 30)
    test, _ = admissions(5, 100)
    x_test = test[["age", "heart_rate", "lactate", "grade"]].to_numpy(np.float64)
    rounded = x_test.astype(np.float32)

    for name, booster in [("xgb_binary", xgb_binary), ("xgb_regression", xgb_regression),
                          ("lgb_multi", lgb_multi), ("lgb_regression", lgb_regression)]:
        report = export(booster, x[:32], tmp_path, name, heldout=x_test, max_batch_size=64)
        assert all(p.passed for p in report.parity), report.parity_table()
        answers = run_published(report.model_path, {"input": rounded})
        if isinstance(booster, xgboost.Booster):
            direct = booster.predict(xgboost.DMatrix(rounded.astype(np.float64)))
        else:
            direct = booster.predict(rounded.astype(np.float64))
        if name.endswith("regression"):
            assert_within_recorded_tolerance(report, "prediction", answers["prediction"], direct.reshape(-1, 1))
        else:
            probabilities = np.column_stack([1 - direct, direct]) if direct.ndim == 1 else direct
            assert_within_recorded_tolerance(report, "probabilities", answers["probabilities"], probabilities)
            np.testing.assert_array_equal(answers["label"], probabilities.argmax(axis=1))


def test_served_answers_match_the_pipeline(tmp_path: Path) -> None:
    """The real server, real gRPC: the published XGBoost pipeline answers like the source."""
    train, targets = admissions(6, 400)
    test, _ = admissions(7, 64, wards=("icu", "general", "oncology"))
    model = pipeline(boosters("binary")["xgboost"]).fit(train, targets["binary"])
    report = export(model, train[:32], tmp_path, "served", max_batch_size=64)
    feeds = {
        "numeric": test[["age", "heart_rate", "lactate"]].to_numpy(np.float32),
        "categorical": test[["ward"]].to_numpy(dtype=object).astype(str).astype(object),
        "categorical_int": test[["grade"]].to_numpy(np.int64),
    }
    answers = served_answers(tmp_path, "served", feeds)
    expected = source_answers(model, test, "binary")
    assert_within_recorded_tolerance(report, "label", answers["label"], expected["label"])
    assert_within_recorded_tolerance(report, "probabilities", answers["probabilities"], expected["probabilities"])


def test_lightgbm_thresholds_keep_float32_inputs_on_their_side(tmp_path: Path) -> None:
    """LightGBM compares float64 inputs with float64 thresholds. Rows placed on the float32
    neighbours of its thresholds (where rounding a threshold to the nearest float32 would send
    them down the other branch) answer exactly as the booster does on those float32 values."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    model = lightgbm.LGBMClassifier(n_estimators=30, num_leaves=7, verbose=-1).fit(x, y)
    thresholds: list[tuple[int, float]] = []

    def walk(node: dict[str, Any]) -> None:
        if "split_feature" in node:
            thresholds.append((node["split_feature"], float(node["threshold"])))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in model.booster_.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    rows = []
    for feature, t in thresholds:
        below = np.float32(t)
        neighbours = {below, np.nextafter(below, np.float32(-np.inf)), np.nextafter(below, np.float32(np.inf))}
        for value in neighbours:
            row = x[len(rows) % len(x)].astype(np.float32)
            row[feature] = value
            rows.append(row)
    edge = np.array(rows, dtype=np.float64)
    nearest_above = sum(1 for _, t in thresholds if np.float64(np.float32(t)) > t)
    assert nearest_above > 0, "no threshold where nearest rounding would misroute: the test proves nothing"

    report = export(model, x[:32], tmp_path, "edges", heldout=edge, max_batch_size=64)

    assert all(p.passed and p.mismatches == 0 for p in report.parity), report.parity_table()
    answers = run_published(report.model_path, {"input": edge.astype(np.float32)})
    np.testing.assert_array_equal(answers["label"], model.predict(edge))


def test_round_thresholds_routes_every_float32_like_float64() -> None:
    rng = np.random.default_rng(9)
    t = rng.normal(size=2000) * 10.0 ** rng.integers(-3, 4, 2000)
    x = np.concatenate([t.astype(np.float32), np.nextafter(t.astype(np.float32), np.float32(np.inf)),
                        np.nextafter(t.astype(np.float32), np.float32(-np.inf))])
    for mode, compare in [("BRANCH_LEQ", np.less_equal), ("BRANCH_LT", np.less), ("BRANCH_GT", np.greater),
                          ("BRANCH_GTE", np.greater_equal)]:
        rounded = round_thresholds(t, [mode] * len(t))
        assert rounded.dtype == np.float32
        for shift in range(3):
            xs = x[shift * len(t):(shift + 1) * len(t)]
            np.testing.assert_array_equal(compare(xs, rounded), compare(xs.astype(np.float64), t), err_msg=mode)
    assert round_thresholds([1e300], ["BRANCH_LEQ"])[0] == np.finfo(np.float32).max


@pytest.mark.parametrize(
    ("make", "part"),
    [
        (lambda: catboost.CatBoostClassifier(iterations=5, verbose=0, cat_features=["ward"], allow_writing_files=False,
                                             thread_count=1), "cat_features"),
        (lambda: xgboost.XGBClassifier(n_estimators=5, objective="binary:logitraw"), "'binary:logitraw'"),
        (lambda: xgboost.XGBRegressor(n_estimators=5, booster="gblinear"), "booster 'gblinear'"),
        (lambda: lightgbm.LGBMRegressor(n_estimators=5, linear_tree=True, verbose=-1), "linear_tree"),
        (lambda: lightgbm.LGBMClassifier(n_estimators=5, objective="multiclassova", num_class=3, verbose=-1),
         "'multiclassova'"),
        (lambda: lightgbm.LGBMRegressor(n_estimators=5, objective="mape", verbose=-1), "'mape'"),
        (lambda: xgboost.XGBClassifier(n_estimators=5, enable_categorical=True), "enable_categorical"),
        (lambda: lightgbm.LGBMClassifier(n_estimators=5, verbose=-1), "pandas 'category' columns"),
    ],
)
def test_a_converter_gap_is_refused_by_name(make: Any, part: str, tmp_path: Path) -> None:
    train, targets = admissions(10, 200)
    estimator = make()
    is_regression = "Regressor" in type(estimator).__name__
    task = "regression" if is_regression else ("multiclass" if "multiclassova" in part else "binary")
    if "cat_features" in part:
        frame = train[["age", "ward", "heart_rate"]]
        model = estimator.fit(frame, targets[task])
        sample = frame[:16]
    elif "categorical" in part or "category" in part:  # the library's own category splits on a 'category' column
        frame = train[["age", "ward", "heart_rate"]].astype({"ward": "category"})
        model = estimator.fit(frame, targets[task])
        sample = frame[:16]
    else:
        x = train[["age", "heart_rate", "lactate", "grade"]].to_numpy(np.float64)
        model = estimator.fit(x, targets[task])
        sample = x[:16]
    with pytest.raises(UnsupportedModelError, match=part):
        export(model, sample, tmp_path, "gap", max_batch_size=64)
    assert not (tmp_path / "gap").exists()


def test_float64_thresholds_that_float32_inputs_cross_are_named(tmp_path: Path) -> None:
    """A LightGBM split at 1 + 9.95e-7 (float64): a client's 1 + 1.0e-6 lies above it, its
    float32 rounding (1 + 9.54e-7) below. The graph answers as the rounded row (parity holds),
    and the report and card name the rows and the feature rather than hiding them."""
    from sklearn.linear_model import LinearRegression

    i = np.arange(400)
    rng = np.random.default_rng(11)
    x = np.column_stack([1.0 + 1e-8 * (i % 200), rng.normal(size=400)])
    y = ((i % 200) >= 100).astype(np.float64) * 10
    model = lightgbm.LGBMRegressor(n_estimators=1, num_leaves=2, min_child_samples=5, learning_rate=1.0,
                                   verbose=-1).fit(x, y)
    held = np.column_stack([1.0 + np.linspace(9.0e-7, 11e-7, 21), rng.normal(size=21)])

    report = export(model, x[:32], tmp_path, "dose", heldout=held, feature_names=["dose", "noise"], max_batch_size=64)

    assert all(p.passed for p in report.parity)
    rounding = report.input_rounding
    assert rounding is not None and rounding.rows == 53
    assert rounding.changed_rows == 2 and dict(rounding.features) == {"dose": 2}
    assert rounding.max_abs_change["prediction"] == 10.0
    assert "2 of 53 row(s) cross a float64 threshold" in report.parity_table() and "'dose' (2)" in report.parity_table()
    assert read_card(report.card_path)["parity_float32_inputs"] == {
        "rows": 53, "changed_rows": 2, "outputs": {"prediction": 2}, "features": {"dose": 2},
        "max_abs_change": {"prediction": 10.0}}

    linear = export(LinearRegression().fit(x, y), x[:32], tmp_path, "dose_linear", heldout=held, max_batch_size=64)
    assert linear.input_rounding is not None and linear.input_rounding.changed_rows == 0  # float32 noise only


@pytest.mark.parametrize("library", ["xgboost", "lightgbm", "catboost"])
def test_a_booster_fitted_on_a_dataframe_keeps_its_column_names(library: str, tmp_path: Path) -> None:
    """Fitted on a numeric DataFrame (XGBoost then names its split features after the columns,
    which onnxmltools cannot read: a copy without the names is converted)."""
    columns = ["age", "heart_rate", "lactate", "grade"]
    train, targets = admissions(12, 300)
    model = boosters("regression")[library].fit(train[columns], targets["regression"])
    test, _ = admissions(13, 80)

    report = export(model, train[columns][:32], tmp_path, "frame", heldout=test[columns[::-1]], max_batch_size=64)

    assert [(s.name, s.shape) for s in report.inputs] == [("input", (-1, 4))]
    assert read_card(report.card_path)["feature_names"] == columns
    assert all(p.passed for p in report.parity), report.parity_table()
    rounded = test[columns].astype(np.float32)
    answers = run_published(report.model_path, {"input": rounded.to_numpy()})
    assert_within_recorded_tolerance(report, "prediction", answers["prediction"],
                                     np.asarray(model.predict(rounded.astype(np.float64))).reshape(-1, 1))


@pytest.mark.parametrize("scaler", ["standard", "robust", "maxabs"])
@pytest.mark.parametrize("library", ["xgboost", "catboost"])
def test_a_scaler_before_a_booster_computes_as_scikit_learn_does(library: str, scaler: str, tmp_path: Path) -> None:
    """Boosters split on float32 cut points taken from the (scaled) training values; a scaler
    computed in float32 lands an ulp away and flips those splits (XGBoost: 8 probabilities off by
    up to 0.08 on these 201 rows before), so scalers run in float64 and the parity is exact."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler, RobustScaler, StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    prep = {"standard": StandardScaler(), "robust": RobustScaler(), "maxabs": MaxAbsScaler()}[scaler]
    model = make_pipeline(prep, boosters("binary")[library]).fit(x[:400], y[:400])

    report = export(model, x[:32], tmp_path, "scaled", heldout=(x[400:], y[400:]), max_batch_size=64)

    assert all(p.passed and p.mismatches == 0 for p in report.parity), report.parity_table()
    answers = run_published(report.model_path, {"input": x.astype(np.float32)})
    np.testing.assert_array_equal(answers["label"], model.predict(x.astype(np.float32).astype(np.float64)))


def test_a_converter_failure_past_the_checks_is_refused_naming_model_and_converter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a gap slip past check_convertible (here: 'mape' let through on purpose), the
    converter's own RuntimeError becomes UnsupportedModelError naming the model and converter."""
    from medserve.exporters import gbm

    monkeypatch.setattr(gbm, "LIGHTGBM_OBJECTIVES", (*gbm.LIGHTGBM_OBJECTIVES, "mape"))
    train, targets = admissions(14, 200)
    x = train[["age", "heart_rate", "lactate", "grade"]].to_numpy(np.float64)
    model = lightgbm.LGBMRegressor(n_estimators=5, objective="mape", verbose=-1).fit(x, targets["regression"] + 100)
    with pytest.raises(UnsupportedModelError, match=r"LGBMRegressor: onnxmltools 1\.16\.0 cannot convert it: RuntimeError"):
        export(model, x[:16], tmp_path, "mape", max_batch_size=64)
    assert not (tmp_path / "mape").exists()
