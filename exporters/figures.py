"""What a parity check found, as plain data: the `Tolerance` an output is held to, the
`OutputParity` figures of one output, and the table of them. No onnxruntime and nothing else of
the package, so the error classes (`errors.ParityError`) can carry these figures without the
module that computes them (`parity.py`) and the errors importing each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Element `actual` passes when |actual - expected| <= atol + rtol * |expected| (numpy's allclose).

    With `cosine` set (embeddings), each row must also lie within that cosine distance
    (1 - cos) of the expected row; a row outside counts as one mismatch."""

    atol: float
    rtol: float
    cosine: float | None = None

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise ValueError("tolerance atol and rtol must be >= 0")
        if self.cosine is not None and not self.cosine >= 0:
            raise ValueError("tolerance cosine must be >= 0")

    def __str__(self) -> str:
        text = f"atol={self.atol:g}, rtol={self.rtol:g}"
        return text if self.cosine is None else f"{text}, cosine distance<={self.cosine:g}"


@dataclass(frozen=True, slots=True)
class OutputParity:
    """How one output of the graph compared with the source model, over all checked samples.

    `tolerance` None means the values had to be identical (labels). `max_rel_diff` divides by
    max(|expected|, atol) so values near zero do not blow it up. `problem` names a structural
    disagreement (missing output, shape, kind of values) that makes the figures meaningless."""

    output: str
    max_abs_diff: float | None
    max_rel_diff: float | None
    tolerance: Tolerance | None
    n_samples: int
    mismatches: int
    problem: str | None = None
    max_cosine_distance: float | None = None  # rows of a 2-D output, when the tolerance bounds it

    @property
    def passed(self) -> bool:
        return self.problem is None and self.mismatches == 0

    def describe(self) -> str:
        bound = "identical values" if self.tolerance is None else str(self.tolerance)
        if self.problem is not None:
            return f"output {self.output!r}: {self.problem} (required: {bound})"
        cosine = "" if self.max_cosine_distance is None else f", max cosine distance {_fmt(self.max_cosine_distance)}"
        return (
            f"output {self.output!r}: max abs diff {_fmt(self.max_abs_diff)}, max rel diff "
            f"{_fmt(self.max_rel_diff)}{cosine}, required {bound}; {self.mismatches} element(s) outside, "
            f"over {self.n_samples} sample(s)"
        )

    def as_card_entry(self) -> dict[str, object]:
        tolerance: object = "exact"
        if self.tolerance is not None:
            bounds: dict[str, float] = {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol}
            if self.tolerance.cosine is not None:
                bounds["cosine_distance"] = self.tolerance.cosine
            tolerance = bounds
        entry: dict[str, object] = {
            "output": self.output,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": tolerance,
            "n_samples": self.n_samples,
            "mismatches": self.mismatches,
        }
        if self.max_cosine_distance is not None:
            entry["max_cosine_distance"] = self.max_cosine_distance
        return entry


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def parity_table(results: Sequence[OutputParity]) -> str:
    """The figures as an aligned text table, one row per output (for the CLI and logs)."""
    cosine = any(r.max_cosine_distance is not None for r in results)  # embeddings: one more column
    rows = [("output", "max abs diff", "max rel diff", *(["max cos dist"] if cosine else []), "required", "samples",
             "outside", "result")]
    for r in results:
        rows.append(
            (
                r.output,
                _fmt(r.max_abs_diff),
                _fmt(r.max_rel_diff),
                *([_fmt(r.max_cosine_distance)] if cosine else []),
                "identical" if r.tolerance is None else str(r.tolerance),
                str(r.n_samples),
                str(r.mismatches),
                "ok" if r.passed else f"FAIL{': ' + r.problem if r.problem else ''}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
