"""A model version's signature, computed once at load: what every request is validated
against before it may join a batch (names, datatypes, ranks, dims, batch limit, outputs)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medserve.protos.wire import datatype_of, numpy_dtype

from .config import ModelConfig, TensorConfig
from .errors import InvalidInput


def _fmt(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


@dataclass(frozen=True, slots=True)
class FixedInput:
    """The one input of a model whose valid requests differ only in their rows: one numeric
    input of fixed dims, batching, nothing optional. Such a request is decoded and validated in
    one step (`codec.decode_fixed`); any other takes the general path, refusals included."""

    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dim
    dtype: np.dtype  # little-endian, as on the wire
    row_elements: int
    max_rows: int
    finite: bool  # NaN and infinities are refused (refuse_non_finite, a float type)


def fixed_input(config: ModelConfig, fixed: bool) -> FixedInput | None:
    if not fixed or len(config.inputs) != 1 or config.inputs[0].datatype in ("BYTES", "BOOL", "BF16"):
        return None
    (spec,) = config.inputs
    dtype = np.dtype(numpy_dtype(spec.datatype)).newbyteorder("<")
    return FixedInput(spec.name, spec.datatype, spec.dims, dtype, math.prod(spec.dims), config.max_batch_size,
                      config.refuse_non_finite and dtype.kind == "f")


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: Mapping[str, TensorConfig]
    shapes: Mapping[str, tuple[int, ...]]  # full expected shape, -1 for the batch and variable dims
    required: tuple[str, ...]
    outputs: Mapping[str, TensorConfig]
    output_names: tuple[str, ...]
    max_batch_size: int
    split_oversized: bool  # False: more rows than max_batch_size is refused (Triton's rule)
    refuse_non_finite: bool  # NaN/Inf in a floating-point input is refused
    # The batching key every valid request has when no input is optional and no non-batch dim
    # varies (None otherwise: the batcher derives it per request).
    fixed_key: tuple[object, ...] | None = None
    fixed_input: FixedInput | None = None  # see FixedInput

    @classmethod
    def of(cls, config: ModelConfig) -> Signature:
        batch = (-1,) if config.max_batch_size > 0 else ()
        fixed = (config.max_batch_size > 0 and config.tokenizer is None and not config.padding
                 and all(not t.optional and min(t.dims, default=0) >= 0 for t in config.inputs))
        return cls(
            inputs={t.name: t for t in config.inputs},
            shapes={t.name: batch + t.dims for t in config.inputs},
            required=tuple(t.name for t in config.inputs if not t.optional),
            outputs={t.name: t for t in config.outputs},
            output_names=tuple(t.name for t in config.outputs),
            max_batch_size=config.max_batch_size,
            split_oversized=config.split_oversized,
            refuse_non_finite=config.refuse_non_finite,
            fixed_key=("signature", tuple((t.name, t.datatype, t.dims) for t in config.inputs)) if fixed else None,
            fixed_input=fixed_input(config, fixed),
        )

    def check_outputs(self, label: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
        """The outputs to return, in order: the requested ones (all known), or every output."""
        for name in wanted:
            if name not in self.outputs:
                raise InvalidInput(f"model {label}: unknown output {name!r}; outputs are {sorted(self.outputs)}")
        return wanted or self.output_names

    def validate(self, label: str, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Check names, datatypes, ranks, dims and the batch limit; return the inputs ready for
        the runtime (BYTES decoded to str, which onnxruntime's string tensors take) and the rows."""
        expected = self.inputs
        for name in inputs:
            if name not in expected:
                raise InvalidInput(f"model {label}: unexpected input {name!r}; expected inputs {sorted(expected)}")
        for name in self.required:
            if name not in inputs:
                raise InvalidInput(f"model {label}: missing input {name!r}; expected inputs {sorted(expected)}")
        batching = self.max_batch_size > 0
        rows = -1
        ready: dict[str, np.ndarray] = {}
        for name, array in inputs.items():
            spec = expected[name]
            got_type = datatype_of(array.dtype)
            if got_type != spec.datatype:
                raise InvalidInput(f"model {label}: input {name!r}: expected datatype {spec.datatype}, got {got_type}")
            want = self.shapes[name]
            shape = array.shape
            if len(shape) != len(want) or any(d != -1 and d != g for g, d in zip(shape, want, strict=True)):
                raise InvalidInput(f"model {label}: input {name!r}: expected shape {_fmt(want)}, got {_fmt(shape)}")
            if batching:
                if shape[0] < 1:
                    raise InvalidInput(f"model {label}: input {name!r}: batch dimension is 0")
                if shape[0] > self.max_batch_size and not self.split_oversized:
                    raise InvalidInput(
                        f"model {label}: input {name!r}: batch size {shape[0]} exceeds max_batch_size "
                        f"{self.max_batch_size} (the model's config sets oversized_requests: refuse)"
                    )
                if rows not in (-1, shape[0]):
                    raise InvalidInput(
                        f"model {label}: inputs disagree on the batch size: {sorted({rows, shape[0]})}"
                    )
                rows = shape[0]
            if spec.datatype == "BYTES":
                array = _utf8(label, name, array)
            elif self.refuse_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidInput(
                    f"model {label}: input {name!r}: holds NaN or infinite values, which this model refuses "
                    "(refuse_non_finite)"
                )
            ready[name] = array
        return ready, max(rows, 1)


def _utf8(label: str, name: str, array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, bytes | bytearray | memoryview):
            try:
                flat_out[i] = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"model {label}: input {name!r}: element {i} is not valid UTF-8 (string tensors need UTF-8)"
                ) from None
        else:
            flat_out[i] = str(item)
    return out
