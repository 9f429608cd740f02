"""Named identities: who may call the server, which models each may use, whether it may
administer the repository, and how fast it may call. Read from the `--tokens` file (JSON):

    {"version": 1, "identities": [
      {"name": "billing", "token_sha256": "<hex>", "models": ["icu_*", "sepsis"], "rate_per_s": 50, "burst": 100},
      {"name": "ward7-gateway", "certificate": "ward7.hospital.local", "models": ["*"]},
      {"name": "ops", "token_sha256": "<hex>", "models": ["*"], "admin": true}
    ]}

A token is stored only as its SHA-256 (tokens are 256-bit random strings, so a plain digest is
safe to keep; the token itself is printed once by `medserve tokens add`). `certificate` names a
mutual-TLS client certificate (verified against `--tls-client-ca`) by one of its names: the gate
looks its subject alternative names up in the certificate's order (DNS, URI, e-mail and IP
alike), then its common name; the first of those names listed here is the identity — so a
certificate whose first SAN is an e-mail address is still known by a DNS name listed after it.
Model names are matched whole or by shell-style patterns (`icu_*`); "*" is every model.
Standard library only.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InvalidSetting, Unauthenticated

FORMAT_VERSION = 1
TOKEN_BYTES = 32  # 256 bits of randomness: a token cannot be guessed, so its plain SHA-256 is safe
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_HEX = re.compile(r"[0-9a-f]{64}")
# A model name's characters (server/layout.py's MODEL_NAME) and fnmatch's: anything else (a comma,
# a space, a slash) makes a pattern no model name can match, which would grant nothing in silence.
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_identity(identities: IdentityFile, authorization: str) -> Identity:
    """The identity an `authorization: Bearer <token>` value names (gRPC metadata or HTTP header
    alike), else Unauthenticated saying what is wrong: never the token."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    identity = identities.by_token.get(token_digest(token.strip()))
    if identity is None:
        raise Unauthenticated("unknown bearer token")
    return identity


@dataclass(frozen=True, slots=True)
class Identity:
    """One caller. `models`: names or patterns it may use ("*" = all). `admin`: may load and
    unload models (in explicit model-control mode). `rate_per_s` 0 = no rate limit; `burst` is
    the bucket's size (default: one second's worth)."""

    name: str
    models: tuple[str, ...] = ()
    admin: bool = False
    token_sha256: str | None = None
    certificate: str | None = None
    rate_per_s: float = 0.0
    burst: int = 0

    def may_use(self, model: str) -> bool:
        return any(p == "*" or p == model or fnmatch.fnmatchcase(model, p) for p in self.models)


# The identity of every call when authentication is off: all models, no administration (that
# still needs --model-control-mode explicit, and is then open to anyone who reaches the port).
ANONYMOUS = Identity("anonymous", models=("*",), admin=True)


def _entry(path: Path, i: int, raw: object) -> Identity:
    where = f"{path}: identities[{i}]"
    if not isinstance(raw, dict):
        raise InvalidSetting(f"{where}: expected an object")
    unknown = set(raw) - {"name", "models", "admin", "token_sha256", "certificate", "rate_per_s", "burst"}
    if unknown:
        raise InvalidSetting(f"{where}: unknown fields {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidSetting(f"{where}.name: expected 1-64 letters, digits, '_', '.', '@', '-'")
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise InvalidSetting(f"{where} ({name}).models: expected a list of model names or patterns")
    impossible = [m for m in models if not _PATTERN.fullmatch(m)]
    if impossible:
        raise InvalidSetting(f"{where} ({name}).models: {impossible[0]!r} can never match a model name (names hold "
                             "letters, digits, '_', '.', '-'; patterns add '*', '?', '[...]'; give one per entry)")
    token, cert = raw.get("token_sha256"), raw.get("certificate")
    if (token is None) == (cert is None):
        raise InvalidSetting(f"{where} ({name}): give exactly one of token_sha256 and certificate")
    if token is not None and (not isinstance(token, str) or not _HEX.fullmatch(token)):
        raise InvalidSetting(f"{where} ({name}).token_sha256: expected 64 lowercase hex digits")
    if cert is not None and (not isinstance(cert, str) or not cert):
        raise InvalidSetting(f"{where} ({name}).certificate: expected the certificate's subject name")
    admin = raw.get("admin", False)
    rate, burst = raw.get("rate_per_s", 0), raw.get("burst", 0)
    if not isinstance(admin, bool):
        raise InvalidSetting(f"{where} ({name}).admin: expected true or false")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        raise InvalidSetting(f"{where} ({name}).rate_per_s: expected a number >= 0")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise InvalidSetting(f"{where} ({name}).burst: expected an integer >= 0")
    return Identity(name, tuple(models), admin, token, cert, float(rate), burst or max(1, int(rate)))


@dataclass(slots=True)
class IdentityFile:
    """The identities of one `--tokens` file, indexed for lookup by token digest and by
    certificate subject. `load` validates everything, naming the entry and field."""

    path: Path
    identities: tuple[Identity, ...] = ()
    by_token: dict[str, Identity] = field(default_factory=dict)
    by_certificate: dict[str, Identity] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> IdentityFile:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {"version": FORMAT_VERSION, "identities": []}
        except (OSError, ValueError) as exc:
            raise InvalidSetting(f"{path}: cannot read the identities file: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(
            data.get("identities"), list
        ):
            raise InvalidSetting(
                f'{path}: expected {{"version": {FORMAT_VERSION}, "identities": [...]}} (create entries with '
                "`medserve tokens add NAME --models ... --file FILE`)"
            )
        identities = tuple(_entry(path, i, raw) for i, raw in enumerate(data["identities"]))
        loaded = cls(path, identities)
        for ident in identities:
            if ident.name in {o.name for o in identities if o is not ident}:
                raise InvalidSetting(f"{path}: identity name {ident.name!r} is listed twice")
            if ident.token_sha256 is not None:
                if ident.token_sha256 in loaded.by_token:
                    raise InvalidSetting(f"{path}: identities {loaded.by_token[ident.token_sha256].name!r} and "
                                         f"{ident.name!r} have the same token")
                loaded.by_token[ident.token_sha256] = ident
            if ident.certificate is not None:
                loaded.by_certificate[ident.certificate] = ident
        return loaded

    def save(self) -> None:
        """Write atomically with owner-only permissions (the file holds token digests)."""
        entries = [{k: v for k, v in asdict(i).items() if v not in (None, False, 0, 0.0)} for i in self.identities]
        text = json.dumps({"version": FORMAT_VERSION, "identities": entries}, indent=1) + "\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def add(self, name: str, models: Iterable[str], *, admin: bool = False, certificate: str | None = None,
            rate_per_s: float = 0.0, burst: int = 0) -> str | None:
        """Add an identity; returns its new token (None for a certificate identity)."""
        if any(i.name == name for i in self.identities):
            raise InvalidSetting(f"{self.path}: identity {name!r} exists already (revoke it first)")
        token = None if certificate else secrets.token_urlsafe(TOKEN_BYTES)
        raw: dict[str, object] = {"name": name, "models": list(models), "admin": admin, "rate_per_s": rate_per_s,
                                  "burst": burst}
        raw["certificate" if certificate else "token_sha256"] = certificate or token_digest(str(token))
        entry = _entry(self.path, len(self.identities), raw)
        self.identities = (*self.identities, entry)
        return token

    def revoke(self, name: str) -> None:
        if not any(i.name == name for i in self.identities):
            raise InvalidSetting(f"{self.path}: no identity {name!r}")
        self.identities = tuple(i for i in self.identities if i.name != name)

    def describe(self) -> list[Mapping[str, object]]:
        """What `medserve tokens list` shows: never a digest."""
        return [
            {"name": i.name, "kind": "certificate" if i.certificate else "token", "models": list(i.models),
             "admin": i.admin, "rate_per_s": i.rate_per_s, **({"certificate": i.certificate} if i.certificate else {})}
            for i in self.identities
        ]
