"""Serving-time checks from the model card: clinical limits refused naming the feature (never
the value), training-range flags and their counter, and PSI that rises on a shifted stream while
staying low on an in-distribution one."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw
from medserve.server.monitor import PSI_CHUNKS, PSI_WINDOW_ROWS, FeatureMonitor

import onnx_models
from conftest import running_server

FEATURES = ["heart_rate", "resp_rate", "temp", "spo2"]
RANGES = {"heart_rate": [50, 130], "resp_rate": [10, 30], "temp": [35.5, 39.5], "spo2": [88, 100]}
LIMITS = {"heart_rate": [0, 300], "spo2": [0, 100]}
RNG = np.random.default_rng(0)
TRAINING = np.column_stack([RNG.normal(80, 15, 20000), RNG.normal(18, 4, 20000), RNG.normal(37, 0.7, 20000),
                            RNG.normal(96, 2, 20000)])
DECILES = {n: np.percentile(TRAINING[:, i], np.arange(10, 100, 10)).tolist() for i, n in enumerate(FEATURES)}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    path = onnx_models.affine(root / "vitals" / "1" / "model.onnx")
    import hashlib

    card = {"model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "feature_names": FEATURES,
            "feature_ranges": RANGES, "feature_limits": LIMITS, "feature_deciles": DECILES}
    (path.parent / "model_card.json").write_text(json.dumps(card))
    return root


def request(x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="vitals")
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x.astype(np.float32)))
    return req


def test_a_value_outside_a_clinical_limit_is_refused_naming_the_feature(repo: Path) -> None:
    with running_server(repo) as server:
        with pytest.raises(grpc.RpcError) as info:
            server.stub().ModelInfer(request(np.array([[80, 18, 37, 96], [912.5, 18, 37, 96]])), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feature 'heart_rate' is outside its clinical limits" in info.value.details()
    assert "912" not in info.value.details()


def test_a_value_outside_the_training_range_is_scored_flagged_and_counted(repo: Path) -> None:
    with running_server(repo, metrics_port=0) as server:
        stub = server.stub()
        normal = stub.ModelInfer(request(np.array([[80, 18, 37, 96]])), timeout=30)
        assert "out_of_range_features" not in normal.parameters
        odd = stub.ModelInfer(request(np.array([[80, 18, 37, 96], [150, 18, 41, 96]])), timeout=30)
        assert json.loads(odd.parameters["out_of_range_features"].string_param) == ["heart_rate", "temp"]
        assert odd.outputs  # scored all the same
        stub.ModelInfer(request(np.array([[80, 45, 37, 96]])), timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    counts = {s.labels["feature"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "medserve_out_of_range_total"}
    assert counts == {"heart_rate": 1, "resp_rate": 1, "temp": 1, "spo2": 0}


def test_psi_rises_on_a_shifted_stream_and_stays_low_in_distribution() -> None:
    rng = np.random.default_rng(7)

    def stream(shift: float) -> dict[str, float]:
        monitor = FeatureMonitor("'m' version 1", "x", FEATURES, range(4), {}, {}, DECILES)
        sample = np.column_stack([rng.normal(80 + shift, 15, PSI_WINDOW_ROWS), rng.normal(18, 4, PSI_WINDOW_ROWS),
                                  rng.normal(37, 0.7, PSI_WINDOW_ROWS), rng.normal(96, 2, PSI_WINDOW_ROWS)])
        for start in range(0, PSI_WINDOW_ROWS, 50):
            monitor.check({"x": sample[start:start + 50].astype(np.float32)})
        return monitor.psi()

    steady, shifted = stream(0.0), stream(20.0)
    assert max(steady.values()) < 0.02
    assert shifted["heart_rate"] > 0.25  # the usual threshold for a significant shift
    assert shifted["resp_rate"] < 0.02 and shifted["temp"] < 0.02  # only the shifted feature moves


def test_psi_needs_a_chunk_of_rows_before_it_reports() -> None:
    monitor = FeatureMonitor("'m' version 1", "x", FEATURES, range(4), {}, {}, DECILES)
    monitor.check({"x": TRAINING[: PSI_WINDOW_ROWS // PSI_CHUNKS - 1].astype(np.float32)})
    assert monitor.psi() == {}
    monitor.check({"x": TRAINING[:2].astype(np.float32)})
    assert set(monitor.psi()) == set(FEATURES)


def test_float32_bounds_decide_exactly_as_the_float64_ones() -> None:
    """float32 inputs are compared with float32 copies of the bounds (half the cost); the copies
    are rounded so that no float32 value is judged differently."""
    from medserve.server.monitor import _float32_bounds

    rng = np.random.default_rng(0)
    lo, hi = rng.normal(size=1000) * 100, rng.normal(size=1000) * 100 + 300
    lo32, hi32 = _float32_bounds((lo, hi))
    for bound, check32, check64 in ((lo, lambda v: v < lo32, lambda v: v.astype(np.float64) < lo),
                                    (hi, lambda v: v > hi32, lambda v: v.astype(np.float64) > hi)):
        nearest = bound.astype(np.float32)
        for v in (nearest, np.nextafter(nearest, np.float32(-np.inf)), np.nextafter(nearest, np.float32(np.inf))):
            np.testing.assert_array_equal(check32(v), check64(v))


def test_drift_bins_count_each_value_by_the_cuts_below_it() -> None:
    """A value's decile bin is the number of cuts strictly below it, ties included and whatever
    order the card lists the cuts in; rows with a non-finite value are left out."""
    from medserve.server.monitor import _Window

    rng = np.random.default_rng(3)
    cuts = np.sort(rng.normal(size=(5, 9)), axis=1)
    cuts[2] = np.repeat(cuts[2, :3], 3)  # a discrete feature: repeated cuts
    shuffled = rng.permuted(cuts, axis=1)
    values = rng.normal(size=(400, 5))
    values[:40] = cuts[np.arange(5), rng.integers(0, 9, size=(40, 5))]  # values exactly on a cut
    values[40, 1], values[41, 3] = np.nan, np.inf
    finite = values[np.isfinite(values).all(axis=1)]
    expected = np.array([np.bincount((finite[:, f, None] > cuts[f]).sum(axis=1), minlength=10) for f in range(5)])
    np.testing.assert_array_equal(_Window(shuffled)._bin(values), expected)


def test_each_row_is_judged_against_the_limits_and_the_range_as_defined() -> None:
    """Refused exactly when a value is outside a limit, else flagged exactly for the features
    outside the range, whatever shortcut settles the usual row: values on a bound, -0.0 against
    a bound of 0, NaN, float32 and float64, one row or many."""
    monitor = FeatureMonitor("'m' version 1", "x", FEATURES, range(4), LIMITS, RANGES, DECILES)
    rng = np.random.default_rng(11)
    lo = np.array([RANGES[n][0] for n in FEATURES]), np.array([LIMITS.get(n, [-np.inf])[0] for n in FEATURES])
    hi = np.array([RANGES[n][1] for n in FEATURES]), np.array([LIMITS.get(n, [0, np.inf])[1] for n in FEATURES])
    special = np.array([lo[0], hi[0], lo[1], hi[1], np.zeros(4), np.full(4, -0.0), np.full(4, np.nan)])
    for dtype in (np.float32, np.float64):
        for rows in (1, 1, 1, 3):
            for _ in range(300):
                x = TRAINING[rng.integers(0, len(TRAINING), rows)] * rng.choice([1.0, 1.0, 1.6, 3.5, -0.1], (rows, 4))
                odd = rng.random((rows, 4)) < 0.1
                x[odd] = special[rng.integers(0, len(special), (rows, 4)), np.arange(4)][odd]
                x = x.astype(dtype)
                wide = x.astype(np.float64)
                refused = ((wide < lo[1]) | (wide > hi[1])).any(axis=0)
                flagged = ((wide < lo[0]) | (wide > hi[0])).any(axis=0)
                if refused.any():
                    with pytest.raises(Exception, match=FEATURES[int(np.argmax(refused))]):
                        monitor.check({"x": x})
                else:
                    assert monitor.check({"x": x}) == tuple(n for n, f in zip(FEATURES, flagged, strict=True) if f)


def test_a_card_whose_tables_the_model_cannot_carry_raises_instead_of_returning_none() -> None:
    """Before: None (no monitor, limits off without a word). Now CardError naming the table, which
    the repository turns into a load failure naming the card's file."""
    from medserve.server.card import CardError

    card = {"feature_names": FEATURES, "feature_limits": LIMITS}
    assert FeatureMonitor.from_card("m", {"feature_names": FEATURES}, {"x": (4,)}) is None  # no tables: no monitor
    assert FeatureMonitor.from_card("m", card, {"x": (4,)}) is not None
    with pytest.raises(CardError, match=r"^feature_limits: the model has no input whose columns"):
        FeatureMonitor.from_card("m", card, {"x": (-1, 4)})  # a sequence model: one row is not the features
    with pytest.raises(CardError, match=r"^feature_limits: the model has no input"):
        FeatureMonitor.from_card("m", card, {"x": (4,), "mask": (4,)})
    mixed = {"feature_names": [*FEATURES, "note"], "input_columns": {"numeric": FEATURES, "text": ["note"]},
             "feature_limits": {"note": [0, 1]}}
    with pytest.raises(CardError, match=r"^feature_limits\['note'\]: names no numeric column of input 'numeric'"):
        FeatureMonitor.from_card("m", mixed, {"numeric": (4,), "text": (1,)})
    with pytest.raises(CardError, match=r"input_columns\['numeric'\] lists 4 columns"):
        FeatureMonitor.from_card("m", {**mixed, "feature_limits": LIMITS}, {"numeric": (3,), "text": (1,)})
    monitor = FeatureMonitor.from_card("m", {**mixed, "feature_limits": LIMITS}, {"numeric": (4,), "text": (1,)})
    assert monitor is not None and monitor.input == "numeric"
