"""medserve's load-testing harness: closed- and open-loop load from several processes sending
pre-encoded requests, latency percentiles from HdrHistogram (open loop: from each request's
intended send time), the server's own statistics, CPU and RSS, comparisons, and reports.

    from medserve.perf import Runner, Scenario, ModelLoad, Target
    results = Runner(Scenario(models=(ModelLoad("rf"),), targets=(Target("a", "127.0.0.1:8001"),))).run()

Command line: `python -m medserve.perf --help` (or `medserve perf`). Recipes for perf_analyzer
and h2load: `perf/README.md`.

Nothing is imported eagerly: the `medserve` command registers `perf` from `medserve.perf.cli`,
and must build its parser without the `perf` extra (hpack, hdrhistogram, matplotlib) installed.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Runner
    from .scenario import ModelLoad, Scenario, ScenarioError, ServeSpec, Target, load_scenario

_LAZY = {
    "Runner": ".runner",
    "ModelLoad": ".scenario",
    "Scenario": ".scenario",
    "ScenarioError": ".scenario",
    "ServeSpec": ".scenario",
    "Target": ".scenario",
    "load_scenario": ".scenario",
}

__all__ = ["ModelLoad", "Runner", "Scenario", "ScenarioError", "ServeSpec", "Target", "load_scenario"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
