"""`Signature.validate`, without a server: names, datatypes, ranks, dims, the batch rule, BYTES
as UTF-8, and messages that name model, version, tensor, expected and got — never values."""
from __future__ import annotations

import numpy as np
import pytest

from medserve.server.config import ModelConfig, TensorConfig
from medserve.server.errors import InvalidInput
from medserve.server.signature import Signature

LABEL = "'m' version 3"
CONFIG = ModelConfig(
    name="m",
    max_batch_size=8,
    inputs=(
        TensorConfig("x", "FP32", (4,)),
        TensorConfig("seq", "INT64", (-1, 2)),
        TensorConfig("note", "BYTES", (1,), optional=True),
    ),
    outputs=(TensorConfig("y", "FP32", (1,)), TensorConfig("z", "FP32", (2,))),
)
SECRET = 4711.0


def valid(rows: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), SECRET, np.float32), "seq": np.zeros((rows, 5, 2), np.int64)}


def refused(inputs: dict[str, np.ndarray], config: ModelConfig = CONFIG) -> str:
    with pytest.raises(InvalidInput) as info:
        Signature.of(config).validate(LABEL, inputs)
    assert str(info.value).startswith(f"model {LABEL}: ") and "4711" not in str(info.value)
    return str(info.value)


def test_a_valid_request_passes_with_its_rows_and_bytes_as_text() -> None:
    inputs = valid(3) | {"note": np.array([[b"caf\xc3\xa9"], [b"a"], [b""]], dtype=object)}
    ready, rows = Signature.of(CONFIG).validate(LABEL, inputs)
    assert rows == 3 and ready["note"].tolist() == [["café"], ["a"], [""]]
    assert ready["x"] is inputs["x"]  # numeric inputs pass through untouched


def test_names() -> None:
    assert refused(valid() | {"y": np.zeros((2, 1), np.float32)}) == (
        f"model {LABEL}: unexpected input 'y'; expected inputs ['note', 'seq', 'x']"
    )
    assert refused({"x": valid()["x"]}) == f"model {LABEL}: missing input 'seq'; expected inputs ['note', 'seq', 'x']"


def test_datatypes_ranks_and_dims() -> None:
    assert refused(valid() | {"x": np.zeros((2, 4), np.float64)}) == (
        f"model {LABEL}: input 'x': expected datatype FP32, got FP64"
    )
    assert refused(valid() | {"x": np.zeros((2, 5), np.float32)}) == (
        f"model {LABEL}: input 'x': expected shape [-1, 4], got [2, 5]"
    )
    assert refused(valid() | {"seq": np.zeros((2, 5), np.int64)}) == (
        f"model {LABEL}: input 'seq': expected shape [-1, -1, 2], got [2, 5]"
    )


def test_the_batch_rule() -> None:
    assert refused(valid(0)).endswith("batch dimension is 0")
    assert refused(valid(2) | {"seq": np.zeros((3, 5, 2), np.int64)}) == (
        f"model {LABEL}: inputs disagree on the batch size: [2, 3]"
    )
    _, rows = Signature.of(CONFIG).validate(LABEL, valid(9))  # split into parts by the batcher
    assert rows == 9
    from dataclasses import replace

    strict = replace(CONFIG, split_oversized=False)
    assert refused(valid(9), strict) == (
        f"model {LABEL}: input 'x': batch size 9 exceeds max_batch_size 8 (the model's config sets "
        "oversized_requests: refuse)"
    )


def test_bytes_must_be_utf8() -> None:
    inputs = valid() | {"note": np.array([[b"ok"], [b"\xff"]], dtype=object)}
    assert refused(inputs) == f"model {LABEL}: input 'note': element 1 is not valid UTF-8 (string tensors need UTF-8)"


def test_outputs() -> None:
    signature = Signature.of(CONFIG)
    assert signature.check_outputs(LABEL, ()) == ("y", "z")
    assert signature.check_outputs(LABEL, ("z",)) == ("z",)
    with pytest.raises(InvalidInput, match=r"unknown output 'w'; outputs are \['y', 'z'\]"):
        signature.check_outputs(LABEL, ("w",))
