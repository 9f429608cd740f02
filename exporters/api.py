"""`export`: convert a trained model, prove the conversion, describe it and publish it, in one
call. Framework modules (torch, scikit-learn) are imported only when a model of theirs is
passed, so importing this package stays cheap for the server and the CLI."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import batch_size, triton_config
from . import publish as publishing
from .card import TrainingData, build_card
from .conversion import Conversion
from .errors import ExportError, UnsupportedModelError
from .parity import OutputParity, Tolerance, cpu_session, parity_table, verify
from .specs import TensorSpec, default_opset, graph_signature

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What was published and the evidence that it behaves like the source model."""

    name: str
    version: int
    model_path: Path
    card_path: Path
    config_path: Path
    model_sha256: str
    framework: str
    converter: str
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: tuple[OutputParity, ...]
    metrics: Mapping[str, float | int]
    batching: batch_size.BatchingChoice  # the max_batch_size in config.pbtxt and how it was chosen

    def parity_table(self) -> str:
        """The parity figures as an aligned text table (for the CLI and logs)."""
        return parity_table(self.parity)


def _convert(model: Any, sample: Any, opset: int | None, dynamic_axes: Any, output_names: Any) -> Conversion:
    """Dispatch on the model's framework without importing frameworks the caller does not use."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        from . import torch as torch_exporter

        return torch_exporter.convert(model, sample, dynamic_axes=dynamic_axes, output_names=output_names, opset=opset)
    sklearn_base = sys.modules.get("sklearn.base")
    if sklearn_base is not None and isinstance(model, sklearn_base.BaseEstimator):
        if dynamic_axes is not None or output_names is not None:
            raise ExportError("dynamic_axes and output_names apply to torch models only")
        from . import sklearn as sklearn_exporter

        return sklearn_exporter.convert(model, sample, opset=opset)
    raise UnsupportedModelError(
        f"cannot export a {type(model).__module__}.{type(model).__qualname__}: expected a scikit-learn "
        "estimator or Pipeline, a torch.nn.Module or a torch.export.ExportedProgram"
    )


def _split_heldout(heldout: Any) -> tuple[Any, np.ndarray | None]:
    if heldout is None:
        return None, None
    if isinstance(heldout, tuple):
        if len(heldout) != 2:
            raise ExportError("heldout must be inputs, or a tuple (inputs, targets)")
        inputs, targets = heldout
        return inputs, None if targets is None else np.asarray(targets)
    return heldout, None


def _check_lengths(
    conversion: Conversion, feature_names: Sequence[str] | None, class_labels: Sequence[str] | None
) -> None:
    if feature_names is not None and conversion.n_features is not None and len(feature_names) != conversion.n_features:
        raise ExportError(f"{len(feature_names)} feature_names for a model of {conversion.n_features} features")
    if class_labels is not None and conversion.n_classes is not None and len(class_labels) != conversion.n_classes:
        raise ExportError(f"{len(class_labels)} class_labels for a model of {conversion.n_classes} classes")


def _feature_ranges(
    feature_names: Sequence[str] | None, *tables: Any
) -> dict[str, tuple[float, float]] | None:
    """The 1st-99th percentile of each named feature over the rows the export saw (sample and
    held-out), for a plain numeric table: enough for load tests and clients to draw realistic
    rows. Percentiles, not min/max: the card must not carry any one patient's extreme value."""
    if feature_names is None:
        return None
    arrays = []
    for table in tables:
        if table is None:
            continue
        if isinstance(table, Mapping):
            return None
        try:
            array = np.asarray(table, dtype=np.float64)
        except (TypeError, ValueError):  # mixed tables (text columns) have no numeric range
            return None
        if array.ndim != 2 or array.shape[1] != len(feature_names):
            return None
        arrays.append(array)
    if not arrays:
        return None
    rows = np.concatenate(arrays)
    ranges = {}
    for name, column in zip(feature_names, rows.T, strict=True):
        column = column[np.isfinite(column)]
        if column.size:
            low, high = np.percentile(column, [1, 99])
            ranges[str(name)] = (round(float(low), 6), round(float(high), 6))
    return ranges or None


def _check_batch_axis(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int | None) -> None:
    if max_batch_size == 0:
        return
    fixed = [t.name for t in (*inputs, *outputs) if not t.shape or t.shape[0] != -1]
    if fixed:
        raise UnsupportedModelError(
            f"tensors {fixed} have no dynamic batch dim 0; export with one or pass max_batch_size=0"
        )


def export(
    model: Any,
    sample_inputs: Any,
    repository: str | Path,
    name: str,
    *,
    version: int | None = None,
    feature_names: Sequence[str] | None = None,
    class_labels: Sequence[str] | None = None,
    description: str | None = None,
    training_data: TrainingData | Mapping[str, Any] | None = None,
    heldout: Any = None,
    tolerance: Tolerance | None = None,
    max_batch_size: int | None = None,
    opset: int | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportReport:
    """Convert `model` to ONNX, prove parity, and publish `<repository>/<name>/<version>/`.

    `sample_inputs` is a few rows shaped like the training inputs: a 2-D table for scikit-learn,
    an array or a name -> array mapping for torch (>= 2 rows; names become graph inputs).
    `heldout` is more inputs, or `(inputs, targets)`: parity is checked on it too, and with
    targets the card records quality metrics measured on the exported graph. `tolerance`
    overrides the per-family default for value outputs; labels must always match exactly.
    `dynamic_axes` / `output_names` are torch-only (see `medserve.exporters.torch`).
    `max_batch_size` None (the default) measures it for a tabular model (the largest batch whose
    execution stays within 2 ms, at least 64; see `medserve.exporters.batch_size`) and uses 64
    otherwise; an integer is used as given (0 = no batching). The card records the choice.

        report = export(clf, X_train[:32], "models", "sepsis_risk",
                        heldout=(X_test, y_test), class_labels=["no", "yes"])

    Raises ParityError (nothing published), VersionExistsError, SignatureMismatchError,
    UnsupportedModelError, ExportError."""
    publishing.check_name(name)
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0
    ):
        raise ExportError(f"max_batch_size must be an integer >= 0 or None (measure it), got {max_batch_size!r}")
    if isinstance(training_data, Mapping):
        training_data = TrainingData(str(training_data["description"]), int(training_data["n_samples"]))

    log.info("converting %s model %r", type(model).__name__, name)
    conversion = _convert(model, sample_inputs, opset, dynamic_axes, output_names)
    graph = onnx.load_model_from_string(conversion.model_bytes)
    inputs, outputs = graph_signature(graph)
    _check_batch_axis(inputs, outputs, max_batch_size)
    feature_names = tuple(feature_names) if feature_names is not None else conversion.feature_names
    class_labels = tuple(str(c) for c in class_labels) if class_labels is not None else conversion.class_labels
    _check_lengths(conversion, feature_names, class_labels)

    heldout_inputs, targets = _split_heldout(heldout)
    datasets = [sample_inputs] if heldout_inputs is None else [sample_inputs, heldout_inputs]
    tolerances = {
        k: (tolerance if v is not None and tolerance is not None else v) for k, v in conversion.tolerances.items()
    }
    log.info("checking parity of %r on %d dataset(s)", name, len(datasets))
    parity = verify(name, conversion.model_bytes, conversion.reference, conversion.feeds, datasets, tolerances)

    quality: dict[str, float | int] = {}
    if heldout_inputs is not None and targets is not None:
        session = cpu_session(conversion.model_bytes)
        names = [o.name for o in outputs]
        answers = dict(zip(names, session.run(names, conversion.feeds(heldout_inputs)), strict=True))
        quality = conversion.metrics(answers, targets)

    batching = batch_size.decide(max_batch_size, inputs, conversion.model_bytes, conversion.feeds(sample_inputs))
    if batching.chosen_by == "measured":
        log.info(
            "max_batch_size %d for %r (median ms by rows: %s)",
            batching.max_batch_size,
            name,
            ", ".join(f"{rows} {s * 1e3:.3f}" for rows, s in (batching.medians_s or {}).items()),
        )

    columns = None
    if conversion.column_groups is not None:
        labels = feature_names or tuple(f"column_{i}" for i in range(conversion.n_features or 0))
        columns = {group: tuple(labels[c] for c in cols) for group, cols in conversion.column_groups.items()}
    opset_used = default_opset(graph)

    def make_card(number: int, sha256: str) -> Mapping[str, object]:
        return build_card(
            name=name,
            version=number,
            framework=conversion.framework,
            framework_version=conversion.framework_version,
            converter=conversion.converter,
            opset=opset_used,
            inputs=inputs,
            outputs=outputs,
            feature_names=feature_names,
            class_labels=class_labels,
            input_columns=columns,
            feature_ranges=_feature_ranges(feature_names, sample_inputs, heldout_inputs),
            task=conversion.task or ("classification" if class_labels is not None else None),
            description=description,
            training_data=training_data,
            metrics=quality,
            parity=parity,
            batching=batching,
            model_sha256=sha256,
        )

    config = triton_config.build_config(name, inputs, outputs, batching.max_batch_size)
    published = publishing.publish(
        Path(repository),
        name,
        version=version,
        model_bytes=conversion.model_bytes,
        make_card=make_card,
        config=config,
    )
    log.info("published %r version %d (sha256 %s)", name, published.version, published.model_sha256[:16])
    return ExportReport(
        name=name,
        version=published.version,
        model_path=published.model_path,
        card_path=published.card_path,
        config_path=published.config_path,
        model_sha256=published.model_sha256,
        framework=conversion.framework,
        converter=conversion.converter,
        opset=opset_used,
        inputs=inputs,
        outputs=outputs,
        parity=parity,
        metrics=quality,
        batching=batching,
    )
