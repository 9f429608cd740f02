"""Held-out quality figures for the model card, computed from the ONNX graph's own outputs.

Measured on the exported graph rather than the source model, so the card describes exactly
what the server will answer. scikit-learn's metrics are the reference implementation; it is
imported here only, so the package imports without it.
"""

from __future__ import annotations

import numpy as np


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None, n_classes: int
) -> dict[str, float | int]:
    """accuracy, and roc_auc when class scores are available (one-vs-rest macro for >2 classes).

    `y_true`/`y_pred` are class indices; `scores` is (n, n_classes) probabilities, or one score
    column (n, 1) / (n,) ranking the positive class of a binary model."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    y_true = np.asarray(y_true).ravel()
    result: dict[str, float | int] = {
        "accuracy": float(accuracy_score(y_true, np.asarray(y_pred).ravel())),
        "n_samples": len(y_true),
    }
    if scores is None or len(np.unique(y_true)) < 2:
        return result
    s = np.asarray(scores, dtype=np.float64)
    if n_classes == 2:
        positive = s.reshape(len(y_true), -1)[:, -1]
        result["roc_auc"] = float(roc_auc_score(y_true, positive))
    elif s.ndim == 2 and s.shape[1] == n_classes and len(np.unique(y_true)) == n_classes:
        result["roc_auc"] = float(roc_auc_score(y_true, s, multi_class="ovr", labels=list(range(n_classes))))
    return result


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """r2, mae and rmse over every predicted value."""
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    t = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(t.shape)
    return {
        "r2": float(r2_score(t, p)),
        "mae": float(mean_absolute_error(t, p)),
        "rmse": float(root_mean_squared_error(t, p)),
        "n_samples": len(t),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
