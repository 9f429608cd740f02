"""`--http-port` from the command line: a free port with `--port 0` (in the ready file), `off`,
refused when it is the gRPC or metrics port, plaintext refused off loopback as for gRPC, and
shared by `--workers` processes (SO_REUSEPORT, as the gRPC port)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from medserve.perf.serverproc import medserve

import onnx_models

AFFINE = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    onnx_models.affine(tmp_path / "repo" / "affine" / "1" / "model.onnx")
    return tmp_path / "repo"


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medserve.server.cli", "serve", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_refused_settings_name_the_flag(repo: Path) -> None:
    done = _serve("--repository", str(repo), "--port", "8411", "--http-port", "8411")
    assert done.returncode == 2 and "--http-port 8411: the same port as --port" in done.stderr
    done = _serve("--repository", str(repo), "--http-port", "nope")
    assert done.returncode == 2 and "'off'" in done.stderr
    done = _serve("--repository", str(repo), "--host", "0.0.0.0", "--http-port", "0")
    assert done.returncode == 2 and "without TLS" in done.stderr
    with socket.socket() as held:  # a REST port in use: one line, before any model loads
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _serve("--repository", str(repo), "--port", "0", "--http-port", str(port))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"medserve serve: 127.0.0.1:{port} is in use (another server? pick --http-port, or 0 for any free port)")


def test_off_serves_grpc_only(repo: Path) -> None:
    with medserve(repo, args=("--http-port", "off"), log_dir=repo.parent) as handle:
        assert handle.http_port is None


@pytest.mark.parametrize("workers", [1, 2])
def test_port_zero_and_workers_share_the_rest_port(repo: Path, workers: int) -> None:
    with medserve(repo, workers=workers, log_dir=repo.parent) as handle:
        assert handle.http_port
        for _ in range(2 * workers):  # a new connection each: the kernel spreads them over the workers
            request = urllib.request.Request(f"http://127.0.0.1:{handle.http_port}/v2/models/affine/infer",
                                             data=AFFINE, method="POST")
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200 and json.loads(answer.read())["model_name"] == "affine"
