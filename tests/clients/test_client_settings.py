"""Client settings: targets, deadlines, and when a bearer token may be sent."""
from __future__ import annotations

from pathlib import Path

import pytest

from medserve.clients import AsyncClient, Client, RetryPolicy, TLSConfig, UsageError
from medserve.clients._settings import is_loopback, target_host


@pytest.mark.parametrize(
    ("target", "host", "loopback"),
    [
        ("127.0.0.1:8001", "127.0.0.1", True),
        ("127.4.5.6:1", "127.4.5.6", True),
        ("localhost:8001", "localhost", True),
        ("LOCALHOST:8001", "LOCALHOST", True),
        ("[::1]:8001", "::1", True),
        ("ipv4:127.0.0.1:8001", "127.0.0.1", True),
        ("ipv6:[::1]:8001", "::1", True),
        ("dns:///localhost:8001", "localhost", True),
        ("dns://8.8.8.8/localhost:8001", "localhost", False),  # that server may resolve it anywhere
        ("dns://8.8.8.8/127.0.0.1:8001", "127.0.0.1", True),
        ("10.0.0.5:8001", "10.0.0.5", False),
        ("128.0.0.1:8001", "128.0.0.1", False),
        ("localhost.evil.example:8001", "localhost.evil.example", False),
        ("[2001:db8::1]:8001", "2001:db8::1", False),
        ("models.hospital.local:8001", "models.hospital.local", False),
    ],
)
def test_loopback_detection(target: str, host: str, loopback: bool) -> None:
    assert target_host(target) == host
    assert is_loopback(target) is loopback


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_token_needs_tls_or_an_explicit_loopback_opt_in(cls: type) -> None:
    with pytest.raises(UsageError, match="insecure channel"):
        cls("127.0.0.1:8001", token="secret")
    with pytest.raises(UsageError, match=r"clear text to \['10.0.0.5:8001'\]"):
        cls(["127.0.0.1:8001", "10.0.0.5:8001"], token="secret", allow_insecure_token=True)
    client = cls("localhost:8001", token="secret", allow_insecure_token=True)
    assert client.targets == ("localhost:8001",)


def test_bad_settings_are_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="target"):
        Client([])
    with pytest.raises(UsageError, match="repeat"):
        Client(["a:1", "a:1"])
    for bad in (0, -1, float("inf"), float("nan"), True):
        with pytest.raises(UsageError, match="timeout_s"):
            Client("a:1", timeout_s=bad)
    with pytest.raises(UsageError, match="one line"):
        Client("a:1", token="a\nb", allow_insecure_token=True)
    with pytest.raises(UsageError, match="cert_file and key_file"):
        Client("a:1", tls=TLSConfig(cert_file=tmp_path / "c.pem"))
    with pytest.raises(UsageError, match="ca_file: cannot read"):
        Client("a:1", tls=TLSConfig(ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)


def test_a_closed_client_refuses_calls() -> None:
    client = Client("127.0.0.1:1")
    client.close()
    with pytest.raises(UsageError, match="closed"):
        client.server_live()
