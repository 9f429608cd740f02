"""Client settings, validated once at construction: targets, deadline, TLS, bearer token.

A bearer token is a credential: it may only travel over TLS, or, when the caller explicitly
allows it with ``allow_insecure_token=True``, in clear text to a loopback address (127.0.0.0/8,
localhost, [::1]) where it never leaves the machine. Anything else is refused before a channel
is opened.

Every channel balances its calls round_robin over all the addresses its target resolves to, so
one ``dns:///medserve.ns.svc.cluster.local:8001`` target naming a Kubernetes headless Service (one
address per replica) spreads calls over the replicas; gRPC's default (pick_first) would send every
call to the first address.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ._types import RetryPolicy, TLSConfig
from .errors import UsageError

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # above any server cap (medserve: --max-message-mb, 16 MiB by default)
DEFAULT_RETRIES = RetryPolicy()

# Reconnect quickly after a replica restarts (gRPC's default starts at 1 s and grows to 120 s).
_RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# gRPC's client-side balancing: one subchannel per resolved address, calls spread over the ready ones.
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

Metadata = tuple[tuple[str, str], ...]


def _address_host(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, a bare host or an unbracketed IPv6 address."""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address[1:]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def target_hosts(target: str) -> tuple[str, ...]:
    """Every host a gRPC target names (``ipv4:``/``ipv6:`` targets may list several addresses)."""
    rest = target
    if rest.startswith("dns:"):
        rest = rest[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[-1]  # drop the DNS authority
    elif rest.startswith(("ipv4:", "ipv6:")):
        return tuple(_address_host(address) for address in rest[5:].split(","))
    return (_address_host(rest),)


def target_host(target: str) -> str:
    """The (first) host of a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``, ``ipv4:``...)."""
    return target_hosts(target)[0]


def _is_loopback_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(target: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost targets (every address of an ``ipv4:``/``ipv6:`` list).
    A name a DNS server of the target's own choosing resolves (``dns://AUTHORITY/name``) may
    answer with any address: only a loopback address literal counts there."""
    named_server = target.startswith("dns://") and not target.startswith("dns:///")
    hosts = target_hosts(target)
    if named_server and any(host.lower().rstrip(".") == "localhost" for host in hosts):
        return False
    return all(_is_loopback_host(host) for host in hosts)


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"TLSConfig.{what}: cannot read {path}: {exc.strerror or exc}") from None


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    if (tls.cert_file is None) != (tls.key_file is None):
        raise UsageError("TLSConfig: mutual TLS needs both cert_file and key_file (or neither)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file"),
        private_key=_read(tls.key_file, "key_file"),
        certificate_chain=_read(tls.cert_file, "cert_file"),
    )


@dataclass(frozen=True, slots=True)
class Settings:
    targets: tuple[str, ...]
    timeout_s: float
    metadata: Metadata | None
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, str | int], ...]
    retries: RetryPolicy


def check_timeout(timeout_s: float, what: str = "timeout_s") -> float:
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not (timeout_s > 0 and math.isfinite(timeout_s))
    ):
        raise UsageError(f"{what} must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def build_settings(
    target: str | Sequence[str],
    *,
    timeout_s: float,
    tls: TLSConfig | None,
    token: str | None,
    allow_insecure_token: bool,
    retries: RetryPolicy,
    max_message_bytes: int,
) -> Settings:
    targets = (target,) if isinstance(target, str) else tuple(target)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise UsageError("target must be a 'host:port' string or a non-empty list of them")
    if len(set(targets)) != len(targets):
        raise UsageError(f"targets repeat an address: {list(targets)}")
    check_timeout(timeout_s)
    if not isinstance(retries, RetryPolicy):
        raise UsageError(f"retries must be a RetryPolicy, got {type(retries).__name__}")
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes <= 0:
        raise UsageError(f"max_message_bytes must be a positive int, got {max_message_bytes!r}")
    metadata: Metadata | None = None
    if token is not None:
        if not isinstance(token, str) or not token.strip() or any(c in token for c in "\r\n\0"):
            raise UsageError("token must be a non-empty string on one line")
        if tls is None:
            remote = [t for t in targets if not is_loopback(t)]
            if not allow_insecure_token:
                raise UsageError(
                    "refusing to send a bearer token over an insecure channel: pass tls=TLSConfig(...) "
                    "(or, for a server on this machine only, allow_insecure_token=True)"
                )
            if remote:
                raise UsageError(
                    f"refusing to send a bearer token in clear text to {remote}: allow_insecure_token only "
                    "covers loopback targets (127.0.0.0/8, localhost, [::1]); use tls=TLSConfig(...)"
                )
        metadata = (("authorization", f"Bearer {token.strip()}"),)
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *_RECONNECT_OPTIONS,
        ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG),
    ]
    credentials = None
    if tls is not None:
        credentials = channel_credentials(tls)
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
    return Settings(targets, float(timeout_s), metadata, credentials, tuple(options), retries)
