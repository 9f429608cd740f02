"""The tokenizer stage of a text model: the client sends one string per row, the server turns the
strings into the graph's token ids and attention mask with the Hugging Face `tokenizers`
library, from the `tokenizer.json` published beside the model (and covered by the card's
hashes), truncated at the configured maximum length. A request's rows are padded to its own
longest row; the batcher pads requests of different lengths to a common one (`PadSpec`).

Why a stage in the server rather than tokenization inside the ONNX graph (onnxruntime-
extensions): the same `tokenizer.json` the model was trained with runs unchanged, with the
library's own truncation rules; no custom-op library has to load into every session; and
`perf/bench_text.py` measures this stage's cost per request (in-graph tokenization is not measured).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TokenizerConfig


class TokenizerStage:
    """Text rows -> {input_ids, attention_mask[, token_type_ids]} INT64 [rows, longest]."""

    def __init__(self, tokenizer_json: str, config: TokenizerConfig, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=config.max_length, strategy=config.truncation)
        self._inputs = config.inputs
        self._pad_id = pad_id
        self.max_length = config.max_length

    def __call__(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        """`texts`: str objects [rows, 1] (validated and decoded already)."""
        return self.tokenize(texts).inputs

    def tokenize(self, texts: np.ndarray) -> Tokenized:
        """The graph's inputs, with the encodings behind them (an explanation's tokens and words)."""
        encodings = self._tokenizer.encode_batch([str(t) for t in texts.reshape(-1)])
        longest = max((len(e.ids) for e in encodings), default=1) or 1
        rows = len(encodings)
        ids = np.full((rows, longest), self._pad_id, np.int64)
        mask = np.zeros((rows, longest), np.int64)
        types = np.zeros((rows, longest), np.int64)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = e.attention_mask
            types[i, :n] = e.type_ids
        out: Mapping[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return Tokenized({name: out[name] for name in self._inputs}, encodings)


@dataclass(frozen=True, slots=True)
class Tokenized:
    """A request's token arrays and its encodings (read only when the request is explained)."""

    inputs: dict[str, np.ndarray]
    encodings: list[Any]

    def tokens(self) -> list[list[str]]:
        """Each row's tokens as the tokenizer spells them (what an explanation's positions are)."""
        return [e.tokens for e in self.encodings]

    def words(self) -> np.ndarray:
        """[rows, length] the word of each token position; -1 for special tokens and padding."""
        out = np.full(next(iter(self.inputs.values())).shape, -1, np.int64)
        for i, e in enumerate(self.encodings):
            out[i, :len(e.word_ids)] = [-1 if w is None else w for w in e.word_ids]
        return out
