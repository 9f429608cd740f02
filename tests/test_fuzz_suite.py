"""Runs tests/fuzz (600 generated ModelInferRequests against a real server) in a child pytest
process. In the whole suite's process, after the tests before it, that module's memory grew
without bound (24 GB, killed by the OOM killer) while it passes in 4 s and a few hundred MB on
its own or after tests/server; the cause is not found yet (see the 2026-12-07 closing note).
A child process keeps the property test running, apart from that state."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_request_fuzz_suite() -> None:
    env = {**os.environ, "MEDSERVE_FUZZ_CHILD": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "fuzz"), "-q", "-p", "no:cacheprovider", "-rs", "-s"],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    print(done.stdout[-20000:], done.stderr[-5000:])
    assert done.returncode == 0, "fuzz suite failed (output above)"
    summary = re.search(r"(\d+) passed", done.stdout)
    assert summary is not None and int(summary.group(1)) == 2, done.stdout[-2000:]
