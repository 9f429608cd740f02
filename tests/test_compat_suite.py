"""Runs tests/compat (unmodified tritonclient and perf_analyzer) in a child pytest process:
tritonclient's generated modules and medserve's both register `inference.*` in protobuf's default
descriptor pool, so they cannot be imported into one process."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient (dev extra) not installed")
def test_tritonclient_and_perf_analyzer_suite(tmp_path: Path) -> None:
    # The text model and a linear model (explanations) are built here (the exporters import
    # medserve's protobuf modules); the child serves them to tritonclient.
    from medserve.exporters.demo import build_demo_repository

    build_demo_repository(tmp_path / "text-repo", models=["notes_minilm", "diabetes_linear"])
    env = {**os.environ, "MEDSERVE_COMPAT_CHILD": "1", "MEDSERVE_COMPAT_TEXT_REPO": str(tmp_path / "text-repo")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "compat"), "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    print(done.stdout[-20000:], done.stderr[-5000:])
    summary = re.search(r"(\d+) passed", done.stdout)
    assert done.returncode == 0, "compat suite failed (output above)"
    assert summary is not None and int(summary.group(1)) >= 8
    assert "skipped" not in done.stdout.splitlines()[-1], "a compat test was skipped (output above)"
