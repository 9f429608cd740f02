"""Rolling a model version out: the labels file, the canary's assignment, and the silent trial's
comparison figures. Pure (numpy and the standard library): every input is explicit, so each part
is tested without a server.

The labels file, `labels.json` in the model's folder (beside config.pbtxt):

    {"stable": 1, "canary": 2, "canary_percent": 10, "shadow": 2, "canary_seed": "sepsis-2026"}

Every key but the reserved ones is a label naming a version number. `canary_percent` (0-100) is
the share of requests naming no version that go to the `canary` label; `shadow` (a version
number or a label) scores a copy of every answered request, never returned; `canary_seed` keys
the canary's hash so that every replica (and every `--workers` worker, and a restart) assigns an
encounter alike (without it, each server draws a random key, shared by its `--workers` workers,
and is consistent only with itself).
A label is refused unless the version it names is READY; the old mapping keeps serving.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

LABELS_FILENAME = "labels.json"
MAX_LABELS_BYTES = 64 * 1024
RESERVED = ("canary_percent", "shadow", "canary_seed")
LABEL = re.compile(r"[a-z][a-z0-9_-]{0,31}")
LABEL_RULE = "lower-case letters, digits, '_' and '-', starting with a letter, at most 32 characters"
CANARY = "canary"
STABLE = "stable"
BUCKETS = 10_000  # canary_percent has a resolution of 0.01 points

# Per-row differences: 0, then 4 buckets a decade from 1e-6 to 1e6 (probabilities and regressions alike).
DIFF_EDGES: tuple[float, ...] = (0.0, *(float(10 ** (-6 + i / 4)) for i in range(49)))
PSI_WINDOW_ROWS = 1000  # the PSI compares the two versions' outputs over windows of this many rows
PSI_BINS = 10
PROBABILITY_EDGES = np.linspace(0.1, 0.9, 9)
PSI_FLOOR = 1e-4  # an empty bin's share (the PSI of an empty bin is otherwise infinite)


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """A labels file as written: labels -> version numbers, the canary share, the shadow."""

    labels: Mapping[str, int]
    canary_percent: float = 0.0
    shadow: int | None = None
    canary_seed: str | None = None

    def versions(self) -> set[int]:
        return set(self.labels.values()) | ({self.shadow} if self.shadow is not None else set())


def parse_rollout(shown: str, text: bytes) -> RolloutSpec:
    """The labels file's mapping, or ConfigError naming the file and the entry (never guessing)."""
    if len(text) > MAX_LABELS_BYTES:
        raise ConfigError(f"{shown}: {len(text)} bytes; a labels file is at most {MAX_LABELS_BYTES}")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{shown}: not valid JSON ({type(exc).__name__} at {getattr(exc, 'pos', '?')})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a JSON object of labels, got {type(data).__name__}")
    labels: dict[str, int] = {}
    for key, value in data.items():
        if key in RESERVED:
            continue
        if not LABEL.fullmatch(key):
            raise ConfigError(f"{shown}: label {key[:40]!r} is not valid ({LABEL_RULE})")
        if not _is_version(value):
            raise ConfigError(f"{shown}: label {key!r} must name a version number (a positive integer)")
        labels[key] = int(value)
    percent = data.get("canary_percent", 0)
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
        raise ConfigError(f"{shown}: canary_percent must be a number from 0 to 100")
    if percent and CANARY not in labels:
        raise ConfigError(f"{shown}: canary_percent is {percent} but no {CANARY!r} label names the canary version")
    shadow = data.get("shadow")
    if shadow is not None:
        if isinstance(shadow, str) and shadow in labels:
            shadow = labels[shadow]
        elif not _is_version(shadow):
            raise ConfigError(f"{shown}: shadow must be a version number or one of the labels {sorted(labels)}")
    seed = data.get("canary_seed")
    if seed is not None and (not isinstance(seed, str) or not 8 <= len(seed) <= 256):
        raise ConfigError(f"{shown}: canary_seed must be a string of 8 to 256 characters")
    return RolloutSpec(labels, float(percent), int(shadow) if shadow is not None else None, seed)


def _is_version(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 63


def check_ready(shown: str, spec: RolloutSpec, ready: Sequence[int]) -> None:
    """Refuse a mapping that names a version that is not READY (the reason names the label)."""
    for label, version in sorted(spec.labels.items()):
        if version not in ready:
            raise ConfigError(f"{shown}: label {label!r} points at version {version}, which is not READY "
                              f"(READY versions: {sorted(ready)})")
    if spec.shadow is not None and spec.shadow not in ready:
        raise ConfigError(f"{shown}: shadow version {spec.shadow} is not READY (READY versions: {sorted(ready)})")


class CanaryAssigner:
    """Which routing keys meet the canary: a keyed BLAKE2b of the key, so the same key always
    lands in the same bucket and the key itself is never kept (nor its hash)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    @classmethod
    def seeded(cls, seed: str) -> CanaryAssigner:
        return cls(hashlib.blake2b(seed.encode("utf-8"), person=b"medserve-canary").digest()[:32])

    def bucket(self, routing_key: str) -> int:
        digest = hashlib.blake2b(routing_key.encode("utf-8", "surrogatepass"), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % BUCKETS

    def is_canary(self, routing_key: str, percent: float) -> bool:
        """Whether this key meets the canary at `percent` %. No key at all: a fresh random draw."""
        threshold = round(percent * BUCKETS / 100)
        if not routing_key:
            return secrets.randbelow(BUCKETS) < threshold
        return self.bucket(routing_key) < threshold


# -- the silent trial's figures -----------------------------------------------------------

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(slots=True)
class TrialStats:
    """How a shadow version's answers compare with the serving version's: counts and histograms
    only (no input or output value is kept past the window that computes the PSI)."""

    model: str
    serving: int
    shadow: int
    output: str  # the compared output
    kind: str  # CLASSIFICATION (top class, probability difference) or REGRESSION (absolute difference)
    rows: int = 0  # rows compared
    agree: int = 0  # classifiers: rows whose top class is the same
    shed_requests: int = 0  # copies not scored: the server was busy (callers first) or the backlog full
    shed_rows: int = 0
    failed_rows: int = 0  # the shadow failed (or refused) these rows
    differences: list[int] = field(default_factory=lambda: [0] * (len(DIFF_EDGES) + 1))
    difference_sum: float = 0.0  # (finite differences only: the Prometheus histogram's sum)
    psi: float | None = None  # of the last complete window
    windows: int = 0
    _serving_window: list[np.ndarray] = field(default_factory=list, repr=False)
    _shadow_window: list[np.ndarray] = field(default_factory=list, repr=False)
    _window_rows: int = 0
    window_rows: int = PSI_WINDOW_ROWS

    def shed(self, rows: int) -> None:
        self.shed_requests += 1
        self.shed_rows += rows

    def compare(self, serving: np.ndarray, shadow: np.ndarray) -> None:
        """Compare one batch of rows (the same rows, in order, as the two versions answered them)."""
        rows = serving.shape[0] if serving.ndim else 1
        a = np.asarray(serving, dtype=np.float64).reshape(rows, -1)
        b = np.asarray(shadow, dtype=np.float64).reshape(rows, -1)
        if a.shape != b.shape:
            self.failed_rows += rows
            return
        if self.kind == CLASSIFICATION and a.shape[1] > 1:
            self.agree += int(np.count_nonzero(a.argmax(axis=1) == b.argmax(axis=1)))
        elif self.kind == CLASSIFICATION:  # one score per row: the class is which side of 0.5
            self.agree += int(np.count_nonzero((a[:, 0] >= 0.5) == (b[:, 0] >= 0.5)))
        diff = np.abs(a - b).max(axis=1) if a.shape[1] else np.zeros(rows)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        index = np.searchsorted(DIFF_EDGES, diff, side="left")
        for i, n in enumerate(np.bincount(index, minlength=len(DIFF_EDGES) + 1)):
            self.differences[i] += int(n)
        self.difference_sum += float(diff[np.isfinite(diff)].sum())
        self.rows += rows
        self._serving_window.append(a)
        self._shadow_window.append(b)
        self._window_rows += rows
        if self._window_rows >= self.window_rows:
            self.psi = psi(np.concatenate(self._serving_window).ravel(), np.concatenate(self._shadow_window).ravel(),
                           PROBABILITY_EDGES if self.kind == CLASSIFICATION else None)
            self.windows += 1
            self._serving_window, self._shadow_window, self._window_rows = [], [], 0

    @property
    def agreement(self) -> float | None:
        return self.agree / self.rows if self.kind == CLASSIFICATION and self.rows else None

    def summary(self) -> dict[str, object]:
        """The figures as JSON-ready numbers (what ModelMetadata's `trial` parameter carries)."""
        return {"serving": self.serving, "shadow": self.shadow, "output": self.output, "kind": self.kind,
                "rows": self.rows, "agree": self.agree, "shed_requests": self.shed_requests,
                "shed_rows": self.shed_rows, "failed_rows": self.failed_rows,
                "differences": list(self.differences), "psi": self.psi, "windows": self.windows}


def psi(expected: np.ndarray, actual: np.ndarray, edges: np.ndarray | None = None, bins: int = PSI_BINS) -> float:
    """Population stability index of `actual` against `expected`, over `edges` (probabilities:
    tenths of [0, 1], so a constant stream of nearly equal scores reads 0) or else the deciles of
    `expected`."""
    expected = expected[np.isfinite(expected)]
    actual = actual[np.isfinite(actual)]
    if not expected.size or not actual.size:
        return 0.0
    if edges is None:
        edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=edges.size + 1) / expected.size
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=edges.size + 1) / actual.size
    e, a = np.maximum(e, PSI_FLOOR), np.maximum(a, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def difference_deciles(counts: Sequence[int], edges: Sequence[float] = DIFF_EDGES) -> list[float]:
    """The 10th ... 100th percentiles of the per-row difference, read from its histogram (each the
    upper edge of the bucket it falls in: an upper bound, within a quarter decade)."""
    total = sum(counts)
    if not total:
        return []
    out: list[float] = []
    cumulative = 0
    bucket = 0
    for decile in range(1, 11):
        need = math.ceil(total * decile / 10)
        while cumulative + counts[bucket] < need:
            cumulative += counts[bucket]
            bucket += 1
        out.append(edges[bucket] if bucket < len(edges) else math.inf)
    return out


def output_kind(task: str | None, outputs: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[str, str] | None:
    """(output, kind) a trial compares, from the card's task and the outputs' (datatype, dims):
    a classifier's first floating output with a class axis (its probabilities), else the first
    floating output. None when no output is a float (nothing to compare)."""
    floats = [(n, dims) for n, (dtype, dims) in outputs.items() if dtype in ("FP16", "FP32", "FP64")]
    if not floats:
        return None
    regression = task is not None and task.lower().startswith("regress")
    if not regression:
        for name, dims in floats:
            if dims and dims[-1] > 1:
                return name, CLASSIFICATION
    return floats[0][0], REGRESSION if regression or task is None or "class" not in task.lower() else CLASSIFICATION


def trial_report(summary: Mapping[str, object]) -> dict[str, object]:
    """A trial's figures as `medserve trial report` shows them: agreement, the difference by
    decile, rows compared, rows shed (from `TrialStats.summary`, as ModelMetadata carries it)."""
    rows = int(summary.get("rows", 0))  # type: ignore[call-overload]
    counts = [int(c) for c in summary.get("differences", [])]  # type: ignore[attr-defined]
    kind = summary.get("kind")
    return {
        "serving": summary.get("serving"), "shadow": summary.get("shadow"), "kind": kind,
        "output": summary.get("output"), "rows_compared": rows,
        "agreement": (int(summary.get("agree", 0)) / rows) if rows and kind == CLASSIFICATION else None,  # type: ignore[call-overload]
        "difference_deciles": difference_deciles(counts) if counts else [],
        "rows_shed": summary.get("shed_rows", 0), "requests_shed": summary.get("shed_requests", 0),
        "rows_failed": summary.get("failed_rows", 0), "psi": summary.get("psi"),
    }


def format_report(model: str, reports: Sequence[Mapping[str, object]]) -> str:
    """The trial report as text, one block per (serving, shadow) pair."""
    if not reports:
        return f"model {model!r}: no silent trial has run (set \"shadow\" in its {LABELS_FILENAME})"
    lines = []
    for r in reports:
        what = "probability difference" if r["kind"] == CLASSIFICATION else "absolute difference"
        lines.append(f"model {model!r}: version {r['shadow']} (shadow) against version {r['serving']} (serving), "
                     f"{r['kind']}, output {r['output']!r}")
        agreement = r["agreement"]
        lines.append(f"  rows compared  {r['rows_compared']}")
        if agreement is not None:
            lines.append(f"  agreement      {agreement:.4f} (share of rows with the same top class)")
        lines.append(f"  rows shed      {r['rows_shed']} ({r['requests_shed']} requests; callers first)")
        lines.append(f"  rows failed    {r['rows_failed']}")
        psi_value = r["psi"]
        lines.append(f"  PSI            {psi_value:.4f} (shadow vs serving outputs, last window)"
                     if isinstance(psi_value, float) else "  PSI            - (no complete window yet)")
        deciles = r["difference_deciles"]
        if isinstance(deciles, list) and deciles:
            cells = "  ".join(f"p{10 * (i + 1)}<={d:.2g}" for i, d in enumerate(deciles))
            lines.append(f"  {what} by decile (upper bounds): {cells}")
    return "\n".join(lines)
