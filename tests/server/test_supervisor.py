"""The worker supervisor on tiny stand-in processes (forked, no server): a worker that dies is
restarted with exponential backoff while the others keep running; a worker that keeps dying
makes it give up (exit 1, the others stopped); restarts outside the window are forgotten; a
SIGTERM is forwarded and a clean stop exits 0."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from medserve.server.workers import RestartPolicy, supervise

FORK = multiprocessing.get_context("fork")


def _ready(path: Path) -> None:
    path.write_text(json.dumps({"pid": os.getpid()}))


def _serve_until_sigterm(path: Path) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _ready(path)
    while True:
        time.sleep(1)


def _die_when_ready(path: Path) -> None:
    _die_after(path, 0.05)


def _die_after(path: Path, seconds: float) -> None:
    _ready(path)
    time.sleep(seconds)
    os._exit(3)


class Starts:
    """The supervisor's `start`: worker 0 serves, worker 1 crashes; records (index, time, pid)."""

    def __init__(self) -> None:
        self.log: list[tuple[int, float, int]] = []

    def __call__(self, index: int, ready: Path) -> multiprocessing.process.BaseProcess:
        process = FORK.Process(target=_serve_until_sigterm if index == 0 else _die_when_ready, args=(ready,))
        process.start()
        assert process.pid is not None
        self.log.append((index, time.monotonic(), process.pid))
        return process

    def of(self, index: int) -> list[tuple[float, int]]:
        return [(t, pid) for i, t, pid in self.log if i == index]


def test_a_dying_worker_is_restarted_with_backoff_until_it_keeps_dying(caplog) -> None:  # type: ignore[no-untyped-def]
    starts = Starts()
    policy = RestartPolicy(initial_backoff_s=0.1, max_backoff_s=10.0, max_restarts=3, restart_window_s=60.0)
    code = supervise(starts, 2, policy=policy)
    assert code == 1
    crashing = [t for t, _ in starts.of(1)]
    assert len(crashing) == 1 + policy.max_restarts  # started, restarted 3 times, then given up
    gaps = [b - a for a, b in zip(crashing, crashing[1:], strict=False)]
    for k, gap in enumerate(gaps):  # each gap: the 50 ms the worker lives + its backoff, doubling
        assert gap >= 0.05 + policy.initial_backoff_s * 2 ** k
    assert len(starts.of(0)) == 1  # the healthy worker kept running throughout, never restarted ...
    pid = starts.of(0)[0][1]
    assert not _alive(pid)  # ... and was stopped when the supervisor gave up
    assert "keeps dying" in caplog.text


def test_a_restarted_worker_is_announced_again_with_its_new_pid() -> None:
    """The ready file names each worker's pid and ports (with --metrics-port 0 only the worker
    knows its port): once a restarted worker is serving, `on_ready` runs again with the new
    one's, so the file never names a dead worker for long."""
    started: dict[int, list[int]] = {0: [], 1: []}
    announced: list[list[int]] = []

    def start(index: int, ready: Path) -> multiprocessing.process.BaseProcess:
        dies = index == 1 and not started[1]  # worker 1's first process crashes after it is ready
        process = FORK.Process(target=_die_after if dies else _serve_until_sigterm,
                               args=(ready, 0.5) if dies else (ready,))
        process.start()
        assert process.pid is not None
        started[index].append(process.pid)
        return process

    def on_ready(statuses: list[dict[str, Any]]) -> None:
        announced.append([s["pid"] for s in statuses])
        if len(announced) == 2:
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()

    policy = RestartPolicy(initial_backoff_s=0.05, max_restarts=3, restart_window_s=60.0)
    give_up = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))  # never announced again: stop
    give_up.start()
    try:
        assert supervise(start, 2, on_ready=on_ready, policy=policy) == 0
    finally:
        give_up.cancel()
    assert len(started[1]) == 2 and len(started[0]) == 1
    assert announced == [[started[0][0], started[1][0]], [started[0][0], started[1][1]]]


def test_restarts_outside_the_window_are_forgotten() -> None:
    """A clock that moves a minute per reading: every restart is old news, so the crashing worker
    is restarted past max_restarts until a SIGTERM (forwarded to the workers) ends the run."""
    starts = Starts()
    now = [0.0]

    def clock() -> float:
        now[0] += 61.0
        return now[0]

    def stop_after_restarts() -> None:
        while len(starts.of(1)) < 5:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_after_restarts, daemon=True).start()
    policy = RestartPolicy(initial_backoff_s=0.0, max_restarts=2, restart_window_s=60.0)
    supervise(starts, 2, policy=policy, clock=clock)  # its status: whichever way the crasher last ended
    assert len(starts.of(1)) >= 5  # far past max_restarts: none counted inside the window
    assert not _alive(starts.of(0)[0][1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_is_forwarded_and_a_clean_stop_exits_0() -> None:
    starts: list[int] = []

    def start(index: int, ready: Path) -> multiprocessing.process.BaseProcess:
        process = FORK.Process(target=_serve_until_sigterm, args=(ready,))
        process.start()
        assert process.pid is not None
        starts.append(process.pid)
        return process

    def on_ready(statuses: list[dict[str, Any]]) -> None:
        assert sorted(s["pid"] for s in statuses) == sorted(starts)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()

    assert supervise(start, 3, on_ready=on_ready) == 0
    assert len(starts) == 3 and not any(_alive(pid) for pid in starts)


def _count_sighups_late(path: Path, seen: Path, late_s: float) -> None:
    """Ready at once, but its SIGHUP handler only after `late_s` (as a worker loading models):
    counts each SIGHUP as a line in `seen`; stops on SIGTERM."""
    _ready(path)
    time.sleep(late_s)
    signal.signal(signal.SIGHUP, lambda *_: seen.open("a").write("hup\n"))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # as app.run does, once its handler is in
    while True:
        time.sleep(1)


def test_sighup_is_forwarded_to_every_worker_even_one_not_yet_listening_and_the_supervisor_carries_on(
        tmp_path: Path) -> None:
    """Row 8 of issue #25 without a server: a SIGHUP sent to the supervisor reaches every worker,
    one sent before a worker has its handler waits for it (instead of killing it), the
    supervisor keeps running (no worker restarted), and SIGTERM still ends it cleanly. On the code
    before, SIGHUP's default action killed the supervisor."""
    pids: list[int] = []
    late_s = 0.5
    seen = [tmp_path / f"seen-{i}" for i in range(2)]

    def start(index: int, ready: Path) -> multiprocessing.process.BaseProcess:
        process = FORK.Process(target=_count_sighups_late, args=(ready, seen[index], late_s))
        process.start()
        assert process.pid is not None
        pids.append(process.pid)
        return process

    def hup_hup_term(_statuses: list[dict[str, Any]]) -> None:
        def run() -> None:
            os.kill(os.getpid(), signal.SIGHUP)  # while the workers cannot handle it yet
            time.sleep(late_s + 0.5)
            os.kill(os.getpid(), signal.SIGHUP)  # once they can
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(
                    s.exists() and s.read_text().count("hup") == 2 for s in seen):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=run, daemon=True).start()

    assert supervise(start, 2, on_ready=hup_hup_term) == 0
    assert len(pids) == 2  # never restarted
    assert [s.read_text().count("hup") for s in seen] == [2, 2]
