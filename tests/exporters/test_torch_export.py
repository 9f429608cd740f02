"""Every torch family: export with a dynamic batch (and sequence) axis, parity on the sample and
on held-out data of another batch size and length, and a fresh onnxruntime session on the
published file answering like the module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from medserve.exporters import ExportError, export
from medserve.exporters.demo_nets import DigitsCNN, ECGCNN1d, NotesTransformer, RiskMLP, VitalsGRU

from exporter_helpers import (
    assert_config_matches_graph,
    assert_within_recorded_tolerance,
    graph_dims,
    read_card,
    run_published,
    served_answers,
)


class VitalsLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _seeded(module: nn.Module) -> nn.Module:
    return module.eval()


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tokens(seed: int, n: int, width: int) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    lengths = rng.integers(2, width + 1, size=n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 50, size=(n, width)), 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


# family -> (module factory, sample, held-out inputs, dynamic axes, expected graph input dims)
CASES: dict[str, tuple[Any, Any, Any, Any, dict[str, list[int]]]] = {
    "mlp": (lambda: RiskMLP(8), _rng(0).normal(size=(6, 8)), _rng(1).normal(size=(40, 8)), None, {"input": [-1, 8]}),
    "cnn2d": (
        DigitsCNN,
        _rng(0).random((4, 1, 8, 8)),
        _rng(1).random((33, 1, 8, 8)),
        None,
        {"input": [-1, 1, 8, 8]},
    ),
    "cnn1d": (
        lambda: ECGCNN1d(leads=3),
        _rng(0).normal(size=(4, 3, 64)),
        _rng(1).normal(size=(9, 3, 100)),
        {"input": {2: "samples"}},
        {"input": [-1, 3, -1]},
    ),
    "gru": (
        lambda: VitalsGRU(6),
        _rng(0).normal(size=(4, 12, 6)),
        _rng(1).normal(size=(7, 30, 6)),
        {"input": {1: "time"}},
        {"input": [-1, -1, 6]},
    ),
    "lstm": (
        VitalsLSTM,
        _rng(0).normal(size=(4, 10, 4)),
        _rng(1).normal(size=(5, 23, 4)),
        {"input": {1: "time"}},
        {"input": [-1, -1, 4]},
    ),
    "transformer": (
        lambda: NotesTransformer(vocab=50, width=16, heads=2, max_length=64),
        _tokens(0, 4, 12),
        _tokens(1, 9, 29),
        {"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}},
        {"input_ids": [-1, -1], "attention_mask": [-1, -1]},
    ),
}


def _float32(data: Any) -> Any:
    if isinstance(data, dict):
        return data
    return np.asarray(data, dtype=np.float32)


@pytest.mark.parametrize("family", sorted(CASES))
def test_torch_family(family: str, tmp_path: Path) -> None:
    factory, sample, heldout, dynamic_axes, input_dims = CASES[family]
    torch.manual_seed(0)
    module = factory().eval()
    sample, heldout = _float32(sample), _float32(heldout)

    report = export(module, sample, tmp_path, family, dynamic_axes=dynamic_axes, heldout=heldout)

    (parity,) = report.parity
    n_sample = len(next(iter(sample.values()))) if isinstance(sample, dict) else len(sample)
    n_heldout = len(next(iter(heldout.values()))) if isinstance(heldout, dict) else len(heldout)
    assert parity.output == "output" and parity.passed and parity.n_samples == n_sample + n_heldout
    assert parity.max_abs_diff is not None and parity.max_abs_diff < 1e-4

    graph = onnx.load(str(report.model_path)).graph
    assert {v.name: graph_dims(v) for v in graph.input} == input_dims
    feeds = heldout if isinstance(heldout, dict) else {"input": heldout}
    answers = served_answers(tmp_path, family, feeds)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(a) for a in feeds.values())).numpy()
    assert_within_recorded_tolerance(report, "output", answers["output"], expected)
    assert read_card(report.card_path)["framework"] == "pytorch"
    assert_config_matches_graph(tmp_path / family)


def test_exported_program_with_named_outputs_and_metrics(tmp_path: Path) -> None:
    """A torch.export program keeps its own dynamic batch dim; integer targets give accuracy."""
    torch.manual_seed(0)
    module = RiskMLP(8).eval()
    x = _rng(0).normal(size=(64, 8)).astype(np.float32)
    program = torch.export.export(module, (torch.from_numpy(x[:4]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    y = _rng(1).integers(0, 2, size=60)

    report = export(
        program, x[:4], tmp_path, "risk", output_names=["logits"], heldout=(x[4:], y), class_labels=["low", "high"]
    )

    assert [s.name for s in report.outputs] == ["logits"]
    assert report.inputs[0].shape == (-1, 8)
    with torch.no_grad():
        expected = module(torch.from_numpy(x[4:])).numpy()
    np.testing.assert_allclose(run_published(report.model_path, {"x": x[4:]})["logits"], expected, atol=1e-5)
    assert report.metrics["n_samples"] == 60 and 0 <= report.metrics["accuracy"] <= 1
    assert read_card(report.card_path)["task"] == "classification"


def test_training_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="eval"):
        export(RiskMLP(8).train(), np.zeros((4, 8), np.float32), tmp_path, "risk")
    assert not (tmp_path / "risk").exists()


def test_single_row_sample_is_refused(tmp_path: Path) -> None:
    """torch.export would specialize a batch of one, silently losing the dynamic batch axis."""
    with pytest.raises(ExportError, match="at least 2"):
        export(RiskMLP(8).eval(), np.zeros((1, 8), np.float32), tmp_path, "risk")


class PooledECG(nn.Module):
    """MaxPool1d over time: torch.export cannot keep that axis variable (torch 2.13)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)).mean(dim=-1)


def test_axis_fixed_by_torch_export_is_refused(tmp_path: Path) -> None:
    """torch.onnx silently exports a static length where an op guards on it; we refuse."""
    sample = _rng(0).normal(size=(4, 3, 32)).astype(np.float32)
    with pytest.raises(ExportError, match=r"fixed variable axis 2 \('samples'\) to 32"):
        export(PooledECG().eval(), sample, tmp_path, "ecg", dynamic_axes={"input": {2: "samples"}})
    assert not (tmp_path / "ecg").exists()


class VitalsAndLabs(nn.Module):
    """Two inputs, as a multi-modal clinical model takes them: a vitals sequence and a labs panel."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.labs = nn.Linear(5, 8)
        self.head = nn.Linear(16, 2)

    def forward(self, vitals: torch.Tensor, labs: torch.Tensor) -> torch.Tensor:
        _, hidden = self.gru(vitals)
        return self.head(torch.cat([hidden[-1], torch.relu(self.labs(labs))], dim=1))


def test_tuple_sample_takes_input_names_from_forward(tmp_path: Path) -> None:
    """torch.onnx's own convention, a tuple of inputs (it ended in numpy's 'setting an array
    element with a sequence'): the graph's inputs are named after forward's parameters."""
    torch.manual_seed(0)
    model = VitalsAndLabs().eval()
    rng = _rng(3)
    sample = (rng.normal(size=(4, 6, 4)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32))
    held = (rng.normal(size=(20, 9, 4)).astype(np.float32), rng.normal(size=(20, 5)).astype(np.float32))
    targets = rng.integers(0, 2, 20)

    report = export(model, sample, tmp_path, "vitals_labs", dynamic_axes={"vitals": {1: "time"}},
                    heldout=(held, targets), max_batch_size=64)

    assert [(s.name, s.shape) for s in report.inputs] == [("vitals", (-1, -1, 4)), ("labs", (-1, 5))]
    assert all(p.passed and p.n_samples == 24 for p in report.parity)
    answers = run_published(report.model_path, {"vitals": held[0], "labs": held[1]})
    with torch.no_grad():
        expected = model(torch.from_numpy(held[0]), torch.from_numpy(held[1])).numpy()
    assert_within_recorded_tolerance(report, "output", answers["output"], expected)
    assert_config_matches_graph(tmp_path / "vitals_labs")


def test_tuple_sample_of_the_wrong_length_names_forwards_parameters(tmp_path: Path) -> None:
    model = VitalsAndLabs().eval()
    rng = _rng(4)
    three = tuple(rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
    with pytest.raises(ExportError, match=r"forward\(\) names 2 positional parameter\(s\) \['vitals', 'labs'\]"):
        export(model, three, tmp_path, "vitals_labs")
    assert not (tmp_path / "vitals_labs").exists()
