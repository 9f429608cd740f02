"""Seeded synthetic data for the demo repository's torch models. Nothing here is real patient
data; each generator plants a simple, learnable signal so the tiny models reach a sensible
held-out score in a few epochs. Same seed, same arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

X = TypeVar("X", np.ndarray, dict[str, np.ndarray])

VITALS = ("heart_rate", "systolic_bp", "diastolic_bp", "respiratory_rate", "spo2", "temperature")
RISK_FEATURES = ("age", "heart_rate", "systolic_bp", "lactate", "creatinine", "wbc", "spo2", "temperature")
NOTES_VOCAB = 200
NOTES_RISK_TOKENS = range(5, 15)  # token ids that mark a concerning note


@dataclass(frozen=True, slots=True)
class Split(Generic[X]):
    """Training and held-out inputs (an array, or name -> array) and integer targets."""

    x_train: X
    y_train: np.ndarray
    x_test: X
    y_test: np.ndarray


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


def risk_table(seed: int, n_train: int = 768, n_test: int = 256) -> Split[np.ndarray]:
    """Standardized admission measurements -> binary deterioration label (logistic ground truth)."""
    rng = np.random.default_rng([seed, 1])
    n = n_train + n_test
    x = _standardize(rng.normal(size=(n, len(RISK_FEATURES))))
    logit = 1.2 * x[:, 3] + 0.8 * x[:, 4] - 0.9 * x[:, 6] + 0.5 * x[:, 0] * x[:, 1]
    y = (logit + rng.normal(scale=0.5, size=n) > 0).astype(np.int64)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def ecg_signals(
    seed: int, n_train: int = 384, n_test: int = 128, leads: int = 3, samples: int = 128
) -> Split[np.ndarray]:
    """Multi-lead traces [n, leads, samples]: class 1 beats irregularly (jittered R-R intervals)."""
    rng = np.random.default_rng([seed, 2])
    n = n_train + n_test
    y = rng.integers(0, 2, size=n)
    t = np.arange(samples)
    x = rng.normal(scale=0.1, size=(n, leads, samples))
    for i in range(n):
        period = 24
        beats = np.cumsum(period + (rng.normal(scale=7, size=samples // period + 2) if y[i] else 0))
        for beat in beats.astype(int) % samples:
            spike = np.exp(-0.5 * ((t - beat) / 1.5) ** 2)
            x[i] += np.linspace(0.6, 1.0, leads)[:, None] * spike
    return Split(x[:n_train].astype(np.float32), y[:n_train], x[n_train:].astype(np.float32), y[n_train:])


def vitals_sequences(
    seed: int, n_train: int = 384, n_test: int = 128, steps: int = 24, test_steps: int = 36
) -> Split[np.ndarray]:
    """Hourly vitals [n, steps, 6]: deteriorating patients drift (heart rate up, SpO2 down).
    Held-out sequences are longer than training ones, to exercise the variable time axis."""
    rng = np.random.default_rng([seed, 3])

    def make(n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, size=n)
        x = rng.normal(size=(n, length, len(VITALS)))
        drift = np.linspace(0.0, 1.5, length)[None, :] * y[:, None]
        x[:, :, 0] += drift
        x[:, :, 4] -= drift
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = make(n_train, steps)
    x_test, y_test = make(n_test, test_steps)
    return Split(x_train, y_train, x_test, y_test)


def note_tokens(
    seed: int, n_train: int = 384, n_test: int = 128, length: int = 32, test_length: int = 40
) -> Split[dict[str, np.ndarray]]:
    """Token ids [n, length] with an attention mask (1 = token, 0 = padding): a note is concerning
    when it mentions risk tokens. Notes hold 8-32 tokens; held-out notes are padded to another
    width, to exercise the variable token axis."""
    rng = np.random.default_rng([seed, 4])

    def make(n: int, width: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids = rng.integers(15, NOTES_VOCAB, size=(n, width))
        lengths = rng.integers(8, min(width, 32) + 1, size=n)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        y = rng.integers(0, 2, size=n)
        for i in np.flatnonzero(y):
            where = rng.integers(0, lengths[i], size=3)
            ids[i, where] = rng.choice(np.array(NOTES_RISK_TOKENS), size=3)
        ids = np.where(mask == 1, ids, 0)  # 0 = padding id
        return {"input_ids": ids.astype(np.int64), "attention_mask": mask}, y.astype(np.int64)

    x_train, y_train = make(n_train, length)
    x_test, y_test = make(n_test, test_length)
    return Split(x_train, y_train, x_test, y_test)
