"""Frozen configuration of the server and of each model, validated once at start-up.

Field names carry their unit (`_us`, `_s`, `_bytes`). The model half mirrors Triton's
`inference.ModelConfig` schema (read from `config.pbtxt` by `model_config.py`), so an existing
Triton ONNX repository means the same thing here.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .errors import InvalidSetting


def _frozen_map(data: Mapping | None = None) -> Mapping:
    return MappingProxyType(dict(data or {}))


@dataclass(frozen=True, slots=True)
class TensorConfig:
    """One input or output. `dims` excludes the batch dimension when the model batches;
    -1 marks a variable dimension. `datatype` is the V2 string (FP32, INT64, BYTES, ...)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False


class TimeoutAction(enum.Enum):
    REJECT = "REJECT"  # a request whose queue timeout passes fails with DEADLINE_EXCEEDED
    DELAY = "DELAY"  # it stays queued, behind requests that have not timed out


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy. `default_timeout_us` 0 = no queue timeout;
    `max_queue_size` 0 = bounded only by the server-wide cap."""

    timeout_action: TimeoutAction = TimeoutAction.REJECT
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Dynamic batching of one model. `max_batch_rows` bounds the sum of dim 0 in a batch.

    `max_queue_delay_us` is the longest a request waits for companions while an instance is
    free; 0 means run as soon as an instance is free (batches still form while all instances
    are busy). Without preferred sizes the batcher waits only for the crowd recent batches
    reached (see `batching.CrowdEstimate`). Priority level 1 is the highest."""

    max_batch_rows: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policies: Mapping[int, QueuePolicy] = field(default_factory=_frozen_map)

    def policy_for(self, level: int) -> QueuePolicy:
        return self.priority_queue_policies.get(level, self.default_queue_policy)


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which version folders are served: the `num_versions` highest, all, or a given set."""

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :] if self.num_versions > 0 else []


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    """Triton's ModelInstanceGroup: `count` sessions of the model (per listed GPU for KIND_GPU).
    KIND_CPU runs on the CPU provider only; KIND_GPU needs a usable CUDA provider (the model fails
    to load without one) and runs on the listed `gpus` (none listed: device 0); KIND_AUTO takes
    the best usable providers."""

    kind: Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"] = "KIND_AUTO"
    count: int = 1
    gpus: tuple[int, ...] = ()

    @property
    def instances(self) -> int:
        return self.count * max(1, len(self.gpus))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model as served. `max_batch_size` 0 = the model does not batch (no batch dim anywhere).
    `batching` None = dynamic batching off: each request executes alone.

    `split_oversized`: a request of more rows than `max_batch_size` runs as several executions of
    at most `max_batch_size` rows, its outputs joined in order (True, the default; config
    parameter `oversized_requests: split`), or is refused with INVALID_ARGUMENT as Triton does
    (`oversized_requests: refuse`)."""

    name: str
    platform: str = "onnxruntime_onnx"
    backend: str = "onnxruntime"
    max_batch_size: int = 0
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    batching: BatchingConfig | None = None
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    default_model_filename: str = "model.onnx"
    parameters: Mapping[str, str] = field(default_factory=_frozen_map)
    split_oversized: bool = True

    @property
    def instance_count(self) -> int:
        """Sessions of this model that may execute at once (the batcher's concurrency)."""
        return sum(g.instances for g in self.instance_groups)

    def input(self, name: str) -> TensorConfig | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorConfig | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Process-wide settings from the command line."""

    repository: str
    host: str = "127.0.0.1"
    port: int = 8001
    max_message_bytes: int = 1 << 30  # explicit cap; large enough for imaging tensors
    max_queue_size: int = 4096  # server-wide cap on queued requests per model version
    # onnxruntime threads per session (0 = onnxruntime's choice, one per core). 1 by default: the
    # event loop needs a core of its own, and instances and workers give the parallelism.
    intra_op_threads: int = 1
    inter_op_threads: int = 0
    providers: tuple[str, ...] | None = None  # None = pick the best usable ones
    exit_on_error: bool = True
    drain_grace_s: float = 10.0
    drain_announce_s: float = 0.5  # on shutdown, answer UNAVAILABLE this long before closing
    server_name: str = "medserve"
    tls_cert: str | None = None  # PEM server certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed
    tokens_file: str | None = None  # JSON token -> [model names | "*"]; None = no token needed
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on `host`; None = off

    def __post_init__(self) -> None:
        """Refuse, at start-up and naming the flag, any setting the server could not honour (a
        queue cap of 0, say, would fail every queued request instead)."""
        checks: tuple[tuple[str, object, bool, str], ...] = (
            ("--host", self.host, bool(self.host), "an address"),
            ("--port", self.port, 0 <= self.port <= 65535, "0..65535 (0 = any free port)"),
            ("--max-message-mb", self.max_message_bytes >> 20, 0 < self.max_message_bytes < 1 << 31, "1..2047"),
            ("--max-queue-size", self.max_queue_size, self.max_queue_size >= 1, ">= 1"),
            ("--intra-op-threads", self.intra_op_threads, self.intra_op_threads >= 0, ">= 0 (0 = one per core)"),
            ("--inter-op-threads", self.inter_op_threads, self.inter_op_threads >= 0, ">= 0 (0 = onnxruntime's choice)"),
            ("--drain-grace-s", self.drain_grace_s, self.drain_grace_s >= 0, ">= 0 seconds"),
            ("drain_announce_s", self.drain_announce_s, 0 <= self.drain_announce_s, ">= 0 seconds"),
            ("--metrics-port", self.metrics_port,
             self.metrics_port is None or 0 <= self.metrics_port <= 65535, "0..65535 (0 = any free port)"),
            ("--providers", self.providers, self.providers is None or (
                bool(self.providers) and all(p.endswith("ExecutionProvider") for p in self.providers)),
             "comma-separated onnxruntime provider names, e.g. CUDAExecutionProvider,CPUExecutionProvider"),
        )
        for flag, value, ok, expected in checks:
            if not ok:
                raise InvalidSetting(f"{flag} {value}: expected {expected}")
        if self.port != 0 and self.port == self.metrics_port:
            raise InvalidSetting(f"--metrics-port {self.metrics_port}: the same port as --port")
