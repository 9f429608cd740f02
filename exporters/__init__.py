"""Export trained models to ONNX, prove parity, and publish them into a model repository.

    from medserve.exporters import export

    report = export(model, X_train[:32], "models", "sepsis_risk", heldout=(X_test, y_test))
    print(report.version, report.model_sha256)
    print(report.parity_table())

One call converts (scikit-learn via skl2onnx, XGBoost / LightGBM / CatBoost through the same path
with onnxmltools' and CatBoost's converters, PyTorch via torch.onnx's dynamo exporter, Hugging
Face text encoders into a graph that pools in itself, published with their tokenizer), checks
the ONNX graph against the source model on the sample and held-out data (`ParityError` if it
disagrees), measures held-out quality on the graph, and atomically writes
`<repository>/<name>/<version>/model.onnx` + `model_card.json` and `<repository>/<name>/config.pbtxt`.

Only the error classes are imported eagerly: the server's CLI imports this package, and must
not pull in onnx, torch or scikit-learn to serve.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ExportError,
    ParityError,
    SignatureMismatchError,
    UnsupportedModelError,
    VersionExistsError,
)

if TYPE_CHECKING:
    from .api import ExportReport, export
    from .card import TrainingData
    from .figures import OutputParity, Tolerance
    from .specs import TensorSpec

_LAZY = {
    "export": ".api",
    "ExportReport": ".api",
    "TrainingData": ".card",
    "OutputParity": ".figures",
    "Tolerance": ".figures",
    "TensorSpec": ".specs",
}

__all__ = [
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
