"""Identities: the file format, `medserve tokens add/list/revoke`, the gate's rules (no token in
clear text from another host; certificate subjects), SIGHUP rotation and per-identity rate
limits against a real server."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw
from medserve.server.errors import InvalidSetting, Unauthenticated
from medserve.server.gate import Gate, certificate_names, certificate_subject, is_loopback_peer
from medserve.server.identities import IdentityFile, token_digest
from medserve.server.ratelimit import RateLimiter

import onnx_models
from conftest import running_server, server_process, wait_for


def medserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medserve.server.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def infer(target: str, token: str | None, model: str = "icu_sepsis") -> grpc.StatusCode:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(to_raw(np.zeros((1, 4), np.float32)))
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, metadata=metadata, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


def test_tokens_add_prints_the_token_once_and_stores_only_its_digest(tmp_path: Path) -> None:
    file = tmp_path / "ids.json"
    added = medserve("tokens", "add", "billing", "--models", "icu_*", "--rate", "5", "--file", str(file))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert len(token) >= 40 and token not in file.read_text()
    stored = json.loads(file.read_text())["identities"][0]
    assert stored == {"name": "billing", "models": ["icu_*"], "token_sha256": token_digest(token), "rate_per_s": 5.0,
                      "burst": 5}
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    listed = json.loads(medserve("tokens", "list", "--file", str(file)).stdout)
    assert listed == [{"name": "billing", "kind": "token", "models": ["icu_*"], "admin": False, "rate_per_s": 5.0}]
    again = medserve("tokens", "add", "billing", "--models", "x", "--file", str(file))
    assert again.returncode == 2 and "exists already" in again.stderr
    assert medserve("tokens", "revoke", "billing", "--file", str(file)).returncode == 0
    assert json.loads(file.read_text())["identities"] == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "models": ["m"]}, "give exactly one of token_sha256 and certificate"),
        ({"name": "a", "token_sha256": "xyz", "models": []}, "token_sha256: expected 64 lowercase hex digits"),
        ({"name": "a b", "token_sha256": "0" * 64}, ".name: expected"),
        ({"name": "a", "token_sha256": "0" * 64, "rate_per_s": -1}, "rate_per_s: expected a number >= 0"),
        ({"name": "a", "token_sha256": "0" * 64, "role": "root"}, "unknown fields ['role']"),
    ],
)
def test_a_broken_identities_file_names_the_entry_and_field(tmp_path: Path, entry: dict, message: str) -> None:
    path = tmp_path / "ids.json"
    path.write_text(json.dumps({"version": 1, "identities": [entry]}))
    with pytest.raises(InvalidSetting, match=message.replace("[", r"\[").replace("]", r"\]")):
        IdentityFile.load(path)


def test_the_old_token_map_format_is_refused_with_the_way_forward(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"secret": ["*"]}))
    with pytest.raises(InvalidSetting, match="medserve tokens add"):
        IdentityFile.load(path)


class FakeContext:
    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...] = (), auth: dict | None = None) -> None:
        self._peer, self._metadata, self._auth = peer, metadata, auth or {}

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict:
        return self._auth


def test_a_token_is_never_accepted_over_plaintext_from_another_host(tmp_path: Path) -> None:
    ids = IdentityFile(tmp_path / "ids.json")
    token = ids.add("ward", ["*"])
    loaded = IdentityFile(tmp_path / "ids.json", ids.identities, {token_digest(str(token)): ids.identities[0]})
    plaintext = Gate(identities=lambda: loaded, plaintext=True, rate_limiter=RateLimiter(lambda: 0.0))
    bearer = (("authorization", f"Bearer {token}"),)
    assert plaintext.authenticate(FakeContext("ipv4:127.0.0.1:4000", bearer)).name == "ward"  # type: ignore[arg-type]
    assert plaintext.authenticate(FakeContext("ipv6:[::1]:4000", bearer)).name == "ward"  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="not accepted over plaintext from another host"):
        plaintext.authenticate(FakeContext("ipv4:10.2.3.4:4000", bearer))  # type: ignore[arg-type]
    tls = Gate(identities=lambda: loaded, plaintext=False, rate_limiter=RateLimiter(lambda: 0.0))
    assert tls.authenticate(FakeContext("ipv4:10.2.3.4:4000", bearer)).name == "ward"  # type: ignore[arg-type]


def test_peers_and_certificate_subjects() -> None:
    assert is_loopback_peer("ipv4:127.0.0.1:1") and is_loopback_peer("ipv6:[::1]:1") and is_loopback_peer("unix:/s")
    assert not is_loopback_peer("ipv4:192.168.1.5:1") and not is_loopback_peer("ipv6:[2001:db8::1]:1")
    both = {"x509_subject_alternative_name": [b"gw.ward7.local"], "x509_common_name": [b"CN gw"]}
    assert certificate_subject(both) == "gw.ward7.local"
    assert certificate_subject({"x509_common_name": [b"gw"]}) == "gw" and certificate_subject({}) is None
    # An identity is looked up by every SAN in the certificate's order (e-mail, IP, URI, DNS
    # alike), then the CN: the first listed one wins.
    many = {"x509_subject_alternative_name": [b"ops@ward7.local", b"10.1.2.3", b"spiffe://ward7/gw", b"gw.local"],
            "x509_common_name": [b"gw"]}
    assert certificate_names(many) == ["ops@ward7.local", "10.1.2.3", "spiffe://ward7/gw", "gw.local", "gw"]


def test_sighup_rotates_tokens_without_a_restart(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "icu_sepsis" / "1" / "model.onnx")
    file = tmp_path / "ids.json"
    old = medserve("tokens", "add", "old", "--models", "icu_*", "--file", str(file)).stdout.strip()
    with server_process(repo, "--tokens", str(file)) as (port, proc):
        target = f"127.0.0.1:{port}"
        assert infer(target, old) == grpc.StatusCode.OK
        new = medserve("tokens", "add", "new", "--models", "icu_*", "--file", str(file)).stdout.strip()
        assert medserve("tokens", "revoke", "old", "--file", str(file)).returncode == 0
        assert infer(target, new) == grpc.StatusCode.UNAUTHENTICATED  # not read yet
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: infer(target, new) == grpc.StatusCode.OK)
        assert infer(target, old) == grpc.StatusCode.UNAUTHENTICATED
        file.write_text("{ broken")  # a file that does not load leaves the identities in force
        proc.send_signal(signal.SIGHUP)
        assert infer(target, new) == grpc.StatusCode.OK


def test_an_identity_over_its_rate_limit_is_told_when_to_retry(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "icu_sepsis" / "1" / "model.onnx")
    file = tmp_path / "ids.json"
    ids = IdentityFile.load(file)
    slow = ids.add("slow", ["*"], rate_per_s=0.5, burst=2)
    fast = ids.add("fast", ["*"])
    ids.save()
    with running_server(repo, tokens_file=str(file)) as server:
        stub = server.stub()
        req = pb.ModelInferRequest(model_name="icu_sepsis")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(to_raw(np.zeros((1, 4), np.float32)))
        for _ in range(2):  # the burst
            stub.ModelInfer(req, metadata=(("authorization", f"Bearer {slow}"),), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, metadata=(("authorization", f"Bearer {slow}"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'slow' is over its rate limit" in info.value.details()
        pushback = dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"]
        assert 1000 <= int(pushback) <= 2000  # one token every 2 s
        stub.ModelInfer(req, metadata=(("authorization", f"Bearer {fast}"),), timeout=30)  # others unaffected


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(lambda: now[0])
    from medserve.server.identities import Identity

    who = Identity("w", ("*",), rate_per_s=10.0, burst=2, token_sha256="0" * 64)
    assert [limiter.wait_s(who) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]
    now[0] = 0.1
    assert limiter.wait_s(who) == 0.0
    unlimited = Identity("u", ("*",), token_sha256="1" * 64)
    assert all(limiter.wait_s(unlimited) == 0.0 for _ in range(1000))
