"""`export`: convert a trained model, prove the conversion, describe it and publish it, in one
call. Framework modules (torch, scikit-learn) are imported only when a model of theirs is
passed, so importing this package stays cheap for the server and the CLI."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from .reference import check_limits, feature_deciles, numeric_columns, reference_rows
from .rounding import InputRounding
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
    # Text models: padded batch vs each text alone on the graph, and the other files of the version.
    padding_check: OutputParity | None = None
    files: Mapping[str, Path] = field(default_factory=dict)
    # Tables: rows whose source answer changes when their numbers are rounded to float32 (the
    # graph's input), and the features whose float64 thresholds they cross (rounding.py).
    input_rounding: InputRounding | None = None

    def parity_table(self) -> str:
        """The parity figures as an aligned text table (for the CLI and logs), and for a table
        model one line on what float32 inputs change in the source model's answers."""
        table = parity_table((*self.parity, *([self.padding_check] if self.padding_check else [])))
        return table if self.input_rounding is None else f"{table}\n{self.input_rounding.describe()}"


def _is_text_model(model: Any, tokenizer: Any, pooling: Any) -> bool:
    """A Hugging Face encoder: a model folder, a transformers model, or anything given a tokenizer
    or pooling (which only text models take)."""
    if tokenizer is not None or pooling is not None or isinstance(model, (str, os.PathLike)):
        return True
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _convert(model: Any, sample: Any, opset: int | None, dynamic_axes: Any, output_names: Any) -> Conversion:
    """Dispatch on the model's framework without importing frameworks the caller does not use."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        from . import torch as torch_exporter

        return torch_exporter.convert(model, sample, dynamic_axes=dynamic_axes, output_names=output_names, opset=opset)
    sklearn_base = sys.modules.get("sklearn.base")
    boosted = type(model).__module__.split(".")[0] in ("xgboost", "lightgbm", "catboost")  # medserve[gbm]
    if boosted or (sklearn_base is not None and isinstance(model, sklearn_base.BaseEstimator)):
        if dynamic_axes is not None or output_names is not None:
            raise ExportError("dynamic_axes and output_names apply to torch models only")
        from . import sklearn as sklearn_exporter

        return sklearn_exporter.convert(model, sample, opset=opset)
    raise UnsupportedModelError(
        f"cannot export a {type(model).__module__}.{type(model).__qualname__}: expected a scikit-learn "
        "estimator or Pipeline, an XGBoost, LightGBM or CatBoost model, a torch.nn.Module, a torch.export.ExportedProgram or a Hugging Face encoder"
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


def _answers(conversion: Conversion, names: Sequence[str], inputs: Any) -> dict[str, np.ndarray]:
    """The graph's outputs on `inputs`: at once, or `chunk_rows` at a time (text: each chunk
    padded to its own longest text, as the server pads a batch) and joined."""
    session = cpu_session(conversion.model_bytes)
    rows = conversion.chunk_rows
    if rows is None:
        return dict(zip(names, session.run(names, conversion.feeds(inputs)), strict=True))
    chunks = [session.run(names, conversion.feeds(inputs[i : i + rows])) for i in range(0, len(inputs), rows)]
    return {name: np.concatenate([chunk[k] for chunk in chunks]) for k, name in enumerate(names)}


def _check_lengths(
    conversion: Conversion, feature_names: Sequence[str] | None, class_labels: Sequence[str] | None
) -> None:
    if feature_names is not None and conversion.n_features is not None and len(feature_names) != conversion.n_features:
        raise ExportError(f"{len(feature_names)} feature_names for a model of {conversion.n_features} features")
    if class_labels is not None and conversion.n_classes is not None and len(class_labels) != conversion.n_classes:
        raise ExportError(f"{len(class_labels)} class_labels for a model of {conversion.n_classes} classes")


def check_padding(name: str, model_bytes: bytes, feeds: Mapping[str, np.ndarray],
                  padding: Mapping[str, tuple[int, float]] | None, max_batch_size: int) -> dict[str, str] | None:
    """The config's `pad` parameters for a graph that is mask-correct: each sample row alone and
    padded (4 more positions along the axis) must give the same outputs, or the export fails."""
    if not padding:
        return None
    if max_batch_size <= 0:
        raise ExportError(f"model {name!r}: padding needs a batching model (max_batch_size > 0)")
    unknown = sorted(set(padding) - set(feeds))
    masks = [n for n in padding if "mask" in n]
    if unknown or len(masks) != 1 or padding[masks[0]][1] != 0:
        raise ExportError(f"model {name!r}: padding must name graph inputs ({sorted(feeds)}), one of them the "
                          f"mask padded with 0; got {dict(padding)}")
    session = cpu_session(model_bytes)
    names = [o.name for o in session.get_outputs()]
    for row in range(min(4, next(iter(feeds.values())).shape[0])):
        alone = {n: a[row:row + 1] for n, a in feeds.items()}
        padded = {}
        for n, a in alone.items():
            if n in padding:
                axis, value = padding[n]
                widths = [(0, 0)] * a.ndim
                widths[axis] = (0, 4)
                a = np.pad(a, widths, constant_values=value)
            padded[n] = a
        for out, x, y in zip(names, session.run(names, alone), session.run(names, padded), strict=True):
            if x.shape == y.shape and not np.allclose(x, y, rtol=1e-4, atol=1e-5):
                raise ExportError(f"model {name!r}: output {out!r} changes when the inputs are padded: the graph is "
                                  "not mask-correct, so the server may not pad it")
    return {"pad": ",".join(f"{n}:{axis}:{value:g}" for n, (axis, value) in padding.items()), "pad_mask": masks[0]}


def _feature_ranges(
    feature_names: Sequence[str] | None, *tables: Any, only: Sequence[str] | None = None
) -> dict[str, tuple[float, float]] | None:
    """The 1st-99th percentile of each named feature over the rows the export saw (sample and
    held-out), for a plain numeric table or the `only` columns (the numeric input) of a mixed
    one: enough for load tests and clients to draw realistic rows. Percentiles, not min/max: the
    card must not carry any one patient's extreme value."""
    if feature_names is None:
        return None
    parts: list[dict[str, np.ndarray]] = []
    for table in tables:
        if table is None:
            continue
        columns = numeric_columns(feature_names, table, only)
        if columns is None:  # mixed tables without a numeric input, mappings: no numeric range
            return None
        parts.append(columns)
    if not parts:
        return None
    ranges = {}
    for name in parts[0]:
        column = np.concatenate([p[name] for p in parts])
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
    tokenizer: Any = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    head: Any = None,
    source: str | None = None,
    reference_data: Any = None,
    feature_limits: Mapping[str, Sequence[float]] | None = None,
    padding: Mapping[str, tuple[int, float]] | None = None,
) -> ExportReport:
    """Convert `model` to ONNX, prove parity, and publish `<repository>/<name>/<version>/`.

    `sample_inputs` is a few rows shaped like the training inputs: a 2-D table for scikit-learn,
    an array or a name -> array mapping for torch (>= 2 rows; names become graph inputs).
    `heldout` is more inputs, or `(inputs, targets)`: parity is checked on it too, and with
    targets the card records quality metrics measured on the exported graph. `tolerance`
    overrides the per-family default for value outputs; labels must always match exactly.
    `dynamic_axes` / `output_names` are torch-only (see `medserve.exporters.torch`).

    Text encoders (`medserve.exporters.text`): `model` is a Hugging Face model folder or a
    transformers model with its fast `tokenizer=`; `sample_inputs` and `heldout` are texts
    (`heldout=(texts, class indices)` with a `head`); `pooling` "mean" or "cls" (a
    sentence-transformers folder supplies it), `normalize=True` L2-normalizes, `max_length`
    bounds the tokens (the model's own setting when None, always written out), `head` is a
    torch module from the pooled embedding to class logits (published as `probabilities`), and
    `source` names where the weights came from. The version folder gets `tokenizer.json`, the
    config takes `text` strings, and parity runs on clinical sentences of every length too.
    `max_batch_size` None (the default) measures it for a tabular model (the largest batch whose
    execution stays within 2 ms, at least 64; see `medserve.exporters.batch_size`) and uses 64
    otherwise; an integer is used as given (0 = no batching). The card records the choice.

        report = export(clf, X_train[:32], "models", "sepsis_risk",
                        heldout=(X_test, y_test), class_labels=["no", "yes"])

    `reference_data` (the training rows, recommended; default: the held-out or sample rows) is
    summarised for explanations and drift monitoring without keeping any patient row: reference
    rows (cluster centroids or quantile-built rows) and per-feature deciles. `feature_limits`
    ({"heart_rate": (0, 300)}) are clinical limits the server enforces. `padding` ({"input_ids":
    (1, 0), "attention_mask": (1, 0)}: input -> (axis, pad value), one of them the mask) lets the
    server pad requests of different lengths into one batch; it is checked (padded and unpadded
    answers must agree) before it is written.

    Raises ParityError (nothing published), VersionExistsError, SignatureMismatchError,
    UnsupportedModelError, ExportError."""
    text_model = _is_text_model(model, tokenizer, pooling)
    if text_model:
        if feature_names is not None or dynamic_axes is not None or output_names is not None:
            raise ExportError("feature_names, dynamic_axes and output_names do not apply to text encoders")
        if reference_data is not None or feature_limits is not None or padding is not None:
            raise ExportError("reference_data, feature_limits and padding do not apply to text encoders "
                              "(the server pads text batches itself once the padding check passes)")
    elif head is not None or normalize is not None or max_length is not None or source is not None:
        raise ExportError("head, normalize, max_length and source apply to text encoders only")
    publishing.check_name(name)
    started = time.perf_counter()
    if text_model:
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ExportError(
                f"a text model is served in batches: max_batch_size must be an integer >= 1, got {max_batch_size!r}"
            )
    elif max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0
    ):
        raise ExportError(f"max_batch_size must be an integer >= 0 or None (measure it), got {max_batch_size!r}")
    if isinstance(training_data, Mapping):
        training_data = TrainingData(str(training_data["description"]), int(training_data["n_samples"]))

    if text_model:
        from . import text

        conversion = text.convert(
            model, sample_inputs, tokenizer=tokenizer, pooling=pooling, normalize=normalize, max_length=max_length,
            head=head, class_labels=class_labels, heldout=heldout, tolerance=tolerance, opset=opset, source=source,
            name=name,
        )
    else:
        log.info("converting %s model %r", type(model).__name__, name)
        conversion = _convert(model, sample_inputs, opset, dynamic_axes, output_names)
    graph = onnx.load_model_from_string(conversion.model_bytes)
    inputs, outputs = graph_signature(graph)
    _check_batch_axis(inputs, outputs, max_batch_size)
    feature_names = tuple(feature_names) if feature_names is not None else conversion.feature_names
    class_labels = tuple(str(c) for c in class_labels) if class_labels is not None else conversion.class_labels
    _check_lengths(conversion, feature_names, class_labels)

    heldout_inputs, targets = _split_heldout(heldout)
    datasets: Sequence[Any] = [sample_inputs] if heldout_inputs is None else [sample_inputs, heldout_inputs]
    if conversion.parity_data is not None:
        datasets = conversion.parity_data
    tolerances = {
        k: (tolerance if v is not None and tolerance is not None else v) for k, v in conversion.tolerances.items()
    }
    log.info("checking parity of %r on %d dataset(s)", name, len(datasets))
    parity = verify(name, conversion.model_bytes, conversion.reference, conversion.feeds, datasets, tolerances)
    input_rounding = None
    if conversion.input_rounding is not None:
        input_rounding = conversion.input_rounding(datasets, feature_names)
        if input_rounding.changed_rows:
            log.info("%r: %s", name, input_rounding.describe())

    quality: dict[str, float | int] = {}
    if heldout_inputs is not None and targets is not None:
        quality = conversion.metrics(_answers(conversion, [o.name for o in outputs], heldout_inputs), targets)

    sample_feeds = conversion.sample_feeds if conversion.sample_feeds is not None else conversion.feeds(sample_inputs)
    batching = batch_size.decide(max_batch_size, inputs, conversion.model_bytes, sample_feeds)
    if batching.chosen_by == "measured":
        log.info(
            "max_batch_size %d for %r (median ms by rows: %s)",
            batching.max_batch_size,
            name,
            ", ".join(f"{rows} {s * 1e3:.3f}" for rows, s in (batching.medians_s or {}).items()),
        )

    # What explanations and drift monitoring need, without patient rows (exporters/reference.py):
    # rows of what clients send, so none for a family whose clients send something else (text).
    columns = None
    if conversion.column_groups is not None:
        labels = feature_names or tuple(f"column_{i}" for i in range(conversion.n_features or 0))
        columns = {group: tuple(labels[c] for c in cols) for group, cols in conversion.column_groups.items()}
    # A mixed table's deciles and ranges cover its numeric input's columns (the monitor's).
    numeric_only = columns.get("numeric", ()) if columns is not None and feature_names is not None else None
    serving_facts: dict[str, object] = {}
    if conversion.client_inputs is None:
        ref_source = reference_data if reference_data is not None else (
            heldout_inputs if heldout_inputs is not None else sample_inputs)
        serving_facts = {
            "reference": reference_rows(conversion.feeds(ref_source)),
            "feature_deciles": feature_deciles(feature_names, ref_source, numeric_only),
            "feature_limits": check_limits(feature_limits, feature_names),
        }
    pad_parameters = check_padding(name, conversion.model_bytes, sample_feeds, padding, batching.max_batch_size)

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
            feature_ranges=_feature_ranges(feature_names, sample_inputs, heldout_inputs, only=numeric_only),
            task=conversion.task or ("classification" if class_labels is not None else None),
            description=description,
            training_data=training_data,
            metrics=quality,
            parity=parity,
            batching=batching,
            model_sha256=sha256,
            extra={**conversion.card_entries, **{k: v for k, v in serving_facts.items() if v},
                   **({"parity_float32_inputs": input_rounding.as_card_entry()} if input_rounding else {})},
        )

    parameters = {**conversion.config_parameters, **(pad_parameters or {})}
    config = triton_config.build_config(
        name, conversion.client_inputs or inputs, outputs, batching.max_batch_size, parameters or None
    )
    published = publishing.publish(
        Path(repository),
        name,
        version=version,
        model_bytes=conversion.model_bytes,
        make_card=make_card,
        config=config,
        extra_files=dict(conversion.extra_files) or None,
    )
    log.info(
        "published %r version %d (sha256 %s) in %.1f s",
        name,
        published.version,
        published.model_sha256[:16],
        time.perf_counter() - started,
    )
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
        padding_check=conversion.padding_check,
        files={n: published.model_path.parent / n for n in conversion.extra_files},
        input_rounding=input_rounding,
    )
