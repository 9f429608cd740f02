"""The demo repository: every family present and servable, and reproducible to the byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medserve.exporters import ExportReport
from medserve.exporters.demo import DEMO_MODELS, build_demo_repository

from exporter_helpers import assert_config_matches_graph, read_card, read_config, run_published, sha256_file

EXPECTED = {
    "breast_cancer_svm",
    "breast_cancer_rf",
    "breast_cancer_gbm",
    "breast_cancer_logreg",
    "diabetes_linear",
    "diabetes_gbm",
    "digits_cnn",
    "ecg_cnn1d",
    "vitals_gru",
    "notes_transformer",
    "risk_mlp",
}
# Rebuilt in a child process under another string-hash seed: one scikit-learn classifier,
# one tree ensemble regressor, one torch model.
REBUILT = ["breast_cancer_svm", "diabetes_gbm", "notes_transformer"]
# Images, signals and sequences keep max_batch_size 64; the tables (the MLP included) are measured.
NOT_TABULAR = {"digits_cnn", "ecg_cnn1d", "vitals_gru", "notes_transformer"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, ExportReport]]:
    path = tmp_path_factory.mktemp("demo")
    return path, {r.name: r for r in build_demo_repository(path, seed=0)}


def test_every_family_is_published_and_consistent(demo: tuple[Path, dict[str, ExportReport]]) -> None:
    path, reports = demo
    assert set(DEMO_MODELS) == EXPECTED == set(reports) == {p.name for p in path.iterdir()}
    for name, report in reports.items():
        assert report.version == 1 and all(p.passed for p in report.parity), name
        card = read_card(report.card_path)
        assert card["model_sha256"] == sha256_file(report.model_path), name
        assert card["metrics"]["n_samples"] > 0 and card["training_data"]["n_samples"] > 0, name
        assert_config_matches_graph(path / name)
        batching = card["batching"]
        assert batching["chosen_by"] == ("default" if name in NOT_TABULAR else "measured"), name
        assert batching["max_batch_size"] == read_config(path / name / "config.pbtxt").max_batch_size, name
        if name in NOT_TABULAR:
            assert batching["max_batch_size"] == 64 and batching["median_ms_by_rows"] is None, name
        else:
            assert batching["max_batch_size"] >= 64 and "64" in batching["median_ms_by_rows"], name
    breast = read_card(reports["breast_cancer_rf"].card_path)
    assert breast["class_labels"] == ["malignant", "benign"] and len(breast["feature_names"]) == 30
    assert breast["feature_names"][0] == "mean radius"
    assert reports["breast_cancer_logreg"].metrics["roc_auc"] > 0.95
    assert reports["diabetes_linear"].metrics["r2"] > 0.2
    assert reports["digits_cnn"].metrics["accuracy"] > 0.7
    assert reports["notes_transformer"].metrics["accuracy"] > 0.75


def test_variable_length_models_accept_other_lengths(demo: tuple[Path, dict[str, ExportReport]]) -> None:
    _, reports = demo
    rng = np.random.default_rng(0)
    gru = run_published(reports["vitals_gru"].model_path, {"input": rng.normal(size=(3, 7, 6)).astype(np.float32)})
    assert gru["deterioration_logit"].shape == (3, 1)
    ecg = run_published(reports["ecg_cnn1d"].model_path, {"input": rng.normal(size=(2, 3, 500)).astype(np.float32)})
    assert ecg["logits"].shape == (2, 2)
    mask = np.ones((2, 57), np.int64)
    notes = run_published(
        reports["notes_transformer"].model_path, {"input_ids": rng.integers(1, 200, (2, 57)), "attention_mask": mask}
    )
    assert notes["logits"].shape == (2, 2)


def test_same_seed_gives_the_same_bytes(demo: tuple[Path, dict[str, ExportReport]], tmp_path: Path) -> None:
    """A fresh process, with another PYTHONHASHSEED, rebuilds identical model.onnx files."""
    _, reports = demo
    script = (
        "import json, sys\n"
        "from medserve.exporters.demo import build_demo_repository\n"
        "reports = build_demo_repository(sys.argv[1], seed=0, models=json.loads(sys.argv[2]))\n"
        "print(json.dumps({r.name: r.model_sha256 for r in reports}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(REBUILT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rebuilt = json.loads(done.stdout.strip().splitlines()[-1])
    assert rebuilt == {name: reports[name].model_sha256 for name in REBUILT}


def test_another_seed_gives_another_model(demo: tuple[Path, dict[str, ExportReport]], tmp_path: Path) -> None:
    _, reports = demo
    (other,) = build_demo_repository(tmp_path, seed=1, models=["risk_mlp"])
    assert other.model_sha256 != reports["risk_mlp"].model_sha256


def test_unknown_demo_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo models"):
        build_demo_repository(tmp_path, models=["nope"])


def test_the_server_serves_every_demo_model(demo: tuple[Path, dict[str, ExportReport]]) -> None:
    """The README's run command serves this repository: every model READY, each answers a
    request built from its own signature like a fresh onnxruntime session does."""
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import from_raw, numpy_dtype, to_raw

    from conftest import running_server

    path, reports = demo
    rng = np.random.default_rng(5)
    with running_server(path) as server:
        stub = server.stub()
        for name, report in sorted(reports.items()):
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
            request = pb.ModelInferRequest(model_name=name, id=name)
            feeds = {}
            for tensor in meta.inputs:
                shape = [2 if i == 0 else (7 if d == -1 else d) for i, d in enumerate(tensor.shape)]
                if tensor.datatype == "INT64":
                    array = rng.integers(1, 10, size=shape).astype(np.int64)  # token ids / masks
                else:
                    array = rng.normal(size=shape).astype(numpy_dtype(tensor.datatype))
                feeds[tensor.name] = array
                request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
                request.raw_input_contents.append(to_raw(array))
            response = stub.ModelInfer(request, timeout=60)
            assert response.model_version == "1" and response.id == name
            assert response.parameters["model_sha256"].string_param == sha256_file(report.model_path)
            expected = run_published(report.model_path, feeds)
            for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
                got = from_raw(raw, out.datatype, out.shape)
                np.testing.assert_allclose(got, expected[out.name], rtol=1e-5, atol=1e-6, err_msg=name)
