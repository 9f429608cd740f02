"""A silent trial: the shadow version scores a copy of what the serving version answered, after
every caller's work, and the two answers are compared (`rollout.TrialStats`). Never returned,
never in a caller's batch (the copies run on the shadow version's own batcher at BACKGROUND
priority), never delaying a caller (copies are queued here and submitted one part at a time; a
copy that arrives while callers wait in the serving version's queue, or while the backlog is
full, is shed and counted; queued copies are scored only at a moment when the serving version
has no caller queued or running).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Protocol

import numpy as np

from .batching import BACKGROUND, Batcher, BatchRequest
from .errors import MedserveError
from .rollout import TrialStats

log = logging.getLogger(__name__)

MAX_PENDING_ROWS = 1024  # rows waiting for the shadow at most; more are shed
PART_ROWS = 256  # rows one shadow part carries at most
GATHER_S = 0.02  # copies gather this long (or until a part is full) before a part is scored: a part
# of one row costs the event loop as much as a caller's request, so parts are made large


class Version(Protocol):
    """What a trial uses of a version (`repository.LoadedVersion`)."""

    @property
    def batcher(self) -> Batcher: ...

    @property
    def label(self) -> str: ...


class ShadowTrial:
    """Copies of one serving version's answered requests, scored by the shadow version."""

    def __init__(self, serving: Version, shadow: Version, stats: TrialStats, *,
                 max_pending_rows: int = MAX_PENDING_ROWS, part_rows: int = PART_ROWS, join: bool = True,
                 gather_s: float = GATHER_S) -> None:
        self._serving = serving
        self._shadow = shadow
        self.stats = stats
        self._max_pending_rows = max_pending_rows
        self._part_rows = part_rows if join else 0  # models without a batch dim: one request a part
        self._gather_s = gather_s if join else 0.0
        self._pending: deque[tuple[Mapping[str, np.ndarray], int, Hashable, np.ndarray]] = deque()
        self._pending_rows = 0
        self._task: asyncio.Task[None] | None = None

    def offer(self, inputs: Mapping[str, np.ndarray], rows: int, outputs: Mapping[str, np.ndarray]) -> None:
        """A caller was answered: queue a copy (or shed it when callers are waiting or the backlog is full)."""
        serving_out = outputs.get(self.stats.output)
        if serving_out is None:
            return
        if self._pending_rows + rows > self._max_pending_rows or self._serving.batcher.stats().queued:
            self.stats.shed(rows)
            return
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())  # parts join only like rows
        self._pending.append((inputs, rows, key, serving_out))
        self._pending_rows += rows
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                if self._gather_s > 0 and (self._pending_rows < self._part_rows or self._callers_busy()):
                    await asyncio.sleep(self._gather_s)  # let copies gather into one part ...
                    if self._callers_busy():
                        continue  # ... and score them only while no caller is queued or running
                parts = [self._pending.popleft()]
                rows = parts[0][1]
                while self._pending and self._pending[0][2] == parts[0][2] and rows + self._pending[0][1] <= self._part_rows:
                    parts.append(self._pending.popleft())
                    rows += parts[-1][1]
                self._pending_rows -= rows
                await self._score(parts, rows)
        finally:
            self._task = None

    def _callers_busy(self) -> bool:
        """Whether the serving version has callers queued or running: the shadow waits (and
        copies past the backlog are shed), so a saturated server spends nothing on the trial."""
        stats = self._serving.batcher.stats()
        return bool(stats.queued or stats.in_flight)

    async def _score(self, parts: list[tuple[Mapping[str, np.ndarray], int, Hashable, np.ndarray]], rows: int) -> None:
        if len(parts) == 1:
            inputs, _, _, serving_out = parts[0]
        else:
            inputs = {n: np.concatenate([p[0][n] for p in parts]) for n in parts[0][0]}
            serving_out = np.concatenate([p[3] for p in parts])
        try:
            answer = await self._shadow.batcher.submit(BatchRequest(dict(inputs), rows=rows, priority=BACKGROUND))
        except MedserveError as exc:  # refused or failed: counted (the reason names no value)
            self.stats.failed_rows += rows
            log.debug("model %s: shadow part of %d rows not scored: %s", self._shadow.label, rows, type(exc).__name__)
            return
        shadow_out = answer.get(self.stats.output)
        if shadow_out is None:
            self.stats.failed_rows += rows
            return
        self.stats.compare(serving_out, shadow_out)

    async def idle(self) -> None:
        """Wait until every queued copy is scored (tests and a trial report's settling)."""
        while self._task is not None:
            await asyncio.sleep(0.005)
