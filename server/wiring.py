"""Wiring of a model version: the factory that makes a checked version's files into a frozen,
complete `LoadedVersion` (sessions, completed config, monitor, tokenizer, warm-up, threads,
batcher, explainer), and the repository built with it.

    repository = build_repository(config, clock=time.monotonic)

Tests inject what runs a version's batches through the factory (`wrap_runner`), never through
the repository's internals.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batching import Batcher, BatcherConfig, Clock, Runner, work_of
from .config import ModelConfig, ServerConfig
from .errors import ConfigError, ModelLoadFailed, model_label
from .inference import explainer_for
from .loader import VersionFiles, card_errors
from .model_config import complete
from .monitor import FeatureMonitor
from .repository import LoadedVersion, ModelRepository
from .runtime import OnnxModel, SessionOptions, instance_providers, lower_thread_priority, zeros_like_spec
from .signature import Signature
from .stats import ModelStats
from .tokenize import TokenizerStage

log = logging.getLogger(__name__)

WrapRunner = Callable[[VersionFiles, Runner], Runner]  # (the version, its sessions) -> what its batches run on
WARM_ROWS = (1, 8, 64)  # batch sizes measured at load (up to max_batch_size)
WARM_LENGTH = 16  # a variable dim's second measured size


class VersionFactory:
    """Makes a version whole from its checked files, or refuses it naming the file and entry.
    Called in a worker thread; the version's batcher is bound to the loop by `LoadedVersion.start`."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Clock,
        session_options: SessionOptions | None = None,
        wrap_runner: WrapRunner | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._session_options = session_options or SessionOptions(
            providers=config.providers,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
        )
        self._wrap_runner = wrap_runner

    def __call__(self, files: VersionFiles) -> LoadedVersion:
        label = model_label(files.name, files.version)
        try:
            instances = [
                plan
                for g in files.base.instance_groups
                for plan in instance_providers(self._session_options, g.kind, g.gpus, g.count)
            ]
        except ConfigError as exc:
            raise ConfigError(f"{files.config_path}: {exc}") from None
        model = OnnxModel(files.source, self._session_options, instances, shown=files.model_path)
        config = complete(files.config_or_model, files.base, model.inputs, model.outputs)
        card = files.card
        monitor = None
        if card is not None:
            with card_errors(files.card_path):
                if config.max_batch_size > 0:  # reference rows are per row of a batch
                    card.check_fits({t.name: t.dims for t in config.graph_inputs or config.inputs},
                                    [t.name for t in config.outputs])
                monitor = FeatureMonitor.from_card(label, card, {t.name: t.dims for t in config.inputs})
        stage = self._stage(files, config)
        warmups = warm_up(label, config, model)
        executor = ThreadPoolExecutor(max_workers=config.instance_count, thread_name_prefix=f"ort-{files.name}")
        # Background parts (explanations) run on threads of their own at the lowest OS priority,
        # beside callers' batches: the cores go to predictions first.
        background = ThreadPoolExecutor(max_workers=config.instance_count, thread_name_prefix=f"ort-{files.name}-bg",
                                        initializer=lower_thread_priority)
        try:
            stats = ModelStats()
            runner: Runner = model if self._wrap_runner is None else self._wrap_runner(files, model)
            batcher = Batcher(
                runner,
                BatcherConfig(
                    name=label,
                    batching=config.batching,
                    instances=config.instance_count,
                    max_queue_size=self._config.max_queue_size,
                    split_rows=config.max_batch_size if config.split_oversized else 0,
                    warmups=warmups,
                    inline_below_s=self._config.inline_below_us / 1e6,
                    padding=config.padding,
                    padded_outputs=padded_outputs(config),
                ),
                self._clock,
                executor=executor,
                background_executor=background,
                observer=stats,
            )
            try:
                explainer = explainer_for(label, config, card, batcher, model.providers, background)
                explainer.use_graph(files.source, model)  # a tree ensemble: exact TreeSHAP from its nodes
            except ModelLoadFailed as exc:  # an explain_* parameter that does not parse
                raise ConfigError(f"{files.config_path}: {exc}") from None
        except BaseException:
            executor.shutdown(wait=False)
            background.shutdown(wait=False)
            raise
        return LoadedVersion(
            name=files.name, version=files.version, config=config, model=model, stats=stats, sha256=files.sha256,
            card=card, batcher=batcher, explainer=explainer, executor=executor, background=background,
            signature=Signature.of(config), label=label, warmups=warmups, stage=stage, monitor=monitor,
        )

    @staticmethod
    def _stage(files: VersionFiles, config: ModelConfig) -> TokenizerStage | None:
        """A text model's tokenizer, from the very bytes the loader checked against the card."""
        if config.tokenizer is None or files.tokenizer is None:
            return None
        pad_id = next((int(p.value) for p in config.padding if p.input == "input_ids"), 0)
        try:
            return TokenizerStage(files.tokenizer.decode("utf-8"), config.tokenizer, pad_id)
        except ModuleNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own types
            raise ConfigError(
                f"{files.tokenizer_path}: the tokenizers library cannot load it: {type(exc).__name__}"
            ) from exc


def build_repository(
    config: ServerConfig, *, clock: Clock, session_options: SessionOptions | None = None,
    wrap_runner: WrapRunner | None = None,
) -> ModelRepository:
    """The repository of `config`, its versions made by a `VersionFactory`."""
    factory = VersionFactory(config, clock=clock, session_options=session_options, wrap_runner=wrap_runner)
    return ModelRepository(config, build=factory)


WARM_TIMED = 5  # timed warm-up runs per size at most (their median seeds the cost model) ...
WARM_BUDGET_S = 0.02  # ... while they have taken less than this


def warm_up(label: str, config: ModelConfig, model: OnnxModel) -> tuple[tuple[int, float], ...]:
    """Run zeros at a few sizes and return each size's (work, engine seconds): the cost
    model's seed. The first run pays one-time allocations, and one timed run can land on a
    preemption: a size's seed is the median of up to WARM_TIMED timed runs within
    WARM_BUDGET_S (so a large batch still runs twice, and a cheap one six times: the forest's
    one-row batch read 33-100 us from a single run on a busy host, 8 us in truth, and that
    decides whether it runs on the event loop).
    The smallest (batch 1, variable dims 1) must succeed or the version never becomes READY;
    a larger one the model refuses (a variable dim it bounds, say) is only left out."""
    measured: list[tuple[int, float]] = []
    for i, inputs in enumerate(warm_inputs(config)):
        try:
            model(inputs)
            times: list[float] = []
            while len(times) < WARM_TIMED and sum(times) < WARM_BUDGET_S:
                start = model.engine_clock()
                model(inputs)
                times.append(model.engine_clock() - start)
            measured.append((work_of(inputs), statistics.median(times)))
        except Exception as exc:  # noqa: BLE001
            if i == 0:
                raise ModelLoadFailed(f"model {label}: warm-up inference failed: {exc}") from exc
            log.debug("model %s: warm-up %d not measured (%s)", label, i, type(exc).__name__)
    return tuple(measured)


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
