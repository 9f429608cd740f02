"""Bearer-token authorization. A token file maps each token to the models it may use:

    {"<token>": ["sepsis", "readmission"], "<admin token>": ["*"]}

No token or an unknown one -> Unauthenticated; a known token used for another model (or for
repository load/unload without "*") -> PermissionDenied. Tokens are compared by SHA-256 digest
in constant time and never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import ConfigError, PermissionDenied, Unauthenticated

ALL_MODELS = "*"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuthorizer:
    def __init__(self, tokens: Mapping[str, Iterable[str]]) -> None:
        self._grants = [(_digest(token), frozenset(models)) for token, models in tokens.items()]

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthorizer:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the token file: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(t, str) and t and isinstance(m, list) and all(isinstance(x, str) for x in m)
            for t, m in data.items()
        ):
            raise ConfigError(f"{path}: expected a JSON object mapping each token to a list of model names")
        return cls(data)

    def _grant(self, metadata: Iterable[tuple[str, str | bytes]]) -> frozenset[str]:
        header = next((v for k, v in metadata if k == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        value = header.decode() if isinstance(header, bytes) else header
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        digest = _digest(token.strip())
        found: frozenset[str] | None = None
        for known, models in self._grants:
            if hmac.compare_digest(known, digest):
                found = models
        if found is None:
            raise Unauthenticated("unknown bearer token")
        return found

    def check(self, metadata: Iterable[tuple[str, str | bytes]], model: str | None) -> None:
        """Authorize a call for `model` (None = any valid token; "*" = needs full access)."""
        models = self._grant(metadata)
        if model is None or ALL_MODELS in models:
            return
        if model == ALL_MODELS or model not in models:
            target = "repository administration" if model == ALL_MODELS else f"model {model!r}"
            raise PermissionDenied(f"token is not allowed to use {target}")
