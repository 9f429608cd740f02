"""Retry schedule and replica choice, as plain objects with an injected clock and random source
(no I/O, no sleeping), so the sync and the asyncio client share them and tests drive them with
explicit times.

A call's life: ``Attempts(policy, timeout_s, ...)`` fixes the absolute deadline; before each try
the caller asks ``remaining_s()`` (the per-try gRPC timeout shrinks as time passes); after a
failure, ``next_delay_s(error, failover=...)`` says how long to wait before the next try, or None
to give up and raise that error. It gives up when the code is not retryable, attempts are used
up, the server's push-back says so, or the wait would end at or past the deadline.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ._types import RetryPolicy
from .errors import MedserveClientError

Clock = Callable[[], float]
Random = Callable[[], float]

T = TypeVar("T")


class Attempts:
    """The retry state of one call (see the module docstring)."""

    __slots__ = ("_clock", "_policy", "_random", "attempt", "deadline_s")

    def __init__(self, policy: RetryPolicy, timeout_s: float, clock: Clock, random: Random) -> None:
        self._policy = policy
        self._clock = clock
        self._random = random
        self.deadline_s = clock() + timeout_s
        self.attempt = 0  # tries made so far

    def remaining_s(self) -> float:
        return self.deadline_s - self._clock()

    def backoff_s(self, retry: int) -> float:
        """The jittered wait before retry number ``retry`` (1 = the first retry)."""
        p = self._policy
        try:
            grown = p.initial_backoff_s * p.multiplier ** (retry - 1)
        except OverflowError:
            grown = p.max_backoff_s
        return min(p.max_backoff_s, grown) * (1.0 - p.jitter * self._random())

    def next_delay_s(self, error: MedserveClientError, *, failover: bool = False) -> float | None:
        """Seconds to wait before the next try, or None to give up. ``failover``: another,
        healthy replica can take the retry, so an UNAVAILABLE one is retried there at once."""
        self.attempt += 1
        p = self._policy
        if error.code is None or error.code.name not in p.retry_on or self.attempt >= p.max_attempts:
            return None
        pushback = error.retry_pushback_s
        if pushback is not None:
            if pushback < 0:
                return None
            delay = pushback
        elif failover and error.code.name == "UNAVAILABLE":
            delay = 0.0
        else:
            delay = self.backoff_s(self.attempt)
        if self._clock() + delay >= self.deadline_s:
            return None
        return delay


class Balancer(Generic[T]):
    """Round-robin over endpoints, per call, skipping any marked unhealthy until its cool-down
    ends. When every endpoint is cooling down, the one whose cool-down ends first is used
    (better a likely failure than no try at all). Safe to share between threads: the counter
    is an ``itertools.count`` and each mark is a single list-item store."""

    def __init__(self, endpoints: Sequence[T], cooldown_s: float, clock: Clock) -> None:
        if not endpoints:
            raise ValueError("at least one target is needed")
        self.endpoints = tuple(endpoints)
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._until = [0.0] * len(self.endpoints)
        self._next = itertools.count()

    def pick(self) -> int:
        """Index of the endpoint for the next try."""
        n = len(self.endpoints)
        start = next(self._next)
        if n == 1:
            return 0
        now = self._clock()
        until = self._until
        for k in range(n):
            i = (start + k) % n
            if until[i] <= now:
                return i
        return min(range(n), key=until.__getitem__)

    def mark_unhealthy(self, index: int) -> None:
        self._until[index] = self._clock() + self._cooldown_s

    def mark_healthy(self, index: int) -> None:
        if self._until[index]:
            self._until[index] = 0.0

    def healthy_other_than(self, index: int) -> bool:
        now = self._clock()
        return any(u <= now for i, u in enumerate(self._until) if i != index)
