"""The model card: what a published version is, where it came from, and how well it and its
conversion were shown to work. Written next to model.onnx as model_card.json through the typed
`ModelCard` the server parses it with (`medserve.server.card`: one schema), so an exporter can
never publish a card whose limits, ranges or reference rows the server would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata

from medserve.server.card import SCHEMA_VERSION, CardError, ModelCard, TrainingData

from .batch_size import BatchingChoice
from .errors import ExportError
from .parity import OutputParity
from .specs import TensorSpec

__all__ = ["SCHEMA_VERSION", "ModelCard", "TrainingData", "build_card", "exporter_version"]


def exporter_version() -> str:
    try:
        return metadata.version("medserve")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def build_card(
    *,
    name: str,
    version: int,
    framework: str,
    framework_version: str,
    converter: str,
    opset: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    feature_names: Sequence[str] | None,
    class_labels: Sequence[str] | None,
    input_columns: Mapping[str, Sequence[str]] | None,
    task: str | None,
    feature_ranges: Mapping[str, Sequence[float]] | None = None,
    description: str | None,
    training_data: TrainingData | None,
    metrics: Mapping[str, float | int],
    parity: Sequence[OutputParity],
    batching: BatchingChoice | None = None,
    model_sha256: str,
    created_at: datetime | None = None,
    extra: Mapping[str, object] | None = None,
) -> ModelCard:
    """The card, parsed through the server's schema (ExportError naming the entry that does not
    parse). Shapes include the batch dim (-1 = variable). `extra` adds family-specific entries
    (a text model's `tokenizer`, `pooling`, `files`...; the serving facts `reference`,
    `feature_deciles`, `feature_limits`) before the hash."""
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    card: dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "framework": framework,
        "framework_version": framework_version,
        "exporter": "medserve.exporters",
        "exporter_version": exporter_version(),
        "converter": converter,
        "opset": opset,
        "task": task,
        "inputs": [s.as_dict() for s in inputs],
        "outputs": [s.as_dict() for s in outputs],
        "feature_names": list(feature_names) if feature_names is not None else None,
        "class_labels": list(class_labels) if class_labels is not None else None,
        "input_columns": {k: list(v) for k, v in input_columns.items()} if input_columns is not None else None,
        "feature_ranges": {k: list(v) for k, v in feature_ranges.items()} if feature_ranges is not None else None,
        "description": description,
        "training_data": training_data.as_dict() if training_data is not None else None,
        "metrics": dict(metrics),
        "parity": [p.as_card_entry() for p in parity],
        "batching": batching.as_card_entry() if batching is not None else None,
    }
    clashes = sorted(set(extra or {}) & {*card, "model_sha256", "created_at"})
    if clashes:
        raise ValueError(f"extra card entries {clashes} would replace standard ones")
    card.update(extra or {})
    card["model_sha256"] = model_sha256
    card["created_at"] = created.isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        return ModelCard.from_dict(card)
    except CardError as exc:
        raise ExportError(f"model card of {name!r}: {exc}") from None
