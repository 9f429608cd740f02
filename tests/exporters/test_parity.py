"""The parity check itself: figures, tolerances, and one ParityError listing every failing
output, including for a deliberately wrong graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medserve.exporters import ParityError, Tolerance, export
from medserve.exporters import sklearn as sklearn_exporter
from medserve.exporters.parity import compare, parity_table, verify

from exporter_helpers import breast_cancer

TOL = Tolerance(atol=1e-3, rtol=1e-2)


def test_within_tolerance_passes_with_figures() -> None:
    expected = np.array([[1.0, 2.0], [0.0, -4.0]])
    result = compare("p", expected, expected + np.array([[0.0, 0.0], [5e-4, -0.02]]), TOL)
    assert result.passed and result.mismatches == 0 and result.n_samples == 2
    assert result.max_abs_diff == pytest.approx(0.02)
    assert result.max_rel_diff == pytest.approx(0.5)  # 5e-4 over |0| floored at atol 1e-3


def test_outside_tolerance_counts_elements() -> None:
    result = compare("p", np.zeros((3, 2)), np.array([[0, 0], [0.5, 0], [0, -0.2]]), TOL)
    assert not result.passed and result.mismatches == 2 and result.max_abs_diff == pytest.approx(0.5)


def test_labels_must_be_identical() -> None:
    assert compare("label", np.array([1, 0, 1]), np.array([1, 0, 1]), None).passed
    flipped = compare("label", np.array([1, 0, 1]), np.array([1, 1, 1]), None)
    assert not flipped.passed and flipped.mismatches == 1
    text = compare("label", np.array(["a", "b"]), np.array(["a", "c"], dtype=object), None)
    assert text.mismatches == 1 and text.max_abs_diff is None


def test_nan_on_both_sides_agrees_and_on_one_side_does_not() -> None:
    assert compare("p", np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), TOL).passed
    one_sided = compare("p", np.array([np.nan, 1.0]), np.array([0.0, 1.0]), TOL)
    assert not one_sided.passed and one_sided.max_abs_diff == np.inf


def test_shape_disagreement_is_a_problem_not_a_crash() -> None:
    result = compare("prediction", np.zeros(4), np.zeros((4, 1)), TOL)
    assert not result.passed and result.problem == "shape (4, 1), expected (4,)"


def test_wrong_graph_raises_one_error_listing_every_output() -> None:
    """The graph of a model trained on inverted labels, checked against the real model."""
    x_train, y_train, x_test, _ = breast_cancer()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    inverted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, 1 - y_train)
    good = sklearn_exporter.convert(model, x_train[:10])
    wrong = replace(good, model_bytes=sklearn_exporter.convert(inverted, x_train[:10]).model_bytes)

    verify("bc", good.model_bytes, good.reference, good.feeds, [x_test], good.tolerances)  # the control
    with pytest.raises(ParityError) as caught:
        verify("bc", wrong.model_bytes, wrong.reference, wrong.feeds, [x_train[:10], x_test], wrong.tolerances)

    error = caught.value
    assert error.model == "bc"
    assert {f.output for f in error.failures} == {"label", "probabilities"}
    by_output = {f.output: f for f in error.failures}
    assert by_output["label"].mismatches > 0.8 * (10 + len(x_test))
    assert by_output["probabilities"].max_abs_diff is not None and by_output["probabilities"].max_abs_diff > 0.5
    message = str(error)
    assert "2 output(s)" in message and "'label'" in message and "'probabilities'" in message
    assert "identical values" in message and "atol=0.0001, rtol=0.0001" in message
    table = parity_table(error.results)
    assert table.splitlines()[0].split()[:2] == ["output", "max"] and table.count("FAIL") == 2


def test_failed_parity_publishes_nothing(tmp_path: Path) -> None:
    """A tolerance the float32 graph cannot meet stops the export before any file is written."""
    x_train, y_train, x_test, y_test = breast_cancer()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    with pytest.raises(ParityError) as caught:
        export(model, x_train[:10], tmp_path, "bc", heldout=(x_test, y_test), tolerance=Tolerance(0.0, 0.0))
    assert [f.output for f in caught.value.failures] == ["probabilities"]
    assert caught.value.failures[0].max_abs_diff is not None and caught.value.failures[0].max_abs_diff > 0
    assert list(tmp_path.iterdir()) == []
