"""CI's front-door check: the README's first command, run literally on a fresh checkout.

It must create its own virtual environment with only the extras it names (none of the others
may be installed afterwards), build the demo repository and serve it on 127.0.0.1:8001. This
script waits for the server to be ready, makes one inference per demo model through the client
library (from that same environment), sends SIGTERM to the server and requires a clean exit.

    python3 .ci/front_door.py            # from the repository root; leaves .venv behind

Standard library only: it runs before any virtual environment exists.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from readme_commands import README, commands  # noqa: E402

READY_TIMEOUT_S = 40 * 60  # a fresh machine downloads every wheel first
STOP_TIMEOUT_S = 60
PYTHON = ROOT / ".venv" / "bin" / "python"

# Runs in the command's own environment: readiness, then one inference per READY model.
PROBE = r"""
import sys
import numpy as np
from medserve.clients import Client
from medserve.protos.wire import numpy_dtype
with Client("127.0.0.1:8001", timeout_s=10.0) as client:
    if not client.server_ready():
        sys.exit(3)
    if sys.argv[1] == "ready":
        sys.exit(0)
    models = [m for m in client.repository_index(ready=True)]
    assert models, "no model is READY"
    for m in models:
        meta = client.model_metadata(m.name, version=m.version)  # every version (the demo rollout has two)
        inputs = {}
        for t in meta.inputs:
            shape = tuple(1 if d < 0 else d for d in t.shape)
            inputs[t.name] = (np.full(shape, "x", dtype=object) if t.datatype == "BYTES"
                              else np.zeros(shape, dtype=numpy_dtype(t.datatype)))
        result = client.infer(m.name, inputs, version=m.version, request_id="front-door")
        assert result.model_version == m.version and result.request_id == "front-door", result
        assert len(result.model_sha256) == 64 and len(result) > 0, result
        print(f"  {m.name} v{m.version}: {', '.join(f'{k} {v.shape}' for k, v in result.items())}")
    print(f"{len(models)} models answered")
"""


def _probe(stage: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PYTHON), "-c", PROBE, stage], capture_output=True, text=True, timeout=120)


def _serve_pid(root_pid: int) -> int | None:
    """The `medserve serve` process among the command's descendants (bash runs it as a child)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(a.endswith(b"medserve") for a in argv):
            return pid
        todo.extend(children.get(pid, []))
    return None


def _named_extras(command: str) -> set[str]:
    named: set[str] = set()
    for group in re.findall(r"\.\[([A-Za-z0-9_,-]+)\]", command):
        named |= set(group.split(","))
    return named


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _other_extras(command: str) -> dict[str, list[str]]:
    """Distributions of every extra the command does not name (none of them may be installed,
    unless a named extra depends on them)."""
    named = _named_extras(command)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {
        extra: [re.split(r"[\[=<>!~ ;]", req, maxsplit=1)[0] for req in reqs]
        for extra, reqs in extras.items()
        if extra not in named
    }


def main() -> int:
    command = commands(README.read_text(encoding="utf-8"))[0]
    print(f"front door: {command}", flush=True)
    if (ROOT / ".venv").exists():
        print("front door: .venv exists already; the check needs a fresh checkout", file=sys.stderr)
        return 1
    started = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                print(f"front door: the command exited with {proc.returncode} before serving", file=sys.stderr)
                return 1
            if time.monotonic() - started > READY_TIMEOUT_S:
                print("front door: the server was not ready in time", file=sys.stderr)
                return 1
            if PYTHON.exists() and _serve_pid(proc.pid) is not None and _probe("ready").returncode == 0:
                break
            time.sleep(2)
        print(f"front door: serving after {time.monotonic() - started:.0f} s", flush=True)

        # No package of an extra the command does not name, unless a named extra depends on it
        # (the export extra's pretrained model pulls in matplotlib, say, which perf also lists).
        named = _named_extras(command)
        listing = json.loads(subprocess.run(
            [str(PYTHON), "-c", (ROOT / ".ci" / "closure.py").read_text(encoding="utf-8"), ",".join(sorted(named))],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout)
        installed, closure = set(listing["installed"]), set(listing["closure"])
        stray = {}
        for extra, dists in _other_extras(command).items():
            found = sorted({_norm(d) for d in dists} & installed - closure)
            if found:
                stray[extra] = found
        if stray:
            print(f"front door: the environment holds extras the command does not name: {stray}", file=sys.stderr)
            return 1

        inferred = _probe("infer")
        print(inferred.stdout, end="")
        if inferred.returncode != 0:
            print(f"front door: inference through the client library failed:\n{inferred.stderr}", file=sys.stderr)
            return 1

        serve = _serve_pid(proc.pid)
        assert serve is not None
        os.kill(serve, signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"front door: the server did not stop within {STOP_TIMEOUT_S} s of SIGTERM", file=sys.stderr)
            return 1
        if code != 0:
            print(f"front door: the command exited with {code} after SIGTERM", file=sys.stderr)
            return 1
        print(f"front door: clean stop; {time.monotonic() - started:.0f} s in all", flush=True)
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
