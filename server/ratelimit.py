"""Per-identity rate limits: a token bucket each, refilled at `rate_per_s` up to `burst`, on an
injected clock. A refused call is told when a token will be there (the caller's retry hint,
sent as `grpc-retry-pushback-ms`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .identities import Identity


@dataclass(slots=True)
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float
    updated_s: float

    def take(self, now: float) -> float:
        """Take one token; 0.0 if there was one, else the seconds until there will be."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated_s) * self.rate_per_s)
        self.updated_s = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One bucket per identity that has a rate limit (identities without one are never limited)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, float, int], TokenBucket] = {}

    def wait_s(self, identity: Identity) -> float:
        """0.0 = the call may proceed; otherwise refuse it and retry after this many seconds."""
        if identity.rate_per_s <= 0:
            return 0.0
        key = (identity.name, identity.rate_per_s, identity.burst)  # a changed limit starts afresh
        bucket = self._buckets.get(key)
        now = self._clock()
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(identity.rate_per_s, float(identity.burst), float(identity.burst), now)
        return bucket.take(now)
