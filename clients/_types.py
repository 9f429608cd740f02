"""Plain, typed values the client returns and takes (no protobuf in the way of the caller)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medserve.protos import model_config_pb2

ParamValue = bool | int | float | str


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS for the channel: ``ca_file`` verifies the server (None: the system's roots);
    ``cert_file`` + ``key_file`` present a client certificate (mutual TLS);
    ``server_name`` overrides the name checked against the server certificate."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed call is tried again.

    Only the codes in ``retry_on`` are retried (UNAVAILABLE, RESOURCE_EXHAUSTED: nothing ran).
    The n-th retry waits ``min(max_backoff_s, initial_backoff_s * multiplier**(n-1))``, scaled by
    a random factor in ``[1 - jitter, 1]`` (jitter 1.0 = "full jitter"), unless the server pushed
    back with ``grpc-retry-pushback-ms``, whose value is then used as is. ``max_attempts``
    counts the first try; no attempt starts after the call's deadline and no sleep runs past
    it. With several targets, a target that answered UNAVAILABLE (or could not be reached) is
    skipped for ``unhealthy_cooldown_s`` and the retry goes to the next one at once.

    ``retry_on`` holds status code names. A grpc.aio server that is shutting down answers
    CANCELLED to calls it received but never started (grpc/grpc#41785); callers whose requests
    are idempotent and who restart replicas under load may add ``"CANCELLED"``.

        Client("10.0.0.5:8001", retries=RetryPolicy(max_attempts=1))  # never retry
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    jitter: float = 1.0
    unhealthy_cooldown_s: float = 2.0
    retry_on: frozenset[str] = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.unhealthy_cooldown_s < 0:
            raise ValueError("RetryPolicy durations must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1], got {self.jitter}")


# -- inference -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class InferRequest:
    """One request of :meth:`Client.infer_stream` (the arguments of :meth:`Client.infer`)."""

    model: str
    inputs: Mapping[str, npt.ArrayLike]
    version: str | int | None = None
    outputs: Sequence[str] | None = None
    request_id: str | None = None
    priority: int | None = None
    routing_key: str | None = None  # an encounter id: the same one always meets the same side of a canary


@dataclass(frozen=True, slots=True, eq=False)
class InferResult(Mapping[str, npt.NDArray[Any]]):
    """The answer to one inference: output name -> numpy array, plus traceability.

    Fixed-size outputs are read-only ``np.frombuffer`` views over the received bytes (copy
    before writing); BYTES outputs are object arrays of ``bytes``.

        result = client.infer("sepsis", {"x": x})
        risk = result["risk"]            # or result.as_numpy("risk")
        result.model_version, result.model_sha256
        result.version_label             # "stable", "canary", ... when a label (or the canary) reached it
    """

    model_name: str
    model_version: str
    request_id: str
    outputs: Mapping[str, npt.NDArray[Any]]
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)

    @property
    def model_sha256(self) -> str | None:
        """SHA-256 of the exact model file that ran (response parameter ``model_sha256``)."""
        value = self.parameters.get("model_sha256")
        return value if isinstance(value, str) and value else None

    @property
    def version_label(self) -> str | None:
        """The label the request reached ``model_version`` by (response parameter ``version_label``:
        the label asked for, or ``stable`` / ``canary`` for a request naming no version); None when
        it named a version number or the model has no labels."""
        value = self.parameters.get("version_label")
        return value if isinstance(value, str) and value else None

    def as_numpy(self, name: str) -> npt.NDArray[Any]:
        """The output called ``name`` (KeyError naming the available outputs otherwise)."""
        return self[name]

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(
                f"model {self.model_name!r} version {self.model_version} returned no output {name!r}; "
                f"outputs: {sorted(self.outputs)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    def __eq__(self, other: object) -> bool:  # arrays have no single truth value: identity
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self.outputs.items())
        return (
            f"InferResult(model={self.model_name!r}, version={self.model_version!r}, "
            f"request_id={self.request_id!r}, outputs={{{shapes}}})"
        )


@dataclass(frozen=True, slots=True, eq=False)
class Explanation:
    """Why a model answered as it did, per row: attributions per input ([rows, targets, *the
    input's dims]: for tables one value per feature and target), the base value each row's
    attributions start from ([rows, targets]; for tables they add up to output - base value),
    the method (``tree_shap``, ``shapley_exact``, ``kernel_shap``, ``occlusion``) and the explained
    output (``margin``: a boosted classifier's log-odds, which the answer does not carry).

        why = client.explain("sepsis", records=[{"heart_rate": 112, ...}])
        why.top(3)        # [("lactate", 0.21), ("heart_rate", 0.12), ("age", -0.05)] for row 0
    """

    result: InferResult
    attributions: Mapping[str, npt.NDArray[Any]]
    base_value: npt.NDArray[Any]
    method: str
    output: str
    feature_names: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None  # class labels, when the model publishes them
    input_columns: Mapping[str, tuple[str, ...]] | None = None  # a mixed table: each input's columns
    tokens: tuple[tuple[str, ...], ...] | None = None  # a text model: each row's tokens (``explain_tokens``)

    def top(self, k: int = 5, *, row: int = 0, target: int | str | None = None) -> list[tuple[str, float]]:
        """The ``k`` features (or elements) that moved ``target`` most for ``row``, by absolute
        attribution, with their signed values; ``target`` defaults to the row's highest output."""
        if target is None:
            column = int(np.argmax(self._explained(row)))
        elif isinstance(target, str):
            if self.targets is None or target not in self.targets:
                raise KeyError(f"target {target!r} is not one of the model's class labels {self.targets}")
            column = self.targets.index(target)
        else:
            column = target
        named: list[tuple[str, float]] = []
        for input_name, values in sorted(self.attributions.items()):
            flat = np.asarray(values)[row, column].reshape(-1)
            names = self._names(input_name, flat.size)
            if names is None and self.tokens is not None and row < len(self.tokens):
                words = self.tokens[row]  # positions past the row's own tokens are padding
                names = tuple(f"{w}@{i}" for i, w in enumerate(words)) + tuple(
                    f"[pad]@{i}" for i in range(len(words), flat.size))
            for i, value in enumerate(flat):
                label = names[i] if names is not None else (
                    f"{input_name}[{i}]" if len(self.attributions) > 1 else f"[{i}]")
                named.append((label, float(value)))
        return sorted(named, key=lambda kv: -abs(kv[1]))[:k]

    def _explained(self, row: int) -> npt.NDArray[Any]:
        """The explained output's values for ``row``, one per target: the answer's, or for an output
        the answer does not carry (``margin``: a boosted classifier's log-odds) the base value plus
        the attributions, which add up to it."""
        if self.output in self.result:
            answer: npt.NDArray[Any] = np.asarray(self.result[self.output]).reshape(len(self.base_value), -1)[row]
            return answer
        total: npt.NDArray[Any] = np.asarray(self.base_value, np.float64).reshape(len(self.base_value), -1)[row].copy()
        for values in self.attributions.values():
            per_target = np.asarray(values, np.float64)[row]
            total += per_target.reshape(per_target.shape[0], -1).sum(axis=1)
        return total

    def _names(self, input_name: str, size: int) -> tuple[str, ...] | None:
        """The column names of one input's attributions, where the model card gives them."""
        names = (self.input_columns or {}).get(input_name)
        if names is None and len(self.attributions) == 1:
            names = self.feature_names
        return names if names is not None and len(names) == size else None

    @classmethod
    def of(cls, result: InferResult, feature_names: tuple[str, ...] | None,
           targets: tuple[str, ...] | None, input_columns: Mapping[str, tuple[str, ...]] | None = None) -> Explanation:
        """Read an explanation out of an answer to a request made with ``explain``."""
        attributions = {
            name.partition(".")[2] or "": array for name, array in result.outputs.items()
            if name == "attributions" or name.startswith("attributions.")
        }
        method, output = result.parameters.get("explain_method"), result.parameters.get("explain_output")
        if not attributions or "base_value" not in result.outputs or not isinstance(output, str):
            raise ValueError(f"model {result.model_name!r} answered without an explanation")
        tokens = _json_rows(result.parameters.get("explain_tokens"))
        return cls(result, attributions, result["base_value"], str(method), output, feature_names, targets,
                   input_columns, tokens)


# -- metadata --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """A model input or output; ``shape`` -1 marks a variable dimension (incl. the batch dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def _parsed(value: object) -> object:
    """A JSON-valued metadata or response parameter, or None where it is absent or not JSON."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def _json_rows(value: object) -> tuple[tuple[str, ...], ...] | None:
    """`explain_tokens`: a JSON list of each row's tokens."""
    data = _parsed(value)
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        return None
    return tuple(tuple(str(t) for t in row) for row in data)


def _json_columns(value: str | None) -> Mapping[str, tuple[str, ...]] | None:
    """`input_columns`: input name -> the column names it carries (a mixed table's inputs)."""
    data = _parsed(value)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        return None
    return {str(k): tuple(str(c) for c in v) for k, v in data.items()}


def _json_list(value: str | None) -> tuple[str, ...] | None:
    data = _parsed(value)
    if not isinstance(data, list):
        return None
    return tuple(str(v) for v in data)


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A model's signature and model-card facts (``feature_names``, ``class_labels``, SHA-256)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)

    def _param(self, key: str) -> str | None:
        value = self.parameters.get(key)
        return value if isinstance(value, str) else None

    @property
    def feature_names(self) -> tuple[str, ...] | None:
        return _json_list(self._param("feature_names"))

    @property
    def class_labels(self) -> tuple[str, ...] | None:
        return _json_list(self._param("class_labels"))

    @property
    def input_columns(self) -> Mapping[str, tuple[str, ...]] | None:
        """Which of ``feature_names`` each input carries, for a model with several inputs."""
        return _json_columns(self._param("input_columns"))

    @property
    def model_sha256(self) -> str | None:
        return self._param("model_sha256") or None


@dataclass(frozen=True, slots=True)
class TensorConfig:
    """An input or output of a model configuration; ``dims`` exclude the batch dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The main facts of a model's configuration; ``raw`` holds the full Triton ModelConfig."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    dynamic_batching: bool
    parameters: Mapping[str, str]
    raw: model_config_pb2.ModelConfig = field(repr=False, compare=False)

    @property
    def feature_names(self) -> tuple[str, ...] | None:
        return _json_list(self.parameters.get("feature_names"))


@dataclass(frozen=True, slots=True)
class Duration:
    """A cumulative statistic: how many times, and the total time in nanoseconds."""

    count: int
    ns: int


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """Cumulative counters of one model version since it was loaded (diff two snapshots)."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: tuple[BatchStatistics, ...]


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    """One row of the repository index (``version`` is "" for a model with nothing loaded)."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecordSchema:
    """What :meth:`Client.infer_records` needs to know of a model (cached per model and version)."""

    feature_names: tuple[str, ...]
    input_name: str
    datatype: str
    model_sha256: str | None
    # A mixed table (several 2-D inputs): (input name, datatype, its columns) per input; then
    # `input_name` and `datatype` are unused. Empty for a model of one input.
    parts: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def inputs(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """(input name, datatype, columns) of every input the records fill."""
        return self.parts or ((self.input_name, self.datatype, self.feature_names),)
