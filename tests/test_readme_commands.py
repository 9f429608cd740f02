"""The README's two commands are what CI runs (`.ci/readme_commands.py` reads them from the
README): both are found, each names the extras its work needs, and a README whose section lost
a command makes the reader fail instead of running something else."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _reader():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_holds_the_setup_and_the_test_command() -> None:
    setup, test = _reader().commands((ROOT / "README.md").read_text(encoding="utf-8"))
    extras = re.findall(r"pip install -e '\.\[([a-z,]+)\]'", setup)
    assert extras == ["server,export,gbm"]  # demo-repository needs all three (gbm: its XGBoost/LightGBM models); serve needs server only
    assert "medserve demo-repository demo-repository" in setup and setup.endswith("medserve serve --repository demo-repository")
    assert re.findall(r"pip install -e '\.\[([a-z,]+)\]'", test) == ["server,export,gbm,perf,dev"]
    assert test.endswith("python -m pytest")


def test_a_readme_without_the_two_commands_fails_the_reader() -> None:
    reader = _reader()
    with pytest.raises(SystemExit, match="no '## The two commands' section"):
        reader.commands("# medserve\n")
    with pytest.raises(SystemExit, match="must hold two one-line"):
        reader.commands("## The two commands\n\n```bash\necho one\n```\n\n## Next\n\n```bash\necho two\n```\n")


def test_ci_runs_the_commands_it_reads_never_a_copy() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 .ci/front_door.py" in ci and "readme_commands.py test" in ci
    setup, test = _reader().commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert setup not in ci and test not in ci
