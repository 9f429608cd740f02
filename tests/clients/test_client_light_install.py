"""`medserve.clients` needs only grpcio, protobuf and numpy: install the medserve wheel into a
FRESH virtual environment (no system site-packages) with the dependencies its metadata declares (grpcio, protobuf, numpy and theirs), and import it.

The medserve wheel is built from a copy of the sources (the checkout is left untouched) by this
venv's setuptools; the dependency wheels come from the package index pip is configured with
(the test skips when it cannot be reached); the install itself runs with --no-index. Takes a few
seconds.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPENDENCIES = ("grpcio", "protobuf", "numpy")
SOURCES = ("pyproject.toml", "setup.py", "protos", "clients", "server", "exporters", "perf")


def _pip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / "README.md").write_text("medserve\n", encoding="utf-8")
    return dest


def test_clients_import_in_a_fresh_venv_without_onnxruntime_or_torch(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    pins = [f"{name}=={version(name)}" for name in DEPENDENCIES]
    fetched = _pip("download", "--only-binary=:all:", "-d", str(wheels), *pins)  # with their own deps
    if fetched.returncode != 0:
        pytest.skip(f"cannot fetch {pins} from the package index: {fetched.stderr.strip()[-300:]}")
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(_copy_sources(tmp_path / "src")))
    assert built.returncode == 0, built.stderr[-2000:]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # What `pip install medserve` does: the wheel plus the dependencies its metadata declares.
    installed = _pip("--python", str(python), "install", "--no-index", "--find-links", str(wheels), "medserve")
    assert installed.returncode == 0, installed.stderr[-2000:]

    probe = textwrap.dedent(
        """
        import importlib.util, json, sys
        import medserve.clients as clients
        client = clients.Client("127.0.0.1:1")
        client.close()
        print(json.dumps({
            "file": clients.__file__,
            "typed": (__import__("pathlib").Path(clients.__file__).parent / "py.typed").is_file(),
            "exported": len(clients.__all__),
            "findable": [m for m in ("onnxruntime", "torch", "onnx", "sklearn") if importlib.util.find_spec(m)],
            "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"onnxruntime", "torch"}),
            "server_loaded": any(m.startswith("medserve.server") for m in sys.modules),
        }))
        """
    )
    done = subprocess.run([str(python), "-I", "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    report = json.loads(done.stdout)
    assert report["file"].startswith(str(venv))
    assert report["exported"] > 0 and report["typed"] is True
    assert report["findable"] == []  # nothing heavy is even installed
    assert report["loaded"] == [] and report["server_loaded"] is False
