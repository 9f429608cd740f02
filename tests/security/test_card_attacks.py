"""Clinical limits never switch off in silence (issue #25, row 17), against real servers.

Row 17: a model card whose clinical limits or ranges did not parse made
`FeatureMonitor.from_card` return None (or an empty table): the model loaded and served with its
limits off, without a word. Now the card is parsed once at load into a typed, frozen `ModelCard`;
an entry that does not parse, or that names a feature or input the model does not have, refuses
the load naming the card's file (relative to the repository) and the entry: FAILED_PRECONDITION
for the model, UNAVAILABLE in the index with that reason.

On the code before the change, every malformed card below loaded: the inference that must be
refused came back OK (`pytest.raises(grpc.RpcError)` fails: "DID NOT RAISE"), and the NaN bound
and the misspelled feature let a heart rate of 900 through.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw
from medserve.server.card import Bounds, ModelCard

import onnx_models
from conftest import running_server, server_process

FEATURES = ["heart_rate", "resp_rate", "temp", "spo2"]
CARD: dict[str, Any] = {
    "feature_names": FEATURES,
    "feature_limits": {"heart_rate": [0, 300], "spo2": [0, 100]},
    "feature_ranges": {"heart_rate": [50, 130], "resp_rate": [10, 30], "temp": [35.5, 39.5], "spo2": [88, 100]},
    "feature_deciles": {n: [float(i) for i in range(1, 10)] for n in FEATURES},
    "reference": {"x": [[80.0, 18.0, 37.0, 96.0], [70.0, 14.0, 36.8, 98.0]]},
}
HEALTHY_ROW = [[80.0, 18.0, 37.0, 96.0]]
CARD_FILE = "vitals/1/model_card.json"


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(card: dict[str, Any]) -> None:
        target = card
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


# (what is wrong, the edit, the entry the refusal must name, words of the reason)
MALFORMED = [
    ("a limit given as text", _set(("feature_limits", "heart_rate"), ["0", 300]),
     "feature_limits['heart_rate'][0]", "expected a number"),
    ("a NaN limit", _set(("feature_limits", "heart_rate"), [float("nan"), 300]),
     "feature_limits['heart_rate'][0]", "finite"),
    ("an infinite limit", _set(("feature_limits", "heart_rate"), [0, float("inf")]),
     "feature_limits['heart_rate'][1]", "finite"),
    ("reversed limits", _set(("feature_limits", "heart_rate"), [300, 0]),
     "feature_limits['heart_rate']", "lower bound exceeds the upper"),
    ("one bound only", _set(("feature_limits", "heart_rate"), [300]),
     "feature_limits['heart_rate']", "expected [low, high]"),
    ("limits as a list", _set(("feature_limits",), [["heart_rate", 0, 300]]),
     "feature_limits", "expected an object"),
    ("a limit on a misspelled feature", _set(("feature_limits",), {"heartrate": [0, 300]}),
     "feature_limits['heartrate']", "names no feature"),
    ("a range as a string", _set(("feature_ranges", "temp"), "35.5-39.5"),
     "feature_ranges['temp']", "expected an array"),
    ("eight decile cuts", _set(("feature_deciles", "spo2"), [float(i) for i in range(8)]),
     "feature_deciles['spo2']", "expected the 9 cuts"),
    ("decreasing decile cuts", _set(("feature_deciles", "spo2"), [float(9 - i) for i in range(9)]),
     "feature_deciles['spo2']", "must not decrease"),
    ("ragged reference rows", _set(("reference", "x"), [[80.0, 18.0, 37.0, 96.0], [70.0, 14.0]]),
     "reference['x']", "not rectangular"),
    ("reference rows of another width", _set(("reference", "x"), [[80.0, 18.0, 37.0]]),
     "reference['x']", "do not fit the input's dims [4]"),
    ("reference rows for an input the model lacks", _set(("reference",), {"vitals": [[1.0, 2.0, 3.0, 4.0]]}),
     "reference['vitals']", "names no input of the model"),
    ("reference rows mixing text and numbers", _set(("reference", "x"), [[80.0, "18", 37.0, 96.0]]),
     "reference['x']", "not a mix"),
    ("feature names as one string", _set(("feature_names",), "heart_rate,resp_rate,temp,spo2"),
     "feature_names", "expected an array"),
    ("a feature name that is a number", _set(("feature_names",), ["heart_rate", 7, "temp", "spo2"]),
     "feature_names[1]", "expected a string"),
    ("a feature named twice", _set(("feature_names",), ["heart_rate", "heart_rate", "temp", "spo2"]),
     "feature_names", "names an entry twice"),
    ("five feature names for four columns", _set(("feature_names",), [*FEATURES, "lactate"]),
     "feature_limits", "no input whose columns are the card's 5 feature_names"),
    ("an explain_output the model lacks", _set(("explain_output",), "probabilities"),
     "explain_output", "names no output of the model"),
    ("a model_sha256 that is not one", _set(("model_sha256",), 12345),
     "model_sha256", "expected a SHA-256"),
]


def write_repo(root: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    path = onnx_models.affine(root / "vitals" / "1" / "model.onnx")
    card = copy.deepcopy(CARD)
    card["model_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if edit is not None:
        edit(card)
    (path.parent / "model_card.json").write_text(json.dumps(card))  # NaN/Infinity written as Python's json does
    return root


def infer(rows: list[list[float]]) -> pb.ModelInferRequest:
    x = np.array(rows, np.float32)
    req = pb.ModelInferRequest(model_name="vitals")
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


@pytest.mark.parametrize(("what", "edit", "entry", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_card_refuses_the_load_naming_the_file_and_entry(
        tmp_path: Path, what: str, edit: Callable[[dict[str, Any]], None], entry: str, reason: str) -> None:
    repo = write_repo(tmp_path / "repo", edit)
    with running_server(repo, exit_on_error=False) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer(HEALTHY_ROW), timeout=10)
        ready = stub.ModelReady(pb.ModelReadyRequest(name="vitals"), timeout=10).ready
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, what
    details = info.value.details()
    assert f"{CARD_FILE}: {entry}: " in details and reason in details, details
    assert str(tmp_path) not in details  # the file relative to the repository, never the host's layout
    assert not ready


def test_the_well_formed_card_loads_and_its_limit_refuses(tmp_path: Path) -> None:
    """The control: the same card unedited loads, serves a healthy row and refuses a heart rate
    of 900 naming the feature (so the refusals above are the edits', not the fixture's)."""
    repo = write_repo(tmp_path / "repo")
    with running_server(repo) as server:
        stub = server.stub()
        assert stub.ModelInfer(infer(HEALTHY_ROW), timeout=10).outputs
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer([[900.0, 18.0, 37.0, 96.0]]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feature 'heart_rate' is outside its clinical limits" in info.value.details()


def test_medserve_serve_reports_the_refused_card_in_the_index(tmp_path: Path) -> None:
    """`medserve serve --no-exit-on-error` (a subprocess, as deployed): the model is UNAVAILABLE
    in the repository index with the reason naming the file and the entry; without the flag the
    server does not start (the reason in its log)."""
    repo = write_repo(tmp_path / "repo", _set(("feature_limits", "heart_rate"), [float("nan"), 300]))
    with server_process(repo, "--no-exit-on-error") as (port, _):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            from medserve.protos import grpc_service_pb2_grpc as pb_grpc

            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(infer([[900.0, 18.0, 37.0, 96.0]]), timeout=10)
    (row,) = [m for m in index.models if m.name == "vitals"]
    reason = f"{CARD_FILE}: feature_limits['heart_rate'][0]: expected a finite number"
    assert row.state == "UNAVAILABLE" and reason in row.reason
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RuntimeError, match="exited with") as refused, server_process(repo):
        pass
    assert reason in str(refused.value)


def test_the_card_is_a_frozen_typed_value(tmp_path: Path) -> None:
    """What the server holds after the load: typed attributes, nothing to mutate."""
    raw = copy.deepcopy(CARD)
    card = ModelCard.from_dict(raw)
    assert card.feature_limits is not None and card.feature_limits["heart_rate"] == Bounds(0, 300)
    assert card.feature_names == tuple(FEATURES)
    assert card.reference is not None and card.reference["x"].shape == (2, 4)
    with pytest.raises(AttributeError):
        card.feature_limits = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        card.feature_limits["heart_rate"] = Bounds(0, 1e9)  # type: ignore[index]
    with pytest.raises(ValueError):
        card.reference["x"][0, 0] = 1e9
    assert card.as_dict() == {**{k: None for k in ("schema_version", "name", "version", "framework",
                                                  "framework_version", "exporter", "exporter_version", "converter",
                                                  "opset", "task", "inputs", "outputs", "class_labels",
                                                  "input_columns", "description", "training_data", "metrics",
                                                  "parity", "batching")}, **raw}
