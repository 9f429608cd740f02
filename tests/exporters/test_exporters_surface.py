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
