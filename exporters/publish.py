"""Atomic publication of a model version into a Triton-layout repository.

    <repository>/<name>/config.pbtxt
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/model_card.json
    <repository>/<name>/<version>/tokenizer.json ...   (extra files, e.g. a text model's tokenizer)

A version appears whole or not at all: its files are written and fsynced in
`<name>/.tmp-<uuid>/`, which is then renamed to `<version>` (a rename within one folder is atomic
on POSIX), so a server scanning the repository never sees half a version. Any failure removes
the temporary folder. Published versions are immutable: an existing version is never
overwritten. config.pbtxt is replaced atomically (temporary file + os.replace) after the
version is in place, and a config describing another signature stops the publication before
anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medserve.protos import model_config_pb2 as mc
from medserve.server.card import CardError, ModelCard
from medserve.server.layout import (
    CARD_DIGEST_KEY,
    CARD_FILENAME,
    CONFIG_FILENAME,
    MODEL_FILENAME,
    MODEL_NAME_RULE,
    card_digest,
    is_model_name,
)
from medserve.server.layout import parse_version as _parse_version

from . import triton_config
from .errors import ExportError, VersionExistsError

TEMP_PREFIX = ".tmp-"
__all__ = ["CARD_FILENAME", "CONFIG_FILENAME", "MODEL_FILENAME", "Published", "check_name", "file_hashes", "publish"]

CardFactory = Callable[[int, str], ModelCard | Mapping[str, object]]  # (version, model_sha256) -> card


@dataclass(frozen=True, slots=True)
class Published:
    version: int
    model_path: Path
    card_path: Path
    config_path: Path
    model_sha256: str


def check_name(name: str) -> None:
    if not is_model_name(name):
        raise ExportError(f"model name {name!r} is not valid: {MODEL_NAME_RULE}")


def file_hashes(files: Mapping[str, bytes]) -> dict[str, str]:
    """file name -> SHA-256 hex, sorted by name: the card's `files` map."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def _plain_file_name(file_name: str) -> bool:
    return (
        bool(file_name)
        and file_name not in (".", "..")
        and not file_name.startswith((".", TEMP_PREFIX))
        and "/" not in file_name
        and "\\" not in file_name
        and "\x00" not in file_name
    )


def existing_versions(model_dir: Path) -> list[int]:
    """Published versions: folders named by a positive integer, in increasing order."""
    if not model_dir.is_dir():
        return []
    found = (_parse_version(p.name) for p in model_dir.iterdir() if p.is_dir())
    return sorted(v for v in found if v is not None)


def next_version(model_dir: Path) -> int:
    return max(existing_versions(model_dir), default=0) + 1


def _write(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    repository: Path,
    name: str,
    *,
    version: int | None,
    model_bytes: bytes,
    make_card: CardFactory,
    config: mc.ModelConfig,
    extra_files: Mapping[str, bytes] | None = None,
) -> Published:
    """Publish `model_bytes` as `version` (next free number when None) of model `name`.

    `make_card(version, sha256)` builds the card once the version is known; if it (or anything
    else) fails, nothing is left behind. `extra_files` (file name -> bytes) are written into the
    version folder with the model, in the same atomic step; the card should list their SHA-256
    (`file_hashes`). Raises VersionExistsError, SignatureMismatchError."""
    check_name(name)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    extra = dict(extra_files or {})
    for file_name in extra:
        if file_name in (MODEL_FILENAME, CARD_FILENAME) or not _plain_file_name(file_name):
            raise ExportError(f"extra file name {file_name!r} must be a plain file name other than the model's and card's")
    model_dir = Path(repository) / name
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _publish_into(model_dir, name, version, model_bytes, make_card, config, extra)
    except BaseException:
        if created:  # a new model folder with no version would be a broken model to the server
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # only if still empty: never take a concurrent exporter's work
        raise


def _card_content(name: str, card: ModelCard | Mapping[str, object]) -> dict[str, object]:
    """The card's JSON object, checked against the schema the server loads it with: a card the
    server would refuse (limits, ranges, reference rows that do not parse) is never published."""
    if isinstance(card, ModelCard):
        return card.as_dict()
    try:
        ModelCard.from_dict(card)
    except CardError as exc:
        raise ExportError(f"model card of {name!r}: {exc}") from None
    return dict(card)


def _publish_into(
    model_dir: Path,
    name: str,
    version: int | None,
    model_bytes: bytes,
    make_card: CardFactory,
    config: mc.ModelConfig,
    extra_files: Mapping[str, bytes],
) -> Published:
    config_path = model_dir / CONFIG_FILENAME
    if config_path.exists():
        triton_config.check_signature(config_path, triton_config.read(config_path), config)
    number = next_version(model_dir) if version is None else version
    final_dir = model_dir / str(number)
    if final_dir.exists():
        raise VersionExistsError(
            f"model {name!r} version {number} already exists at {final_dir}; versions are immutable"
        )

    sha256 = hashlib.sha256(model_bytes).hexdigest()
    token = uuid.uuid4().hex
    temp_dir = model_dir / f"{TEMP_PREFIX}{token}"
    temp_config = model_dir / f"{TEMP_PREFIX}{token}-{CONFIG_FILENAME}"
    try:
        temp_dir.mkdir()
        _write(temp_dir / MODEL_FILENAME, model_bytes)
        for file_name, data in sorted(extra_files.items()):
            _write(temp_dir / file_name, data)
        content = _card_content(name, make_card(number, sha256))
        content[CARD_DIGEST_KEY] = card_digest(content)
        card = json.dumps(content, indent=2, allow_nan=False) + "\n"
        _write(temp_dir / CARD_FILENAME, card.encode("utf-8"))
        _write(temp_config, triton_config.render(config).encode("utf-8"))
        try:
            os.rename(temp_dir, final_dir)  # fails if another exporter published it meanwhile
        except OSError as exc:
            raise VersionExistsError(f"model {name!r} version {number} appeared while exporting: {exc}") from exc
        try:
            os.replace(temp_config, config_path)
        except BaseException:
            shutil.rmtree(final_dir, ignore_errors=True)  # never leave a version without its config
            raise
        _fsync_dir(model_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_config.unlink(missing_ok=True)
    return Published(number, final_dir / MODEL_FILENAME, final_dir / CARD_FILENAME, config_path, sha256)
