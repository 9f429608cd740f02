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

BLOCK_ELEMENTS = 1 << 16  # rows x reference rows x leaves worked on at once (a few MiB per array)
CACHED_SLOTS = 1 << 22  # reference rows x leaves x path features kept unpacked (32 MiB), else unpacked per block


def path_bits(trees: Trees, x: np.ndarray, leaves: slice = slice(None), taken: np.ndarray | None = None) -> np.ndarray:
    """[rows, L] uint64: per leaf (of `leaves`), the bits of its path's distinct features whose
    every test on the path the row passes (a row reaches the leaf when it holds all of them:
    `trees.full`). `taken`: the rows' `decisions`, when already made."""
    if taken is None:
        taken = decisions(trees, x)  # [rows, N]
    ok = taken[:, trees.path_node[leaves]] == trees.path_true[leaves]  # [rows, L, D]
    failed = np.bitwise_or.reduce(np.where(ok, np.uint64(0), trees.path_bit[leaves]), axis=2)
    return trees.full[leaves] & ~failed


def _bits(masks: np.ndarray, width: int) -> np.ndarray:
    """[E, width] float64 0/1: the low `width` bits of each uint64 mask (bit j in column j)."""
    little = masks.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)
    return np.unpackbits(little, axis=1, count=width, bitorder="little").astype(np.float64)


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
        self._r_bits = path_bits(trees, trees.features_of(reference))  # [M, L]
        width = trees.leaf_features.shape[1]
        self._r_slots = (_bits(self._r_bits.ravel(), width).reshape(*self._r_bits.shape, width)
                         if self._r_bits.size * width <= CACHED_SLOTS else None)  # [M, L, U]
        self._r_out = self.outputs(self.raw(self._r_bits))  # [M, T]
        self._plus, self._minus = _weight_tables(width)

    @property
    def base_value(self) -> np.ndarray:
        """The mean output over the reference rows [T]."""
        return self._r_out.mean(axis=0)

    def raw(self, bits: np.ndarray, leaves: slice = slice(None)) -> np.ndarray:
        """The raw sums per class or target id [rows, C] of the leaves (of `leaves`) the rows reach."""
        return (bits == self.trees.full[leaves]).astype(np.float64) @ self.trees.leaf_values[leaves]

    def outputs(self, raw: np.ndarray) -> np.ndarray:
        """The served scores [rows, T] from the raw sums (before any nonlinear post_transform)."""
        t = self.trees
        return t.offset + t.scale * raw @ t.matrix.T

    def explain(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(attributions [rows, T, F], the output they add up to with `base_value` [rows, T])
        for graph-input rows `x` [rows, F]: the leaves in blocks, so that the [rows, reference
        rows, leaves] arrays stay a few MiB however large the ensemble.

        Per (row, leaf): N = the path's features x does not let through is fixed, and a
        reference row r can mix with x into the leaf exactly when r lets all of N through; then
        P = the features x lets through and r does not. So a feature of N gets -W-(|P|, |N|)
        summed over those r, and a feature u that x lets through gets +W+(|P|, |N|) summed over
        those r that do not let u through: the total minus a sum over r weighted by r's bit
        for u. The work is [rows, references, leaves] and [rows, references, leaves, U] numpy
        arithmetic, however many leaves the mixes reach."""
        t = self.trees
        rows, features = x.shape[0], x.shape[1]
        feats = t.features_of(x)
        taken = decisions(t, feats)
        references, leaves = self._r_bits.shape
        block = max(64, BLOCK_ELEMENTS // max(1, rows * references))
        raw = np.zeros((rows * features, t.leaf_values.shape[1]))
        reached = np.zeros((rows, t.leaf_values.shape[1]))
        for first in range(0, leaves, block):
            part = slice(first, min(leaves, first + block))
            x_bits = path_bits(t, feats, part, taken)  # [R, B]
            reached += self.raw(x_bits, part)
            raw += self._block(x_bits, part, rows, features)
        raw /= references
        phi = (t.scale * raw.reshape(rows, features, -1) @ t.matrix.T).transpose(0, 2, 1)  # [R, T, F]
        return phi, self.outputs(reached)

    def _block(self, x_bits: np.ndarray, part: slice, rows: int, features: int) -> np.ndarray:
        """The summed (over reference rows) raw attributions [rows * F, C] of one block of leaves."""
        t = self.trees
        full, r_bits = t.full[part], self._r_bits[:, part]  # [B], [M, B]
        width = t.leaf_features.shape[1]
        blocked = full & ~x_bits  # [R, B]: N per leaf
        mixes = (r_bits[None, :, :] & blocked[:, None, :]) == blocked[:, None, :]  # [R, M, B]
        stride = self._plus.shape[1]
        pn = np.bitwise_count(x_bits[:, None, :] & ~r_bits[None, :, :]).astype(np.intp)  # [R, M, B]: |P|
        pn *= stride
        pn += np.bitwise_count(blocked)[:, None, :]  # + |N|: the weight tables' flat index
        plus = np.where(mixes, self._plus.ravel().take(pn), 0.0)  # [R, M, B]
        minus = np.where(mixes, self._minus.ravel().take(pn), 0.0).sum(axis=1)  # [R, B]
        r_slots = (self._r_slots[:, part] if self._r_slots is not None
                   else _bits(r_bits.ravel(), width).reshape(*r_bits.shape, width))  # [M, B, U]
        # [R, B, U]: r lets u through too (the contraction order pays for its planning beyond one row)
        crossed = np.einsum("rml,mlu->rlu", plus, r_slots, optimize=rows > 1)
        x_slots = _bits(x_bits.ravel(), width).reshape(rows, -1, width)
        n_slots = _bits(blocked.ravel(), width).reshape(rows, -1, width)
        np.subtract(plus.sum(axis=1)[:, :, None], crossed, out=crossed)
        crossed *= x_slots
        n_slots *= minus[:, :, None]
        coef = np.subtract(crossed, n_slots, out=crossed)  # [R, B, U]
        # past a path's own features there is no bit: coefficient 0 (on feature 0)
        key = (np.arange(rows)[:, None, None] * features + t.leaf_features[part][None, :, :]).ravel()
        values = t.leaf_values[part]
        out = np.zeros((rows * features, values.shape[1]))
        for c in range(values.shape[1]):
            if values[:, c].any():
                out[:, c] = np.bincount(key, weights=(coef * values[None, :, c, None]).ravel(), minlength=rows * features)
        return out
