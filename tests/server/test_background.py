"""Background work (an explanation's perturbed rows) yields to callers below the batcher too:
its threads run in the kernel's idle scheduling class, and a caller's batch that starts beside background
parts on every instance still finds a session."""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from medserve.server.runtime import BACKGROUND_NICE, OnnxModel, SessionOptions, lower_thread_priority

import onnx_models


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling classes are Linux's")
def test_background_threads_run_in_the_idle_class_and_only_they() -> None:
    def policy() -> int:
        return os.sched_getscheduler(threading.get_native_id())

    with ThreadPoolExecutor(1, initializer=lower_thread_priority) as pool:
        assert pool.submit(policy).result() == os.SCHED_IDLE  # unprivileged threads may enter it (Linux >= 2.6.39)
    assert policy() != os.SCHED_IDLE  # this thread untouched


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling classes are Linux's")
def test_where_the_idle_class_is_refused_background_threads_run_at_nice_19(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:  # as a seccomp profile or an old kernel would
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with ThreadPoolExecutor(1, initializer=lower_thread_priority) as pool:
        nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == BACKGROUND_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != BACKGROUND_NICE


def test_a_run_while_every_instance_is_taken_shares_a_session(tmp_path: Path) -> None:
    path = onnx_models.affine(tmp_path / "model.onnx")
    model = OnnxModel(path.read_bytes(), SessionOptions(providers=("CPUExecutionProvider",)),
                      [["CPUExecutionProvider"], ["CPUExecutionProvider"]])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = onnx_models.affine_answer(x)
    taken = [model._sessions.get_nowait(), model._sessions.get_nowait()]  # both instances busy
    out = model({"x": x})
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6)
    for session in taken:
        model._sessions.put(session)
