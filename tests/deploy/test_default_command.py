"""The image's default command, run on the host with its paths moved into a temporary folder:
without one of its Secrets (the identities file, the audit key, the TLS certificate) it refuses to
start with one line naming the missing file, exit 2, before it binds a port (secure by default,
issue 25 row 16); with all of them it gets past those checks. The real image is checked by
.ci/container_check.py."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import k8s_manifests as km
import pytest
from test_dockerfile import _stages

from medserve.server.audit import keygen
from medserve.server.identities import IdentityFile

import onnx_models

TIMEOUT_S = 30.0


def _command(root: Path) -> list[str]:
    """The Dockerfile's CMD with every absolute path under `root`, on free ports."""
    cmd = json.loads(dict(_stages()[-1])["CMD"])
    moved = [str(root) + a if a.startswith("/") else a for a in cmd]
    return [*moved, "--port", "0", "--metrics-port", "0"]  # the last of a flag wins


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Everything the command names, as the Secrets and volumes would provide it."""
    onnx_models.affine(tmp_path / "models" / "affine" / "1" / "model.onnx")
    tls = tmp_path / km.TLS_DIR.lstrip("/")
    tls.mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(tls / "tls.key"), "-out", str(tls / "tls.crt"), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=60)
    ids = tmp_path / km.IDENTITIES_FILE.lstrip("/")
    ids.parent.mkdir(parents=True)
    identities = IdentityFile.load(ids)
    identities.add("ward", ["*"])
    identities.save()
    key = tmp_path / km.AUDIT_KEY_FILE.lstrip("/")
    key.parent.mkdir(parents=True)
    keygen(key)
    (tmp_path / km.AUDIT_DIR.lstrip("/")).mkdir(parents=True)
    return tmp_path


def _run(root: Path) -> tuple[int | None, str, float]:
    """(exit status or None if still running after TIMEOUT_S, its output, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "medserve.server.cli", *_command(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        return proc.returncode, out, time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out, time.monotonic() - started


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        (km.IDENTITIES_FILE, f"--tokens {{root}}{km.IDENTITIES_FILE}: no such file"),
        (km.AUDIT_KEY_FILE, f"--audit-key {{root}}{km.AUDIT_KEY_FILE}: cannot read it"),
    ],
    ids=["identities Secret", "audit key Secret"],
)
def test_without_a_secret_the_default_command_refuses_to_start(root: Path, missing: str, named: str) -> None:
    (root / missing.lstrip("/")).unlink()
    code, out, elapsed = _run(root)
    print(f"{missing} missing: exit {code} after {elapsed:.2f} s: {out.strip()[-300:]}")
    # before the identities check, the server started with no identity at all (and was killed here)
    assert code == 2, out[-2000:]
    assert named.format(root=root) in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_without_the_tls_secret_the_default_command_does_not_serve(root: Path) -> None:
    (root / km.TLS_DIR.lstrip("/") / "tls.key").unlink()
    code, out, elapsed = _run(root)
    print(f"tls.key missing: exit {code} after {elapsed:.2f} s: {out.strip()[-300:]}")
    assert code not in (0, None), out[-2000:]
    assert "tls.key" in out
