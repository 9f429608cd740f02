"""server_stages: the timers (a plain call, a coroutine timed only when it finished without
waiting, passed through unchanged when it waits) and, where h2load runs, the benchmark end to
end on a tiny model. Speed is never asserted; the figures must be consistent with each other."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from medserve.perf.server_stages import STAGES, Tally, install, timed, timed_coroutine

import onnx_models


def test_a_plain_call_is_timed_and_counted_whatever_it_raises() -> None:
    tally = Tally()
    double = timed(lambda x: 2 * x, tally)
    assert [double(i) for i in range(3)] == [0, 2, 4]

    def fail() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        timed(fail, tally)()
    assert tally.calls == 4 and tally.ns >= 0 and tally.waited == 0


def test_a_coroutine_is_counted_only_when_it_finished_without_waiting() -> None:
    """One that waits keeps its value, its exception and its cancellation, and is not counted:
    its thread time would include whatever else the loop ran meanwhile."""
    tally = Tally()

    async def at_once(x: int) -> int:
        return x + 1

    async def waits(x: int, fail: bool = False) -> int:
        await asyncio.sleep(0)
        if fail:
            raise KeyError("late")
        return x + 2

    async def run() -> None:
        assert await timed_coroutine(at_once, tally)(1) == 2
        assert await timed_coroutine(waits, tally)(1) == 3
        with pytest.raises(KeyError, match="late"):
            await timed_coroutine(waits, tally)(1, fail=True)
        forever = asyncio.get_running_loop().create_future()

        async def blocked() -> None:
            await forever

        task = asyncio.ensure_future(timed_coroutine(blocked, tally)())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert forever.cancelled()  # the cancellation reached the awaited future

    asyncio.run(run())
    assert (tally.calls, tally.waited) == (1, 3)


def test_install_wraps_a_module_function_and_a_method_where_they_are_looked_up() -> None:
    module = types.ModuleType("medserve_stage_probe")

    class Model:
        def run(self, x: int) -> int:
            return x * 3

    module.Model = Model  # type: ignore[attr-defined]
    module.decode = lambda b: len(b)  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        tallies = install(((module.__name__, "decode", "decode", False), (module.__name__, "Model.run", "run", False)))
        assert module.decode(b"abc") == 3 and Model().run(2) == 6 and Model().run(1) == 3  # type: ignore[attr-defined]
        assert (tallies["decode"].calls, tallies["run"].calls) == (1, 2)
    finally:
        del sys.modules[module.__name__]


def test_every_stage_names_a_real_attribute() -> None:
    """A renamed function would leave a stage unmeasured in silence: each one resolves."""
    import importlib

    for stages in STAGES.values():
        for module_name, path, _, coroutine in stages:
            owner = importlib.import_module(module_name)
            for name in path.split("."):
                owner = getattr(owner, name)
            assert callable(owner) and asyncio.iscoroutinefunction(owner) == coroutine, path


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_server_stages_end_to_end(make_repo, tmp_path: Path) -> None:
    repo = make_repo(affine=onnx_models.affine)
    done = subprocess.run([sys.executable, "-m", "medserve.perf.server_stages", "--repository", str(repo),
                           "--model", "affine", "--concurrency", "2", "--warmup-s", "0.3", "--measure-s", "1.0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("server_stages-*.json")
    result = json.loads(path.read_text())
    assert result["schema"] == "medserve.perf.server_stages/1"
    points = {p["server"]: p for p in result["points"]}
    assert set(points) == set(STAGES)
    for name, p in points.items():
        assert p["throughput_rps"] > 0 and 0 < p["loop_thread_us_per_request"] <= p["process_us_per_request"] * 1.05
        assert set(p["stages"]) == {stage for _, _, stage, _ in STAGES[name]}, p["stages"]
        assert p["stages"]["onnxruntime run"]["calls"] > 0
    medserve = points["medserve"]["stages"]
    fixed = medserve["decode + validate, fixed signature"]  # affine's one FP32 input of fixed dims
    assert fixed["calls"] >= medserve["servicer path (decode .. encode)"]["calls"] > 0
    assert medserve["decode"]["calls"] == medserve["validate"]["calls"] == 0  # the general path: not taken
    assert medserve["batcher run_now (+ the engine)"]["calls"] > 0
    whole = medserve["servicer path (decode .. encode)"]["us_per_call"]
    assert whole > fixed["us_per_call"] and whole > medserve["encode"]["us_per_call"]
    assert points["minimal"]["stages"]["handler (parse .. encode)"]["us_per_call"] > \
        points["minimal"]["stages"]["onnxruntime run"]["us_per_call"]
    loop = result["in_process_us"]  # request_path's figures for the same stages, same model
    assert {"decode", "decode + validate, fixed signature", "encode", "onnxruntime run",
            "handler (parse .. encode)"} <= set(loop) and min(loop.values()) > 0
    assert "in process" in done.stdout
