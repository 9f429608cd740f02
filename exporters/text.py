"""Hugging Face transformer encoders -> one ONNX graph from token ids to a pooled sentence
embedding (or to class probabilities, with a classifier head on the embedding), served from text.

    export("/models/all-MiniLM-L6-v2", texts, "models", "notes_minilm", pooling="mean", normalize=True,
           max_length=128)
    export(encoder, texts, "models", "notes_triage", tokenizer=tokenizer, pooling="mean", normalize=True,
           max_length=128, head=linear, class_labels=["routine", "urgent", "emergency"],
           heldout=(test_texts, test_labels))

`convert` turns the encoder into a `Conversion` like the other families' (the graph, its feeds
and reference, plus what a text model adds: the tokenizer file, its config parameters and card
entries, the padding check); `export` checks, describes and publishes it in its one pipeline.

What is published (the contract the server's text path is written to):

- `model.onnx`: inputs `input_ids` and `attention_mask` (INT64 [batch, tokens], both axes
  dynamic; `token_type_ids` too only if the encoder answers differently without it, which a
  BERT-style encoder on single sentences does not), output `embedding` FP32 [batch, hidden]
  pooled in the graph (mean over the tokens the mask keeps, or the first token for "cls"), then
  L2-normalized with `normalize=True`; with a `head`, `probabilities` FP32 [batch, classes]
  (the softmax of the head's logits) instead, and the class labels in the card, as for the other
  torch classifiers.
- `tokenizer.json` beside it: the model's fast tokenizer with padding switched off (the server
  pads each batch itself) and truncation set to `max_length`, longest_first.
- `config.pbtxt`: the client's signature, `text` TYPE_STRING [1] per row, and the outputs; the
  parameters `tokenizer`, `tokenizer_max_length`, `tokenizer_truncation`, `tokenizer_inputs`
  (graph inputs in graph order) and, only once padded batches are shown to give what each row
  alone gives, `pad` (input:axis:pad value, e.g. `input_ids:1:0,attention_mask:1:0`).
- `model_card.json`: the usual entries plus `tokenizer`, `pooling`, `files` (SHA-256 of every
  file in the version folder besides model.onnx and the card), `padding_check` and `text_parity`.

Parity: the graph, fed by the `tokenizers` library from the published tokenizer.json exactly as
the server will (truncated, padded to the longest text of each batch), against the reference
pipeline: the transformers tokenizer and model (float32, CPU) and the pooling computed apart in
float64. Checked on the caller's texts and held-out texts and on `clinical_text.PARITY_SENTENCES`
(triage notes to a ~1,000-word record, so truncation is always exercised): every embedding
within cosine distance 1e-4 and atol 1e-4 + rtol 1e-3 per element, else `ParityError`.

Why torch.onnx's dynamo exporter (`torch.py`): with torch 2.13 and transformers 5 it keeps both
axes of a BERT-style encoder symbolic through SDPA attention, gives byte-identical graphs for
identical weights and runs offline; the weights stay float32 (a model in another dtype is refused).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tokenizers
import torch
import transformers
from torch import nn

from . import metrics
from . import publish as publishing
from . import torch as torch_exporter
from .clinical_text import PARITY_SENTENCES
from .conversion import Conversion
from .errors import ExportError, UnsupportedModelError
from .parity import OutputParity, Tolerance, compare, cpu_session
from .specs import TensorSpec, default_opset, graph_signature

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
TRUNCATION = "longest_first"  # the tokenizers library's name, as enable_truncation(strategy=...) takes it
TOKENIZER_FILENAME = "tokenizer.json"
TEXT_INPUT = TensorSpec("text", "BYTES", (-1, 1))  # what clients send: one string per row
MIN_OPSET = 17  # LayerNormalization
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# float32 on both sides; different kernels (SDPA vs onnxruntime's attention) and summation orders.
EMBEDDING_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3, cosine=1e-4)
PROBABILITY_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
PARITY_BATCH = 16  # texts per padded batch in the parity check (the server pads a batch to its longest)


@dataclass(frozen=True, slots=True)
class Encoder:
    """A loaded encoder with its tokenizer and what the export settled (pooling, max_length...)."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers tokenizer: the reference pipeline's
    pooling: str
    normalize: bool
    max_length: int
    source: str
    token_types: bool  # the graph takes token_type_ids
    pad_id: int
    pad_type_id: int
    tokenizer_json: bytes  # the published file

    @property
    def input_names(self) -> tuple[str, ...]:
        return TOKEN_INPUTS if self.token_types else TOKEN_INPUTS[:2]

    def server_tokenizer(self) -> tokenizers.Tokenizer:
        """The published tokenizer.json as the server sets it up."""
        tokenizer = tokenizers.Tokenizer.from_str(self.tokenizer_json.decode("utf-8"))
        tokenizer.enable_truncation(self.max_length, strategy=TRUNCATION)
        return tokenizer


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars or load reports from transformers while we load (the CLI prints ours)."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _sentence_transformers_settings(folder: Path | None) -> tuple[str | None, bool | None, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers folder's own config."""
    if folder is None or not (folder / "modules.json").is_file():
        return None, None, None
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pooling = normalize = None
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith(".Pooling"):
                config = json.loads((folder / module["path"] / "config.json").read_text(encoding="utf-8"))
                if config.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
                elif config.get("pooling_mode_cls_token"):
                    pooling = "cls"
            normalize = normalize or kind.endswith(".Normalize")
        max_seq = None
        if (folder / "sentence_bert_config.json").is_file():
            max_seq = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8")).get(
                "max_seq_length"
            )
        return pooling, bool(normalize), int(max_seq) if max_seq else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{folder.name}: unreadable sentence-transformers configuration: {exc}") from exc


def _choose_max_length(requested: int | None, from_folder: int | None, model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limit = min((int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000), default=None)
    chosen = requested if requested is not None else from_folder if from_folder is not None else limit
    if chosen is None:
        raise ExportError("the tokenizer states no maximum length: pass max_length=")
    if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 3:
        raise ExportError(f"max_length must be an integer >= 3 (room for the special tokens), got {chosen!r}")
    if limit is not None and chosen > limit:
        raise ExportError(f"max_length {chosen} is more tokens than this encoder takes ({limit})")
    return chosen


def _takes_token_types(model: Any, tokenizer: Any, sample: Mapping[str, torch.Tensor]) -> bool:
    """Whether the graph needs token_type_ids: only when the encoder takes them and answers the
    sample differently without them (BERT uses zeros when they are left out: the same answer)."""
    if "token_type_ids" not in sample or "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    with torch.no_grad():
        given = model(**sample)[0]
        try:
            left_out = model(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"])[0]
        except (TypeError, ValueError, RuntimeError):
            return True
    return not torch.equal(given, left_out)


def _check_float32(*modules: nn.Module | None) -> None:
    for module in modules:
        if module is None:
            continue
        other = sorted({str(p.dtype) for p in module.parameters() if p.dtype != torch.float32})
        if other:
            raise UnsupportedModelError(
                f"{type(module).__name__} has {', '.join(other)} weights: text models are exported with float32 "
                "weights (load it with dtype=torch.float32, or call .float() on it)"
            )


def _source_name(model: Any, folder: Path | None) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    if not name or Path(name).is_absolute() or (folder is not None and Path(name) == folder):
        return folder.name if folder is not None else type(model).__name__
    return name


def load_encoder(
    model: Any,
    tokenizer: Any = None,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    source: str | None = None,
) -> Encoder:
    """Load (a folder path) or take (a transformers model + tokenizer) an encoder and settle what
    the export needs. A sentence-transformers folder supplies defaults for pooling, normalize
    and max_length from its own configuration; anything passed wins."""
    folder = None
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise ExportError(f"{folder} is not a Hugging Face model folder (no config.json)")
        with _quiet_loading():
            try:
                model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
                if tokenizer is None:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ExportError(f"cannot load the encoder in {folder.name}: {exc}") from exc
        model.eval()
    elif not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model or a model folder")
    if tokenizer is None:
        raise ExportError("pass the encoder's tokenizer as tokenizer= (a transformers fast tokenizer)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise UnsupportedModelError(
            f"{type(tokenizer).__name__} has no tokenizers-library backend: the server runs tokenizer.json, "
            "so pass a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if tokenizer.pad_token_id is None:
        raise UnsupportedModelError("the tokenizer has no pad token; the server pads batches with it")
    if any(m.training for m in model.modules()):
        raise ExportError("call model.eval() first: a model in training mode (dropout) is not what to serve")
    _check_float32(model)

    folder_pooling, folder_normalize, folder_max = _sentence_transformers_settings(folder)
    pooling = pooling if pooling is not None else folder_pooling
    if pooling not in POOLINGS:
        raise ExportError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    normalize = bool(normalize) if normalize is not None else bool(folder_normalize)
    length = _choose_max_length(max_length, folder_max, model, tokenizer)

    published = tokenizers.Tokenizer.from_str(backend.to_str())
    published.no_padding()  # the server pads each batch to its longest text
    published.enable_truncation(length, strategy=TRUNCATION)
    probe = tokenizer(list(PARITY_SENTENCES[:3]), padding=True, truncation=True, max_length=length, return_tensors="pt")
    token_types = _takes_token_types(model, tokenizer, dict(probe))
    return Encoder(
        model=model,
        tokenizer=tokenizer,
        pooling=pooling,
        normalize=normalize,
        max_length=length,
        source=source or _source_name(model, folder),
        token_types=token_types,
        pad_id=int(tokenizer.pad_token_id),
        pad_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        tokenizer_json=published.to_str().encode("utf-8"),
    )


class TextGraph(nn.Module):
    """Token tensors -> pooled embedding (masked mean or first token, optionally L2-normalized),
    or -> softmax of a head over it. Padding is masked out of attention by the encoder and out of
    the mean here, so a row's answer does not depend on how far its batch was padded."""

    def __init__(self, encoder: nn.Module, pooling: str, normalize: bool, head: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        if self.pooling == "mean":
            keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
        else:
            pooled = hidden[:, 0]
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=1)
        if self.head is None:
            return pooled
        return torch.softmax(self.head(pooled), dim=-1)


def tokenize(
    encoder: Encoder, texts: Sequence[str], tokenizer: tokenizers.Tokenizer | None = None
) -> dict[str, np.ndarray]:
    """What the server feeds the graph: the published tokenizer's ids (truncated), padded on the
    right to the longest text with the pad id (mask 0, pad type id)."""
    encodings = (tokenizer or encoder.server_tokenizer()).encode_batch(list(texts))
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), width), encoder.pad_id, dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    types = np.full((len(encodings), width), encoder.pad_type_id, dtype=np.int64)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = e.attention_mask
        types[row, : len(e.ids)] = e.type_ids
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: feeds[name] for name in encoder.input_names}


def reference_embeddings(encoder: Encoder, texts: Sequence[str], batch: int = 32) -> np.ndarray:
    """The reference pipeline: the transformers tokenizer and model (float32, CPU), pooling in
    float64 apart from the graph's code. Float32 [n, hidden]."""
    rows = []
    accepted = inspect.signature(encoder.model.forward).parameters
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        enc = encoder.tokenizer(
            chunk, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = encoder.model(**{k: v for k, v in enc.items() if k in accepted})[0].numpy().astype(np.float64)
        if encoder.pooling == "mean":
            mask = enc["attention_mask"].numpy().astype(np.float64)[..., None]
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        else:
            pooled = hidden[:, 0]
        if encoder.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        rows.append(pooled.astype(np.float32))
    return np.concatenate(rows)


def _texts(data: Any, what: str) -> list[str]:
    if isinstance(data, str) or not isinstance(data, Sequence | np.ndarray):
        raise ExportError(f"{what} must be a sequence of strings (the texts), got {type(data).__name__}")
    texts = [t.item() if isinstance(t, np.generic) else t for t in list(data)]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ExportError(f"{what} must be a non-empty sequence of strings")
    return texts


def _targets(labels: Any, class_labels: Sequence[str] | None, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind in "USO":
        if class_labels is None:
            raise ExportError("held-out targets given as labels need class_labels")
        index = {c: i for i, c in enumerate(class_labels)}
        unknown = sorted({str(v) for v in y.ravel()} - set(index))
        if unknown:
            raise ExportError(f"held-out targets {unknown[:5]} are not among class_labels")
        y = np.asarray([index[str(v)] for v in y.ravel()], dtype=np.int64)
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise ExportError(f"held-out targets must be {n} class indices or labels")
    return y.astype(np.int64)


def _batches(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i : i + size]) for i in range(0, len(texts), size)]


def _padding_check(
    session: Any, encoder: Encoder, texts: Sequence[str], output: str, tolerance: Tolerance
) -> OutputParity:
    """Each text alone (no padding) against the same text in padded batches, on the graph."""
    tokenizer = encoder.server_tokenizer()
    batched = np.concatenate(
        [session.run([output], tokenize(encoder, chunk, tokenizer))[0] for chunk in _batches(texts, PARITY_BATCH)]
    )
    alone = np.concatenate([session.run([output], tokenize(encoder, [text], tokenizer))[0] for text in texts])
    result = compare(output, alone, batched, tolerance)
    return OutputParity(
        f"{output} (padded batch vs alone)",
        result.max_abs_diff,
        result.max_rel_diff,
        tolerance,
        result.n_samples,
        result.mismatches,
        result.problem,
        result.max_cosine_distance,
    )


def convert(
    model: Any,
    sample_inputs: Any,
    *,
    tokenizer: Any = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    head: nn.Module | None = None,
    class_labels: Sequence[str] | None = None,
    heldout: Any = None,
    tolerance: Tolerance | None = None,
    opset: int | None = None,
    source: str | None = None,
    name: str = "model",
) -> Conversion:
    """The text family's `Conversion` for `medserve.exporters.export`'s one pipeline (see the
    module docstring): the graph from tokens to the pooled embedding (or probabilities), fed by
    the published tokenizer; clients send `text`, and the tokenizer, its config parameters and
    card entries and the padding check come with it. `name` only labels log lines."""
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"text encoders need opset {MIN_OPSET} or later, got {opset}")
    texts = [] if sample_inputs is None else _texts(sample_inputs, "sample_inputs")
    heldout_texts: list[str] = []
    targets = None
    if heldout is not None:
        if isinstance(heldout, tuple):
            if len(heldout) != 2:
                raise ExportError("heldout must be texts, or a tuple (texts, targets)")
            heldout_texts = _texts(heldout[0], "heldout texts")
            if heldout[1] is not None:
                targets = _targets(heldout[1], class_labels, len(heldout_texts))
        else:
            heldout_texts = _texts(heldout, "heldout")
    if head is not None:
        if not isinstance(head, nn.Module):
            raise UnsupportedModelError(
                f"head must be a torch.nn.Module over the pooled embedding, got {type(head).__name__}"
            )
        if any(m.training for m in head.modules()):
            raise ExportError("call head.eval() first")
        _check_float32(head)
    elif class_labels is not None or targets is not None:
        raise ExportError("class_labels and held-out targets apply to a classifier head (head=)")

    log.info("loading text encoder for %r", name)
    encoder = load_encoder(model, tokenizer, pooling=pooling, normalize=normalize, max_length=max_length, source=source)
    graph_module = TextGraph(encoder.model, encoder.pooling, encoder.normalize, head).eval()
    output = "embedding" if head is None else "probabilities"

    # The export sample: a few texts of different lengths, padded (a batch of 3, so no size-1 dims).
    sample = tokenize(encoder, list(PARITY_SENTENCES[4:7]))
    n_classes = None
    if head is not None:
        with torch.no_grad():
            probe = graph_module(*(torch.from_numpy(a) for a in sample.values()))
        if probe.ndim != 2 or probe.shape[1] < 2:
            raise UnsupportedModelError(f"the head must answer logits [rows, classes >= 2], got {list(probe.shape)}")
        n_classes = int(probe.shape[1])
        if class_labels is not None and len(class_labels) != n_classes:
            raise ExportError(f"{len(class_labels)} class_labels for a head of {n_classes} classes")
    log.info("converting %r (%s pooling%s)", name, encoder.pooling, ", normalized" if encoder.normalize else "")
    traced = torch_exporter.convert(
        graph_module,
        sample,
        dynamic_axes={n: {1: "tokens"} for n in encoder.input_names},
        output_names=[output],
        opset=opset,
    )
    graph = onnx.load_model_from_string(traced.model_bytes)
    inputs, _ = graph_signature(graph)
    if [i.name for i in inputs] != list(encoder.input_names) or any(i.shape != (-1, -1) for i in inputs):
        raise ExportError(f"unexpected graph inputs {[(i.name, i.shape) for i in inputs]}")
    opset_used = default_opset(graph)
    if opset_used < MIN_OPSET:
        raise ExportError(f"the graph uses opset {opset_used}; text encoders need {MIN_OPSET} or later")

    def reference(batch: Sequence[str]) -> dict[str, np.ndarray]:
        embeddings = reference_embeddings(encoder, batch)
        if head is None:
            return {output: embeddings}
        with torch.no_grad():
            logits = head(torch.from_numpy(embeddings)).numpy()
        return {output: metrics.softmax(logits).astype(np.float32)}

    server_tokenizer = encoder.server_tokenizer()

    def feeds(batch: Sequence[str]) -> dict[str, np.ndarray]:
        return tokenize(encoder, [str(t) for t in batch], server_tokenizer)  # numpy str_ elements too

    def quality(answers: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float | int]:
        y = _targets(labels, class_labels, len(heldout_texts))
        probabilities = answers[output]
        predicted = probabilities.argmax(axis=1)
        figures = metrics.classification_metrics(y, predicted, probabilities, probabilities.shape[1])
        figures["macro_f1"] = _macro_f1(y, predicted, probabilities.shape[1])
        return figures

    value_tolerance = tolerance or (EMBEDDING_TOLERANCE if head is None else PROBABILITY_TOLERANCE)
    parity_texts = list(dict.fromkeys([*texts, *heldout_texts, *PARITY_SENTENCES]))
    whole = tokenizers.Tokenizer.from_str(encoder.tokenizer_json.decode("utf-8"))
    whole.no_truncation()
    untruncated = [len(e.ids) for e in whole.encode_batch(parity_texts)]
    check_texts = list(dict.fromkeys([*texts, *PARITY_SENTENCES]))
    padding = _padding_check(cpu_session(traced.model_bytes), encoder, check_texts, output, value_tolerance)
    if not padding.passed:
        log.warning("%r: %s; publishing without the pad parameter (no padded batches)", name, padding.describe())

    tokenizer_sha = publishing.file_hashes({TOKENIZER_FILENAME: encoder.tokenizer_json})[TOKENIZER_FILENAME]
    pad_values = {"input_ids": encoder.pad_id, "attention_mask": 0, "token_type_ids": encoder.pad_type_id}
    parameters = {
        "tokenizer": TOKENIZER_FILENAME,
        "tokenizer_max_length": str(encoder.max_length),
        "tokenizer_truncation": TRUNCATION,
        "tokenizer_inputs": ",".join(encoder.input_names),
    }
    if padding.passed:
        parameters["pad"] = ",".join(f"{n}:1:{pad_values[n]}" for n in encoder.input_names)
    entries = {
        "tokenizer": {
            "file": TOKENIZER_FILENAME,
            "sha256": tokenizer_sha,
            "max_length": encoder.max_length,
            "truncation": TRUNCATION,
            "pad_id": encoder.pad_id,
            "pad_type_id": encoder.pad_type_id,
            "inputs": list(encoder.input_names),
            "source": f"{encoder.source} ({type(encoder.tokenizer).__name__}, tokenizers {tokenizers.__version__}; "
            f"padding off, truncation {TRUNCATION} at {encoder.max_length})",
        },
        "pooling": {"method": encoder.pooling, "normalize": encoder.normalize, "in_graph": True},
        "files": {TOKENIZER_FILENAME: tokenizer_sha},
        "padding_check": {**padding.as_card_entry(), "passed": padding.passed},
        "text_parity": {
            "reference": f"transformers {transformers.__version__} {type(encoder.model).__name__} and its tokenizer, "
            f"float32 on the CPU, {encoder.pooling} pooling in float64",
            "n_texts": len(parity_texts),
            "n_truncated": sum(n > encoder.max_length for n in untruncated),
            "longest_tokens": max(untruncated),
            "batch": PARITY_BATCH,
        },
    }
    return Conversion(
        model_bytes=traced.model_bytes,
        framework="transformers",
        framework_version=transformers.__version__,
        converter=traced.converter,
        feeds=feeds,
        reference=reference,
        tolerances={output: value_tolerance},
        metrics=quality,
        task="embedding" if head is None else "classification",
        n_classes=n_classes,
        client_inputs=(TEXT_INPUT,),
        config_parameters=parameters,
        card_entries=entries,
        extra_files={TOKENIZER_FILENAME: encoder.tokenizer_json},
        sample_feeds=sample,
        parity_data=tuple(_batches(parity_texts, PARITY_BATCH)),
        chunk_rows=PARITY_BATCH,
        padding_check=padding,
    )


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_classes)), zero_division=0))
