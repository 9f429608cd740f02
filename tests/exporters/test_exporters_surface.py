"""The public surface of medserve.exporters, and that importing it (as the server's CLI does)
pulls in no model framework."""

from __future__ import annotations

import subprocess
import sys

import medserve.exporters as exporters


def test_exported_members() -> None:
    assert sorted(exporters.__all__) == [
        "ExportError",
        "ExportReport",
        "OutputParity",
        "ParityError",
        "SignatureMismatchError",
        "TensorSpec",
        "Tolerance",
        "TrainingData",
        "UnsupportedModelError",
        "VersionExistsError",
        "export",
    ]
    for name in exporters.__all__:
        assert getattr(exporters, name) is not None
    for error in ("ParityError", "VersionExistsError", "SignatureMismatchError", "UnsupportedModelError"):
        assert issubclass(getattr(exporters, error), exporters.ExportError)


def test_importing_the_cli_loads_no_framework() -> None:
    code = (
        "import sys\n"
        "import medserve.exporters, medserve.exporters.cli\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'onnx', 'skl2onnx', 'onnxruntime') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_parity_figures_live_apart_from_the_check() -> None:
    """`ParityError` carries `OutputParity` figures from `figures.py`, which imports nothing of
    the package: errors.py and parity.py no longer import each other (tests/test_import_graph.py)."""
    from medserve.exporters import errors, figures, parity

    assert exporters.Tolerance is parity.Tolerance is figures.Tolerance
    assert exporters.OutputParity is parity.OutputParity is figures.OutputParity
    failed = figures.OutputParity("p", 0.5, 0.5, figures.Tolerance(1e-6, 0.0), 4, 2)
    error = errors.ParityError("m", [failed, figures.OutputParity("label", 0.0, 0.0, None, 4, 0)])
    assert error.failures == (failed,) and "1 output(s)" in str(error) and "'p'" in str(error)
