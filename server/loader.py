"""A model version's files, checked once: the model file, the config, the card, external data,
listed files and the tokenizer. What comes out (`VersionFiles`) is what the factory builds a
served version from, so nothing is read twice and no check is repeated or skipped.

    <root>/<model>/config.pbtxt                  optional; completed from the ONNX graph later
    <root>/<model>/<version>/model.onnx          version = a positive integer folder name
    <root>/<model>/<version>/model_card.json     optional; its SHA-256 must match model.onnx

Paths never escape the root: model names are single path segments, and every file is resolved
(symlinks included) and checked to lie under the root. Messages name files relative to the
root (never the host's layout).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from .card import CardError, ModelCard, loads
from .config import ModelConfig
from .errors import ConfigError, MedserveError, ModelLoadFailed, ModelNotFound, model_label
from .layout import (
    CARD_DIGEST_KEY,
    CARD_FILENAME,
    CONFIG_FILENAME,
    MODEL_NAME_RULE,
    card_digest,
    is_model_name,
    parse_version,
)
from .model_config import from_proto, read_config_proto
from .onnx_refs import external_files
from .rollout import LABELS_FILENAME, MAX_LABELS_BYTES, RolloutSpec, parse_rollout


@dataclass(frozen=True, slots=True)
class VersionFiles:
    """One version's checked files: everything the factory needs, read once."""

    name: str
    version: int
    base: ModelConfig  # as config.pbtxt states it (or the defaults), before the graph completes it
    config_path: Path  # shown (relative to the root): config.pbtxt, whether or not it exists
    config_or_model: Path  # shown: the file a completed config's messages name
    model_path: Path  # shown
    source: Path | bytes  # the very bytes that were hashed, or the checked file when it has external data
    sha256: str
    card: ModelCard | None
    card_path: Path  # shown
    tokenizer: bytes | None  # a text model's tokenizer.json, its SHA-256 checked against the card
    tokenizer_path: Path | None  # shown


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RepositoryFiles:
    """Reads and checks the files under one repository root (no state of its own)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # -- names and paths -------------------------------------------------------------------

    def scan(self) -> list[str]:
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: model repository folder does not exist")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def model_dir(self, name: str) -> Path:
        """The folder of model `name`, refusing names that are not one plain path segment and
        folders that resolve outside the repository."""
        if not is_model_name(name):
            raise ModelNotFound(f"model name {name!r} is not valid ({MODEL_NAME_RULE})")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or path.parent != self.root:
            raise ModelNotFound(f"model {name!r} resolves outside the model repository")
        if not path.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the model repository")
        return path

    def shown(self, path: Path) -> Path:
        """A path as messages name it: relative to the repository (never the host's layout)."""
        try:
            return path.relative_to(self.root)
        except ValueError:
            return Path(path.name)

    def relative(self, text: str) -> str:
        """A message with the repository's own location taken out of every path in it."""
        return text.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def _inside(self, path: Path, what: str) -> Path:
        """`path` resolved (symlinks followed), refused unless it stays inside the repository."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ConfigError(f"{self.shown(path)}: {what} resolves outside the model repository")
        return resolved

    def fingerprint(self, name: str) -> tuple[object, ...]:
        """What changes when a model's files do: names, sizes and modification times (the labels
        file apart: a label change reloads no session; see `labels_text`)."""
        root = self.root / name
        items = []
        for path in sorted(root.glob("*")) + sorted(root.glob("*/*")):
            if path.name == LABELS_FILENAME and path.parent == root:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            items.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
        return tuple(items)

    # -- a model's labels -------------------------------------------------------------------

    def labels_text(self, name: str) -> bytes | None:
        """The labels file's bytes as they are now (None without one; at most one byte over the
        limit, so an oversized file is refused by `rollout` without reading it all)."""
        path = self.root / name / LABELS_FILENAME
        try:
            real = self._inside(path, "the labels file")
            with real.open("rb") as f:
                return f.read(MAX_LABELS_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{self.shown(path)}: cannot read it ({exc.strerror})") from None

    def rollout(self, name: str, text: bytes | None) -> RolloutSpec | None:
        """The model's labels, parsed (ConfigError naming the file and entry), or None."""
        return None if text is None else parse_rollout(f"{name}/{LABELS_FILENAME}", text)

    # -- a model's config and versions -----------------------------------------------------

    def _base(self, name: str, model_dir: Path) -> ModelConfig:
        config_path = model_dir / CONFIG_FILENAME
        if not config_path.exists():
            return ModelConfig(name=name)
        real = self._inside(config_path, "the model config")
        return from_proto(self.shown(config_path), read_config_proto(real, self.shown(config_path)), name)

    @staticmethod
    def _found(model_dir: Path) -> list[int]:
        found = (parse_version(p.name) for p in model_dir.iterdir() if p.is_dir())
        return [v for v in found if v is not None]

    def versions(self, name: str) -> tuple[ModelConfig, list[int]]:
        """The model's config as written and the versions its policy selects (refused when none)."""
        model_dir = self.model_dir(name)
        base = self._base(name, model_dir)
        available = self._found(model_dir)
        selected = base.version_policy.select(available)
        if not selected:
            raise ConfigError(
                f"{self.shown(model_dir)}: no version folder selected by version_policy {base.version_policy.kind} "
                f"(found versions {sorted(available)})"
            )
        return base, selected

    def selected(self, name: str) -> list[int]:
        """The version folders the model's policy selects (none when its config does not parse)."""
        try:
            model_dir = self.model_dir(name)
            policy = self._base(name, model_dir).version_policy
        except MedserveError:
            return []
        return policy.select(self._found(model_dir))

    # -- one version's files ---------------------------------------------------------------

    def version(self, base: ModelConfig, version: int) -> VersionFiles:
        """Read and check one version's files, or refuse naming the file (and the entry)."""
        model_dir = self.model_dir(base.name)
        config_path = model_dir / CONFIG_FILENAME
        version_dir = self._inside(model_dir / str(version), "the version folder")
        model_path = self._inside(version_dir / base.default_model_filename, "the model file")
        if not model_path.is_file():
            raise ConfigError(f"{self.shown(version_dir)}: model file {base.default_model_filename!r} is missing")
        model_bytes = model_path.read_bytes()  # hashed, checked and handed to onnxruntime: one read
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        card = self._read_card(base.name, version, version_dir, sha256)
        external = self._check_external_data(model_path, model_bytes, card)
        self._check_listed_files(version_dir, card)
        tokenizer, tokenizer_path = self._tokenizer(version_dir, base, card)
        return VersionFiles(
            name=base.name,
            version=version,
            base=base,
            config_path=self.shown(config_path),
            config_or_model=self.shown(config_path if config_path.exists() else model_path),
            model_path=self.shown(model_path),
            # A model with external data is opened from its file (onnxruntime reads the listed,
            # checked files beside it); any other from the very bytes that were hashed.
            source=model_path if external else model_bytes,
            sha256=sha256,
            card=card,
            card_path=self.shown(version_dir / CARD_FILENAME),
            tokenizer=tokenizer,
            tokenizer_path=tokenizer_path,
        )

    def _check_listed_files(self, version_dir: Path, card: ModelCard | None) -> None:
        """Every file the card lists (`files`: name -> SHA-256) is there, inside the version
        folder, with that hash: a version whose files were swapped does not load."""
        listed = card.files if card is not None else None
        if listed is None:
            return
        for name, digest in sorted(listed.items()):
            path = version_dir / str(name)
            shown = self.shown(path)
            if Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
                raise ConfigError(f"{shown}: a listed file must be inside the version folder")
            self._inside(path, "a listed file")
            if not path.is_file() or sha256_of(path) != digest:
                raise ConfigError(f"{shown}: missing, or its SHA-256 does not match {CARD_FILENAME} files")

    def _tokenizer(self, version_dir: Path, base: ModelConfig, card: ModelCard | None) -> tuple[bytes | None, Path | None]:
        """A text model's tokenizer: the very bytes whose SHA-256 the card lists."""
        tokenizer = base.tokenizer
        if tokenizer is None:
            return None, None
        path = self._inside(version_dir / tokenizer.file, "the tokenizer")
        shown = self.shown(version_dir / tokenizer.file)
        listed = card.files if card is not None else None
        expected = listed.get(tokenizer.file) if listed is not None else None
        if expected is None:
            raise ConfigError(f"{shown}: not listed with its SHA-256 in {CARD_FILENAME} files")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{shown}: cannot read the tokenizer: {type(exc).__name__}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            raise ConfigError(f"{shown}: its SHA-256 does not match {CARD_FILENAME}; refusing a swapped tokenizer")
        return data, shown

    def _check_external_data(self, model_path: Path, model_bytes: bytes, card: ModelCard | None) -> bool:
        """Refuse external data unless each file is a plain relative path inside the version
        folder and listed with its SHA-256 in the card's `external_data`; True if there is any."""
        version_dir = model_path.parent
        try:
            files = external_files(model_bytes)
        except DecodeError as exc:
            raise ConfigError(f"{self.shown(model_path)}: not a valid ONNX model file") from exc
        if not files:
            return False
        listed = (card.external_data if card is not None else None) or {}
        for name in sorted(files):
            shown = f"{self.shown(version_dir)}: external data {name!r}"
            if name not in listed:
                raise ConfigError(f"{shown} is not listed with its SHA-256 in {CARD_FILENAME} external_data")
            path = version_dir / name
            if Path(name).is_absolute() or ".." in Path(name).parts or path.resolve().parent != version_dir:
                raise ConfigError(f"{shown} must be a file directly inside the version folder")
            if not path.is_file() or sha256_of(path) != listed[name]:
                raise ConfigError(f"{shown}: missing, or its SHA-256 does not match {CARD_FILENAME}")
        return True

    def _read_card(self, name: str, version: int, version_dir: Path, sha256: str) -> ModelCard | None:
        """The version's card, parsed once into its typed value (None when there is none)."""
        card_path = version_dir / CARD_FILENAME
        if not card_path.exists():
            return None
        card_path = self._inside(card_path, "the model card")
        try:
            raw = loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.shown(card_path)}: not valid JSON: {exc}") from exc
        with card_errors(self.shown(version_dir / CARD_FILENAME)):
            card = ModelCard.from_dict(raw)  # first: the digest is computed only over finite JSON
        sealed = raw.get(CARD_DIGEST_KEY)
        if sealed is not None and sealed != card_digest(raw):
            raise ModelLoadFailed(
                f"model {model_label(name, version)}: {CARD_FILENAME} was changed after publication (its content "
                f"does not match its {CARD_DIGEST_KEY}); refusing reference rows and limits that are not the published ones"
            )
        expected = card.model_sha256
        if expected is not None and expected != sha256:
            raise ModelLoadFailed(
                f"model {model_label(name, version)}: model file SHA-256 {sha256} does not match "
                f"{CARD_FILENAME} model_sha256 {expected}; refusing a file that is not the published one"
            )
        return card


@contextlib.contextmanager
def card_errors(card_path: Path) -> Iterator[None]:
    """A card entry that does not parse (or does not fit the model) as a load failure naming
    the card's file and the entry: clinical limits never switch off in silence."""
    try:
        yield
    except CardError as exc:
        raise ConfigError(f"{card_path}: {exc}") from None
