"""onnxruntime sessions: execution-provider choice, graph signature, warm-up and execution.

Providers: TensorRT and CUDA are listed by onnxruntime-gpu even where they cannot load, and a
failed provider load logs errors. So a GPU provider is only asked for when its libraries really
load here (`usable_providers`), and the providers a session actually uses are read back from it.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from medserve.protos.wire import ONNX_TYPES, numpy_dtype

from .errors import ConfigError, ExecutionError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """An input or output of the ONNX graph. `shape` includes dim 0; -1 marks a dynamic dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def _loads(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            return False
    return True


def _cuda_device_count() -> int:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """The execution providers that can really run here, best first (probed once per process)."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    if CUDA in available and _cuda_device_count() > 0:
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception:  # noqa: BLE001 - absent optional libraries only narrow the choice
                log.debug("onnxruntime.preload_dlls failed", exc_info=True)
        if TENSORRT in available and _loads("libnvinfer.so.10"):
            chosen.append(TENSORRT)
        if _loads("libcudart.so.13") or _loads("libcudart.so.12") or _loads("libcudart.so"):
            chosen.append(CUDA)
    chosen.append(CPU)
    return tuple(chosen)


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How sessions are built. `providers` None = `usable_providers()`; 0 threads = ORT's choice."""

    providers: tuple[str, ...] | None = None
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False


# What one session asks onnxruntime for: provider names, or (name, provider options) pairs.
ProviderList = list[str | tuple[str, dict[str, str]]]


def instance_providers(options: SessionOptions, kind: str, gpus: Sequence[int], count: int) -> list[ProviderList]:
    """The providers of each session of one instance group (Triton's kinds): KIND_CPU runs on
    the CPU provider only; KIND_GPU on the GPU providers, `count` sessions per listed device (none
    listed: device 0), and refuses to load where no GPU provider is usable; KIND_AUTO takes the
    best usable providers (or `options.providers`)."""
    chosen = list(options.providers or usable_providers())
    if kind == "KIND_CPU":
        return [[CPU] for _ in range(count)]
    if kind != "KIND_GPU":
        return [list(chosen) for _ in range(count)]
    gpu = [p for p in chosen if p in (TENSORRT, CUDA)]
    if not gpu:
        raise ConfigError(
            f"instance_group kind KIND_GPU, but no GPU execution provider is usable here (providers: {', '.join(chosen)})"
        )
    return [
        [(p, {"device_id": str(device)}) for p in gpu] + [CPU]
        for device in (gpus or (0,))
        for _ in range(count)
    ]


class OnnxModel:
    """One or more onnxruntime sessions of the same model file (one per instance), callable as a
    batching `Runner`: name -> array in, name -> array out. Thread-safe: each call borrows a
    session, so as many calls run concurrently as there are sessions.

    `source` is the model's bytes (what was hashed is what runs) or, for a model with external
    data, its file. `shown` names it in messages (a path relative to the repository).
    `instances` gives each session's providers (`instance_providers`); None = one session on
    the best usable providers."""

    def __init__(
        self,
        source: Path | bytes,
        options: SessionOptions,
        instances: Sequence[ProviderList] | None = None,
        *,
        shown: str | Path = "model.onnx",
    ) -> None:
        path = Path(shown)
        default: ProviderList = list(options.providers or usable_providers())
        plans: list[ProviderList] = list(instances or [default])
        self._sessions: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        used: list[str] = []
        first: ort.InferenceSession | None = None
        for providers in plans:
            session = self._session(source, path, options, providers)
            first = first or session
            used += [p for p in session.get_providers() if p not in used]
            self._sessions.put(session)
        assert first is not None
        self.providers: tuple[str, ...] = tuple(used)
        # The engine's own time for the cost model, read in the executing thread: its CPU time
        # when onnxruntime runs the whole graph on that thread (CPU, one intra-op thread: no GIL
        # wait or hand-off counted); wall time when other threads or a GPU do the work.
        single = self.providers == (CPU,) and options.intra_op_threads == 1 and options.inter_op_threads <= 1
        self.engine_clock: Callable[[], float] = time.thread_time if single else time.perf_counter
        self.inputs = tuple(_graph_tensor(path, a) for a in first.get_inputs())
        self.outputs = tuple(_graph_tensor(path, a) for a in first.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self._only = first if len(plans) == 1 else None
        self._first = first

    @staticmethod
    def _session(source: Path | bytes, path: Path, options: SessionOptions, providers: ProviderList) -> ort.InferenceSession:
        so = ort.SessionOptions()
        # Fatal only: onnxruntime's own error lines quote input values (a Gather prints the index
        # it was given); failures reach the log and the caller as `describe_failure` says them.
        so.log_severity_level = 4
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not options.allow_spinning:
            # Spinning intra-op threads burn the cores the event loop needs to decode requests.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            model = source if isinstance(source, bytes) else str(source)
            return ort.InferenceSession(model, sess_options=so, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types here
            raise ConfigError(f"{path}: onnxruntime cannot load the model: {exc}") from exc

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = inputs if isinstance(inputs, dict) else dict(inputs)
        if self._only is not None:  # one instance: ORT sessions are thread-safe, no pool needed
            return self._run(self._only, feeds)
        try:
            session = self._sessions.get_nowait()
        except queue.Empty:  # a caller's batch beside background parts on every instance:
            return self._run(self._first, feeds)  # sessions are thread-safe, share one
        try:
            return self._run(session, feeds)
        finally:
            self._sessions.put(session)

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = session.run(self._output_names, feeds)
        except Exception as exc:  # noqa: BLE001 - the engine's text must not travel on
            raise ExecutionError(describe_failure(exc)) from None
        return dict(zip(self._output_names, results, strict=True))


BACKGROUND_NICE = 19  # where the idle class is refused: the lowest nice value


def lower_thread_priority() -> None:
    """Put the calling thread in Linux's idle scheduling class (SCHED_IDLE; nice 19 where that is
    refused). For the threads that run background parts: the kernel runs them only on CPU time
    no normal thread wants, and a waking caller's thread preempts them at once. Measured beside
    plain requests (perf/bench_explain, four pairs of runs): the p99 of plain requests rose
    1.10x (paired-round median, mean of eight) against 1.24x at nice 19. They hold the GIL only
    between engine calls (onnxruntime's run releases it); a holder the kernel keeps waiting
    stalls the event loop only while normal threads keep every core busy."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        return
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, thread, BACKGROUND_NICE)
    except OSError:
        log.warning("cannot lower the priority of background thread %s", threading.current_thread().name)


_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : ([A-Z_]+) :")
_ORT_NODE = re.compile(r"while running ([A-Za-z0-9_.]+) node")


def describe_failure(exc: BaseException) -> str:
    """What an execution failure may say outside the engine: the failing node's op type and
    onnxruntime's status name, never its message (it can quote input values)."""
    text = str(exc)
    status = _ORT_STATUS.search(text)
    node = _ORT_NODE.search(text)
    where = f"a {node.group(1)} node failed" if node else "execution failed"
    return f"{where} (onnxruntime {status.group(1) if status else type(exc).__name__})"


def _graph_tensor(path: Path, arg: ort.NodeArg) -> GraphTensor:
    datatype = ONNX_TYPES.get(arg.type)  # protos/wire.py's one datatype table
    if datatype is None:
        raise ConfigError(f"{path}: tensor {arg.name!r} has type {arg.type}, which medserve cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return GraphTensor(arg.name, datatype, shape)


def zeros_like_spec(datatype: str, shape: Sequence[int], length: int = 1) -> np.ndarray:
    """An all-zero input for warm-up: dynamic dims become `length`."""
    concrete = tuple(length if d < 0 else d for d in shape)
    if datatype == "BYTES":
        return np.full(concrete, "", dtype=object)
    return np.zeros(concrete, dtype=numpy_dtype(datatype))
