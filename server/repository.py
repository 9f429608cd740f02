"""The model repository on disk (Triton's layout) and the versions loaded from it.

    <root>/<model>/config.pbtxt                  optional; completed from the ONNX graph
    <root>/<model>/<version>/model.onnx          version = a positive integer folder name
    <root>/<model>/<version>/model_card.json     optional; its SHA-256 must match model.onnx

Each served version gets its own onnxruntime sessions (one per instance), its own batcher and
its own statistics. A version is READY only after a warm-up inference succeeded. Loading runs in
a worker thread, so a (re)load never stalls requests to other models; a reload swaps versions
in only once the new ones are ready, then drains the old ones.

Paths never escape the root: model names are single path segments, and every file is resolved
(symlinks included) and checked to lie under the root.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from .batching import Batcher, BatcherConfig, Clock, work_of
from .card import CardError, ModelCard, loads
from .config import ModelConfig, ServerConfig
from .errors import ConfigError, MedserveError, ModelLoadFailed, ModelNotFound, ModelNotReady, model_label
from .explain import Explainer
from .layout import (
    CARD_DIGEST_KEY,
    CARD_FILENAME,
    CONFIG_FILENAME,
    MODEL_NAME_RULE,
    card_digest,
    is_model_name,
    parse_version,
)
from .model_config import complete, from_proto, read_config_proto
from .monitor import FeatureMonitor
from .onnx_refs import external_files
from .runtime import OnnxModel, SessionOptions, instance_providers, lower_thread_priority, zeros_like_spec
from .signature import Signature
from .stats import ModelStats
from .tokenize import TokenizerStage

log = logging.getLogger(__name__)



class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load (reason says why) or unloaded


@dataclass(slots=True, eq=False)
class LoadedVersion:
    """A servable model version: everything a request needs, traceable to its exact file."""

    name: str
    version: int
    config: ModelConfig
    model: OnnxModel
    stats: ModelStats
    sha256: str
    card: ModelCard | None  # parsed once at load: every module reads its typed attributes
    executor: ThreadPoolExecutor
    warmups: tuple[tuple[int, float], ...] = ()  # (work, engine seconds) of the warm-ups: the cost model's seed
    stage: TokenizerStage | None = None  # text models: strings -> the graph's token ids
    monitor: FeatureMonitor | None = None  # tabular models: clinical limits, range flags, drift
    background: ThreadPoolExecutor | None = None  # background parts' threads (lowest OS priority)
    explainer: Explainer | None = None  # made on the version's first explanation
    batcher: Batcher | None = None
    signature: Signature = field(init=False)
    label: str = field(init=False)  # "'name' version N", for messages (built once, not per request)

    def __post_init__(self) -> None:
        self.signature = Signature.of(self.config)
        self.label = model_label(self.name, self.version)


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One line of the repository index: a model (version "" when none is loaded) and its state."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(slots=True)
class VersionEntry:
    version: int
    state: State
    reason: str = ""
    loaded: LoadedVersion | None = None


@dataclass(slots=True)
class ModelEntry:
    name: str
    state: State = State.LOADING
    reason: str = ""
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    latest: LoadedVersion | None = None  # the highest READY version: what "no version" means


def unknown_model(name: str) -> ModelNotFound:
    """The answer for a model that is not there (or that the caller may not see: the same words)."""
    return ModelNotFound(f"model {name!r} is not in the model repository")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    """Loads, serves and unloads the models under one repository root."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Clock,
        session_options: SessionOptions | None = None,
    ) -> None:
        self.root = Path(config.repository).resolve()
        self._config = config
        self._clock = clock
        self._session_options = session_options or SessionOptions(
            providers=config.providers,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
        )
        self._models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._fingerprints: dict[str, tuple[object, ...]] = {}  # poll mode: the files last loaded
        self._watchers: list[Callable[[str, bool], None]] = []

    def watch(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(model, ready)` whenever a model's servable state may have changed."""
        self._watchers.append(callback)

    def _notify(self, name: str) -> None:
        entry = self._models.get(name)
        for callback in self._watchers:
            callback(name, entry is not None and entry.latest is not None)

    # -- discovery -------------------------------------------------------------------------

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

    def _relative(self, text: str) -> str:
        """A message with the repository's own location taken out of every path in it."""
        return text.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def scan(self) -> list[str]:
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: model repository folder does not exist")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    # -- loading ---------------------------------------------------------------------------

    async def load_all(self, *, exit_on_error: bool) -> None:
        """Load every model at start-up. With `exit_on_error`, the first broken model raises
        (the server does not start); otherwise it is kept as UNAVAILABLE with its reason."""
        for name in self.scan():
            try:
                await self.load(name)
            except MedserveError:
                if exit_on_error:
                    raise
                log.error("model %r failed to load; serving the others", name, extra={"model": name})

    async def load_named(self, names: Sequence[str], *, exit_on_error: bool) -> None:
        """Explicit model control: load just these models at start ("*" = every model)."""
        for name in self.scan() if "*" in names else names:
            try:
                await self.load(name)
            except MedserveError:
                if exit_on_error:
                    raise
                log.error("model %r failed to load; serving the others", name, extra={"model": name})

    async def poll(self) -> None:
        """Poll model control: load models and versions that appeared or changed (a version that
        fails to load leaves the serving ones in place), unload models that went away."""
        present = set(self.scan())
        for name in sorted(present):
            if self._fingerprint(name) == self._fingerprints.get(name):
                continue
            try:
                await self.load(name)
            except MedserveError as exc:
                log.error("model %r: new files did not load; what was serving still serves: %s", name, exc,
                          extra={"model": name})
        for name in sorted(set(self._models) - present):
            self._fingerprints.pop(name, None)
            if self._models[name].versions:
                log.info("model %r left the repository: unloading", name, extra={"model": name})
                await self.unload(name)

    def _fingerprint(self, name: str) -> tuple[object, ...]:
        """What changes when a model's files do: names, sizes and modification times."""
        root = self.root / name
        items = []
        for path in sorted(root.glob("*")) + sorted(root.glob("*/*")):
            try:
                stat = path.stat()
            except OSError:
                continue
            items.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
        return tuple(items)

    async def load(self, name: str) -> None:
        """Load (or reload) one model: new versions are loaded and warmed up first, then swapped
        in; versions no longer selected are drained and unloaded."""
        self.model_dir(name)  # refuse unknown names before keeping any state for them
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self._models.get(name)
            if entry is None:
                entry = self._models[name] = ModelEntry(name)
            previous = dict(entry.versions)
            if not previous:
                entry.state = State.LOADING
            # What was tried is remembered either way: poll mode retries a broken model only
            # when its files change again.
            self._fingerprints[name] = self._fingerprint(name)
            try:
                loaded = await asyncio.to_thread(self._load_sync, name)
            except MedserveError as exc:
                self._failed(entry, bool(previous), self._relative(str(exc)))
                log.error("model %r: load failed: %s", name, entry.reason, extra={"model": name})
                if isinstance(exc, ModelNotFound):
                    raise
                raise ModelLoadFailed(entry.reason) from exc
            except Exception as exc:  # noqa: BLE001 - an unexpected failure is still a load failure
                log.exception("model %r: load failed unexpectedly", name)
                self._failed(entry, bool(previous), self._relative(f"{type(exc).__name__}: {exc}"))
                raise ModelLoadFailed(f"model {name!r} failed to load: {type(exc).__name__}") from exc
            for version in loaded:
                config = version.config
                version.batcher = Batcher(
                    version.model,
                    BatcherConfig(
                        name=version.label,
                        batching=config.batching,
                        instances=config.instance_count,
                        max_queue_size=self._config.max_queue_size,
                        split_rows=config.max_batch_size if config.split_oversized else 0,
                        warmups=version.warmups,
                        inline_below_s=self._config.inline_below_us / 1e6,
                        padding=config.padding,
                        padded_outputs=padded_outputs(config),
                    ),
                    self._clock,
                    executor=version.executor,
                    background_executor=version.background,
                    observer=version.stats,
                )
                version.batcher.start()
            entry.versions = {v.version: VersionEntry(v.version, State.READY, loaded=v) for v in loaded}
            entry.latest = max(loaded, key=lambda v: v.version)
            entry.state, entry.reason = State.READY, ""
            for v in loaded:
                log.info(
                    "model %r version %d READY: providers %s, max_batch_size %d, dynamic batching %s, "
                    "instances %d, sha256 %s",
                    name, v.version, ",".join(v.model.providers), v.config.max_batch_size,
                    "on" if v.config.batching else "off", v.config.instance_count, v.sha256[:16],
                    extra={"model": name, "version": v.version, "model_sha256": v.sha256},
                )
            self._notify(name)
            retired = [e for e in previous.values() if e.loaded is not None]  # replaced by fresh sessions
            await self._retire(retired)
            for e in retired:
                log.info("model %r version %d unloaded (drained)", name, e.version,
                         extra={"model": name, "version": e.version})

    def _failed(self, entry: ModelEntry, serving: bool, reason: str) -> None:
        """A load failed: the versions it tried are UNAVAILABLE with the reason (the repository
        index says why), and whatever was serving keeps serving."""
        entry.reason = reason
        if not serving:
            entry.state = State.UNAVAILABLE
        for version in self._selected_versions(entry.name):
            current = entry.versions.get(version)
            if current is None or current.loaded is None:
                entry.versions[version] = VersionEntry(version, State.UNAVAILABLE, reason)

    def _selected_versions(self, name: str) -> list[int]:
        """The version folders the model's policy selects (none when its config does not parse)."""
        try:
            model_dir = self.model_dir(name)
            config_path = model_dir / CONFIG_FILENAME
            policy = (from_proto(self.shown(config_path), read_config_proto(config_path), name).version_policy
                      if config_path.exists() else ModelConfig(name=name).version_policy)
        except MedserveError:
            return []
        found = (parse_version(p.name) for p in model_dir.iterdir() if p.is_dir())
        return policy.select([v for v in found if v is not None])

    def _load_sync(self, name: str) -> list[LoadedVersion]:
        model_dir = self.model_dir(name)
        config_path = model_dir / CONFIG_FILENAME
        if config_path.exists():
            real = self._inside(config_path, "the model config")
            base = from_proto(self.shown(config_path), read_config_proto(real, self.shown(config_path)), name)
        else:
            base = ModelConfig(name=name)
        found = (parse_version(p.name) for p in model_dir.iterdir() if p.is_dir())
        available = [v for v in found if v is not None]
        selected = base.version_policy.select(available)
        if not selected:
            raise ConfigError(
                f"{self.shown(model_dir)}: no version folder selected by version_policy {base.version_policy.kind} "
                f"(found versions {sorted(available)})"
            )
        return [self._load_version(model_dir, config_path, base, v) for v in selected]

    def _inside(self, path: Path, what: str) -> Path:
        """`path` resolved (symlinks followed), refused unless it stays inside the repository."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ConfigError(f"{self.shown(path)}: {what} resolves outside the model repository")
        return resolved

    def shown(self, path: Path) -> Path:
        """A path as messages name it: relative to the repository (never the host's layout)."""
        try:
            return path.relative_to(self.root)
        except ValueError:
            return Path(path.name)

    def _load_version(self, model_dir: Path, config_path: Path, base: ModelConfig, version: int) -> LoadedVersion:
        version_dir = self._inside(model_dir / str(version), "the version folder")
        model_path = self._inside(version_dir / base.default_model_filename, "the model file")
        if not model_path.is_file():
            raise ConfigError(f"{self.shown(version_dir)}: model file {base.default_model_filename!r} is missing")
        model_bytes = model_path.read_bytes()  # hashed, checked and handed to onnxruntime: one read
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        card = self._read_card(base.name, version, version_dir, sha256)
        external = self._check_external_data(model_path, model_bytes, card)
        self._check_listed_files(version_dir, card)
        try:
            instances = [
                plan
                for g in base.instance_groups
                for plan in instance_providers(self._session_options, g.kind, g.gpus, g.count)
            ]
        except ConfigError as exc:
            raise ConfigError(f"{self.shown(config_path)}: {exc}") from None
        # A model with external data is opened from its file (onnxruntime reads the listed,
        # checked files beside it); any other from the very bytes that were hashed.
        source = model_path if external else model_bytes
        model = OnnxModel(source, self._session_options, instances, shown=self.shown(model_path))
        where = config_path if config_path.exists() else model_path
        config = complete(self.shown(where), base, model.inputs, model.outputs)
        monitor = None
        if card is not None:
            with self._card_errors(version_dir):
                if config.max_batch_size > 0:  # reference rows are per row of a batch
                    card.check_fits({t.name: t.dims for t in config.graph_inputs or config.inputs},
                                    [t.name for t in config.outputs])
                monitor = FeatureMonitor.from_card(model_label(base.name, version), card,
                                                   {t.name: t.dims for t in config.inputs})
        stage = self._stage(version_dir, config, card)
        warmups = self._warm_up(base.name, version, config, model)
        executor = ThreadPoolExecutor(max_workers=config.instance_count, thread_name_prefix=f"ort-{base.name}")
        # Background parts (explanations) run on threads of their own at the lowest OS priority,
        # beside callers' batches: the cores go to predictions first.
        background = ThreadPoolExecutor(max_workers=config.instance_count, thread_name_prefix=f"ort-{base.name}-bg",
                                        initializer=lower_thread_priority)
        return LoadedVersion(base.name, version, config, model, ModelStats(), sha256, card, executor, warmups,
                             stage=stage, monitor=monitor, background=background)

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

    def _stage(self, version_dir: Path, config: ModelConfig, card: ModelCard | None) -> TokenizerStage | None:
        """A text model's tokenizer, from the very bytes whose SHA-256 the card lists."""
        tokenizer = config.tokenizer
        if tokenizer is None:
            return None
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
        pad_id = next((int(p.value) for p in config.padding if p.input == "input_ids"), 0)
        try:
            return TokenizerStage(data.decode("utf-8"), tokenizer, pad_id)
        except ModuleNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own types
            raise ConfigError(f"{shown}: the tokenizers library cannot load it: {type(exc).__name__}") from exc

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

    @contextlib.contextmanager
    def _card_errors(self, version_dir: Path) -> Iterator[None]:
        """A card entry that does not parse (or does not fit the model) as a load failure naming
        the card's file and the entry: clinical limits never switch off in silence."""
        try:
            yield
        except CardError as exc:
            raise ConfigError(f"{self.shown(version_dir / CARD_FILENAME)}: {exc}") from None

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
        with self._card_errors(version_dir):
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

    @staticmethod
    def _warm_up(name: str, version: int, config: ModelConfig, model: OnnxModel) -> tuple[tuple[int, float], ...]:
        """Run zeros at a few sizes, each twice (the first run pays one-time allocations), and
        return each size's (work, engine seconds) of the second run: the cost model's seed.
        The smallest (batch 1, variable dims 1) must succeed or the version never becomes READY;
        a larger one the model refuses (a variable dim it bounds, say) is only left out."""
        measured: list[tuple[int, float]] = []
        for i, inputs in enumerate(warm_inputs(config)):
            try:
                model(inputs)
                start = model.engine_clock()
                model(inputs)
                measured.append((work_of(inputs), model.engine_clock() - start))
            except Exception as exc:  # noqa: BLE001
                if i == 0:
                    raise ModelLoadFailed(f"model {model_label(name, version)}: warm-up inference failed: {exc}") from exc
                log.debug("model %s: warm-up %d not measured (%s)", model_label(name, version), i, type(exc).__name__)
        return tuple(measured)

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, name: str) -> None:
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._models[name]
            entry.state, entry.latest = State.UNLOADING, None
            self._notify(name)
            versions = [e for e in entry.versions.values() if e.loaded is not None]
            for e in versions:
                e.state = State.UNLOADING
            await self._retire(versions)
            entry.state, entry.reason = State.UNAVAILABLE, "unloaded"
            for e in entry.versions.values():
                e.state, e.reason, e.loaded = State.UNAVAILABLE, "unloaded", None
            self._notify(name)
            log.info("model %r unloaded", name, extra={"model": name})

    async def _retire(self, entries: list[VersionEntry], grace_s: float | None = None) -> None:
        """Drain these versions at once (each gets the whole grace, not a share of it)."""
        grace = self._config.drain_grace_s if grace_s is None else grace_s
        loaded = [e.loaded for e in entries if e.loaded is not None]
        await asyncio.gather(*(v.batcher.stop(grace) for v in loaded if v.batcher is not None))
        for v in loaded:
            v.executor.shutdown(wait=False)
            if v.background is not None:
                v.background.shutdown(wait=False)

    async def close(self, grace_s: float | None = None) -> None:
        """Drain every version: queued requests run within the grace; those still queued after it
        are answered UNAVAILABLE (never dropped, never left to the transport)."""
        await self._retire([e for entry in self._models.values() for e in entry.versions.values()], grace_s)

    # -- lookup ----------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedVersion:
        """The version that serves a request: the given one, or the highest READY one."""
        entry = self._models.get(name)
        if entry is None:
            raise unknown_model(name)
        if version:
            number = parse_version(version)
            if number is None:
                raise ModelNotFound(f"model {name!r}: version {version[:40]!r} is not a positive integer")
            v = entry.versions.get(number)
            if v is None:
                raise ModelNotFound(
                    f"model {name!r} has no version {version} (served versions: {sorted(entry.versions)})"
                )
            return self._ready(name, v)
        if entry.latest is not None:
            return entry.latest
        if entry.state is State.UNAVAILABLE and entry.reason and entry.reason != "unloaded":
            raise ModelLoadFailed(f"model {name!r} failed to load: {entry.reason}")
        raise ModelNotReady(f"model {name!r} is {entry.state.value.lower()}; no version is ready")

    @staticmethod
    def _ready(name: str, v: VersionEntry) -> LoadedVersion:
        if v.state is State.READY and v.loaded is not None:
            return v.loaded
        if v.state is State.UNAVAILABLE and v.reason and v.reason != "unloaded":
            raise ModelLoadFailed(f"model {model_label(name, v.version)} failed to load: {v.reason}")
        raise ModelNotReady(f"model {model_label(name, v.version)} is {v.state.value.lower()}")

    def index(self, *, ready_only: bool = False) -> list[IndexRow]:
        """Every model folder in the repository, loaded or not, with each version's state."""
        rows: list[IndexRow] = []
        for name in sorted(set(self.scan()) | set(self._models)):
            entry = self._models.get(name)
            if entry is None or not entry.versions:
                if not ready_only:
                    state = entry.state.value if entry else State.UNAVAILABLE.value
                    rows.append(IndexRow(name, "", state, entry.reason if entry else "not loaded"))
                continue
            for v in sorted(entry.versions.values(), key=lambda x: x.version):
                if not ready_only or v.state is State.READY:
                    rows.append(IndexRow(name, str(v.version), v.state.value, v.reason))
        return rows

    def ready_versions(self, name: str) -> list[str]:
        entry = self._models.get(name)
        if entry is None:
            return []
        return [str(v) for v in sorted(entry.versions) if entry.versions[v].state is State.READY]

    def entries(self) -> list[ModelEntry]:
        return [self._models[n] for n in sorted(self._models)]

    def loaded_versions(self, name: str = "", version: str = "") -> list[LoadedVersion]:
        """Loaded versions for statistics: all, one model's, or one version (NOT_FOUND if none)."""
        if name:
            entry = self._models.get(name)
            if entry is None:
                raise ModelNotFound(f"model {name!r} is not in the model repository")
            found = [v.loaded for v in entry.versions.values() if v.loaded is not None]
            if version:
                found = [v for v in found if str(v.version) == version]
                if not found:
                    raise ModelNotFound(f"model {name!r} has no loaded version {version}")
            return sorted(found, key=lambda v: v.version)
        return [v.loaded for e in self.entries() for v in sorted(e.versions.values(), key=lambda x: x.version) if v.loaded]


WARM_ROWS = (1, 8, 64)  # batch sizes measured at load (up to max_batch_size)
WARM_LENGTH = 16  # a variable dim's second measured size


def padded_outputs(config: ModelConfig) -> tuple[tuple[str, int], ...]:
    """The outputs that carry a padded model's padded axis: a variable dim at that axis."""
    axes = {p.axis for p in config.padding}
    batch = (-1,) if config.max_batch_size > 0 else ()
    return tuple((t.name, axis) for t in config.outputs for axis in sorted(axes)
                 if axis < len(batch + t.dims) and (batch + t.dims)[axis] == -1)


def warm_inputs(config: ModelConfig) -> list[dict[str, np.ndarray]]:
    """All-zero inputs of the graph for warm-up, smallest first: batch 1 with variable dims 1
    (what every servable version must accept), then larger batches, then variable dims at
    `WARM_LENGTH`."""
    batched = config.max_batch_size > 0
    required = [t for t in config.graph_inputs or config.inputs if not t.optional]
    rows = sorted({min(r, config.max_batch_size) for r in WARM_ROWS}) if batched else [0]
    variable = any(d < 0 for t in required for d in t.dims)
    sizes = [(r, 1) for r in rows] + ([(1 if batched else 0, WARM_LENGTH)] if variable else [])
    return [
        {t.name: zeros_like_spec(t.datatype, ((r,) if batched else ()) + t.dims, length) for t in required}
        for r, length in sizes
    ]
