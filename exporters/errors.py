"""Errors raised by the exporters. Messages name models, versions, tensors and figures, never
tensor values (the inputs may be patient data).

    ExportError                      anything that stops an export; nothing was published
    ├── UnsupportedModelError        not a model family or input layout we can convert
    ├── ParityError                  the ONNX graph does not reproduce the source model
    ├── VersionExistsError           the requested version folder is already there
    └── SignatureMismatchError       config.pbtxt describes other inputs/outputs
"""

from __future__ import annotations

from collections.abc import Sequence

from .figures import OutputParity


class ExportError(Exception):
    """Base class: the export stopped and left no partial version behind."""


class UnsupportedModelError(ExportError):
    """The model, its input layout or an argument is outside what the exporters convert."""


class VersionExistsError(ExportError):
    """A published version is immutable: the server may already serve it."""


class SignatureMismatchError(ExportError):
    """The model's existing config.pbtxt has other inputs/outputs than the new version.

    Clients are written against that signature; a new signature needs a new model name."""


class ParityError(ExportError):
    """The converted graph disagrees with the source model on at least one output.

    `results` holds every output's figures (passing ones too); `failures` the failing ones."""

    def __init__(self, model: str, results: Sequence[OutputParity]) -> None:
        self.model = model
        self.results = tuple(results)
        self.failures = tuple(r for r in self.results if not r.passed)
        lines = [f"ONNX export of {model!r} failed the parity check on {len(self.failures)} output(s):"]
        lines += [f"  {r.describe()}" for r in self.failures]
        super().__init__("\n".join(lines))
