"""What to send, how hard and to whom: the scenario (from a small TOML file or from flags), the
model facts needed to build requests (ModelMetadata, ModelConfig, the model card), and the
pre-encoded ModelInferRequest bytes the load processes send as-is.

A scenario file (every key optional except at least one model; flags override the top level):

    name = "rf-sweep"
    mode = "closed"            # "closed": fixed concurrency; "open": fixed arrival rate
    levels = [1, 8, 64]        # concurrencies (closed) or requests/s (open)
    arrival = "poisson"        # open loop only: "poisson" or "fixed" inter-arrival times
    warmup_s = 1.0
    measure_s = 5.0
    repetitions = 1
    processes = 1              # load processes (each with its own channels)
    channels = 4               # channels (TCP connections) per load process and target
    slo_ms = 50                # goodput counts OK responses within this latency

    [[model]]
    name = "rf"
    batch = 1                  # rows per request
    weight = 3                 # share of the requests in a mix
    data = "card"              # "card" (feature ranges of model_card.json), "random", "zeros"
    deadline_ms = 100          # gRPC deadline of each request
    send_as = "rf_v2"          # optional: send these requests under another model name
    priority = 1               # Triton priority parameter (0 = model default)
    shape = { x = [30] }       # non-batch dims for inputs with variable (-1) dims

    [[target]]
    name = "medserve"
    address = "127.0.0.1:8001" # or: serve = { repository = "models", workers = 2, args = [] }
    pid = 1234                 # optional: the server's pid, for CPU and RSS
    workers = 2                # optional: `--workers` of that server (its statistics are per worker)
    generator = "python"       # or "grpcio", "h2load"
    models = ["rf_batched"]    # optional: this target's model names, replacing [[model]] names

Several targets are measured in the same run, interleaved level by level, and compared.
"""
from __future__ import annotations

import json
import math
import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

SERVICE = "inference.GRPCInferenceService"
INFER_PATH = f"/{SERVICE}/ModelInfer"
MODES = ("closed", "open")
ARRIVALS = ("poisson", "fixed")
GENERATORS = ("python", "grpcio", "h2load")  # load processes over rawh2 or grpc.aio; h2load
DATA_SOURCES = ("card", "random", "zeros")


def grpc_message(body: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message (1-byte flag, 4-byte big-endian length,
    the serialized message): what goes in the DATA frames of a call, from any transport."""
    return b"\x00" + struct.pack(">I", len(body)) + body


class ScenarioError(ValueError):
    """A scenario file or flag that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model of the mix and the requests sent to it."""

    model: str
    version: str = ""
    batch: int = 1
    weight: float = 1.0
    data: str = "card"
    deadline_ms: float | None = None
    priority: int = 0
    shape: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    send_as: str | None = None  # model name put on the wire (error injection: unknown model, bad shape)


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """A `medserve serve` the harness starts (and stops) itself."""

    repository: str
    workers: int = 1
    args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Target:
    """A server and how to drive it. `models`, when given, renames the scenario's models
    position by position (so two configurations of one server can be compared)."""

    name: str
    address: str | None = None
    serve: ServeSpec | None = None
    pid: int | None = None
    generator: str = "python"
    models: tuple[str, ...] = ()
    repository: str | None = None  # where model cards are read from (set when serve is used)
    server_of: str | None = None  # measure the server of that (earlier) target instead of one's own
    workers: int | None = None  # server processes behind the address (statistics are per process)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str = "perf"
    mode: str = "closed"
    levels: tuple[float, ...] = (1, 8, 64)
    arrival: str = "poisson"
    warmup_s: float = 1.0
    measure_s: float = 5.0
    repetitions: int = 1
    processes: int = 1
    channels: int = 4
    slo_ms: float | None = None
    max_outstanding: int = 20000  # open loop: cap on in-flight requests per load process
    drain_s: float = 10.0  # after the window: how long to wait for responses still due
    payload_variants: int = 16  # distinct request bodies per model (different random data)
    seed: int = 0
    models: tuple[ModelLoad, ...] = ()
    targets: tuple[Target, ...] = ()

    def validate(self) -> Scenario:
        if self.mode not in MODES:
            raise ScenarioError(f"mode {self.mode!r}: expected one of {MODES}")
        if self.arrival not in ARRIVALS:
            raise ScenarioError(f"arrival {self.arrival!r}: expected one of {ARRIVALS}")
        if not self.levels or any(v <= 0 for v in self.levels):
            raise ScenarioError(f"levels {list(self.levels)}: need at least one, each > 0")
        if self.mode == "closed" and any(v != int(v) for v in self.levels):
            raise ScenarioError(f"levels {list(self.levels)}: concurrencies must be whole numbers")
        for key in ("measure_s", "processes", "channels", "repetitions"):
            if getattr(self, key) <= 0:
                raise ScenarioError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.warmup_s < 0:
            raise ScenarioError(f"warmup_s must be >= 0, got {self.warmup_s}")
        if not self.models:
            raise ScenarioError("no model: give --model or a [[model]] table")
        if not self.targets:
            raise ScenarioError("no target: give --target, --serve or a [[target]] table")
        for m in self.models:
            if m.batch < 1 or m.weight <= 0:
                raise ScenarioError(f"model {m.model!r}: batch must be >= 1 and weight > 0")
            if m.data not in DATA_SOURCES:
                raise ScenarioError(f"model {m.model!r}: data {m.data!r}: expected one of {DATA_SOURCES}")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ScenarioError(f"target names must differ, got {names}")
        for t in self.targets:
            if sum(x is not None for x in (t.address, t.serve, t.server_of)) != 1:
                raise ScenarioError(f"target {t.name!r}: give exactly one of address, serve and server_of")
            if t.server_of is not None and t.server_of not in names[: names.index(t.name)]:
                raise ScenarioError(f"target {t.name!r}: server_of {t.server_of!r} names no earlier target")
            if t.generator not in GENERATORS:
                raise ScenarioError(f"target {t.name!r}: generator {t.generator!r}: expected one of {GENERATORS}")
            if t.models and len(t.models) != len(self.models):
                raise ScenarioError(f"target {t.name!r}: models lists {len(t.models)} names for {len(self.models)} models")
            if t.generator == "h2load" and (self.mode != "closed" or len(self.models) != 1):
                raise ScenarioError(f"target {t.name!r}: the h2load generator drives one model in closed loop only")
        return self

    def models_for(self, target: Target) -> tuple[ModelLoad, ...]:
        if not target.models:
            return self.models
        return tuple(replace(m, model=n) for m, n in zip(self.models, target.models, strict=True))

    def as_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            return value

        return plain(self)


# -- loading -----------------------------------------------------------------------------------

_TOP_KEYS = {f.name for f in fields(Scenario)} - {"models", "targets"}


def _model_from(table: Mapping[str, Any], where: str) -> ModelLoad:
    known = {f.name for f in fields(ModelLoad)} | {"name"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r}; known: {sorted(known - {'model'})}")
    args = dict(table)
    if "name" in args:
        args["model"] = args.pop("name")
    if "model" not in args:
        raise ScenarioError(f"{where}: missing 'name'")
    args["shape"] = {k: tuple(int(d) for d in v) for k, v in args.get("shape", {}).items()}
    args["outputs"] = tuple(args.get("outputs", ()))
    args["version"] = str(args.get("version", ""))
    return ModelLoad(**args)


def _target_from(table: Mapping[str, Any], where: str, base: Path) -> Target:
    known = {f.name for f in fields(Target)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r}; known: {sorted(known)}")
    args = dict(table)
    serve = args.get("serve")
    if serve is not None:
        repo = Path(serve["repository"])
        repo = repo if repo.is_absolute() else (base / repo).resolve()
        args["serve"] = ServeSpec(str(repo), int(serve.get("workers", 1)), tuple(serve.get("args", ())))
        args.setdefault("repository", str(repo))
    args["models"] = tuple(args.get("models", ()))
    if "name" not in args:
        args["name"] = args.get("address") or (f"serve:{Path(serve['repository']).name}" if serve else "target")
    return Target(**args)


def load_scenario(path: Path) -> Scenario:
    """Read a scenario TOML file (see the module docstring); relative paths are from its folder."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    unknown = sorted(set(data) - _TOP_KEYS - {"model", "target"})
    if unknown:
        raise ScenarioError(f"{path}: unknown key {unknown[0]!r}; known: {sorted(_TOP_KEYS | {'model', 'target'})}")
    top = {k: v for k, v in data.items() if k in _TOP_KEYS}
    if "levels" in top:
        top["levels"] = tuple(float(v) for v in top["levels"])
    models = tuple(_model_from(t, f"{path}: model[{i}]") for i, t in enumerate(data.get("model", [])))
    targets = tuple(_target_from(t, f"{path}: target[{i}]", path.parent) for i, t in enumerate(data.get("target", [])))
    return Scenario(**top, models=models, targets=targets)


# -- model facts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch dim (-1) when the model batches


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    inputs: tuple[TensorInfo, ...]
    batching: bool
    card: Mapping[str, Any] | None = None


def fetch_model_info(address: str, model: str, version: str = "", repository: str | None = None) -> ModelInfo:
    """Inputs from ModelMetadata; whether the model batches from ModelConfig (max_batch_size),
    falling back to a leading -1 dim; the model card from the repository folder when known."""
    import grpc

    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=30)
        inputs = tuple(TensorInfo(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in meta.inputs)
        try:
            config = stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version), timeout=30).config
            batching = config.max_batch_size > 0
        except grpc.RpcError:
            batching = all(t.shape[:1] == (-1,) for t in inputs)
    card = read_card(repository, model, version or (meta.versions[-1] if meta.versions else "")) if repository else None
    return ModelInfo(model, version, inputs, batching, card)


def read_card(repository: str, model: str, version: str) -> Mapping[str, Any] | None:
    path = Path(repository) / model / str(version) / "model_card.json"
    if not version or not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def feature_ranges(card: Mapping[str, Any] | None, width: int) -> np.ndarray | None:
    """[width, 2] (low, high) per feature from a model card, or None. Accepted forms:
    `feature_ranges` as a list of [low, high] or a {feature: [low, high]} map ordered by
    `feature_names`; or `features` as a list of {"name", "min", "max"}."""
    if not card:
        return None
    ranges: list[Sequence[float]] | None = None
    raw = card.get("feature_ranges")
    if isinstance(raw, list):
        ranges = raw
    elif isinstance(raw, dict):
        names = card.get("feature_names") or list(raw)
        if all(n in raw for n in names):
            ranges = [raw[n] for n in names]
    elif isinstance(card.get("features"), list):
        feats = card["features"]
        if all(isinstance(f, dict) and "min" in f and "max" in f for f in feats):
            ranges = [(f["min"], f["max"]) for f in feats]
    if ranges is None or len(ranges) != width:
        return None
    try:
        out = np.asarray(ranges, dtype=np.float64).reshape(width, 2)
    except (TypeError, ValueError):
        return None
    return out if np.all(np.isfinite(out)) else None


def _concrete_shape(info: ModelInfo, tensor: TensorInfo, load: ModelLoad) -> tuple[int, ...]:
    dims = list(tensor.shape)
    if info.batching and dims:
        dims = dims[1:]
    given = load.shape.get(tensor.name)
    if given is not None:
        if len(given) != len(dims) or any(d != -1 and d != g for d, g in zip(dims, given, strict=True)):
            raise ScenarioError(
                f"model {info.name!r}: shape {list(given)} for input {tensor.name!r} does not fit {list(dims)}"
            )
        dims = list(given)
    if any(d < 0 for d in dims):
        raise ScenarioError(
            f"model {info.name!r}: input {tensor.name!r} has variable dims {list(tensor.shape)}; "
            f"give them with shape = {{ {tensor.name} = [...] }} or --shape {tensor.name}=..."
        )
    return ((load.batch,) if info.batching else ()) + tuple(dims)


def _array(tensor: TensorInfo, shape: tuple[int, ...], data: str, card: Mapping[str, Any] | None,
           rng: np.random.Generator) -> np.ndarray:
    from medserve.protos.wire import numpy_dtype

    if tensor.datatype == "BYTES":
        if data == "zeros":
            return np.full(shape, b"", dtype=object)
        flat = [bytes(rng.integers(97, 123, size=8, dtype=np.uint8)) for _ in range(math.prod(shape))]
        out = np.empty(math.prod(shape), dtype=object)
        out[:] = flat
        return out.reshape(shape)
    dtype = numpy_dtype(tensor.datatype)
    if data == "zeros":
        return np.zeros(shape, dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 8, size=shape).astype(dtype)  # small non-negative: valid as indices too
    rows = card_rows(card, shape, dtype, rng) if data == "card" else None
    return rows if rows is not None else rng.random(shape).astype(dtype)


def card_rows(card: Mapping[str, Any] | None, shape: tuple[int, ...], dtype: np.dtype | type,
              rng: np.random.Generator) -> np.ndarray | None:
    """Values drawn uniformly within the card's per-feature ranges (the last dim is the
    features), as the load generator sends them; None where the card has no usable ranges."""
    ranges = feature_ranges(card, shape[-1]) if shape else None
    if ranges is None:
        return None
    lo, hi = ranges[:, 0], ranges[:, 1]
    return (lo + (hi - lo) * rng.random(shape)).astype(dtype)


def build_request(info: ModelInfo, load: ModelLoad, rng: np.random.Generator, request_id: str = "") -> bytes:
    """One serialized ModelInferRequest (raw_input_contents) for `load` against `info`."""
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import to_raw

    req = pb.ModelInferRequest(model_name=load.send_as or load.model, model_version=load.version, id=request_id)
    for tensor in info.inputs:
        shape = _concrete_shape(info, tensor, load)
        req.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        req.raw_input_contents.append(to_raw(_array(tensor, shape, load.data, info.card, rng)))
    for name in load.outputs:
        req.outputs.add(name=name)
    if load.priority:
        req.parameters["priority"].uint64_param = load.priority
    return req.SerializeToString()


def rows_without_card(info: ModelInfo, load: ModelLoad) -> list[str]:
    """The float inputs that `data = "card"` fills with values in [0, 1) because no model card
    was read for the model (the target's repository is not known). A model whose card has
    training ranges then flags, or refuses, rows real traffic would not."""
    if load.data != "card" or info.card is not None:
        return []
    return [t.name for t in info.inputs if t.datatype in ("FP16", "FP32", "FP64")]


def build_payloads(info: ModelInfo, load: ModelLoad, count: int, seed: int = 0) -> list[bytes]:
    """`count` request bodies with different data (the server sees varied inputs)."""
    rng = np.random.default_rng(seed)
    return [build_request(info, load, rng) for _ in range(max(1, count))]


# -- flags ----------------------------------------------------------------------------------


def parse_model_flag(text: str) -> ModelLoad:
    """`NAME[:VERSION][,batch=N][,weight=W][,deadline_ms=D][,priority=P][,data=card|random|zeros]
    [,send_as=OTHER]` (send_as: build requests for NAME, send them as model OTHER)."""
    head, *opts = text.split(",")
    name, _, version = head.partition(":")
    args: dict[str, Any] = {"model": name, "version": version}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise ScenarioError(f"--model {text!r}: {opt!r} is not key=value")
        if key in ("batch", "priority"):
            args[key] = int(value)
        elif key in ("weight", "deadline_ms"):
            args[key] = float(value)
        elif key in ("data", "send_as"):
            args[key] = value
        else:
            raise ScenarioError(
                f"--model {text!r}: unknown option {key!r} (batch, weight, deadline_ms, priority, data, send_as)"
            )
    return ModelLoad(**args)


def parse_levels(text: str) -> tuple[float, ...]:
    """`1,8,64` or a range `1:64:x2` (doubling) / `100:1000:+300` (steps)."""
    if ":" in text:
        lo, hi, step = text.split(":")
        start, stop = float(lo), float(hi)
        values = [start]
        while True:
            nxt = values[-1] * float(step[1:]) if step.startswith("x") else values[-1] + float(step.lstrip("+"))
            if nxt > stop or nxt <= values[-1]:
                break
            values.append(nxt)
        return tuple(values)
    return tuple(float(v) for v in text.split(",") if v)
