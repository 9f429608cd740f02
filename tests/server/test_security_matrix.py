"""Who may do what, against the real server, over both transports (gRPC and the KServe V2 REST
port, one gate): {plaintext on loopback, TLS, mutual TLS} x {no
credential, bad token, good token, a token for another model, admin} x {infer on the model the
good token may use, infer on a model only the admin may use, RepositoryIndex, load/unload}.
Every cell's status is in the one table below. Under mutual TLS, "no credential" is the client
certificate alone, whose subject is an identity of its own (it may use `ward` models).
"""
from __future__ import annotations

import json
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw

import onnx_models
from conftest import RunningServer, running_server
from credentials import Certs, make_certs, write_tokens

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for test certificates")

OK, NOT_FOUND, UNAUTH, DENIED = "OK", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"
CREDENTIALS = ("none", "bad token", "good token", "other token", "admin")
ACTIONS = ("infer allowed", "infer forbidden", "index", "load/unload")
# What the index shows each caller (its models only), where the call succeeds.
INDEX_SHOWS = {"good token": {"ward"}, "admin": {"ward", "secret", "other"}, "none@mtls": {"ward"},
               "other token": {"other"}}

EXPECTED: dict[tuple[str, str], tuple[str, str, str, str]] = {
    # (transport, credential): (infer allowed, infer forbidden, index, load/unload)
    **{(t, "none"): (UNAUTH, UNAUTH, UNAUTH, UNAUTH) for t in ("plaintext", "tls")},
    ("mtls", "none"): (OK, NOT_FOUND, OK, DENIED),
    **{(t, "bad token"): (UNAUTH, UNAUTH, UNAUTH, UNAUTH) for t in ("plaintext", "tls", "mtls")},
    **{(t, "good token"): (OK, NOT_FOUND, OK, DENIED) for t in ("plaintext", "tls", "mtls")},
    **{(t, "other token"): (NOT_FOUND, NOT_FOUND, OK, DENIED) for t in ("plaintext", "tls", "mtls")},
    **{(t, "admin"): (OK, OK, OK, OK) for t in ("plaintext", "tls", "mtls")},
}
TOKENS = {"good token": "ward-token", "other token": "other-token", "admin": "admin-token", "bad token": "nobody"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("matrix") / "repo"
    for name in ("ward", "secret", "other"):
        onnx_models.affine(root / name / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def servers(repo: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer]]:
    tokens = write_tokens(
        tmp_path_factory.mktemp("ids") / "identities.json",
        {"ward-token": ["ward"], "other-token": ["oth*"], "admin-token": ["*"]},
        certificates={"medserve test client": ["ward"]},
    )
    common = {"tokens_file": str(tokens), "model_control_mode": "explicit", "load_models": ("*",), "http_port": 0}
    tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)}
    with (
        running_server(repo, **common) as plain,
        running_server(repo, **common, **tls) as tls_server,
        running_server(repo, **common, **tls, tls_client_ca=str(certs.ca)) as mtls_server,
    ):
        yield {"plaintext": plain, "tls": tls_server, "mtls": mtls_server}


def _channel(transport: str, server: RunningServer, certs: Certs) -> grpc.Channel:
    if transport == "plaintext":
        return grpc.insecure_channel(server.target)
    ca = certs.ca.read_bytes()
    if transport == "tls":
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        creds = grpc.ssl_channel_credentials(ca, certs.client_key.read_bytes(), certs.client_cert.read_bytes())
    return grpc.secure_channel(f"localhost:{server.port}", creds)


def _infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str, metadata: tuple[tuple[str, str], ...]) -> None:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(to_raw(np.zeros((1, 4), np.float32)))
    stub.ModelInfer(req, metadata=metadata, timeout=30)


def _status(call) -> tuple[str, object]:  # type: ignore[no-untyped-def]
    try:
        return OK, call()
    except grpc.RpcError as err:
        return err.code().name, None


# The REST column of status.py, read back as the gRPC code names of the table above.
HTTP_CODES = {401: UNAUTH, 403: DENIED, 404: NOT_FOUND}


class _RestError(Exception):
    def __init__(self, code: str) -> None:
        self.code = code


class Rest:
    """The same calls over the REST port (urllib: plain HTTP, TLS, or TLS with the client certificate)."""

    def __init__(self, transport: str, server: RunningServer, certs: Certs, token: str | None) -> None:
        self._context: ssl.SSLContext | None = None
        scheme, host = "http", "127.0.0.1"
        if transport != "plaintext":
            scheme, host = "https", "localhost"
            self._context = ssl.create_default_context(cafile=str(certs.ca))
            if transport == "mtls":
                self._context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        self._base = f"{scheme}://{host}:{server.server.http_port}"
        self._headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._context) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as err:
            with err:
                raise _RestError(HTTP_CODES.get(err.code, str(err.code))) from None

    def infer(self, model: str) -> object:
        return self.call("POST", f"/v2/models/{model}/infer",
                         {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]})

    def index(self) -> set[str]:
        return {row["name"] for row in self.call("POST", "/v2/repository/index", {})}  # type: ignore[attr-defined]

    def load_unload(self) -> None:
        self.call("POST", "/v2/repository/models/other/unload", {})
        self.call("POST", "/v2/repository/models/other/load", {})


def _rest_status(call) -> tuple[str, object]:  # type: ignore[no-untyped-def]
    try:
        return OK, call()
    except _RestError as err:
        return err.code, None


@pytest.mark.parametrize("transport", ["plaintext", "tls", "mtls"])
@pytest.mark.parametrize("credential", CREDENTIALS)
def test_every_cell_of_the_access_matrix_over_rest(
    servers: dict[str, RunningServer], certs: Certs, transport: str, credential: str
) -> None:
    """The same table over the REST port: the gate decides, whatever the transport."""
    rest = Rest(transport, servers[transport], certs, None if credential == "none" else TOKENS[credential])
    got = []
    for action, call in zip(ACTIONS, (lambda: rest.infer("ward"), lambda: rest.infer("secret"), rest.index,
                                      rest.load_unload), strict=True):
        status, answer = _rest_status(call)
        got.append(status)
        if action == "index" and status == OK:
            assert answer == INDEX_SHOWS["none@mtls" if credential == "none" else credential]
    assert tuple(got) == EXPECTED[(transport, credential)], dict(zip(ACTIONS, got, strict=True))
    # Liveness and readiness stay open to probes whatever the credential.
    assert rest.call("GET", "/v2/health/live") == {"live": True}
    assert rest.call("GET", "/v2/health/ready") == {"ready": True}


@pytest.mark.parametrize("transport", ["plaintext", "tls", "mtls"])
@pytest.mark.parametrize("credential", CREDENTIALS)
def test_every_cell_of_the_access_matrix(
    servers: dict[str, RunningServer], certs: Certs, transport: str, credential: str
) -> None:
    server = servers[transport]
    metadata = () if credential == "none" else (("authorization", f"Bearer {TOKENS[credential]}"),)
    with _channel(transport, server, certs) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def load_unload() -> None:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="other"), metadata=metadata, timeout=30)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="other"), metadata=metadata, timeout=30)

        got = []
        for action, call in zip(ACTIONS, (
            lambda: _infer(stub, "ward", metadata),
            lambda: _infer(stub, "secret", metadata),
            lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata, timeout=30),
            load_unload,
        ), strict=True):
            status, answer = _status(call)
            got.append(status)
            if action == "index" and status == OK:
                key = "none@mtls" if credential == "none" else credential
                assert {m.name for m in answer.models} == INDEX_SHOWS[key]  # type: ignore[attr-defined]
        assert tuple(got) == EXPECTED[(transport, credential)], dict(zip(ACTIONS, got, strict=True))
        # Liveness and readiness stay open to probes whatever the credential.
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready


def test_a_forbidden_model_answers_exactly_like_a_missing_one(servers: dict[str, RunningServer], certs: Certs) -> None:
    metadata = (("authorization", "Bearer ward-token"),)
    with _channel("tls", servers["tls"], certs) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = []
        for model in ("secret", "no_such_model"):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelMetadata(pb.ModelMetadataRequest(name=model), metadata=metadata, timeout=30)
            answers.append((info.value.code(), info.value.details().replace(model, "<m>")))
        assert answers[0] == answers[1]
    rest = Rest("tls", servers["tls"], certs, "ward-token")
    errors = []
    for model in ("secret", "no_such_model"):
        request = urllib.request.Request(f"https://localhost:{servers['tls'].server.http_port}/v2/models/{model}",
                                         headers={"Authorization": "Bearer ward-token"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30, context=rest._context)  # noqa: SLF001
        with info.value as err:
            errors.append((err.code, err.read().decode().replace(model, "<m>")))
    assert errors[0] == errors[1] and errors[0][0] == 404


IDENTITY = {"none": "anonymous", "bad token": "anonymous", "good token": "ward-token", "other token": "other-token",
            "admin": "admin-token"}


def _audit_calls(wire: str, stub: pb_grpc.GRPCInferenceServiceStub, rest: Rest,
                 metadata: tuple[tuple[str, str], ...]) -> tuple[Any, Any, Any, Any]:
    """infer(model), index(), unload(), load() over one transport, each returning the status name."""
    if wire == "rest":
        return ((lambda m: _rest_status(lambda: rest.infer(m))[0]),
                (lambda: _rest_status(lambda: rest.call("POST", "/v2/repository/index", {}))[0]),
                (lambda: _rest_status(lambda: rest.call("POST", "/v2/repository/models/other/unload", {}))[0]),
                (lambda: _rest_status(lambda: rest.call("POST", "/v2/repository/models/other/load", {}))[0]))
    return ((lambda m: _status(lambda: _infer(stub, m, metadata))[0]),
            (lambda: _status(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata,
                                                          timeout=30))[0]),
            (lambda: _status(lambda: stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="other"), metadata=metadata, timeout=30))[0]),
            (lambda: _status(lambda: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="other"), metadata=metadata, timeout=30))[0]))


@pytest.mark.parametrize("wire", ["grpc", "rest"])
def test_every_call_of_the_matrix_is_audited_as_the_caller_saw_it(repo: Path, tmp_path: Path, wire: str) -> None:
    """Every refused call of the matrix (and every audited success) is in the audit trail exactly
    once with the identity, RPC and status its caller got — the strangers' (no or unknown
    credentials: `anonymous`) as per-peer, per-second counts, the last of them written at stop.
    A guard for counting refusals (it held on the code before too, with a line per refusal).
    Over REST the same records, each identified caller's naming the transport ("http")."""
    from collections import Counter

    from medserve.server.audit import keygen  # type: ignore[attr-defined]

    tokens = write_tokens(tmp_path / "identities.json",
                          {"ward-token": ["ward"], "other-token": ["oth*"], "admin-token": ["*"]})
    keygen(tmp_path / "audit.key")
    log = tmp_path / "audit.jsonl"
    expected: Counter[tuple[str, str, str]] = Counter()
    with running_server(repo, tokens_file=str(tokens), model_control_mode="explicit", load_models=("*",),
                        audit_log=str(log), audit_key=str(tmp_path / "audit.key"), http_port=0) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for credential in CREDENTIALS:
                metadata = () if credential == "none" else (("authorization", f"Bearer {TOKENS[credential]}"),)
                who = IDENTITY[credential]
                rest = Rest("plaintext", server, None, None if credential == "none" else TOKENS[credential])  # type: ignore[arg-type]
                infer, index_call, unload_call, load_call = _audit_calls(wire, stub, rest, metadata)
                for model in ("ward", "secret"):
                    expected[(who, "ModelInfer", infer(model))] += 1
                index = index_call()
                if index != OK:  # a successful index is not audited
                    expected[(who, "RepositoryIndex", index)] += 1
                unload = unload_call()
                expected[(who, "RepositoryModelUnload", unload)] += 1
                if unload == OK:
                    expected[(who, "RepositoryModelLoad", load_call())] += 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    audited: Counter[tuple[str, str, str]] = Counter()
    for record in records:
        if "rpc" in record:
            audited[(record["identity"], record["rpc"], record["status"])] += record.get("count", 1)
    assert audited == expected
    if wire == "rest":
        assert all(r.get("transport") == "http" for r in records if "rpc" in r and r["identity"] != "anonymous")
    else:
        assert not any("transport" in r for r in records)
