"""model_card.json: provenance, signature, quality and parity figures, and the true SHA-256."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sklearn
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier

from medserve.exporters import TrainingData, export
from medserve.protos import grpc_service_pb2 as pb

from exporter_helpers import breast_cancer, read_card, read_config


def test_card_describes_the_published_version(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = breast_cancer()
    features = [str(f) for f in load_breast_cancer().feature_names]
    model = GradientBoostingClassifier(n_estimators=20, random_state=0).fit(x_train, y_train)
    before = datetime.now(UTC).replace(microsecond=0)

    report = export(
        model,
        x_train[:12],
        tmp_path,
        "bc_gbm",
        version=3,
        feature_names=features,
        class_labels=["malignant", "benign"],
        description="demo",
        training_data=TrainingData("WDBC, 400 rows", 400),
        heldout=(x_test, y_test),
    )

    card = read_card(report.card_path)
    assert card["model_sha256"] == hashlib.sha256(report.model_path.read_bytes()).hexdigest() == report.model_sha256
    assert {k: card[k] for k in ("schema_version", "name", "version", "framework", "exporter", "task")} == {
        "schema_version": 1,
        "name": "bc_gbm",
        "version": 3,
        "framework": "scikit-learn",
        "exporter": "medserve.exporters",
        "task": "classification",
    }
    assert card["framework_version"] == sklearn.__version__ and card["exporter_version"]
    assert card["converter"].startswith("skl2onnx ") and card["opset"] == report.opset > 0
    assert card["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert card["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]
    assert card["feature_names"] == features and card["class_labels"] == ["malignant", "benign"]
    assert card["input_columns"] is None
    assert card["description"] == "demo"
    assert card["training_data"] == {"description": "WDBC, 400 rows", "n_samples": 400}
    assert card["metrics"] == dict(report.metrics) and set(card["metrics"]) == {"accuracy", "roc_auc", "n_samples"}
    assert [p["output"] for p in card["parity"]] == ["label", "probabilities"]
    label, proba = card["parity"]
    assert label["tolerance"] == "exact" and label["max_abs_diff"] == 0 and label["n_samples"] == 12 + len(y_test)
    assert proba["tolerance"] == {"atol": 1e-4, "rtol": 1e-4} and 0 <= proba["max_abs_diff"] < 1e-4
    batching = card["batching"]
    assert batching["chosen_by"] == "measured" and batching["budget_ms"] == 2.0
    assert batching["max_batch_size"] == read_config(report.config_path).max_batch_size >= 64
    assert batching["median_ms_by_rows"] and all(v > 0 for v in batching["median_ms_by_rows"].values())
    created = datetime.fromisoformat(card["created_at"])
    assert card["created_at"].endswith("Z") and before <= created <= datetime.now(UTC) + timedelta(seconds=1)


def test_card_without_optional_facts(tmp_path: Path) -> None:
    x_train, y_train, _, _ = breast_cancer()
    model = GradientBoostingClassifier(n_estimators=5, random_state=0).fit(x_train, y_train)
    card = read_card(export(model, x_train[:5], tmp_path, "bare").card_path)
    assert card["feature_names"] is None and card["class_labels"] is None and card["training_data"] is None
    assert card["metrics"] == {} and card["description"] is None
    assert card["batching"]["chosen_by"] == "measured"  # a table, and no max_batch_size was given


def test_card_has_percentile_feature_ranges_for_numeric_tables(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from medserve.exporters import export

    from exporter_helpers import breast_cancer, read_card

    x_train, y_train, x_test, y_test = breast_cancer()
    names = [f"f{i}" for i in range(x_train.shape[1])]
    model = LogisticRegression(max_iter=5000).fit(x_train, y_train)
    report = export(model, x_train[:20], tmp_path, "bc", feature_names=names, heldout=(x_test, y_test))
    ranges = read_card(report.card_path)["feature_ranges"]
    seen = np.concatenate([x_train[:20], x_test])
    assert list(ranges) == names
    for i, name in enumerate(names):
        low, high = ranges[name]
        assert seen[:, i].min() <= low <= high <= seen[:, i].max()
        assert (low, high) == pytest.approx(tuple(np.percentile(seen[:, i], [1, 99])), rel=1e-5, abs=1e-6)


def test_the_card_is_sealed_and_an_edited_card_does_not_load(tmp_path: Path) -> None:
    """Reference rows, deciles and clinical limits are covered by the card's own digest: a card
    edited after publication (here one reference value) makes the version fail to load."""
    import json

    import grpc

    from medserve.protos import grpc_service_pb2 as pb
    from medserve.server.layout import card_digest

    from conftest import running_server

    x_train, y_train, _, _ = breast_cancer()
    names = [f"f{i}" for i in range(x_train.shape[1])]
    repo = tmp_path / "repo"
    report = export(GradientBoostingClassifier(n_estimators=5, random_state=0).fit(x_train, y_train), x_train[:32],
                    repo, "gbm", feature_names=names, feature_limits={"f0": (0.0, 100.0)})
    card = read_card(report.card_path)
    assert card["card_sha256"] == card_digest(card) and card["feature_limits"] and card["reference"]
    path = report.card_path
    edited = json.loads(path.read_text())
    first = next(iter(edited["reference"]))
    edited["reference"][first][0][0] += 1.0
    path.write_text(json.dumps(edited))
    with running_server(repo, exit_on_error=False) as server:
        with pytest.raises(grpc.RpcError) as info:
            server.stub().ModelInfer(pb.ModelInferRequest(model_name="gbm"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_card.json was changed after publication" in info.value.details()


# -- one schema: the exporters write cards through the server's ModelCard ---------------------

# A table with deciles, ranges and reference rows, a torch table, a signal model and a token
# model: every kind of serving entry (the text families' cards are checked by test_text_export).
ROUND_TRIP_DEMO = ["breast_cancer_logreg", "risk_mlp", "ecg_cnn1d", "notes_transformer"]


def test_demo_cards_round_trip_through_the_type(tmp_path: Path) -> None:
    """Each demo card parses into a ModelCard that writes back the very same JSON object (so its
    digest holds), and the server loads it: the exporters and the server share one schema."""
    from medserve.exporters.demo import build_demo_repository
    from medserve.server.card import ModelCard, loads
    from medserve.server.layout import card_digest

    from conftest import running_server

    reports = build_demo_repository(tmp_path, seed=0, models=ROUND_TRIP_DEMO)
    for report in reports:
        raw = loads(report.card_path.read_text(encoding="utf-8"))
        card = ModelCard.from_dict(raw)
        assert card.as_dict() == raw and list(card.as_dict()) == list(raw), report.name
        assert card_digest(card.as_dict()) == raw["card_sha256"] == card.card_sha256, report.name
        assert card.model_sha256 == report.model_sha256 and card.reference, report.name
    logreg = ModelCard.from_dict(loads(reports[0].card_path.read_text(encoding="utf-8")))
    assert logreg.feature_names is not None and logreg.feature_ranges and logreg.feature_deciles
    assert set(logreg.feature_deciles) == set(logreg.feature_names)
    with running_server(tmp_path) as server:
        stub = server.stub()
        ready = {r.name for r in reports if stub.ModelReady(pb.ModelReadyRequest(name=r.name), timeout=30).ready}
    assert ready == set(ROUND_TRIP_DEMO)


def test_build_card_returns_the_typed_card_and_refuses_what_the_server_would() -> None:
    from medserve.exporters import ExportError
    from medserve.exporters.card import ModelCard, build_card

    common: dict[str, Any] = dict(
        name="m", version=1, framework="f", framework_version="1", converter="c", opset=17, inputs=[], outputs=[],
        feature_names=["a", "b"], class_labels=None, input_columns=None, task=None, description=None,
        training_data=TrainingData("rows", 3), metrics={}, parity=[], model_sha256="0" * 64)
    card = build_card(**common, extra={"feature_limits": {"a": [0.0, 1.0]}})
    assert isinstance(card, ModelCard) and card.training_data == TrainingData("rows", 3)
    assert card.feature_limits is not None and card.feature_limits["a"].as_list() == [0.0, 1.0]
    with pytest.raises(ExportError, match=r"model card of 'm': feature_deciles\['a'\]: expected the 9 cuts"):
        build_card(**common, extra={"feature_deciles": {"a": [1.0, 2.0]}})
    with pytest.raises(ExportError, match=r"feature_limits\['c'\]: names no feature in feature_names"):
        build_card(**common, extra={"feature_limits": {"c": [0.0, 1.0]}})


def test_publish_refuses_a_card_the_server_would_refuse(tmp_path: Path) -> None:
    """A card factory's plain mapping is checked against the same schema; nothing is written."""
    from medserve.exporters import ExportError, triton_config
    from medserve.exporters.publish import publish
    from medserve.exporters.specs import TensorSpec

    config = triton_config.build_config("m", [TensorSpec("x", "FP32", (-1, 2))], [TensorSpec("y", "FP32", (-1, 1))], 8)
    with pytest.raises(ExportError, match=r"feature_ranges\['a'\]: the lower bound exceeds the upper"):
        publish(tmp_path, "m", version=1, model_bytes=b"g", config=config,
                make_card=lambda v, s: {"feature_names": ["a", "b"], "feature_ranges": {"a": [2, 1]}})
    assert list(tmp_path.iterdir()) == []
