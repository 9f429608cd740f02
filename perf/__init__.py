"""medserve's load-testing harness: closed- and open-loop load from several processes sending
pre-encoded requests, latency percentiles from HdrHistogram (open loop: from each request's
intended send time), the server's own statistics, CPU and RSS, comparisons, and reports.

    from medserve.perf import Runner, Scenario, ModelLoad, Target
    results = Runner(Scenario(models=(ModelLoad("rf"),), targets=(Target("a", "127.0.0.1:8001"),))).run()

Command line: `python -m medserve.perf --help` (or `medserve perf`). Recipes for perf_analyzer
and h2load: `perf/README.md`.
"""
from .runner import Runner
from .scenario import ModelLoad, Scenario, ScenarioError, ServeSpec, Target, load_scenario

__all__ = ["ModelLoad", "Runner", "Scenario", "ScenarioError", "ServeSpec", "Target", "load_scenario"]
