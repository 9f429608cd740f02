"""Runs tests/compat (unmodified tritonclient and perf_analyzer) in a child pytest process:
tritonclient's generated modules and medserve's both register `inference.*` in protobuf's default
descriptor pool, so they cannot be imported into one process.

The guarantee is not optional: tritonclient is in the dev extra that the README's test command
installs, so a missing one fails the test (it once skipped, and a run without it passed). Outside
CI (`CI=true`), `MEDSERVE_SKIP_COMPAT=1` skips it knowingly and says so."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent




def require_tritonclient(installed: bool | None = None) -> None:
    """Fail (never skip by accident) when tritonclient, the suite's client, is not installed."""
    if installed is None:
        installed = importlib.util.find_spec("tritonclient") is not None
    if installed:
        return
    missing = "tritonclient (dev extra) is not installed: pip install -e '.[dev]'"
    if os.environ.get("MEDSERVE_SKIP_COMPAT") == "1" and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"{missing} (skipped: MEDSERVE_SKIP_COMPAT=1)")
    pytest.fail(f"{missing}; the tritonclient/perf_analyzer compatibility suite cannot run (outside CI, "
                "MEDSERVE_SKIP_COMPAT=1 skips it knowingly)")


def test_tritonclient_and_perf_analyzer_suite(tmp_path: Path) -> None:
    require_tritonclient()
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



@pytest.mark.parametrize(("env", "outcome"), [
    ({}, pytest.fail.Exception),
    ({"CI": "true"}, pytest.fail.Exception),
    ({"CI": "true", "MEDSERVE_SKIP_COMPAT": "1"}, pytest.fail.Exception),
    ({"MEDSERVE_SKIP_COMPAT": "1"}, pytest.skip.Exception),
])
def test_a_missing_tritonclient_fails_unless_skipped_knowingly_outside_ci(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], outcome: type[BaseException]
) -> None:
    for name in ("CI", "MEDSERVE_SKIP_COMPAT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(outcome, match="tritonclient \\(dev extra\\) is not installed"):
        require_tritonclient(installed=False)
    require_tritonclient(installed=True)  # installed: nothing to say
