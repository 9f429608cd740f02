"""Per-call fixes for skl2onnx 1.20's HistGradientBoosting converters, passed through
`convert_sklearn(custom_conversion_functions=...)` so nothing global is patched.

1. onnx >= 1.23 refuses Python bools in integer-list attributes, and the converter emits
   `nodes_missing_value_tracks_true` with `False` for leaves: the conversion fails outright.
2. The converter rounds each float64 split threshold to the *nearest* float32. scikit-learn
   compares float64 inputs with float64 thresholds, so for a float32 input x the split
   x <= t64 holds exactly when x <= (largest float32 <= t64). Rounding to nearest can land one
   ulp above that and send a row down the other branch (seen on load_diabetes: 2 rows of 442,
   errors of ~4 on the target). We hand the converter thresholds rounded down instead.

Both fixes wrap the registered converter and change only the attributes of the TreeEnsemble node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from skl2onnx import get_model_alias
from skl2onnx.common._registration import get_converter
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

Converter = Callable[[Any, Any, Any], None]
_FIXED = (HistGradientBoostingClassifier, HistGradientBoostingRegressor)


def floor_to_float32(values: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 value."""
    nearest = values.astype(np.float32)
    above = nearest.astype(np.float64) > values
    nearest[above] = np.nextafter(nearest[above], np.float32(-np.inf))
    return nearest


def _thresholds(model: Any) -> np.ndarray:
    """Split thresholds in the order the converter emits nodes: iteration, class, node."""
    nodes = np.concatenate([predictor.nodes for iteration in model._predictors for predictor in iteration])
    return np.where(nodes["is_leaf"].astype(bool), 0.0, nodes["num_threshold"])


class _FixingContainer:
    """Delegates to skl2onnx's container, correcting the TreeEnsemble node's attributes."""

    def __init__(self, container: Any, thresholds: np.ndarray) -> None:
        self._container = container
        self._thresholds = thresholds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, op_type: str, *args: Any, **attrs: Any) -> Any:
        for key, value in attrs.items():
            if isinstance(value, list) and any(isinstance(v, (bool, np.bool_)) for v in value):
                attrs[key] = [int(v) for v in value]
        if op_type.startswith("TreeEnsemble") and "nodes_values" in attrs:
            if len(attrs["nodes_values"]) != len(self._thresholds):
                raise RuntimeError("unexpected HistGradientBoosting node layout from skl2onnx")
            attrs["nodes_values"] = floor_to_float32(self._thresholds)
        return self._container.add_node(op_type, *args, **attrs)


def _fixed(model_type: type) -> Converter:
    original = get_converter(get_model_alias(model_type))

    def convert(scope: Any, operator: Any, container: Any) -> None:
        original(scope, operator, _FixingContainer(container, _thresholds(operator.raw_operator)))

    return convert


def custom_converters() -> dict[type, Converter]:
    """The `custom_conversion_functions` argument for `convert_sklearn`."""
    return {t: _fixed(t) for t in _FIXED}
