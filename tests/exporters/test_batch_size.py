"""max_batch_size: measured for tabular models (the largest batch within the time budget, never
below 64), 64 for images, signals and sequences, and a caller's number kept as given; the choice
and its figures are recorded in config.pbtxt and the model card.

The choice itself is tested on explicit numbers; exports check which way the size was chosen
and that the recorded figures decided it, never how fast this machine happens to be."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medserve.exporters import batch_size, export
from medserve.exporters.batch_size import BUDGET_S, CEILING, FLOOR, BatchingChoice, choose, is_tabular, tile
from medserve.exporters.demo_nets import ECGCNN1d, RiskMLP
from medserve.exporters.specs import TensorSpec

from exporter_helpers import assert_config_matches_graph, breast_cancer, read_card, read_config

MS = 1e-3


def _doublings(first: int = 64, last: int = 4096) -> list[int]:
    sizes = [first]
    while sizes[-1] < last:
        sizes.append(sizes[-1] * 2)
    return sizes


# --- the pure choice -------------------------------------------------------------------------


def test_the_defaults_are_what_the_exporter_promises() -> None:
    assert (FLOOR, CEILING, BUDGET_S) == (64, 4096, 0.002)


def test_everything_within_the_budget_gives_the_ceiling() -> None:
    assert choose({rows: 0.01 * MS for rows in _doublings()}, 2 * MS) == 4096


def test_a_median_exactly_on_the_budget_is_within_it() -> None:
    timings = {64: 0.5 * MS, 128: 1.0 * MS, 256: 2.0 * MS, 512: 2.0001 * MS}
    assert choose(timings, 2 * MS) == 256
    assert choose({**timings, 256: 2.0001 * MS}, 2 * MS) == 128


def test_the_largest_size_within_the_budget_wins() -> None:
    timings = {64: 0.2 * MS, 128: 0.4 * MS, 256: 0.8 * MS, 512: 1.6 * MS, 1024: 3.2 * MS}
    assert choose(timings, 2 * MS) == 512
    assert choose(timings, 1 * MS) == 256
    assert choose(timings, 5 * MS) == 1024


def test_never_below_the_floor() -> None:
    assert choose({64: 9 * MS}, 2 * MS) == 64  # a slow model keeps 64
    assert choose({}, 2 * MS) == 64
    assert choose({16: 0.1 * MS, 32: 0.2 * MS}, 2 * MS) == 64  # smaller sizes never lower it
    assert choose({64: 9 * MS}, 2 * MS, floor=128) == 128


def test_choice_stops_at_the_first_size_past_the_budget() -> None:
    # 256 looks fast again after 128 passed the budget: noise, not capacity.
    timings = {64: 1 * MS, 128: 2.5 * MS, 256: 1.5 * MS, 512: 1.9 * MS}
    assert choose(timings, 2 * MS) == 64
    # The order the sizes were recorded in does not matter, only their size.
    assert choose(dict(reversed(list(timings.items()))), 2 * MS) == 64


def test_sizes_above_the_ceiling_are_ignored() -> None:
    timings = {rows: 0.01 * MS for rows in _doublings(64, 16384)}
    assert choose(timings, 2 * MS) == 4096
    assert choose(timings, 2 * MS, ceiling=256) == 256


# --- which models are tables -------------------------------------------------------------------


def test_only_fixed_width_tables_are_tabular() -> None:
    table = TensorSpec("input", "FP32", (-1, 30))
    assert is_tabular([table])
    assert is_tabular([TensorSpec("numeric", "FP32", (-1, 3)), TensorSpec("categorical", "BYTES", (-1, 2))])
    assert not is_tabular([TensorSpec("input", "FP32", (-1, 1, 8, 8))])  # images
    assert not is_tabular([TensorSpec("input", "FP32", (-1, 3, -1))])  # signals
    assert not is_tabular([TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("mask", "INT64", (-1, -1))])
    assert not is_tabular([table, TensorSpec("history", "FP32", (-1, 24, 6))])  # any non-table input
    assert not is_tabular([TensorSpec("input", "FP32", (-1,))])
    assert not is_tabular([])


# --- the timing code, on a tiny graph -----------------------------------------------------------


def _tiny_graph() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return model.SerializeToString()


def test_tile_repeats_the_sample_rows_in_order() -> None:
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "s": np.array([["a"], ["b"], ["c"]], dtype=object)}
    tiled = tile(feeds, 7)
    np.testing.assert_array_equal(tiled["x"], feeds["x"][[0, 1, 2, 0, 1, 2, 0]])
    assert tiled["s"].dtype == object and tiled["s"].ravel().tolist() == list("abcabca")


def test_sessions_are_configured_like_the_servers() -> None:
    options = batch_size.session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert batch_size.server_like_session(_tiny_graph()).get_providers() == ["CPUExecutionProvider"]


def test_measure_doubles_from_the_floor_to_the_ceiling_within_the_budget() -> None:
    sample = {"x": np.ones((5, 3), np.float32)}
    medians = batch_size.measure(_tiny_graph(), sample, budget_s=60.0, ceiling=512)
    assert list(medians) == [64, 128, 256, 512]
    assert all(s > 0 for s in medians.values())


def test_measure_stops_at_the_first_size_past_the_budget() -> None:
    medians = batch_size.measure(_tiny_graph(), {"x": np.ones((5, 3), np.float32)}, budget_s=0.0)
    assert list(medians) == [64] and medians[64] > 0


def test_measure_needs_sample_rows() -> None:
    with pytest.raises(ValueError, match="sample row"):
        batch_size.measure(_tiny_graph(), {"x": np.ones((0, 3), np.float32)})


def test_the_card_entry_has_figures_only_when_measured() -> None:
    measured = BatchingChoice(128, "measured", 0.002, {128: 0.0025, 64: 0.00123456})
    assert measured.as_card_entry() == {
        "max_batch_size": 128,
        "chosen_by": "measured",
        "budget_ms": 2.0,
        "median_ms_by_rows": {"64": 1.2346, "128": 2.5},
    }
    assert list(measured.as_card_entry()["median_ms_by_rows"]) == ["64", "128"]  # type: ignore[call-overload]
    for chosen_by in ("default", "caller"):
        entry = BatchingChoice(64, chosen_by).as_card_entry()  # type: ignore[arg-type]
        assert entry == {"max_batch_size": 64, "chosen_by": chosen_by, "budget_ms": None, "median_ms_by_rows": None}


# --- through export ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logreg() -> tuple[Any, np.ndarray]:
    x_train, y_train, _, _ = breast_cancer()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train), x_train[:16]


def _refuse_to_measure(*args: object, **kwargs: object) -> Mapping[int, float]:
    raise AssertionError("max_batch_size was measured where it should not have been")


def _assert_measured(report: Any, model_dir: Path) -> None:
    config = read_config(model_dir / "config.pbtxt")
    batching = read_card(report.card_path)["batching"]
    assert config.max_batch_size == batching["max_batch_size"] == report.batching.max_batch_size >= 64
    assert batching["chosen_by"] == "measured" and batching["budget_ms"] == 2.0
    medians = report.batching.medians_s
    sizes = list(medians)
    assert sizes == _doublings(64, sizes[-1]) and sizes[-1] <= 4096
    assert list(batching["median_ms_by_rows"]) == [str(rows) for rows in sizes]
    assert all(isinstance(v, float) and v > 0 for v in batching["median_ms_by_rows"].values())
    # The recorded figures are what decided, and doubling stopped where the rules say.
    assert choose(medians, BUDGET_S) == report.batching.max_batch_size
    assert all(medians[rows] <= BUDGET_S for rows in sizes[:-1])
    assert sizes[-1] == 4096 or medians[sizes[-1]] > BUDGET_S
    assert_config_matches_graph(model_dir)


def test_a_cheap_tabular_model_gets_a_measured_batch_size(logreg: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, sample = logreg
    report = export(model, sample, tmp_path, "bc_logreg")
    _assert_measured(report, tmp_path / "bc_logreg")


def test_a_tabular_torch_mlp_is_measured_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sample = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    report = export(RiskMLP(8).eval(), sample, tmp_path, "risk")
    _assert_measured(report, tmp_path / "risk")


def test_a_slow_tabular_model_keeps_64(
    logreg: tuple[Any, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, sample = logreg
    seen: list[tuple[int, ...]] = []

    def slow(model_bytes: bytes, feeds: Mapping[str, np.ndarray], budget_s: float) -> dict[int, float]:
        seen.append(tuple(a.shape[0] for a in feeds.values()))
        return {64: 5 * MS}

    monkeypatch.setattr(batch_size, "measure", slow)
    report = export(model, sample, tmp_path, "slow")
    assert seen == [(16,)]  # measured on the export sample's rows
    assert read_config(report.config_path).max_batch_size == 64
    assert read_card(report.card_path)["batching"] == {
        "max_batch_size": 64,
        "chosen_by": "measured",
        "budget_ms": 2.0,
        "median_ms_by_rows": {"64": 5.0},
    }


def test_a_signal_model_keeps_64_unmeasured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_size, "measure", _refuse_to_measure)
    torch.manual_seed(0)
    sample = np.random.default_rng(0).normal(size=(4, 3, 64)).astype(np.float32)
    report = export(ECGCNN1d(leads=3).eval(), sample, tmp_path, "ecg", dynamic_axes={"input": {2: "samples"}})
    assert [len(s.shape) for s in report.inputs] == [3]
    assert read_config(report.config_path).max_batch_size == 64
    assert read_card(report.card_path)["batching"] == {
        "max_batch_size": 64,
        "chosen_by": "default",
        "budget_ms": None,
        "median_ms_by_rows": None,
    }
    assert report.batching == BatchingChoice(64, "default")
    assert_config_matches_graph(tmp_path / "ecg")


@pytest.mark.parametrize("requested", [0, 16, 64, 8192])
def test_an_explicit_max_batch_size_is_kept(
    requested: int, logreg: tuple[Any, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_size, "measure", _refuse_to_measure)
    model, sample = logreg
    report = export(model, sample, tmp_path, "bc", max_batch_size=requested)
    config = read_config(report.config_path)
    assert config.max_batch_size == requested
    assert config.HasField("dynamic_batching") == (requested > 0)
    assert read_card(report.card_path)["batching"] == {
        "max_batch_size": requested,
        "chosen_by": "caller",
        "budget_ms": None,
        "median_ms_by_rows": None,
    }
    graph = onnx.load(str(report.model_path))
    assert [i.name for i in graph.graph.input] == ["input"]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "64"])
def test_a_bad_max_batch_size_is_refused(bad: Any, logreg: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    from medserve.exporters import ExportError

    model, sample = logreg
    with pytest.raises(ExportError, match="max_batch_size"):
        export(model, sample, tmp_path, "bc", max_batch_size=bad)
    assert not (tmp_path / "bc").exists()
