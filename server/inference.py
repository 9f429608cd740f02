"""The transport-neutral inference path: resolve the model version, validate the inputs against
its signature (so bad input never joins a batch), submit to its batcher, pick the requested
outputs, and record statistics. No protobuf, no gRPC.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from medserve.protos.wire import DATATYPES

from .batching import BACKGROUND, Batcher, BatchRequest, Clock, RequestTiming, work_of
from .card import ModelCard
from .config import ModelConfig
from .errors import ExecutionError, InvalidInput, MedserveError
from .explain import Explainer, Explanation
from .repository import LoadedVersion, ModelRepository
from .runtime import CPU
from .signature import FixedInput
from .tokenize import Tokenized
from .trial import ShadowTrial


# The three per-request records below are not frozen: a frozen dataclass sets each field through
# object.__setattr__ (InferRequest: 2.7 us against 0.9 us per request); nothing writes to them.
@dataclass(slots=True)
class InferRequest:
    """A decoded request. `deadline_s` is absolute on the server's monotonic clock.
    `outputs` empty = every output of the model, in the model's order."""

    model: str
    version: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...] = ()
    id: str = ""
    priority: int = 0
    timeout_us: int | None = None
    deadline_s: float | None = None
    timing: RequestTiming | None = None  # a traced request: the batcher notes its phases here
    explain: bool = False  # request parameter `explain`: add attributions to the answer
    routing_key: str = ""  # request parameter `routing_key`: which side of a canary (never logged)
    validated: FixedInput | None = None  # decoded and validated against this (`codec.decode_fixed`)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(slots=True)
class InferResult:
    """Outputs in the requested order, with the exact model version and file that produced them."""

    model: str
    version: str
    id: str
    sha256: str
    outputs: tuple[OutputTensor, ...]
    rows: int = 0
    out_of_range: tuple[str, ...] = ()  # features with a value outside the training range (scored, flagged)
    parameters: tuple[tuple[str, str], ...] = ()  # more response parameters (explain_method, explain_output)
    label: str = ""  # the version label the request reached it by (also the parameter `version_label`)


T = TypeVar("T")
TOKENIZE_INLINE_CHARS = 4096  # more text than this is tokenized off the event loop ...
TOKENIZE_INLINE_ROWS = 8  # ... and more rows than this (a million empty strings are seconds of work)
VALIDATE_INLINE_ELEMENTS = 1 << 16  # more elements scanned for NaN (refuse_non_finite) off the event loop ...
VALIDATE_INLINE_STRINGS = 256  # ... and more strings (each decoded from UTF-8 in Python)
BACKGROUND_PART_S = 8e-3  # a background part's estimated cost at most, on the CPU: callers' batches
# start beside a running part (and the OS runs them first), so its length delays none of them,
# while each part costs the event loop its queueing and hand-off (a forest explanation in parts
# of 0.25 / 2 / 8 ms: 14 / 5.3 / 3.6 ms of event-loop time)
BACKGROUND_PART_GPU_S = 1e-3  # on a GPU a caller's kernels queue behind a running part's: keep it short
BACKGROUND_PART_CHUNKS = 64  # a part runs as at most this many engine calls of max_batch_size rows
BACKGROUND_WINDOW = 4  # background parts one explanation keeps queued


def background_part_rows(estimate_s: Callable[[int], float], row_work: int, limit: int,
                         budget_s: float = BACKGROUND_PART_S) -> int:
    """The most rows (a power of two, at most `limit`, at least 1) whose batch the cost model
    expects to run within `budget_s`: explanation work is queued in parts of this size."""
    rows = 1
    while rows * 2 <= limit and estimate_s(rows * 2 * row_work) <= budget_s:
        rows *= 2
    return rows


class InferenceCore:
    """Runs decoded requests against the repository's model versions."""

    def __init__(self, repository: ModelRepository, clock: Clock = time.monotonic,
                 max_response_bytes: int | None = None) -> None:
        self._repository = repository
        self._clock = clock
        self._max_response_bytes = max_response_bytes  # the send limit: an explanation must fit in it
        self._routes = repository.routes  # models with labels (`rollout`); most have none

    def fixed_input(self, model: str, version: str) -> FixedInput | None:
        """The fixed input of the version a request for `model` and `version` reaches, when
        that version has one and no label or canary routes the model (None: decode generally,
        and let `infer` answer, errors included)."""
        if model in self._routes:
            return None
        try:
            return self._repository.get(model, version).signature.fixed_input
        except MedserveError:
            return None

    async def infer(self, request: InferRequest) -> InferResult:
        route = self._routes.get(request.model)
        if route is None:
            loaded, label, trial = self._repository.get(request.model, request.version), "", None
        else:  # a label, the canary (by routing key, else request id), a silent trial
            found, label = route.pick(request.version, request.routing_key or request.id)
            loaded = found if found is not None else self._repository.get(request.model, request.version)
            trial = route.trials.get(loaded.version)
        stats = loaded.stats
        started_ns = time.perf_counter_ns()
        stats.in_flight += 1
        try:
            result = await self._infer(loaded, request, label, trial)
        except BaseException as exc:
            stats.on_request(type(exc), time.perf_counter_ns() - started_ns)
            raise
        finally:
            stats.in_flight -= 1
        stats.on_request(None, time.perf_counter_ns() - started_ns)
        return result

    @staticmethod
    async def _tokenize(loaded: LoadedVersion, inputs: Mapping[str, np.ndarray]) -> Tokenized:
        """A text model's strings as token ids (a long request on a worker thread)."""
        stage = loaded.stage
        assert stage is not None
        (texts,) = inputs.values()
        if texts.size > TOKENIZE_INLINE_ROWS or sum(len(t) for t in texts.reshape(-1)) > TOKENIZE_INLINE_CHARS:
            return await asyncio.to_thread(stage.tokenize, texts)
        return stage.tokenize(texts)

    @staticmethod
    def _validate_off_loop(loaded: LoadedVersion, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether the signature's checks go to a worker thread: strings are decoded one by one
        in Python, a float tensor scanned for NaN. (A plain test, so the common small request
        costs no coroutine of its own.)"""
        strings = scanned = 0
        for a in inputs.values():
            scanned += a.size
            if a.dtype == object:
                strings += a.size
        if not loaded.signature.refuse_non_finite:
            scanned = 0
        return strings > VALIDATE_INLINE_STRINGS or scanned > VALIDATE_INLINE_ELEMENTS

    def _admit_explanation(self, loaded: LoadedVersion, request: InferRequest, wanted: tuple[str, ...]) -> None:
        """Refuse an explanation that would be too large before any of the request's work: the
        explained elements against the model's bound, and the response's size (the outputs, the
        attributions, the tokens) against the send limit, from the shapes alone."""
        shapes = {n: a.shape for n, a in request.inputs.items()}
        first = next(iter(shapes.values()), ())
        rows = first[0] if first else 1
        token_chars = 0
        if loaded.stage is not None:  # text: the graph sees at most max_length tokens a row
            length = loaded.stage.max_length
            shapes = {n: (rows, length) for n in loaded.stage.inputs}
            token_chars = rows * length * 24  # explain_tokens: a JSON string per token
        output_bytes = 0
        for name in wanted:
            spec = loaded.signature.outputs[name]
            entry = DATATYPES.get(spec.datatype)
            itemsize = (entry.itemsize if entry is not None else None) or 8  # a string: its prefix, at least
            output_bytes += rows * math.prod(max(1, d) for d in spec.dims) * itemsize
        loaded.explainer.admit(shapes, output_bytes + token_chars, self._max_response_bytes)

    async def _infer(self, loaded: LoadedVersion, request: InferRequest, label_reached: str = "",
                     trial: ShadowTrial | None = None) -> InferResult:
        signature = loaded.signature
        label = loaded.label
        wanted = signature.check_outputs(label, request.outputs)
        if request.explain:
            self._admit_explanation(loaded, request, wanted)
        inputs: Mapping[str, np.ndarray]
        if request.validated is not None and request.validated is signature.fixed_input:
            inputs = request.inputs
            rows = next(iter(inputs.values())).shape[0]
        elif self._validate_off_loop(loaded, request.inputs):
            inputs, rows = await asyncio.to_thread(signature.validate, label, request.inputs)
        else:
            inputs, rows = signature.validate(label, request.inputs)
        flagged = loaded.monitor.check(inputs) if loaded.monitor is not None else ()
        tokenized = None
        if loaded.stage is not None:
            tokenized = await self._tokenize(loaded, inputs)
            inputs = tokenized.inputs
        batcher = loaded.batcher
        submitted = BatchRequest(inputs=inputs, rows=rows, key=signature.fixed_key, deadline_s=request.deadline_s,
                                 priority=request.priority, timeout_us=request.timeout_us, timing=request.timing)
        outputs = batcher.run_now(submitted)  # an idle batcher's cheap lone request: answered here
        if outputs is None:
            future = batcher.submit(submitted)
            try:
                outputs = await future
            except asyncio.CancelledError:
                batcher.cancel(future)  # the client went away: drop the queued request at once
                raise
        tensors = []
        for name in wanted:
            array = outputs.get(name)
            if array is None:
                raise ExecutionError(f"model {label}: runtime returned no output {name!r}")
            tensors.append(OutputTensor(name, signature.outputs[name].datatype, array))
        parameters: tuple[tuple[str, str], ...] = (("version_label", label_reached),) if label_reached else ()
        if trial is not None:  # a copy for the silent trial, scored later at background priority
            trial.offer(inputs, rows, outputs)
        if request.explain:
            explanation = await self._explain(loaded, inputs, outputs,
                                              tokenized.words() if tokenized is not None else None)
            single = len(explanation.attributions) == 1
            for input_name, attribution in sorted(explanation.attributions.items()):
                tensors.append(OutputTensor("attributions" if single else f"attributions.{input_name}", "FP32",
                                            attribution))
            tensors.append(OutputTensor("base_value", "FP32", explanation.base_value))
            parameters += (("explain_method", explanation.method), ("explain_output", explanation.output))
            if tokenized is not None:  # text: which token each position of the attributions is
                parameters += (("explain_tokens", json.dumps(tokenized.tokens())),)
        return InferResult(request.model, str(loaded.version), request.id, loaded.sha256, tuple(tensors), rows,
                           flagged, parameters, label_reached)

    async def _explain(self, loaded: LoadedVersion, inputs: Mapping[str, np.ndarray],
                       outputs: Mapping[str, np.ndarray], words: np.ndarray | None) -> Explanation:
        explainer = loaded.explainer
        output = outputs[str(explainer.output)] if explainer.output in outputs else None
        if output is None:
            raise InvalidInput(f"model {loaded.label} cannot be explained: {explainer.refuse() or 'no output'}")
        return await explainer.explain(inputs, output, words)


def explainer_for(label: str, config: ModelConfig, card: ModelCard | None, batcher: Batcher,
                  providers: tuple[str, ...], background: Executor) -> Explainer:
    """A version's explainer (the factory makes it with the version): perturbed rows through
    the version's own batcher, the explanation's numpy work on its background threads."""

    async def evaluate(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Perturbed rows through the model's own batcher, after every caller's request
        (callers' batches start beside a running part), in short parts, only a few queued
        at a time (an explanation never fills the queue)."""
        total = next(iter(batch.values())).shape[0]
        budget = BACKGROUND_PART_S if providers == (CPU,) else BACKGROUND_PART_GPU_S
        limit = background_part_rows(batcher.estimate_s, work_of(batch) // max(1, total),
                                     max(1, config.max_batch_size) * BACKGROUND_PART_CHUNKS, budget)
        answers: list[Mapping[str, np.ndarray]] = []
        for first in range(0, total, limit * BACKGROUND_WINDOW):
            answers += await asyncio.gather(*(
                batcher.submit(BatchRequest({n: a[start:start + limit] for n, a in batch.items()},
                                            rows=min(limit, total - start), priority=BACKGROUND))
                for start in range(first, min(total, first + limit * BACKGROUND_WINDOW), limit)))
        return {n: np.concatenate([a[n] for a in answers]) for n in answers[0]}

    async def offload(work: Callable[[], T]) -> T:
        """An explanation's own numpy work on the background threads (lowest OS priority)."""
        try:
            future = asyncio.get_running_loop().run_in_executor(background, work)
        except RuntimeError:  # the version is retiring and its threads are shut down: finish here
            return work()
        return await future

    return Explainer(label, config, card, evaluate, offload=offload)
