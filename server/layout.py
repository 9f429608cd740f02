"""The model repository's layout (Triton's), shared by the server that reads it and the exporters
that write it, so the two can never disagree on a name. Standard library only.

    <repository>/<model>/config.pbtxt                  optional
    <repository>/<model>/<version>/model.onnx          version = a positive integer folder name
    <repository>/<model>/<version>/model_card.json     from the exporters
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

CONFIG_FILENAME = "config.pbtxt"
MODEL_FILENAME = "model.onnx"
CARD_FILENAME = "model_card.json"

# One plain path segment, matched whole (`fullmatch`: "name\n" is not a name).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MODEL_NAME_RULE = "letters, digits, '_', '.', '-', not starting with '.', '_' or '-'"
MAX_VERSION_DIGITS = 18  # a version is an int64 in Triton's protocol
CARD_DIGEST_KEY = "card_sha256"


def card_digest(card: Mapping[str, object]) -> str:
    """The SHA-256 of a model card's content (every entry but `card_sha256` itself, as canonical
    JSON), written by the exporters and checked at load: the reference rows, deciles and clinical
    limits the server acts on are covered like the model file is."""
    body = {k: v for k, v in card.items() if k != CARD_DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def parse_version(text: str) -> int | None:
    """The version a folder name or a request's `model_version` names: a positive integer in
    ASCII digits (no sign, no other script's digits, at most 18 of them); None otherwise."""
    if not (0 < len(text) <= MAX_VERSION_DIGITS and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None
