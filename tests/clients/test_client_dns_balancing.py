"""One target, several replicas (issue #27): a ``dns:///`` target naming a headless Service
resolves to one address per replica, and the client's channels balance over them round_robin
(gRPC's own default, pick_first, sends every call to the first address). A DNS name cannot
resolve to two ports here, so the balancing is shown with gRPC's static ``ipv4:`` resolver (two
addresses, two real servers), and ``dns:///localhost:PORT`` is shown to work; both go through the
same channel options."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medserve.clients import AsyncClient, Client, RetryPolicy, TLSConfig, Unavailable, UsageError
from medserve.clients._settings import is_loopback, target_hosts

import onnx_models
from client_helpers import server_cert_for_name
from conftest import running_server
from credentials import make_certs

X = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("dns-repo")
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def two_ports(repo: Path) -> Iterator[tuple[int, int]]:
    with running_server(repo) as a, running_server(repo) as b:
        yield a.port, b.port


def counts(*ports: int) -> tuple[int, ...]:
    """Inferences each server has answered so far (read over a channel of its own)."""
    out = []
    for port in ports:
        with Client(f"127.0.0.1:{port}") as client:
            out.append(sum(s.inference_count for s in client.model_statistics("affine")))
    return tuple(out)


def test_one_target_with_two_addresses_is_balanced_round_robin(two_ports: tuple[int, int]) -> None:
    p1, p2 = two_ports
    with Client(f"ipv4:127.0.0.1:{p1},127.0.0.1:{p2}") as client:
        assert len(client.targets) == 1  # the client's own replica list plays no part
        start = counts(p1, p2)
        for _ in range(200):  # until both subchannels are connected (a few calls at most)
            client.infer("affine", X)
            now = counts(p1, p2)
            if now[0] > start[0] and now[1] > start[1]:
                break
        before = counts(p1, p2)
        for _ in range(10):
            assert client.infer("affine", X)["s"][0, 0] == 6.0
        after = counts(p1, p2)
    print(f"first calls: {tuple(b - s for b, s in zip(before, start, strict=True))}; then 10 calls: "
          f"{tuple(a - b for a, b in zip(after, before, strict=True))}")
    assert before[0] > start[0] and before[1] > start[1], "every call went to one address (pick_first)"
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5)  # round_robin alternates


async def test_the_asyncio_client_balances_the_same_way(two_ports: tuple[int, int]) -> None:
    p1, p2 = two_ports
    async with AsyncClient(f"ipv4:127.0.0.1:{p1},127.0.0.1:{p2}") as client:
        start = counts(p1, p2)
        for _ in range(200):
            await client.infer("affine", X)
            now = counts(p1, p2)
            if now[0] > start[0] and now[1] > start[1]:
                break
        before = counts(p1, p2)
        for _ in range(10):
            await client.infer("affine", X)
        after = counts(p1, p2)
    assert before[0] > start[0] and before[1] > start[1], "every call went to one address (pick_first)"
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5)


def test_a_dns_target(two_ports: tuple[int, int]) -> None:
    port = two_ports[0]
    before = counts(port)
    with Client(f"dns:///localhost:{port}") as client:
        assert client.server_ready()
        assert client.infer("affine", X)["y"].tolist() == [[1.0, 3.0, 5.0, 7.0]]
    assert counts(port) == (before[0] + 1,)


async def test_a_dns_target_from_asyncio(two_ports: tuple[int, int]) -> None:
    async with AsyncClient(f"dns:///localhost:{two_ports[1]}") as client:
        assert (await client.infer("affine", X))["s"].tolist() == [[6.0]]


def test_a_dns_target_over_tls_checks_the_name_it_is_told(repo: Path, tmp_path: Path) -> None:
    """deploy/README's recipe: dial the headless Service, check the name the certificate holds."""
    certs = make_certs(tmp_path / "certs")
    cert, key = server_cert_for_name(tmp_path / "certs", "medserve.medserve.svc")
    with running_server(repo, tls_cert=str(cert), tls_key=str(key)) as server:
        target = f"dns:///localhost:{server.port}"
        unchecked = TLSConfig(ca_file=certs.ca)
        with Client(target, tls=unchecked, retries=RetryPolicy(max_attempts=1)) as client, pytest.raises(Unavailable):
            client.server_ready()
        named = TLSConfig(ca_file=certs.ca, server_name="medserve.medserve.svc")
        with Client(target, tls=named) as client:
            assert client.infer("affine", X)["s"].tolist() == [[6.0]]


def test_a_token_in_clear_text_needs_every_listed_address_to_be_loopback() -> None:
    assert target_hosts("ipv4:127.0.0.1:1,10.0.0.5:2") == ("127.0.0.1", "10.0.0.5")
    assert target_hosts("ipv6:[::1]:1,[2001:db8::1]:2") == ("::1", "2001:db8::1")
    assert is_loopback("ipv4:127.0.0.1:1,127.0.0.2:2")
    assert not is_loopback("ipv4:127.0.0.1:1,10.0.0.5:2")  # the second address is another machine
    assert not is_loopback("ipv6:[::1]:1,[2001:db8::1]:2")
    with pytest.raises(UsageError, match="clear text"):
        Client("ipv4:127.0.0.1:1,10.0.0.5:2", token="secret", allow_insecure_token=True)
    with Client("ipv4:127.0.0.1:1,127.0.0.2:2", token="secret", allow_insecure_token=True) as client:
        assert client.targets == ("ipv4:127.0.0.1:1,127.0.0.2:2",)
