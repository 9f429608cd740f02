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

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TokenizerConfig

# Normalizers that act on each character alone, and pre-tokenizers that always split at an ASCII
# space: with these, the tokens of a text cut just before a space are a prefix of the whole
# text's tokens (nothing is normalized or merged across the space). Any other tokenizer
# (a Replace pattern, a ByteLevel without its split regex, ...) is never cut.
_LOCAL_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"})
_SPLITTING_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"})
_EXTRA_PRE_TOKENIZERS = frozenset({"Punctuation", "Digits"})  # in a Sequence beside a splitting one
FIRST_CUT_CHARS = 1024  # the first prefix tried is about this many characters past ...
CUT_CHARS_PER_TOKEN = 8  # ... or this many per token of max_length, whichever is more
# CJK ideographs: BertNormalizer makes each one of BERT's ranges a word of its own (a boundary);
# no run of letters that a long word is shortened in holds one of the (wider) blocks.
_CJK_BOUNDARY = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
                 "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"


def _types(section: Any, key: str) -> list[Mapping[str, Any]]:
    """A normalizer or pre-tokenizer section as its parts (a Sequence's members)."""
    if section is None:
        return []
    if section.get("type") == "Sequence":
        return [p for member in section.get(key, []) for p in _types(member, key)]
    return [section]


@dataclass(frozen=True, slots=True)
class _CutRules:
    """Where a text may be cut without changing its first tokens (see `TokenizerStage.cut`)."""

    boundary: re.Pattern[str]  # a character that always starts a new pre-token (cut before it)
    long_word: re.Pattern[str] | None  # WordPiece: a word this long is one unknown token whatever follows
    keep: int  # ... of which this many characters are kept


def _cut_rules(spec: Mapping[str, Any]) -> _CutRules | None:
    """The cut rules a tokenizer.json allows, or None when its text must be tokenized whole."""
    normalizers = _types(spec.get("normalizer"), "normalizers")
    pre = _types(spec.get("pre_tokenizer"), "pretokenizers")
    if any(n.get("type") not in _LOCAL_NORMALIZERS for n in normalizers):
        return None
    kinds = {p.get("type") for p in pre}
    if not kinds & _SPLITTING_PRE_TOKENIZERS or not kinds <= _SPLITTING_PRE_TOKENIZERS | _EXTRA_PRE_TOKENIZERS:
        return None
    if any(p.get("type") == "ByteLevel" and p.get("use_regex") is False for p in pre):
        return None
    if any(p.get("type") == "Metaspace" and p.get("split") is False for p in pre):
        return None
    # A character inside an added token ("[SEP]"'s "]") is no boundary: the cut would split it.
    inside = {c for token in spec.get("added_tokens", []) for c in str(token.get("content", ""))[1:]}
    chars = {" "}
    model = spec.get("model") or {}
    bert = (kinds == {"BertPreTokenizer"} and [n.get("type") for n in normalizers] == ["BertNormalizer"]
            and model.get("type") == "WordPiece")
    cjk = ""
    if bert:  # BERT isolates every ASCII punctuation mark (and, as configured, each CJK ideograph)
        chars |= set(string.punctuation)
        if normalizers[0].get("handle_chinese_chars", True):
            cjk = _CJK_BOUNDARY
    allowed = "".join(re.escape(c) for c in sorted(chars - inside))
    if not allowed:
        return None
    boundary = re.compile(f"[{allowed}{cjk}]")
    long_word, keep = None, 0
    if bert and isinstance(model.get("max_input_chars_per_word"), int):
        # A run of letters and digits (never split by BERT, and each still at least one
        # character once normalized) longer than max_input_chars_per_word is one [UNK] token,
        # whatever its length: kept to one character more than that limit.
        keep = model["max_input_chars_per_word"] + 1
        long_word = re.compile(f"[^\\W_{_CJK}]{{{keep + 1},}}")
    return _CutRules(boundary, long_word, keep)


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
        self._rules = _cut_rules(json.loads(tokenizer_json))
        self._first_cut = max(FIRST_CUT_CHARS, CUT_CHARS_PER_TOKEN * config.max_length)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The graph inputs this stage makes."""
        return self._inputs

    @property
    def cuts(self) -> bool:
        """Whether long texts are cut before tokenization (the tokenizer allows it)."""
        return self._rules is not None

    def __call__(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        """`texts`: str objects [rows, 1] (validated and decoded already)."""
        return self.tokenize(texts).inputs

    def cut(self, text: str) -> str:
        """The shortest text whose tokens, truncated at max_length, are exactly `text`'s.

        A megabyte of text costs the tokenizer about a second and hundreds of megabytes (it
        keeps an alignment per byte) for the max_length tokens the graph can use. So: a word of
        letters and digits longer than WordPiece's max_input_chars_per_word (one [UNK] however
        long) is shortened to one character past that limit; then the text is cut just before a
        boundary character (a space; for BERT also ASCII punctuation and CJK ideographs), which
        always starts a new pre-token, and the cut is kept only once the part before it
        tokenizes (without special tokens) to max_length tokens or more: those are then the
        first tokens of the whole text, and truncation keeps no others. Prefixes grow four-fold
        until one qualifies or the text is used whole (its long words shortened). Text the rules
        cannot shorten (200,000 emoji make one word) is tokenized whole: the request's text
        budget (`--max-text-bytes`) bounds it."""
        rules = self._rules
        if rules is None or len(text) <= self._first_cut:
            return text
        limit = self._first_cut
        while True:
            boundary = rules.boundary.search(text, limit)
            end = len(text) if boundary is None else boundary.start()
            prefix = text[:end]
            if rules.long_word is not None:  # no long word crosses a boundary: the prefix's are whole
                prefix = rules.long_word.sub(lambda m: m.group()[:rules.keep], prefix)
            if boundary is None:
                return prefix
            if len(self._tokenizer.encode(prefix, add_special_tokens=False).ids) >= self.max_length:
                return prefix
            limit = max(4 * limit, end + 1)

    def tokenize(self, texts: np.ndarray) -> Tokenized:
        """The graph's inputs, with the encodings behind them (an explanation's tokens and words)."""
        encodings = self._tokenizer.encode_batch([self.cut(str(t)) for t in texts.reshape(-1)])
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
