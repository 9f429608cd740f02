"""The transport-neutral inference path: resolve the model version, validate the inputs against
its signature (so bad input never joins a batch), submit to its batcher, pick the requested
outputs, and record statistics. No protobuf, no gRPC.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medserve.protos.wire import datatype_of

from .batching import BatchRequest, Clock
from .config import ModelConfig
from .errors import ExecutionError, InvalidInput
from .repository import LoadedVersion, ModelRepository


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(frozen=True, slots=True)
class InferResult:
    """Outputs in the requested order, with the exact model version and file that produced them."""

    model: str
    version: str
    id: str
    sha256: str
    outputs: tuple[OutputTensor, ...]


def _shape_matches(got: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(got) == len(dims) and all(d == -1 or d == g for g, d in zip(got, dims, strict=True))


def _fmt(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def validate(label: str, config: ModelConfig, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Check names, datatypes, ranks, dims and the batch limit; return the inputs ready for the
    runtime (BYTES decoded to str, which onnxruntime's string tensors take) and the row count."""
    expected = {t.name: t for t in config.inputs}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise InvalidInput(f"model {label}: unexpected input {unknown[0]!r}; expected inputs {sorted(expected)}")
    missing = [t.name for t in config.inputs if t.name not in inputs and not t.optional]
    if missing:
        raise InvalidInput(f"model {label}: missing input {missing[0]!r}; expected inputs {sorted(expected)}")
    batching = config.max_batch_size > 0
    rows = 1
    ready: dict[str, np.ndarray] = {}
    for name, array in inputs.items():
        spec = expected[name]
        got_type = datatype_of(array.dtype)
        if got_type != spec.datatype:
            raise InvalidInput(f"model {label}: input {name!r}: expected datatype {spec.datatype}, got {got_type}")
        want = ((-1,) + spec.dims) if batching else spec.dims
        if not _shape_matches(array.shape, want):
            raise InvalidInput(f"model {label}: input {name!r}: expected shape {_fmt(want)}, got {_fmt(array.shape)}")
        if batching:
            if array.shape[0] < 1:
                raise InvalidInput(f"model {label}: input {name!r}: batch dimension is 0")
            if array.shape[0] > config.max_batch_size:
                raise InvalidInput(
                    f"model {label}: input {name!r}: batch size {array.shape[0]} exceeds max_batch_size "
                    f"{config.max_batch_size}"
                )
        if spec.datatype == "BYTES":
            array = _utf8(label, name, array)
        ready[name] = array
    if batching:
        batch_sizes = {a.shape[0] for a in ready.values()}
        if len(batch_sizes) > 1:
            raise InvalidInput(f"model {label}: inputs disagree on the batch size: {sorted(batch_sizes)}")
        rows = batch_sizes.pop() if batch_sizes else 1
    return ready, rows


def _utf8(label: str, name: str, array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, bytes | bytearray | memoryview):
            try:
                flat_out[i] = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"model {label}: input {name!r}: element {i} is not valid UTF-8 (string tensors need UTF-8)"
                ) from None
        else:
            flat_out[i] = str(item)
    return out


def batch_key(inputs: Mapping[str, np.ndarray], batching: bool) -> tuple[object, ...]:
    """Requests share a batch only if names, dtypes and non-batch dims all match."""
    return tuple(
        (name, a.dtype.str, a.shape[1:] if batching else a.shape) for name, a in sorted(inputs.items())
    )


class InferenceCore:
    """Runs decoded requests against the repository's model versions."""

    def __init__(self, repository: ModelRepository, clock: Clock = time.monotonic) -> None:
        self._repository = repository
        self._clock = clock

    def resolve(self, model: str, version: str) -> LoadedVersion:
        return self._repository.get(model, version)

    async def infer(self, request: InferRequest) -> InferResult:
        loaded = self._repository.get(request.model, request.version)
        started_ns = time.perf_counter_ns()
        ok = False
        try:
            result = await self._infer(loaded, request)
            ok = True
            return result
        finally:
            loaded.stats.on_request(ok, time.perf_counter_ns() - started_ns)

    async def _infer(self, loaded: LoadedVersion, request: InferRequest) -> InferResult:
        config = loaded.config
        label = loaded.label
        wanted = request.outputs or tuple(t.name for t in config.outputs)
        known = {t.name: t for t in config.outputs}
        for name in wanted:
            if name not in known:
                raise InvalidInput(f"model {label}: unknown output {name!r}; outputs are {sorted(known)}")
        inputs, rows = validate(label, config, request.inputs)
        batching = config.max_batch_size > 0
        batcher = loaded.batcher
        assert batcher is not None
        future = batcher.submit(
            BatchRequest(
                inputs=inputs,
                rows=rows,
                key=batch_key(inputs, batching),
                deadline_s=request.deadline_s,
                priority=request.priority,
                timeout_us=request.timeout_us,
            )
        )
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
            tensors.append(OutputTensor(name, known[name].datatype, array))
        return InferResult(request.model, str(loaded.version), request.id, loaded.sha256, tuple(tensors))
