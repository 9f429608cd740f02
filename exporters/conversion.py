"""The contract between a framework converter (`sklearn.py`, `torch.py`, `text.py`) and the one
export pipeline (`api.py`): a serialized graph plus what the pipeline needs to prove parity,
measure quality, describe and publish the model, with no framework knowledge left over."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .figures import OutputParity, Tolerance
from .rounding import InputRounding
from .specs import TensorSpec

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Conversion:
    """A converted model. Inputs (`Any` below) are in the framework's user-facing form: a 2-D
    table for scikit-learn, an array or a name -> array mapping for torch, texts for a text
    encoder.

    The fields after `column_groups` are for a family whose clients send something other than
    the graph's inputs (text: strings the server tokenizes); the table and tensor families leave
    their defaults."""

    model_bytes: bytes
    framework: str  # "scikit-learn" | "pytorch" | "transformers"
    framework_version: str
    converter: str  # what produced the graph, with its version
    feeds: Callable[[Any], dict[str, np.ndarray]]  # user inputs -> onnxruntime feeds
    reference: Callable[[Any], dict[str, np.ndarray]]  # source model on exactly those values
    tolerances: Mapping[str, Tolerance | None]  # per output; None = must be identical
    metrics: Callable[[Arrays, np.ndarray], dict[str, float | int]]  # (graph outputs, targets)
    task: str | None  # "classification" | "regression" | "embedding" | None (unknown)
    n_features: int | None = None  # table width, when the model takes a table
    n_classes: int | None = None  # for classifiers whose classes are known
    feature_names: tuple[str, ...] | None = None  # found on the model (feature_names_in_)
    class_labels: tuple[str, ...] | None = None  # found on the model (string classes_)
    column_groups: Mapping[str, tuple[int, ...]] | None = None  # graph input -> table columns
    client_inputs: tuple[TensorSpec, ...] | None = None  # config.pbtxt's inputs; None: the graph's
    config_parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # text: tokenizer
    card_entries: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))  # text: tokenizer...
    extra_files: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))  # beside model.onnx
    sample_feeds: Mapping[str, np.ndarray] | None = None  # graph inputs batch sizes are measured on; None: feeds(sample)
    parity_data: tuple[Any, ...] | None = None  # the datasets parity is checked on; None: sample and held-out
    chunk_rows: int | None = None  # held-out inputs go through the graph this many at a time; None: all at once
    padding_check: OutputParity | None = None  # each row alone vs in a padded batch, when the family checked it
    # Tables: the source model on the parity data as given vs rounded to float32 (rounding.py),
    # called with the parity datasets and the feature names.
    input_rounding: Callable[[Sequence[Any], Sequence[str] | None], InputRounding] | None = None
