"""Who may do what, against the real server: {plaintext on loopback, TLS, mutual TLS} x {no
credential, bad token, good token, a token for another model, admin} x {infer on the model the
good token may use, infer on a model only the admin may use, RepositoryIndex, load/unload}.
Every cell's status is in the one table below. Under mutual TLS, "no credential" is the client
certificate alone, whose subject is an identity of its own (it may use `ward` models).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

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
    common = {"tokens_file": str(tokens), "model_control_mode": "explicit", "load_models": ("*",)}
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


IDENTITY = {"none": "anonymous", "bad token": "anonymous", "good token": "ward-token", "other token": "other-token",
            "admin": "admin-token"}


def test_every_call_of_the_matrix_is_audited_as_the_caller_saw_it(repo: Path, tmp_path: Path) -> None:
    """Every refused call of the matrix (and every audited success) is in the audit trail exactly
    once with the identity, RPC and status its caller got — the strangers' (no or unknown
    credentials: `anonymous`) as per-peer, per-second counts, the last of them written at stop.
    A guard for counting refusals (it held on the code before too, with a line per refusal)."""
    from collections import Counter

    from medserve.server.audit import keygen  # type: ignore[attr-defined]

    tokens = write_tokens(tmp_path / "identities.json",
                          {"ward-token": ["ward"], "other-token": ["oth*"], "admin-token": ["*"]})
    keygen(tmp_path / "audit.key")
    log = tmp_path / "audit.jsonl"
    expected: Counter[tuple[str, str, str]] = Counter()
    with running_server(repo, tokens_file=str(tokens), model_control_mode="explicit", load_models=("*",),
                        audit_log=str(log), audit_key=str(tmp_path / "audit.key")) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for credential in CREDENTIALS:
                metadata = () if credential == "none" else (("authorization", f"Bearer {TOKENS[credential]}"),)
                who = IDENTITY[credential]
                for model in ("ward", "secret"):
                    expected[(who, "ModelInfer", _status(lambda m=model, md=metadata: _infer(stub, m, md))[0])] += 1
                index = _status(lambda md=metadata: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md,
                                                             timeout=30))[0]
                if index != OK:  # a successful index is not audited
                    expected[(who, "RepositoryIndex", index)] += 1
                unload = _status(lambda md=metadata: stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name="other"), metadata=md, timeout=30))[0]
                expected[(who, "RepositoryModelUnload", unload)] += 1
                if unload == OK:
                    load = _status(lambda md=metadata: stub.RepositoryModelLoad(
                        pb.RepositoryModelLoadRequest(model_name="other"), metadata=md, timeout=30))[0]
                    expected[(who, "RepositoryModelLoad", load)] += 1
    audited: Counter[tuple[str, str, str]] = Counter()
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "rpc" in record:
            audited[(record["identity"], record["rpc"], record["status"])] += record.get("count", 1)
    assert audited == expected
