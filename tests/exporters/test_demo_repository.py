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

from exporter_helpers import (
    assert_config_matches_graph,
    read_card,
    read_config,
    run_published,
    sha256_file,
    text_feeds,
)

EXPECTED = {
    "breast_cancer_svm",
    "breast_cancer_rf",
    "breast_cancer_gbm",
    "breast_cancer_logreg",
    "diabetes_linear",
    "diabetes_gbm",
    "breast_cancer_xgb",
    "diabetes_lgbm",
    "digits_cnn",
    "ecg_cnn1d",
    "vitals_gru",
    "notes_transformer",
    "risk_mlp",
    "notes_minilm",
    "notes_triage",
}
# Rebuilt in a child process under another string-hash seed: one scikit-learn classifier,
# one tree ensemble regressor, one torch model.
REBUILT = ["breast_cancer_svm", "diabetes_gbm", "notes_transformer"]
# Images, signals, sequences and text keep max_batch_size 64; the tables (the MLP included) are measured.
NOT_TABULAR = {"digits_cnn", "ecg_cnn1d", "vitals_gru", "notes_transformer", "notes_minilm", "notes_triage"}
TEXT = {"notes_minilm", "notes_triage"}  # served from strings: the pretrained MiniLM encoder


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
        if card["task"] == "embedding":  # pretrained by its authors; nothing trained or scored here
            assert card["training_data"] is None and card["metrics"] == {}, name
        else:
            assert card["metrics"]["n_samples"] > 0 and card["training_data"]["n_samples"] > 0, name
        assert card.get("files", {}) == {f: sha256_file(report.model_path.parent / f) for f in card.get("files", {})}
        assert ("tokenizer" in card) == (name in TEXT), name
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
    # The boosted models (medserve[gbm]) on tables with gaps: NaN in the held-out rows, parity kept.
    assert reports["breast_cancer_xgb"].framework.endswith("+ xgboost") and reports["breast_cancer_xgb"].metrics["roc_auc"] > 0.95
    assert reports["diabetes_lgbm"].framework.endswith("+ lightgbm") and reports["diabetes_lgbm"].metrics["r2"] > 0.1
    assert reports["digits_cnn"].metrics["accuracy"] > 0.7
    assert reports["notes_transformer"].metrics["accuracy"] > 0.75
    # 3 classes (chance 1/3), held out by template: phrasings the head never saw.
    triage = reports["notes_triage"]
    assert triage.metrics["accuracy"] > 0.6 and triage.metrics["macro_f1"] > 0.6 and triage.metrics["n_samples"] == 60
    triage_card = read_card(triage.card_path)
    assert triage_card["class_labels"] == ["routine", "urgent", "emergency"]
    assert [(o["name"], o["shape"]) for o in triage_card["outputs"]] == [("probabilities", [-1, 3])]
    minilm_card = read_card(reports["notes_minilm"].card_path)
    assert [(o["name"], o["shape"]) for o in minilm_card["outputs"]] == [("embedding", [-1, 384])]
    for name in TEXT:
        card = read_card(reports[name].card_path)
        assert card["parity"][0]["mismatches"] == 0 and card["padding_check"]["passed"], name
        assert card["tokenizer"]["max_length"] == 128 and card["tokenizer"]["pad_id"] == 0, name
        assert "pad" in read_config(path / name / "config.pbtxt").parameters, name


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
    for name, output, width in (("notes_minilm", "embedding", 384), ("notes_triage", "probabilities", 3)):
        ids = rng.integers(1000, 20000, (3, 200))  # longer than the tokenizer would ever send
        answers = run_published(reports[name].model_path, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert answers[output].shape == (3, width)


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
            if name in TEXT:  # strings in; the graph's answer on the tokens the published tokenizer gives
                assert [(t.name, t.datatype) for t in meta.inputs] == [("text", "BYTES")]
                texts = ["Pt c/o chest pain radiating to L arm, sweaty.", "Repeat prescription please"]
                rows = np.asarray([[t] for t in texts], dtype=object)
                request.inputs.add(name="text", datatype="BYTES", shape=list(rows.shape))
                request.raw_input_contents.append(to_raw(rows))
                tokenizer_inputs = read_config(path / name / "config.pbtxt").parameters["tokenizer_inputs"]
                feeds = text_feeds(
                    report.model_path.parent / "tokenizer.json", texts, 128, tokenizer_inputs.string_value.split(",")
                )
            for tensor in [] if name in TEXT else meta.inputs:
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


def test_every_tabular_demo_model_explains_additively(demo: tuple[Path, dict[str, ExportReport]]) -> None:
    """The cards carry reference rows (no patient rows) and deciles; for each tabular model the
    attributions and the base value add up to the explained output. The boosted models are
    explained exactly by their trees: LightGBM behind its float64 scaler, XGBoost in log-odds
    (`explain_output: margin`, whose logistic is the served probabilities)."""
    from medserve.clients import Client
    from medserve.protos.wire import numpy_dtype

    from conftest import running_server

    path, reports = demo
    tabular = sorted(set(reports) - NOT_TABULAR)
    explained = {}
    with running_server(path) as server, Client(server.target, timeout_s=120) as client:
        for name in tabular:
            card = read_card(reports[name].card_path)
            assert card["reference"] and card["feature_deciles"], name
            meta = client.model_metadata(name)
            inputs = {}
            for t in meta.inputs:
                reference = np.asarray(card["reference"][t.name])
                inputs[t.name] = reference[:2].astype(numpy_dtype(t.datatype)) if t.datatype != "BYTES" else reference[:2]
            why = client.explain(name, inputs)
            total = sum(a.sum(axis=-1) for a in why.attributions.values()) + why.base_value
            if why.output == "margin":  # log-odds: the served probabilities are their logistic
                total = 1 / (1 + np.exp(-total))
            output = np.asarray(why.result["probabilities" if why.output == "margin" else why.output],
                                np.float64).reshape(total.shape)
            np.testing.assert_allclose(total, output, atol=1e-3, err_msg=name)
            explained[name] = (why.method, why.output)
    assert explained["breast_cancer_xgb"] == ("tree_shap", "margin")
    assert explained["diabetes_lgbm"] == ("tree_shap", "prediction")


def test_text_models_answer_strings_from_the_client_library(demo: tuple[Path, dict[str, ExportReport]]) -> None:
    from medserve.clients import Client

    from conftest import running_server

    path, _ = demo
    notes = ["Patient has chest pain.", "The patient complains of pain in the chest.",
             "Discharge summary: fractured left wrist, cast applied, follow up in clinic in six weeks."]
    with running_server(path) as server, Client(server.target, timeout_s=60) as client:
        rows = np.array([[n] for n in notes], dtype=object)
        embedding = client.infer("notes_minilm", {"text": rows})["embedding"]
        triage = client.infer("notes_triage", {"text": rows})["probabilities"]
    assert embedding.shape == (3, 384) and triage.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    similar, unrelated = float(embedding[0] @ embedding[1]), float(embedding[0] @ embedding[2])
    assert similar > unrelated + 0.2, (similar, unrelated)
    np.testing.assert_allclose(triage.sum(axis=1), 1.0, atol=1e-5)


def test_a_note_is_explained_by_removing_windows_of_its_tokens(demo: tuple[Path, dict[str, ExportReport]]) -> None:
    """Text in, the server's tokenizer, occlusion over windows of the note's own words: one
    attribution per token position and class; a word's sub-word tokens share one window, so
    one value; none for the padding of the shorter note or for [CLS] and [SEP] (kept)."""
    from tokenizers import Tokenizer

    from medserve.clients import Client, InvalidArgument

    from conftest import running_server

    path, _ = demo
    notes = ["Unresponsive patient, no pulse, CPR started on arrival; electrocardiogram showed ventricular "
             "fibrillation, defibrillated twice and intubated by paramedics.", "Routine follow up."]
    tokenizer = Tokenizer.from_file(str(path / "notes_triage" / "1" / "tokenizer.json"))
    lengths = [len(tokenizer.encode(n).ids) for n in notes]
    with running_server(path) as server, Client(server.target, timeout_s=60) as client:
        why = client.explain("notes_triage", {"text": np.array([[n] for n in notes], dtype=object)})
        with pytest.raises(InvalidArgument, match="embedding model"):  # 384 coordinates are no targets
            client.explain("notes_minilm", {"text": np.array([[notes[0]]], dtype=object)})
    attributions = why.attributions[""]
    assert why.method == "occlusion" and why.output == "probabilities"
    assert attributions.shape == (2, 3, max(lengths)) and why.base_value.shape == (2, 3)
    assert np.isfinite(attributions).all() and np.isfinite(why.base_value).all()
    for row, note in enumerate(notes):
        word_ids = tokenizer.encode(note).word_ids
        assert (attributions[row, :, [i for i, w in enumerate(word_ids) if w is None]] == 0).all()  # [CLS], [SEP]
        pieces = [[i for i, w in enumerate(word_ids) if w == word] for word in set(word_ids) - {None}]
        assert any(len(p) > 1 for p in pieces) == (row == 0)  # words of several tokens: one value each
        for p in pieces:
            assert (attributions[row][:, p] == attributions[row][:, p[:1]]).all(), (row, p)
    assert len(set(tokenizer.encode(notes[0]).word_ids) - {None}) > 16  # more words than windows
    assert (attributions[1, :, lengths[1]:] == 0).all()  # the short note's padding: nothing to remove
    # Removing every token but the first moves both answers; removing a window of the short note
    # moves it visibly (the long one is an emergency at p > 0.9999: a window barely moves it).
    assert (np.abs(why.base_value - why.result["probabilities"]).max(axis=1) > 0.1).all()
    assert np.abs(attributions[1]).max() > 1e-2
    # The tokens come back too (response parameter explain_tokens), and top() names them.
    assert why.tokens is not None and [len(t) for t in why.tokens] == lengths
    assert why.tokens[1] == tuple(tokenizer.encode(notes[1]).tokens)
    named = dict(why.top(50, row=1, target="routine"))
    assert set(named) == {f"{t}@{i}" for i, t in enumerate(why.tokens[1])} | {
        f"[pad]@{i}" for i in range(lengths[1], max(lengths))}


def test_notes_of_different_lengths_share_batches_and_answer_as_alone(
    demo: tuple[Path, dict[str, ExportReport]],
) -> None:
    """Concurrent notes of different lengths: executions < inferences (padded batches), and
    each answer equals the one-at-a-time answer."""
    from concurrent.futures import ThreadPoolExecutor

    from medserve.clients import Client

    from conftest import running_server

    path, _ = demo
    words = "patient reports worsening shortness of breath with fever cough and chest tightness overnight".split()
    notes = [" ".join(words[: 2 + (i * 5) % len(words)]) for i in range(24)]
    with running_server(path) as server, Client(server.target, timeout_s=60) as client:
        alone = [client.infer("notes_minilm", {"text": np.array([[n]], dtype=object)})["embedding"] for n in notes]
        before = client.model_statistics("notes_minilm")[0]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(
                lambda n: client.infer("notes_minilm", {"text": np.array([[n]], dtype=object)})["embedding"],
                notes * 4))
        after = client.model_statistics("notes_minilm")[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 96 and executions < inferences, (executions, inferences)
    for i, got in enumerate(together):
        np.testing.assert_allclose(got, alone[i % len(notes)], atol=1e-5)
