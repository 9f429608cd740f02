"""The served model versions of one repository: their states (the state machine) and lookup.

A version is built whole, elsewhere: `loader.RepositoryFiles` checks its files once and the
factory the wiring passes in (`wiring.VersionFactory`) makes a frozen, complete `LoadedVersion`
(sessions, batcher, monitor, explainer, tokenizer, warmed up) or refuses it naming the file and
entry. Here a version is only started, swapped in, looked up, drained and closed.

A version is READY only after its warm-up succeeded. Loading runs in a worker thread, so a
(re)load never stalls requests to other models; a reload swaps versions in only once the new
ones are ready, then drains the old ones.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .batching import Batcher
from .card import ModelCard
from .config import ModelConfig, ServerConfig
from .errors import MedserveError, ModelLoadFailed, ModelNotFound, ModelNotReady, model_label
from .explain import Explainer
from .layout import parse_version
from .loader import RepositoryFiles, VersionFiles
from .monitor import FeatureMonitor
from .rollout import LABELS_FILENAME, STABLE, CanaryAssigner, RolloutSpec, TrialStats, check_ready, output_kind
from .runtime import OnnxModel
from .signature import Signature
from .stats import ModelStats
from .tokenize import TokenizerStage
from .trial import ShadowTrial

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load (reason says why) or unloaded


@dataclass(frozen=True, slots=True, eq=False)
class LoadedVersion:
    """A servable model version, complete when made: everything a request needs, traceable to
    its exact file. Its batcher is bound to the event loop by `start()`; `close()` drains it."""

    name: str
    version: int
    config: ModelConfig  # completed from the graph
    model: OnnxModel  # the sessions (the batcher may run a wrapper of them: see the factory)
    stats: ModelStats
    sha256: str
    card: ModelCard | None  # parsed once at load: every module reads its typed attributes
    batcher: Batcher
    explainer: Explainer  # made with the version (cheap: its coalitions are made on first use)
    executor: ThreadPoolExecutor
    background: ThreadPoolExecutor  # background parts' threads (lowest OS priority)
    signature: Signature
    label: str  # "'name' version N", for messages (built once, not per request)
    warmups: tuple[tuple[int, float], ...] = ()  # (work, engine seconds) of the warm-ups: the cost model's seed
    stage: TokenizerStage | None = None  # text models: strings -> the graph's token ids
    monitor: FeatureMonitor | None = None  # tabular models: clinical limits, range flags, drift

    def start(self) -> None:
        """Bind the batcher to the running event loop (a version is made in a worker thread)."""
        self.batcher.start()

    async def close(self, grace_s: float) -> None:
        """Drain the batcher for up to `grace_s`, then let the threads go."""
        await self.batcher.stop(grace_s)
        self.discard()

    def discard(self) -> None:
        """Let the threads go (a version never started, or one already drained)."""
        self.executor.shutdown(wait=False)
        self.background.shutdown(wait=False)


VersionBuilder = Callable[[VersionFiles], LoadedVersion]  # the factory: checked files -> a complete version


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


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """A model's labels as they serve now (`labels.json`): immutable, swapped whole, so a label
    change or a rollback takes effect at once for every request after it and none in flight fails."""

    name: str
    spec: RolloutSpec
    labels: Mapping[str, LoadedVersion]
    default: LoadedVersion  # what a request naming no version meets outside the canary
    default_label: str  # "stable" when that label exists ("" = the highest READY version)
    canary: LoadedVersion | None
    assigner: CanaryAssigner
    trials: Mapping[int, ShadowTrial]  # serving version -> its silent trial (when a shadow is set)

    def pick(self, version: str, routing_key: str) -> tuple[LoadedVersion | None, str]:
        """(version, label it was reached by) for a request; (None, "") when it names a version
        number (the repository looks that up as ever)."""
        if not version:
            canary = self.canary
            if canary is not None and self.assigner.is_canary(routing_key, self.spec.canary_percent):
                return canary, "canary"
            return self.default, self.default_label
        loaded = self.labels.get(version)
        if loaded is not None:
            return loaded, version
        return None, ""


def unknown_model(name: str) -> ModelNotFound:
    """The answer for a model that is not there (or that the caller may not see: the same words)."""
    return ModelNotFound(f"model {name!r} is not in the model repository")


class ModelRepository:
    """The states of the models under one repository root, and the lookup of their versions.

        repository = ModelRepository(config, build=VersionFactory(config, clock=time.monotonic))

    (`wiring.build_repository` does this.)"""

    def __init__(self, config: ServerConfig, *, build: VersionBuilder) -> None:
        self._files = RepositoryFiles(Path(config.repository))
        self.root = self._files.root
        self._drain_grace_s = config.drain_grace_s
        self._build = build
        self._models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._fingerprints: dict[str, tuple[object, ...]] = {}  # poll mode: the files last loaded
        self._watchers: list[Callable[[str, bool], None]] = []
        # Models with a labels file, read on every request by the inference core (one dict
        # lookup; a model without labels has no entry). Each value is swapped whole.
        self.routes: dict[str, Route] = {}
        self._labels_read: dict[str, bytes | None] = {}  # the labels file last applied (or tried)
        self._trial_stats: dict[tuple[str, int, int], TrialStats] = {}  # kept across label changes
        # The canary's key: its workers' shared one, else this process's own (a labels file's
        # canary_seed overrides either).
        self._assigner = CanaryAssigner(config.canary_key)

    def watch(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(model, ready)` whenever a model's servable state may have changed."""
        self._watchers.append(callback)

    def _notify(self, name: str) -> None:
        entry = self._models.get(name)
        for callback in self._watchers:
            callback(name, entry is not None and entry.latest is not None)

    # -- discovery -------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        """The folder of model `name` (NOT_FOUND for a name that is not one plain path segment
        or a folder that resolves outside the repository)."""
        return self._files.model_dir(name)

    def scan(self) -> list[str]:
        return self._files.scan()

    # -- loading ---------------------------------------------------------------------------

    async def load_all(self, *, exit_on_error: bool) -> None:
        """Load every model at start-up (see `load_named`)."""
        await self.load_named(("*",), exit_on_error=exit_on_error)

    async def load_named(self, names: Sequence[str], *, exit_on_error: bool) -> None:
        """Load these models at start ("*" = every model). With `exit_on_error`, the first broken
        model raises (the server does not start); otherwise it is kept as UNAVAILABLE with its
        reason and the others load."""
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
            if (self._files.fingerprint(name) == self._fingerprints.get(name)
                    and self._files.labels_text(name) == self._labels_read.get(name, b"")):
                continue  # (a change of the labels file alone is applied without reloading sessions)
            try:
                await self.load(name)
            except MedserveError as exc:
                log.error("model %r: new files (or labels) did not load; what was serving still serves: %s", name, exc,
                          extra={"model": name})
        for name in sorted(set(self._models) - present):
            self._fingerprints.pop(name, None)
            if self._models[name].versions:
                log.info("model %r left the repository: unloading", name, extra={"model": name})
                await self.unload(name)

    async def load(self, name: str) -> None:
        """Load (or reload) one model: new versions are made and warmed up first, then swapped
        in; versions no longer selected are drained and unloaded."""
        self.model_dir(name)  # refuse unknown names before keeping any state for them
        entry = self._models.get(name)
        if (entry is not None and entry.latest is not None
                and self._files.fingerprint(name) == self._fingerprints.get(name)
                and self._files.labels_text(name) != self._labels_read.get(name)):
            await self.relabel(name)  # only the labels changed: no session is reloaded
            return
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
            self._fingerprints[name] = self._files.fingerprint(name)
            labels_text = self._labels_read[name] = self._files.labels_text(name)
            try:
                spec = self._files.rollout(name, labels_text)
                loaded = await asyncio.to_thread(self._make, name)
                if spec is not None:
                    try:
                        check_ready(self._labels_shown(name), spec, [v.version for v in loaded])
                    except MedserveError:
                        for v in loaded:
                            v.discard()
                        raise
            except MedserveError as exc:
                self._failed(entry, bool(previous), self._files.relative(str(exc)))
                log.error("model %r: load failed: %s", name, entry.reason, extra={"model": name})
                if isinstance(exc, ModelNotFound):
                    raise
                raise ModelLoadFailed(entry.reason) from exc
            except Exception as exc:  # noqa: BLE001 - an unexpected failure is still a load failure
                log.exception("model %r: load failed unexpectedly", name)
                self._failed(entry, bool(previous), self._files.relative(f"{type(exc).__name__}: {exc}"))
                raise ModelLoadFailed(f"model {name!r} failed to load: {type(exc).__name__}") from exc
            for version in loaded:
                version.start()
            entry.versions = {v.version: VersionEntry(v.version, State.READY, loaded=v) for v in loaded}
            entry.latest = max(loaded, key=lambda v: v.version)
            entry.state, entry.reason = State.READY, ""
            self._route(entry, spec)
            if spec is not None:
                log.info("model %r: labels: %s", name, _describe(spec), extra={"model": name})
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

    def _labels_shown(self, name: str) -> str:
        return f"{name}/{LABELS_FILENAME}"

    async def relabel(self, name: str) -> None:
        """Apply a changed labels file without reloading any session: checked against the READY
        versions, then swapped in whole; refused (FAILED_PRECONDITION naming the label and the
        reason) with the old mapping serving."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._models.get(name)
            if entry is None or entry.latest is None:
                raise ModelNotReady(f"model {name!r} has no READY version to label")
            text = self._labels_read[name] = self._files.labels_text(name)
            spec = self._files.rollout(name, text)
            if spec is not None:
                ready = [v for v, e in entry.versions.items() if e.state is State.READY and e.loaded is not None]
                check_ready(self._labels_shown(name), spec, ready)
            self._route(entry, spec)
            log.info("model %r: labels applied: %s", name, _describe(spec), extra={"model": name})

    def _route(self, entry: ModelEntry, spec: RolloutSpec | None) -> None:
        """Swap in the model's route for `spec` (its versions are READY: checked by the caller)."""
        if spec is None:
            self.routes.pop(entry.name, None)
            return
        loaded = {v: e.loaded for v, e in entry.versions.items() if e.loaded is not None and e.state is State.READY}
        labels = {label: loaded[v] for label, v in spec.labels.items()}
        assert entry.latest is not None
        default = labels.get(STABLE, entry.latest)
        trials: dict[int, ShadowTrial] = {}
        shadow = loaded.get(spec.shadow) if spec.shadow is not None else None
        if shadow is not None:
            card = shadow.card
            compared = output_kind(card.task if card is not None else None,
                                   {t.name: (t.datatype, t.dims) for t in shadow.config.outputs})
            for version, serving in loaded.items():
                if version == shadow.version or compared is None:
                    continue
                key = (entry.name, version, shadow.version)
                stats = self._trial_stats.get(key)
                if stats is None or stats.output != compared[0]:
                    stats = self._trial_stats[key] = TrialStats(entry.name, version, shadow.version, *compared)
                trials[version] = ShadowTrial(serving, shadow, stats, join=min(
                    serving.config.max_batch_size, shadow.config.max_batch_size) > 0)
        self.routes[entry.name] = Route(
            entry.name, spec, labels, default, STABLE if STABLE in labels else "", labels.get("canary"),
            CanaryAssigner.seeded(spec.canary_seed) if spec.canary_seed else self._assigner, trials)

    def trials(self, name: str = "") -> list[TrialStats]:
        """The silent trials' figures (of one model, or all), current or past."""
        current = dict(self._trial_stats)  # (a copy: the metrics thread reads it while the loop may add one)
        return [s for k, s in sorted(current.items()) if not name or k[0] == name]

    def _make(self, name: str) -> list[LoadedVersion]:
        """Every selected version of the model, each checked by the loader and made whole by the
        factory (in a worker thread); if one is refused, those already made are let go."""
        base, selected = self._files.versions(name)
        made: list[LoadedVersion] = []
        try:
            for version in selected:
                made.append(self._build(self._files.version(base, version)))
        except BaseException:
            for v in made:
                v.discard()
            raise
        return made

    def _failed(self, entry: ModelEntry, serving: bool, reason: str) -> None:
        """A load failed: the versions it tried are UNAVAILABLE with the reason (the repository
        index says why), and whatever was serving keeps serving."""
        entry.reason = reason
        if not serving:
            entry.state = State.UNAVAILABLE
        for version in self._files.selected(entry.name):
            current = entry.versions.get(version)
            if current is None or current.loaded is None:
                entry.versions[version] = VersionEntry(version, State.UNAVAILABLE, reason)

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, name: str) -> None:
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._models[name]
            entry.state, entry.latest = State.UNLOADING, None
            self.routes.pop(name, None)
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
        grace = self._drain_grace_s if grace_s is None else grace_s
        await asyncio.gather(*(e.loaded.close(grace) for e in entries if e.loaded is not None))

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
                route = self.routes.get(name)
                if route is not None and version in route.labels:
                    return route.labels[version]
                known = f" nor one of the labels {sorted(route.labels)}" if route is not None else " (no labels are set)"
                raise ModelNotFound(f"model {name!r}: version {version[:40]!r} is not a positive integer{known}")
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
            route = self.routes.get(name)
            if version and route is not None and version in route.labels:
                version = str(route.labels[version].version)
            if version:
                found = [v for v in found if str(v.version) == version]
                if not found:
                    raise ModelNotFound(f"model {name!r} has no loaded version {version}")
            return sorted(found, key=lambda v: v.version)
        return [v.loaded for e in self.entries() for v in sorted(e.versions.values(), key=lambda x: x.version) if v.loaded]


def _describe(spec: RolloutSpec | None) -> str:
    """A labels mapping for the log (configuration only: no request value)."""
    if spec is None:
        return "none (requests naming no version meet the highest READY version)"
    text = ", ".join(f"{label} -> {v}" for label, v in sorted(spec.labels.items()))
    if spec.canary_percent:
        text += f"; canary {spec.canary_percent:g} %"
    if spec.shadow is not None:
        text += f"; silent trial of version {spec.shadow}"
    return text
