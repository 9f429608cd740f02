"""Exact interventional Shapley values of a tree ensemble against reference rows (TreeSHAP),
vectorised in numpy over rows, reference rows and leaves.

For one explained row x and one reference row r, the game v(S) = f(x on S, r elsewhere) is a
sum over leaves: a leaf's value counts when the row made of x on S and r elsewhere reaches it.
Along the leaf's path each distinct feature j either lets x through (X_j), lets r through (R_j),
both (then j does not matter to this leaf), or neither (then no such row reaches the leaf). So
the leaf is reached exactly when P = {X only} is inside S and N = {R only} is outside S, a game
whose Shapley values are value * (|P|-1)! |N|! / (|P|+|N|)! for each feature of P and
-value * |P|! (|N|-1)! / (|P|+|N|)! for each of N. Per leaf, X and R are bit masks over its
path's distinct features (one uint64); the leaves that neither x nor r alone reach cost a bit
test only. The values are averaged over the reference rows (the game is the mean output), and
the reference side is computed once per model version.

Additivity holds per pair (efficiency), so the attributions plus the base value (the mean
output over the reference rows) add up to the output, to float64 rounding of the leaf values.
"""
from __future__ import annotations

import math

import numpy as np

from .onnx_trees import Trees, decisions


def path_bits(trees: Trees, x: np.ndarray) -> np.ndarray:
    """[rows, L] uint64: per leaf, the bits of its path's distinct features whose every test on
    the path the row passes (a row reaches the leaf when it holds all of them: `trees.full`)."""
    taken = decisions(trees, x)  # [rows, N]
    ok = taken[:, trees.path_node] == trees.path_true  # [rows, L, D]
    failed = np.bitwise_or.reduce(np.where(ok, np.uint64(0), trees.path_bit), axis=2)
    return trees.full & ~failed


def _weight_tables(width: int) -> tuple[np.ndarray, np.ndarray]:
    """W+[p, n] = (p-1)! n! / (p+n)! (a feature of P), W-[p, n] = p! (n-1)! / (p+n)! (of N)."""
    plus, minus = np.zeros((width + 1, width + 1)), np.zeros((width + 1, width + 1))
    for p in range(width + 1):
        for n in range(width + 1 - p):
            total = math.lgamma(p + n + 1)
            if p:
                plus[p, n] = math.exp(math.lgamma(p) + math.lgamma(n + 1) - total)
            if n:
                minus[p, n] = math.exp(math.lgamma(p + 1) + math.lgamma(n) - total)
    return plus, minus


class TreeShap:
    """Explains one ensemble against fixed reference rows (graph-input rows [M, F])."""

    def __init__(self, trees: Trees, reference: np.ndarray) -> None:
        self.trees = trees
        r = trees.features_of(reference)
        self._r_bits = path_bits(trees, r)  # [M, L]
        self._r_out = self.outputs(self._raw(self._r_bits))  # [M, T]
        self._plus, self._minus = _weight_tables(trees.leaf_features.shape[1])

    @property
    def base_value(self) -> np.ndarray:
        """The mean output over the reference rows [T]."""
        return self._r_out.mean(axis=0)

    def _raw(self, bits: np.ndarray) -> np.ndarray:
        """The raw sums per class or target id [rows, C] of the leaves the rows reach."""
        return (bits == self.trees.full).astype(np.float64) @ self.trees.leaf_values

    def outputs(self, raw: np.ndarray) -> np.ndarray:
        """The served scores [rows, T] from the raw sums (before any nonlinear post_transform)."""
        t = self.trees
        return t.offset + t.scale * raw @ t.matrix.T

    def explain(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(attributions [rows, T, F], the output they add up to with `base_value` [rows, T])
        for graph-input rows `x` [rows, F]."""
        t = self.trees
        rows, features = x.shape[0], x.shape[1]
        x_bits = path_bits(t, t.features_of(x))  # [R, L]
        r_bits = self._r_bits
        alive = (x_bits[:, None, :] | r_bits[None, :, :]) == t.full  # [R, M, L]: some mix of x and r reaches it
        ri, mi, li = np.nonzero(alive)
        xb, rb = x_bits[ri, li], r_bits[mi, li]
        only_x, only_r = xb & ~rb, rb & ~xb
        p, n = np.bitwise_count(only_x), np.bitwise_count(only_r)
        moved = (p + n) > 0  # a leaf both reach is the same on every coalition: no attribution
        ri, li, only_x, only_r, p, n = ri[moved], li[moved], only_x[moved], only_r[moved], p[moved], n[moved]
        slots = np.arange(t.leaf_features.shape[1], dtype=np.uint64)
        in_x = ((only_x[:, None] >> slots) & np.uint64(1)).astype(bool)  # [E, U]
        in_r = ((only_r[:, None] >> slots) & np.uint64(1)).astype(bool)
        coef = np.where(in_x, self._plus[p, n][:, None], 0.0) - np.where(in_r, self._minus[p, n][:, None], 0.0)
        # past a path's own features there is no bit: coefficient 0 (on feature 0)
        key = (ri[:, None] * features + t.leaf_features[li]).ravel()
        channels = t.leaf_values.shape[1]
        raw = np.zeros((rows * features, channels))
        for c in range(channels):
            values = t.leaf_values[li, c]
            if values.any():
                raw[:, c] = np.bincount(key, weights=(coef * values[:, None]).ravel(), minlength=rows * features)
        raw /= r_bits.shape[0]
        phi = (t.scale * raw.reshape(rows, features, channels) @ t.matrix.T).transpose(0, 2, 1)  # [R, T, F]
        return phi, self.outputs(self._raw(x_bits))
