"""Every `curl` of the README runs as written against the served demo repository: each ```bash
block that calls curl (marked `<!-- not run -->` for tests/test_readme_snippets.py or not) runs
in a child bash against a real server whose REST port (`127.0.0.1:8000` in the text) and
metrics port (`127.0.0.1:9090`) are the ones it bound. Answers must be what the text says: no
`{"error": ...}` but where the line's comment names the error status."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import running_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REST, METRICS = "127.0.0.1:8000", "127.0.0.1:9090"
_FENCE = re.compile(r"^```bash\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_CURL = re.compile(r"(?<![\w-])curl\s")  # curl itself (not grpcurl)


def curl_blocks(text: str) -> list[tuple[int, str]]:
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _FENCE.finditer(text) if _CURL.search(m.group(1))]


def _demo(tmp_path_factory: pytest.TempPathFactory, models: list[str]) -> Path:
    checkout = ROOT / "demo-repository"
    if all((checkout / m).is_dir() for m in models):
        return checkout
    from medserve.exporters.demo import build_demo_repository

    path = tmp_path_factory.mktemp("demo") / "demo-repository"
    build_demo_repository(path, seed=0, models=models)
    return path


def test_every_readme_curl_runs_against_the_served_demo(tmp_path_factory: pytest.TempPathFactory) -> None:
    from medserve.exporters.demo import DEMO_MODELS

    blocks = curl_blocks(README.read_text(encoding="utf-8"))
    assert any(REST in code for _, code in blocks), "the README shows no curl against the REST port"
    named = sorted(m for m in DEMO_MODELS if any(re.search(rf"\b{m}\b", code) for _, code in blocks))
    work = tmp_path_factory.mktemp("reader")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    with running_server(_demo(tmp_path_factory, named), http_port=0, metrics_port=0) as server:
        for line, code in blocks:
            code = code.replace(REST, f"127.0.0.1:{server.server.http_port}")
            code = code.replace(METRICS, f"127.0.0.1:{server.server.metrics_port}")
            ran = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, cwd=work,
                                 env=env, timeout=60, check=False)
            print(f"--- README.md line {line}\n{ran.stdout}{ran.stderr}")
            assert ran.returncode == 0, f"the curl block at README.md line {line} failed: {ran.stderr[-2000:]}"
            expected_errors = re.findall(r"# .*?\b(4\d\d)\b", code)
            got_errors = re.findall(r'\{"error":.*?\} ?(\d{3})?', ran.stdout)
            assert len(got_errors) == len(expected_errors), (line, ran.stdout[-2000:])
            assert sorted(expected_errors) == sorted(g for g in got_errors if g), (line, ran.stdout[-2000:])
