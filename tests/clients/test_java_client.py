"""A Java caller, for real (issue #27): clients/java/build.sh generates the stubs from protos/ with
Debian's protoc and grpc-java plugin, compiles the example against Debian's jars, and the example
infers over TLS with a bearer token against a real medserve server; a model the token may not use
answers exactly as a missing one. Skipped only when the JDK or the Debian packages are missing
(CI installs them: .ci/run)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import onnx_models
from client_helpers import server_cert_for_name, sha256_file
from conftest import RunningServer, running_server
from credentials import Certs, make_certs, write_tokens

ROOT = Path(__file__).resolve().parents[2]
JAVA = ROOT / "clients" / "java"
TOKEN = "ward-7-java-token-0123456789"
MISSING_PREREQUISITES = 3  # build.sh's exit status when a tool or a jar is not installed


def _sources_digest() -> str:
    """What the build depends on: the script, the Java sources and the protos."""
    digest = hashlib.sha256()
    files = [JAVA / "build.sh", *sorted((JAVA / "src").rglob("*.java")), *sorted((ROOT / "protos").glob("*.proto"))]
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def infer_example() -> Path:
    """The built launcher, cached under the temp dir by a digest of its sources (a rebuild costs
    about 6 s of javac)."""
    out = Path(tempfile.gettempdir()) / f"medserve-java-{_sources_digest()}"
    launcher, done = out / "infer-example", out / "built"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        build = subprocess.run(
            ["sh", str(JAVA / "build.sh"), str(out)], capture_output=True, text=True, timeout=180, check=False
        )
        if build.returncode == MISSING_PREREQUISITES:
            pytest.skip(f"Java client not buildable here: {build.stderr.strip()}")
        assert build.returncode == 0, f"clients/java/build.sh failed:\n{build.stdout}\n{build.stderr}"
        done.write_text("ok\n", encoding="utf-8")
        print(f"java client built in {time.monotonic() - started:.1f} s")
    return launcher


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("java-repo")
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    onnx_models.affine(repo / "other" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tokens") / "tokens.json", {TOKEN: ["affine"]})


@pytest.fixture(scope="module")
def tls_server(repo: Path, certs: Certs, tokens: Path) -> Iterator[RunningServer]:
    with running_server(
        repo, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tokens_file=str(tokens)
    ) as server:
        yield server


def run_java(launcher: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "MEDSERVE_TOKEN"}
    started = time.monotonic()
    done = subprocess.run(
        [str(launcher), *args], capture_output=True, text=True, timeout=60, check=False, env={**clean, **(env or {})}
    )
    print(f"java {' '.join(args[:2])}: exit {done.returncode} in {time.monotonic() - started:.1f} s")
    return done


def test_java_infers_over_tls_with_a_token_and_a_forbidden_model_looks_missing(
    infer_example: Path, tls_server: RunningServer, certs: Certs, token_file: Path, repo: Path
) -> None:
    done = run_java(
        infer_example, "--target", f"localhost:{tls_server.port}", "--ca", str(certs.ca),
        "--token-file", str(token_file), "--model", "affine", "--values", "0,1,2,3", "--forbidden", "other",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "server ready: true" in lines
    assert "output y FP32 [1, 4] = [1.0, 3.0, 5.0, 7.0]" in lines  # y = 2x + 1
    assert "output s FP32 [1, 1] = [6.0]" in lines  # the row's sum
    assert f"model_sha256: {sha256_file(repo / 'affine' / '1' / 'model.onnx')}" in lines
    not_found = "NOT_FOUND \"model '<model>' is not in the model repository\""
    for rpc in ("ModelMetadata", "ModelInfer"):
        assert f"forbidden {rpc}: {not_found}; missing: {not_found} -> same" in lines


def test_java_dns_target_with_round_robin(infer_example: Path, tls_server: RunningServer, certs: Certs) -> None:
    done = run_java(
        infer_example, "--target", f"dns:///localhost:{tls_server.port}", "--ca", str(certs.ca),
        "--model", "affine", env={"MEDSERVE_TOKEN": TOKEN},
    )
    assert done.returncode == 0, done.stderr
    assert "output y FP32 [1, 4] = [1.0, 1.0, 1.0, 1.0]" in done.stdout.splitlines()  # zeros in


def test_java_failures_exit_non_zero_with_the_status(
    infer_example: Path, tls_server: RunningServer, certs: Certs, token_file: Path
) -> None:
    target = f"localhost:{tls_server.port}"
    anonymous = run_java(infer_example, "--target", target, "--ca", str(certs.ca), "--model", "affine")
    assert anonymous.returncode == 1
    assert "error: ModelMetadata failed: UNAUTHENTICATED" in anonymous.stderr  # ServerReady needs no token
    wrong_ca = run_java(
        infer_example, "--target", target, "--ca", str(certs.other_ca), "--token-file", str(token_file),
        "--model", "affine",
    )
    assert wrong_ca.returncode == 1
    assert "error: ServerReady failed: UNAVAILABLE" in wrong_ca.stderr
    plaintext = run_java(
        infer_example, "--target", target, "--plaintext", "--token-file", str(token_file), "--model", "affine"
    )
    assert plaintext.returncode == 2
    assert "a bearer token travels only over TLS" in plaintext.stderr


def test_java_checks_the_certificate_name_it_is_told(
    infer_example: Path, repo: Path, certs: Certs, tokens: Path, token_file: Path
) -> None:
    """deploy/README's headless-Service recipe: the caller dials one name and checks another,
    the one the certificate holds (here the only name it holds)."""
    cert, key = server_cert_for_name(certs.ca.parent, "medserve.medserve.svc")
    with running_server(repo, tls_cert=str(cert), tls_key=str(key), tokens_file=str(tokens)) as server:
        dial = ("--target", f"dns:///localhost:{server.port}", "--ca", str(certs.ca), "--token-file", str(token_file),
                "--model", "affine")
        unchecked = run_java(infer_example, *dial)
        assert unchecked.returncode == 1
        assert "error: ServerReady failed: UNAVAILABLE" in unchecked.stderr
        named = run_java(infer_example, *dial, "--server-name", "medserve.medserve.svc")
        assert named.returncode == 0, named.stderr
        assert "output s FP32 [1, 1] = [0.0]" in named.stdout.splitlines()
