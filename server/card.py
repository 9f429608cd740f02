"""The model card (`model_card.json`) as one typed, frozen value: the exporters build a `ModelCard`
and write `as_dict()`; the server parses the file once at load with `ModelCard.from_dict` and
every module reads attributes, never the JSON. One schema, so the two cannot drift apart.

A card whose clinical limits, training ranges, deciles, reference rows or any other entry the
server acts on does not parse is refused (`CardError`, naming the entry): the server refuses the
load rather than serving with the limits silently switched off. Entries the server does not act
on (provenance: framework, parity, metrics...) are kept as read, frozen, so the card round-trips
(`ModelCard.from_dict(d).as_dict() == d` for a card the exporters wrote) and its digest holds.

Standard library and numpy only: the exporters import it without the `server` extra.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

SCHEMA_VERSION = 1
DECILE_CUTS = 9  # the 10th..90th percentiles
_SHA256 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")

# A JSON value as the card keeps it: objects as read-only mappings, arrays as tuples.
Json = Any


class CardError(ValueError):
    """A card entry that does not parse. `field` names it as a path (`feature_limits['hr']`);
    the server prefixes the card's file, the exporters the model's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def loads(text: str) -> dict[str, object]:
    """A card's JSON object. Python's json reads NaN and Infinity; `ModelCard.from_dict` refuses
    them naming the entry (a NaN bound compares false both ways: its limit would be off)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class Bounds:
    """A closed interval [low, high] of one feature (clinical limits or the training range)."""

    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True, slots=True)
class TrainingData:
    """What the model was trained on, in words, and how many samples."""

    description: str
    n_samples: int

    def as_dict(self) -> dict[str, object]:
        return {"description": self.description, "n_samples": int(self.n_samples)}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One graph input or output as the card lists it (shape with the batch dim, -1 = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class TokenizerEntry:
    """A text model's tokenizer: its file (listed in `files` with the same SHA-256) and settings."""

    file: str
    sha256: str
    max_length: int
    truncation: str | None = None
    pad_id: int | None = None
    pad_type_id: int | None = None
    inputs: tuple[str, ...] | None = None
    source: str | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"file": self.file, "sha256": self.sha256, "max_length": self.max_length}
        for key in ("truncation", "pad_id", "pad_type_id", "inputs", "source"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, slots=True)
class ModelCard:
    """Everything a card says, typed. None = the card does not give it."""

    # Written by every exporter (as null when unknown).
    schema_version: int | None = None
    name: str | None = None
    version: int | None = None
    framework: str | None = None
    framework_version: str | None = None
    exporter: str | None = None
    exporter_version: str | None = None
    converter: str | None = None
    opset: int | None = None
    task: str | None = None
    inputs: tuple[TensorEntry, ...] | None = None
    outputs: tuple[TensorEntry, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    class_labels: tuple[str, ...] | None = None
    input_columns: Mapping[str, tuple[str, ...]] | None = None
    feature_ranges: Mapping[str, Bounds] | None = None
    description: str | None = None
    training_data: TrainingData | None = None
    metrics: Mapping[str, float] | None = None
    parity: tuple[Json, ...] | None = None
    batching: Mapping[str, Json] | None = None
    # Family-specific and serving entries (written only when there is something to say).
    tokenizer: TokenizerEntry | None = None
    pooling: Mapping[str, Json] | None = None
    files: Mapping[str, str] | None = None
    padding_check: Mapping[str, Json] | None = None
    text_parity: Mapping[str, Json] | None = None
    reference: Mapping[str, np.ndarray] | None = None  # input -> [rows, *dims], read-only
    feature_deciles: Mapping[str, tuple[float, ...]] | None = None
    feature_limits: Mapping[str, Bounds] | None = None
    explain_output: str | None = None
    external_data: Mapping[str, str] | None = None
    model_sha256: str | None = None
    created_at: str | None = None
    card_sha256: str | None = None
    extra: Mapping[str, Json] = field(default_factory=lambda: MappingProxyType({}))  # entries of no known name

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> ModelCard:
        """Parse a card's JSON object; CardError names the first entry that does not parse."""
        known = {f for f in _FIELDS if f != "extra"}
        values: dict[str, Any] = {}
        for key, parse in _PARSERS.items():
            if raw.get(key) is not None:
                values[key] = parse(raw[key], key)
        values["extra"] = MappingProxyType({str(k): _freeze(v, str(k)) for k, v in raw.items() if k not in known})
        card = cls(**values)
        card._check_consistent()
        return card

    def _check_consistent(self) -> None:
        """Entries that must agree with each other (a limit on a feature the card does not name
        would be a limit that is never applied)."""
        names = set(self.feature_names or ())
        for key in ("feature_limits", "feature_ranges", "feature_deciles"):
            table = getattr(self, key)
            if not table:
                continue
            if self.feature_names is None:
                raise CardError(key, "needs feature_names (the table is given per named feature)")
            unknown = sorted(set(table) - names)
            if unknown:
                raise CardError(f"{key}[{unknown[0]!r}]", "names no feature in feature_names")
        if self.tokenizer is not None and self.files is not None:
            listed = self.files.get(self.tokenizer.file)
            if listed is not None and listed != self.tokenizer.sha256:
                raise CardError("tokenizer.sha256", f"does not match files[{self.tokenizer.file!r}]")

    def check_fits(self, inputs: Mapping[str, tuple[int, ...]], outputs: Sequence[str]) -> None:
        """Refuse a card that describes another model: reference rows for inputs the model does
        not have or of another shape (`inputs`: graph input -> dims after the batch dim), an
        `explain_output` that is not one of `outputs`."""
        if self.explain_output is not None and self.explain_output not in outputs:
            raise CardError("explain_output", f"names no output of the model (outputs: {sorted(outputs)})")
        if not self.reference:
            return
        rows = {len(a) for a in self.reference.values()}
        if len(rows) > 1:
            raise CardError("reference", "inputs have different numbers of rows")
        for name, array in self.reference.items():
            where = f"reference[{name!r}]"
            if name not in inputs:
                raise CardError(where, f"names no input of the model (inputs: {sorted(inputs)})")
            dims = inputs[name]
            got = array.shape[1:]
            if len(got) != len(dims) or any(d > 0 and d != g for d, g in zip(dims, got, strict=True)):
                raise CardError(where, f"rows of shape {list(got)} do not fit the input's dims {list(dims)}")

    # -- writing ---------------------------------------------------------------------------

    def as_dict(self) -> dict[str, object]:
        """The card's JSON object (what the exporters write and the digest covers)."""
        out: dict[str, object] = {}
        for key in _FIELDS:
            if key == "extra":
                out.update({k: _thaw(v) for k, v in self.extra.items()})
                continue
            value = getattr(self, key)
            if value is None and key not in _ALWAYS_WRITTEN:
                continue
            out[key] = _to_json(value)
        # The exporters' order: provenance, family entries, unknown entries, then the hashes.
        for key in ("model_sha256", "created_at", "card_sha256"):
            if key in out:
                out[key] = out.pop(key)
        return out


# -- parsers (value, entry name) -> typed value ------------------------------------------------


def _fail(where: str, expected: str, value: object) -> CardError:
    return CardError(where, f"expected {expected}, got {_kind(value)}")


def _kind(value: object) -> str:
    """A JSON value's kind for a message (never the value: a card is config, but keep it short)."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, "a string", value)
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, "an integer", value)
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, "a number", value)
    if not math.isfinite(value):
        raise CardError(where, "expected a finite number (NaN and Infinity are not JSON)")
    return value  # ints stay ints: the card round-trips exactly


def _sha256(value: object, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise CardError(where, "expected a SHA-256 as 64 lowercase hex digits")
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _fail(where, "an array", value)
    return value


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    return value


def _strings(value: object, where: str) -> tuple[str, ...]:
    items = tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))
    if len(set(items)) != len(items):
        raise CardError(where, "names an entry twice")
    return items


def _mapping(value: object, where: str, parse: Callable[[object, str], T]) -> Mapping[str, T]:
    return MappingProxyType({k: parse(v, f"{where}[{k!r}]") for k, v in _object(value, where).items()})


def _bounds(value: object, where: str) -> Bounds:
    items = _list(value, where)
    if len(items) != 2:
        raise CardError(where, f"expected [low, high], got {len(items)} values")
    low, high = (_number(v, f"{where}[{i}]") for i, v in enumerate(items))
    if not low <= high:
        raise CardError(where, "the lower bound exceeds the upper")
    return Bounds(low, high)


def _deciles(value: object, where: str) -> tuple[float, ...]:
    cuts = tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))
    if len(cuts) != DECILE_CUTS:
        raise CardError(where, f"expected the {DECILE_CUTS} cuts of the 10th..90th percentiles, got {len(cuts)}")
    if any(b < a for a, b in zip(cuts, cuts[1:], strict=False)):
        raise CardError(where, "the cuts must not decrease")
    return cuts


def _reference(value: object, where: str) -> np.ndarray:
    """Rows of one input: a non-empty rectangular nested array of numbers, of booleans or of
    strings (a mixed table's text columns), made read-only."""
    rows = _list(value, where)
    if not rows:
        raise CardError(where, "expected at least one row")
    leaves: list[object] = []
    _leaves(rows, leaves)
    if all(isinstance(v, str) for v in leaves):
        dtype: type | None = None
    elif all(isinstance(v, bool) for v in leaves):
        dtype = np.bool_
    elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in leaves):
        if not all(math.isfinite(v) for v in leaves):  # type: ignore[arg-type]
            raise CardError(where, "expected finite numbers")
        dtype = np.int64 if all(isinstance(v, int) for v in leaves) else np.float64
    else:
        raise CardError(where, "expected rows of numbers (or of strings), not a mix")
    try:
        array = np.array(rows, dtype=dtype)
    except (ValueError, OverflowError):
        raise CardError(where, "rows are not rectangular (every row must have the same shape)") from None
    if array.dtype == object or array.ndim < 2:
        raise CardError(where, "expected an array of rows, each row of the input's shape")
    array.flags.writeable = False
    return array


def _leaves(value: object, out: list[object]) -> None:
    if isinstance(value, list):
        for v in value:
            _leaves(v, out)
    else:
        out.append(value)


def _tensor(value: object, where: str) -> TensorEntry:
    entry = _object(value, where)
    shape = tuple(_int(d, f"{where}.shape[{i}]") for i, d in enumerate(_list(entry.get("shape"), f"{where}.shape")))
    return TensorEntry(_str(entry.get("name"), f"{where}.name"), _str(entry.get("datatype"), f"{where}.datatype"),
                       shape)


def _tensors(value: object, where: str) -> tuple[TensorEntry, ...]:
    return tuple(_tensor(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


def _training_data(value: object, where: str) -> TrainingData:
    entry = _object(value, where)
    return TrainingData(_str(entry.get("description"), f"{where}.description"),
                        _int(entry.get("n_samples"), f"{where}.n_samples"))


def _tokenizer(value: object, where: str) -> TokenizerEntry:
    entry = _object(value, where)

    def optional(key: str, parse: Callable[[object, str], T]) -> T | None:
        return parse(entry[key], f"{where}.{key}") if entry.get(key) is not None else None

    max_length = _int(entry.get("max_length"), f"{where}.max_length")
    if max_length < 1:
        raise CardError(f"{where}.max_length", "must be >= 1")
    return TokenizerEntry(_str(entry.get("file"), f"{where}.file"), _sha256(entry.get("sha256"), f"{where}.sha256"),
                          max_length, optional("truncation", _str), optional("pad_id", _int),
                          optional("pad_type_id", _int), optional("inputs", _strings), optional("source", _str))


def _json_object(value: object, where: str) -> Mapping[str, Json]:
    return _freeze(_object(value, where), where)  # type: ignore[no-any-return]


def _json_array(value: object, where: str) -> tuple[Json, ...]:
    return _freeze(_list(value, where), where)  # type: ignore[no-any-return]


def _freeze(value: object, where: str) -> Json:
    """A JSON value made read-only; NaN and Infinity (which Python's json reads) refused."""
    if isinstance(value, dict):
        return MappingProxyType({str(k): _freeze(v, f"{where}[{k!r}]") for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, float) and not math.isfinite(value):
        raise CardError(where, "expected a finite number (NaN and Infinity are not JSON)")
    return value


def _thaw(value: Json) -> object:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _to_json(value: object) -> object:
    if isinstance(value, Bounds):
        return value.as_list()
    if isinstance(value, TrainingData | TensorEntry | TokenizerEntry):
        return value.as_dict()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


_PARSERS: dict[str, Callable[[object, str], Any]] = {
    "schema_version": _int,
    "name": _str,
    "version": _int,
    "framework": _str,
    "framework_version": _str,
    "exporter": _str,
    "exporter_version": _str,
    "converter": _str,
    "opset": _int,
    "task": _str,
    "inputs": _tensors,
    "outputs": _tensors,
    "feature_names": _strings,
    "class_labels": _strings,
    "input_columns": lambda v, w: _mapping(v, w, _strings),
    "feature_ranges": lambda v, w: _mapping(v, w, _bounds),
    "description": _str,
    "training_data": _training_data,
    "metrics": lambda v, w: _mapping(v, w, _number),
    "parity": _json_array,
    "batching": _json_object,
    "tokenizer": _tokenizer,
    "pooling": _json_object,
    "files": lambda v, w: _mapping(v, w, _sha256),
    "padding_check": _json_object,
    "text_parity": _json_object,
    "reference": lambda v, w: _mapping(v, w, _reference),
    "feature_deciles": lambda v, w: _mapping(v, w, _deciles),
    "feature_limits": lambda v, w: _mapping(v, w, _bounds),
    "explain_output": _str,
    "external_data": lambda v, w: _mapping(v, w, _sha256),
    "model_sha256": _sha256,
    "created_at": _str,
    "card_sha256": _sha256,
}
_FIELDS = tuple(ModelCard.__dataclass_fields__)
# What build_card always writes, null when unknown (so an exported card round-trips exactly).
_ALWAYS_WRITTEN = frozenset(_FIELDS[:_FIELDS.index("batching") + 1])
assert set(_PARSERS) | {"extra"} == set(_FIELDS), "every card field has its parser"
