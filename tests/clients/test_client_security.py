"""TLS, mutual TLS and bearer tokens end to end: throwaway certificates (openssl CLI), a real
server configured with them, and the client's refusals."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medserve.clients import (
    Client,
    InferRequest,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    TLSConfig,
    Unauthenticated,
    Unavailable,
)

import onnx_models
from conftest import RunningServer, running_server, server_process
from credentials import Certs, make_certs, write_tokens

NO_RETRY = RetryPolicy(max_attempts=1)
X = {"x": np.zeros((1, 4), np.float32)}
TOKENS = {"ward-7": ["affine"], "admin": ["*"]}


def _server_config_has(*fields: str) -> bool:
    from medserve.server.config import ServerConfig

    names = {f.name for f in dataclasses.fields(ServerConfig)}
    return all(f in names for f in fields)


pytestmark = [
    pytest.mark.skipif(
        not _server_config_has("tls_cert", "tls_key", "tls_client_ca", "tokens_file"),
        reason="the server has no TLS/token settings yet",
    ),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for test certificates"),
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("client-security") / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    onnx_models.affine(repo / "other" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tokens") / "tokens.json", TOKENS)


@pytest.fixture(scope="module")
def tls_server(repo: Path, certs: Certs, tokens: Path) -> Iterator[RunningServer]:
    with running_server(
        repo, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tokens_file=str(tokens),
        model_control_mode="explicit", load_models=("*",),
    ) as server:
        yield server


def test_tls_with_a_ca_bundle(tls_server: RunningServer, certs: Certs) -> None:
    for host in ("127.0.0.1", "localhost"):
        with Client(f"{host}:{tls_server.port}", tls=TLSConfig(ca_file=certs.ca), token="ward-7") as client:
            assert client.server_live()
            assert client.infer("affine", X)["y"].tolist() == [[1.0] * 4]


def test_tls_refuses_a_server_signed_by_another_ca_and_plain_text(tls_server: RunningServer, certs: Certs) -> None:
    wrong_ca = TLSConfig(ca_file=certs.other_ca)
    with Client(tls_server.target, tls=wrong_ca, retries=NO_RETRY) as client, pytest.raises(Unavailable):
        client.server_live()
    with Client(tls_server.target, retries=NO_RETRY) as client, pytest.raises(Unavailable):
        client.server_live()


def test_tokens_authenticate_and_authorize_per_model(tls_server: RunningServer, certs: Certs) -> None:
    tls = TLSConfig(ca_file=certs.ca)
    with (
        Client(tls_server.target, tls=tls, retries=NO_RETRY) as anonymous,
        pytest.raises(Unauthenticated, match="missing credentials"),
    ):
        anonymous.infer("affine", X)
    with (
        Client(tls_server.target, tls=tls, token="stolen", retries=NO_RETRY) as stranger,
        pytest.raises(Unauthenticated, match="unknown bearer token"),
    ):
        stranger.infer("affine", X, request_id="s-1")
    with Client(tls_server.target, tls=tls, token="ward-7", retries=NO_RETRY) as ward:
        assert ward.model_metadata("affine").name == "affine"
        with pytest.raises(NotFound, match="'other' is not in the model repository"):
            ward.infer("other", X)  # a model it may not use is, for it, not there
        with pytest.raises(PermissionDenied, match="not an admin"):
            ward.load_model("affine")
        items = list(ward.infer_stream([InferRequest("affine", X, request_id="ok"), InferRequest("other", X)]))
        kinds = {item.request_id: type(item).__name__ for item in items}
        assert kinds == {"ok": "InferResult", "1": NotFound.__name__}
    with Client(tls_server.target, tls=tls, token="admin", retries=NO_RETRY) as admin:
        assert admin.infer("other", X).model_name == "other"
        admin.load_model("other")


def test_mutual_tls(repo: Path, certs: Certs) -> None:
    with running_server(
        repo, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca)
    ) as server:
        mtls = TLSConfig(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        with Client(server.target, tls=mtls) as client:
            assert client.infer("affine", X).model_name == "affine"
        no_cert = TLSConfig(ca_file=certs.ca)
        with Client(server.target, tls=no_cert, retries=NO_RETRY) as client, pytest.raises(Unavailable):
            client.server_metadata()


def test_a_token_in_clear_text_to_loopback_when_explicitly_allowed(repo: Path, tokens: Path) -> None:
    with (
        running_server(repo, tokens_file=str(tokens)) as server,
        Client(server.target, token="ward-7", allow_insecure_token=True) as client,
    ):
        assert client.infer("affine", X).model_name == "affine"


def _serve_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "medserve.server.cli", "serve", "--help"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    return done.stdout if done.returncode == 0 else ""


def test_the_cli_flags(repo: Path, certs: Certs, tokens: Path) -> None:
    help_text = _serve_help()
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--tokens"):
        assert flag in help_text, f"`medserve serve --help` does not offer {flag}"
    args = ("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
            "--tls-client-ca", str(certs.ca), "--tokens", str(tokens))
    with server_process(repo, *args) as (port, _proc):
        mtls = TLSConfig(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        with Client(f"localhost:{port}", tls=mtls, token="ward-7") as client:
            assert client.infer("affine", X).model_name == "affine"
            with pytest.raises(NotFound):
                client.infer("other", X)
