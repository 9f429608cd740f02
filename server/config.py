"""Frozen configuration of the server and of each model, validated once at start-up.

Field names carry their unit (`_us`, `_s`, `_bytes`). The model half mirrors Triton's
`inference.ModelConfig` schema (read from `config.pbtxt` by `model_config.py`), so an existing
Triton ONNX repository means the same thing here.
"""
from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .errors import InvalidSetting

# One gRPC message, either way. gRPC refuses a longer message from its length prefix, before
# reading it; an accepted one is copied into Python on the event loop, stalling every other call
# about 1.7 ms per MiB on a 2-core machine (tests/security/test_budgets.py): 16 MiB keeps that
# under 50 ms. An imaging repository may raise it (--max-message-mb), at that cost.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


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
class PadSpec:
    """A graph input whose `axis` (counting the batch dim) may be padded with `value` so that
    requests of different lengths share a batch (config parameter `pad`)."""

    input: str
    axis: int
    value: float


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """A tokenizer stage the server runs before the graph (config parameters `tokenizer`,
    `tokenizer_max_length`, `tokenizer_truncation`, `tokenizer_inputs`): the client sends text,
    the graph gets `inputs` (input_ids, attention_mask, token_type_ids), truncated at
    `max_length` tokens."""

    file: str
    max_length: int
    truncation: str
    inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model as served. `max_batch_size` 0 = the model does not batch (no batch dim anywhere).
    `batching` None = dynamic batching off: each request executes alone.

    `split_oversized`: a request of more rows than `max_batch_size` runs as several executions of
    at most `max_batch_size` rows, its outputs joined in order (True, the default; config
    parameter `oversized_requests: split`), or is refused with INVALID_ARGUMENT as Triton does
    (`oversized_requests: refuse`).

    `refuse_non_finite`: a NaN or infinite value in a floating-point input is refused with
    INVALID_ARGUMENT naming the tensor (config parameter `refuse_non_finite: true`); by default
    it is passed to the model, as Triton does."""

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
    refuse_non_finite: bool = False  # parameter refuse_non_finite: NaN/Inf inputs are INVALID_ARGUMENT
    tokenizer: TokenizerConfig | None = None
    padding: tuple[PadSpec, ...] = ()  # padded batching (see PadSpec); () = one batch group per shape
    pad_mask: str | None = None  # the mask input of a padded model (padded with 0)
    graph_inputs: tuple[TensorConfig, ...] = ()  # the graph's own inputs, when a tokenizer feeds them

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
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
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
    tokens_file: str | None = None  # identities file (see identities.py); None = no credentials needed
    metrics_port: int | None = None  # Prometheus /metrics and HTTP health on `metrics_host`; None = off
    metrics_host: str = "127.0.0.1"  # the HTTP port's address: loopback unless asked (not `host`)
    metrics_max_connections: int = 256  # open HTTP connections (past it the oldest is closed)
    metrics_header_timeout_s: float = 10.0  # an HTTP connection's time to send a request, and to idle
    allow_plaintext: bool = False  # serve plaintext off loopback (behind a mesh that terminates mTLS)
    # The KServe V2 REST data plane (server/rest.py) on `host`, with the gRPC port's TLS; None = off.
    http_port: int | None = None
    # Triton's model control: none = load everything at start, no load/unload RPCs; explicit =
    # load `load_models` at start ("*" = all), load/unload by RPC; poll = follow the repository.
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    load_models: tuple[str, ...] = ()
    repository_poll_s: float = 15.0  # poll mode: seconds between repository scans
    audit_log: str | None = None  # JSON-lines audit trail; None = off
    audit_key: str | None = None  # the audit chain's HMAC key file (`medserve audit keygen`); needed with audit_log
    audit_max_bytes: int = 100 << 20  # rotate the audit log past this size
    audit_fsync: bool = False  # fsync each write (every 20 ms at most): records survive a power loss
    audit_retention: int | None = None  # rotated audit files kept; None = all (rotation deletes nothing)
    audit_checkpoint_s: float = 60.0  # the audit chain's head and count go to the server's log this often
    max_concurrent_rpcs: int = 4096  # calls in progress at once; more are refused RESOURCE_EXHAUSTED
    max_streams_per_connection: int = 1024  # HTTP/2 concurrent streams one connection may open
    keepalive_time_s: float = 60.0  # the server pings an idle connection this often ...
    keepalive_timeout_s: float = 20.0  # ... and closes it when the ping goes unanswered this long
    min_ping_interval_s: float = 10.0  # a client pinging more often than this is sent GOAWAY
    max_connection_idle_s: float = 900.0  # a connection without calls this long is closed
    max_connection_age_s: float = 3600.0  # connections are recycled after this long (GOAWAY) ...
    max_connection_age_grace_s: float = 60.0  # ... their calls in progress get this long to finish
    # A batch measured to execute faster than this runs on the event loop (a thread hand-off each
    # way would cost more); 0 = always on a worker thread.
    inline_below_us: int = 100
    max_tensor_elements: int = 1 << 26  # elements of one input tensor
    max_bytes_elements: int = 1 << 16  # elements of one BYTES input tensor (each a Python object, a row to tokenize)
    max_bytes_element_size: int = 1 << 20  # bytes of one BYTES element
    max_text_bytes: int = 8 << 20  # bytes of all of a request's BYTES elements (64 notes of 128 KiB fit)
    max_json_bytes: int = 2 << 20  # REST: the JSON part of a request (binary data beside it counts against the message)
    # The canary's hash key when a labels file sets no canary_seed: drawn once by `--workers`'
    # supervisor so that every worker (and a restarted one) assigns an encounter alike; None = this
    # process draws its own. Never a flag, never logged.
    canary_key: bytes | None = field(default=None, repr=False)

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
            ("--drain-announce-s", self.drain_announce_s, 0 <= self.drain_announce_s, ">= 0 seconds"),
            ("--metrics-port", self.metrics_port,
             self.metrics_port is None or 0 <= self.metrics_port <= 65535, "0..65535 (0 = any free port)"),
            ("--metrics-host", self.metrics_host, bool(self.metrics_host), "an address"),
            ("--http-port", self.http_port,
             self.http_port is None or 0 <= self.http_port <= 65535, "0..65535 (0 = any free port)"),
            ("--metrics-max-connections", self.metrics_max_connections, self.metrics_max_connections >= 1, ">= 1"),
            ("--metrics-header-timeout-s", self.metrics_header_timeout_s, self.metrics_header_timeout_s > 0,
             "> 0 seconds"),
            ("--model-control-mode", self.model_control_mode,
             self.model_control_mode in ("none", "poll", "explicit"), "none, poll or explicit"),
            ("--load-model", self.load_models, not self.load_models or self.model_control_mode == "explicit",
             "only with --model-control-mode explicit"),
            ("--repository-poll-s", self.repository_poll_s, self.repository_poll_s > 0, "> 0 seconds"),
            ("--audit-max-mb", self.audit_max_bytes >> 20, self.audit_max_bytes > 0, ">= 1"),
            ("--audit-retention", self.audit_retention, self.audit_retention is None or self.audit_retention >= 1,
             ">= 1 (or leave it out: keep every rotated file)"),
            ("--audit-checkpoint-s", self.audit_checkpoint_s, self.audit_checkpoint_s > 0, "> 0 seconds"),
            ("--max-concurrent-rpcs", self.max_concurrent_rpcs, self.max_concurrent_rpcs >= 1, ">= 1"),
            ("--max-streams-per-connection", self.max_streams_per_connection, self.max_streams_per_connection >= 1,
             ">= 1"),
            ("--inline-below-us", self.inline_below_us, self.inline_below_us >= 0, ">= 0 microseconds"),
            ("--max-tensor-elements", self.max_tensor_elements, self.max_tensor_elements >= 1, ">= 1"),
            ("--max-bytes-elements", self.max_bytes_elements, self.max_bytes_elements >= 1, ">= 1"),
            ("--max-bytes-element-size", self.max_bytes_element_size, self.max_bytes_element_size >= 1, ">= 1"),
            ("--max-text-bytes", self.max_text_bytes, self.max_text_bytes >= 1, ">= 1"),
            ("--max-json-mb", self.max_json_bytes, self.max_json_bytes >= 1, ">= 1"),
            ("--providers", self.providers, self.providers is None or (
                bool(self.providers) and all(p.endswith("ExecutionProvider") for p in self.providers)),
             "comma-separated onnxruntime provider names, e.g. CUDAExecutionProvider,CPUExecutionProvider"),
        )
        for flag, value, ok, expected in checks:
            if not ok:
                raise InvalidSetting(f"{flag} {value}: expected {expected}")
        if self.audit_log is not None and self.audit_key is None:
            raise InvalidSetting(
                f"--audit-log {self.audit_log} needs --audit-key FILE, the key of its HMAC chain "
                "(create one with `medserve audit keygen FILE`)"
            )
        if self.port != 0 and self.port == self.metrics_port:
            raise InvalidSetting(f"--metrics-port {self.metrics_port}: the same port as --port")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise InvalidSetting(f"--http-port {self.http_port}: the same port as --port or --metrics-port")
        if not self.loopback and not (self.tls_cert or self.tls_key) and not self.allow_plaintext:
            raise InvalidSetting(
                f"--host {self.host}: serving another interface without TLS would send patient data in clear "
                "text; give --tls-cert and --tls-key, or --allow-plaintext behind a mesh that terminates mTLS"
            )

    @property
    def loopback(self) -> bool:
        """Whether the server binds a loopback address only (the default)."""
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
