"""`medserve export` / `medserve demo-repository` handlers, through a real argparse parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

from medserve.exporters.cli import add_subcommands
from medserve.exporters.demo_nets import RiskMLP

from exporter_helpers import breast_cancer, read_card, read_config


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medserve")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def joblib_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sklearn.ensemble import RandomForestClassifier

    folder = tmp_path_factory.mktemp("files")
    x_train, y_train, _, _ = breast_cancer()
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(x_train, y_train)
    joblib.dump(model, folder / "model.joblib")
    np.save(folder / "sample.npy", x_train[:8])
    return folder / "model.joblib", folder / "sample.npy"


def test_export_joblib_prints_warning_progress_and_parity_table(
    joblib_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_file, sample_file = joblib_model
    args = _parse(
        "export", str(model_file), "--name", "bc_rf", "--repository", str(tmp_path), "--sample", str(sample_file)
    )
    assert args.func(args) == 0

    out, err = capsys.readouterr()
    assert "loading a pickle" not in out and "runs any code the pickle contains" in err
    assert "output" in out and "max abs diff" in out and "probabilities" in out and "ok" in out
    assert "published 'bc_rf' version 1" in out
    card = read_card(tmp_path / "bc_rf" / "1" / "model_card.json")
    assert card["framework"] == "scikit-learn"
    assert card["batching"]["chosen_by"] == "measured"  # --max-batch-size not given: measured
    assert f"max_batch_size {card['batching']['max_batch_size']} (measured)" in out
    assert read_config(tmp_path / "bc_rf" / "config.pbtxt").max_batch_size == card["batching"]["max_batch_size"]

    args = _parse(
        "export",
        str(model_file),
        "--name",
        "bc_rf",
        "--repository",
        str(tmp_path),
        "--sample",
        str(sample_file),
        "--version",
        "1",
    )
    assert args.func(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_export_keeps_an_explicit_max_batch_size(
    joblib_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_file, sample_file = joblib_model
    argv = ["export", str(model_file), "--name", "bc", "--repository", str(tmp_path), "--sample", str(sample_file)]
    assert _parse(*argv).max_batch_size is None
    args = _parse(*argv, "--max-batch-size", "16")
    assert args.func(args) == 0
    assert "max_batch_size 16 (caller)" in capsys.readouterr().out
    assert read_config(tmp_path / "bc" / "config.pbtxt").max_batch_size == 16
    assert read_card(tmp_path / "bc" / "1" / "model_card.json")["batching"]["chosen_by"] == "caller"


def test_export_scikit_learn_needs_a_sample(joblib_model: tuple[Path, Path], tmp_path: Path) -> None:
    model_file, _ = joblib_model
    args = _parse("export", str(model_file), "--name", "bc", "--repository", str(tmp_path))
    assert args.func(args) == 2
    assert not (tmp_path / "bc").exists()


def test_export_pt2_uses_the_programs_example_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    program = torch.export.export(
        RiskMLP(8).eval(), (torch.randn(5, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "risk.pt2")
    args = _parse("export", str(tmp_path / "risk.pt2"), "--name", "risk", "--repository", str(tmp_path / "repo"))
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "pickle" not in err and "published 'risk' version 1" in out
    card = read_card(tmp_path / "repo" / "risk" / "1" / "model_card.json")
    assert card["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert card["parity"][0]["n_samples"] == 5
    assert card["batching"]["chosen_by"] == "measured"  # an MLP over a table


def test_demo_repository_parser_is_wired() -> None:
    args = _parse("demo-repository", "somewhere", "--seed", "3")
    assert args.directory == Path("somewhere") and args.seed == 3 and callable(args.func)


def test_demo_repository_skip_existing_keeps_what_is_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medserve.exporters.demo import DEMO_MODELS

    for name in DEMO_MODELS:
        (tmp_path / name / "1").mkdir(parents=True)
    args = _parse("demo-repository", str(tmp_path), "--skip-existing")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"keeping {len(DEMO_MODELS)} demo models" in out and "0 models in" in out
    assert all(sorted(p.name for p in (tmp_path / n).iterdir()) == ["1"] for n in DEMO_MODELS)
