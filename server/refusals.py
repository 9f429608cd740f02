"""Refusals counted rather than written one by one: a stranger (no or unknown credentials) or a
caller refused because the audit trail is behind can send thousands of calls a second, and a
record per call would let it fill the audit trail (and, with rotation, push real records out).

Refusals are grouped by (identity, peer address without its port, RPC, status, transport) per
second of the injected monotonic clock. The first refusal of a group in a second is written at once
(`count` 1: an attack is visible as it starts); the others of that second become one record
whose `count` says how many calls it stands for, written when the second is over (`flush_ended`,
which the gate's timer calls) or on stop (`flush`). So a group leaves at most two records a
second, and at most `max_groups` groups are kept per second (past that, peers are folded into
one group whose peer reads `OTHER_PEERS`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .audit import AuditEvent

OTHER_PEERS = "(other peers)"
MAX_GROUPS = 1024

Key = tuple[str, str, str, str, str]  # identity, peer host, rpc, status, transport ("grpc" or "http")


def peer_host(peer: str) -> str:
    """A grpc peer string without its port ("ipv4:10.0.0.5:41234" -> "ipv4:10.0.0.5"): one
    client opening many connections is still one peer."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host, sep, port = rest.rpartition(":")
    return f"{kind}:{host}" if sep and port.isdigit() else peer


@dataclass(slots=True)
class _Group:
    count: int = 0  # refusals after the first of this second (the first was written at once)
    first_unix: float = 0.0
    latency_ms: float = 0.0  # the longest of them


class RefusalTally:
    """Per-second counts of refused calls, handed to `emit` as audit events with `count`."""

    def __init__(self, emit: Callable[[AuditEvent], None], *, clock: Callable[[], float],
                 wall_clock: Callable[[], float], max_groups: int = MAX_GROUPS) -> None:
        self._emit = emit
        self._clock = clock
        self._wall = wall_clock
        self._max_groups = max_groups
        self._second = -1
        self._groups: dict[Key, _Group] = {}

    @property
    def pending(self) -> bool:
        """Whether some refusals are counted but not yet written."""
        return any(g.count for g in self._groups.values())

    def add(self, identity: str, peer: str, rpc: str, status: str, latency_ms: float,
            transport: str = "grpc") -> None:
        second = math.floor(self._clock())
        if second != self._second:
            self.flush()
            self._second = second
        key: Key = (identity, peer_host(peer), rpc, status, transport)
        group = self._groups.get(key)
        if group is None and len(self._groups) >= self._max_groups:
            key = (identity, OTHER_PEERS, rpc, status, transport)
            group = self._groups.get(key)
        if group is None:
            self._groups[key] = _Group()
            self._emit(AuditEvent(time_unix=self._wall(), identity=identity, peer=key[1], rpc=rpc, status=status,
                                  latency_ms=latency_ms, transport=transport))
            return
        if not group.count:
            group.first_unix = self._wall()
        group.count += 1
        group.latency_ms = max(group.latency_ms, latency_ms)

    def flush_ended(self) -> bool:
        """Write the counts of a second that is over; True if some are still waiting for theirs."""
        if math.floor(self._clock()) != self._second:
            self.flush()
        return self.pending

    def flush(self) -> None:
        """Write every count now (the second is over, or the server stops)."""
        for (identity, peer, rpc, status, transport), group in self._groups.items():
            if group.count:
                self._emit(AuditEvent(time_unix=group.first_unix, identity=identity, peer=peer, rpc=rpc,
                                      status=status, latency_ms=group.latency_ms, count=group.count,
                                      transport=transport))
        self._groups.clear()
