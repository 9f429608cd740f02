"""The contract between a framework converter (`sklearn.py`, `torch.py`) and the shared
export pipeline (`api.py`): a serialized graph plus what the pipeline needs to prove parity,
measure quality and describe the model, with no framework knowledge left over."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .parity import Tolerance

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Conversion:
    """A converted model. Inputs (`Any` below) are in the framework's user-facing form: a 2-D
    table for scikit-learn, an array or a name -> array mapping for torch."""

    model_bytes: bytes
    framework: str  # "scikit-learn" | "pytorch"
    framework_version: str
    converter: str  # what produced the graph, with its version
    feeds: Callable[[Any], dict[str, np.ndarray]]  # user inputs -> onnxruntime feeds
    reference: Callable[[Any], dict[str, np.ndarray]]  # source model on exactly those values
    tolerances: Mapping[str, Tolerance | None]  # per output; None = must be identical
    metrics: Callable[[Arrays, np.ndarray], dict[str, float | int]]  # (graph outputs, targets)
    task: str | None  # "classification" | "regression" | None (unknown)
    n_features: int | None = None  # table width, when the model takes a table
    n_classes: int | None = None  # for classifiers whose classes are known
    feature_names: tuple[str, ...] | None = None  # found on the model (feature_names_in_)
    class_labels: tuple[str, ...] | None = None  # found on the model (string classes_)
    column_groups: Mapping[str, tuple[int, ...]] | None = None  # graph input -> table columns
