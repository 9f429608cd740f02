"""`medserve export` and `medserve demo-repository`.

    medserve export model.joblib --name sepsis_risk --repository models --sample rows.npy
    medserve export model.pt2 --name ecg --repository models          # sample from the program
    medserve export ./all-MiniLM-L6-v2 --name notes --repository models --pooling mean --normalize --max-length 128
    medserve demo-repository demo-repository --seed 0

The server's CLI registers these with `add_subcommands`. Nothing heavy is imported until a
handler runs, so `medserve serve` does not load torch or scikit-learn.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

# Third-party loggers that narrate every export at INFO; the CLI shows our progress instead.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export")
_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="convert a trained model to ONNX, prove parity and publish it into a model repository",
        description="Convert a scikit-learn model (joblib/pickle), a torch.export program (.pt2) or a Hugging Face "
        "encoder folder (served from text) to ONNX, check the ONNX graph against the model, and publish "
        "<repository>/<name>/<version>/.",
    )
    parser.add_argument(
        "file",
        type=Path,
        help="model file: .joblib/.pkl/.pickle (scikit-learn) or .pt2 (torch.export), or a Hugging Face model "
        "folder (config.json, weights, tokenizer.json) for a text encoder",
    )
    parser.add_argument("--name", required=True, help="model name in the repository (e.g. sepsis_risk)")
    parser.add_argument("--repository", required=True, type=Path, help="model repository folder")
    parser.add_argument(
        "--sample",
        type=Path,
        default=None,
        help="a few input rows: .npy (one input) or .npz (named inputs); required for scikit-learn, "
        "defaults to the program's example inputs for .pt2",
    )
    parser.add_argument("--version", type=int, default=None, help="version number (default: latest + 1)")
    parser.add_argument("--description", default=None, help="one line for the model card")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="most rows one execution runs, written to config.pbtxt (0 = no batching); default: measured for "
        "tabular models (the largest batch within 2 ms on one CPU thread, at least 64), 64 for others",
    )
    text = parser.add_argument_group("text encoders (a model folder)")
    text.add_argument(
        "--pooling", choices=("mean", "cls"), default=None, help="pooling of the token states (default: the folder's "
        "sentence-transformers configuration)"
    )
    text.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalize the embedding (default: as the folder's sentence-transformers configuration says)",
    )
    text.add_argument(
        "--max-length", type=int, default=None, help="tokens per text before truncation (default: the model's own)"
    )
    parser.set_defaults(func=run_export, extras=("server", "export"))  # parity runs onnxruntime
    return parser


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo-repository",
        help="train and publish one small demo model per family (reproducible)",
        description="Train one small model per family on bundled or seeded synthetic data and publish them.",
    )
    parser.add_argument("directory", type=Path, help="repository folder to create or add to")
    parser.add_argument("--seed", type=int, default=0, help="seed for data splits, initialization and training")
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave demo models that already have a folder in the repository as they are "
        "(so running the README's command again does not publish new versions)",
    )
    parser.set_defaults(func=run_demo, extras=("server", "export"))
    return parser


def add_subcommands(subparsers: Any) -> None:
    """Register `export` and `demo-repository` on an argparse subparsers object."""
    add_export_parser(subparsers)
    add_demo_parser(subparsers)


def _quiet_third_party() -> None:
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms" and the like, on every export.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _load_arrays(path: Path) -> Any:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:
        raise SystemExit(
            f"error: {path} holds Python objects (e.g. a mixed text/number table), which would need pickle; "
            "export such models with medserve.exporters.export from Python"
        ) from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    return loaded


def _load_model(path: Path) -> Any:
    if path.suffix == ".pt2":
        import torch

        return torch.export.load(path)
    if path.suffix in _PICKLE_SUFFIXES:
        print(
            f"warning: loading {path} runs any code the pickle contains; only export files you trust",
            file=sys.stderr,
        )
        import joblib

        return joblib.load(path)
    raise SystemExit(f"error: {path}: expected a .pt2, .joblib, .pkl or .pickle file")


def _default_sample(model: Any, path: Path) -> Any:
    examples = getattr(model, "example_inputs", None)
    if examples is None or not examples[0]:
        raise SystemExit(f"error: {path} has no example inputs; pass --sample FILE.npy or FILE.npz")
    names = list(model.graph_signature.user_inputs)
    arrays = [t.detach().cpu().numpy() for t in examples[0]]
    return arrays[0] if len(arrays) == 1 else dict(zip(names, arrays, strict=True))


def _require_extras() -> None:
    """Import what exporting needs before anything else is said or loaded, so a missing extra
    is named at once (the `medserve` command turns ModuleNotFoundError into that one line)."""
    import joblib  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import skl2onnx  # noqa: F401
    import sklearn  # noqa: F401
    import torch  # noqa: F401


def run_export(args: argparse.Namespace) -> int:
    _require_extras()
    from . import export

    _quiet_third_party()
    text_options = {"pooling": args.pooling, "normalize": args.normalize, "max_length": args.max_length}
    if args.file.is_dir():
        if args.sample is not None:
            print("error: a text encoder is checked on built-in clinical sentences; --sample is for tables", file=sys.stderr)
            return 2
        print(f"converting the text encoder in {args.file} and checking parity")
        return _export_and_report(export, args, args.file, None, text_options)
    if any(v is not None for v in text_options.values()):
        print("error: --pooling, --normalize and --max-length apply to a text encoder folder", file=sys.stderr)
        return 2
    if not args.file.is_file():
        print(f"error: {args.file} is not a file", file=sys.stderr)
        return 2
    print(f"loading {args.file}")
    model = _load_model(args.file)
    sample: Any
    if args.sample is not None:
        sample = _load_arrays(args.sample)
    elif args.file.suffix == ".pt2":
        sample = _default_sample(model, args.file)
    else:
        print("error: scikit-learn models need --sample FILE.npy with a few input rows", file=sys.stderr)
        return 2
    print(f"converting {type(model).__name__} and checking parity")
    return _export_and_report(export, args, model, sample, {})


def _export_and_report(
    export: Any, args: argparse.Namespace, model: Any, sample: Any, options: dict[str, Any]
) -> int:
    from .errors import ExportError, ParityError
    from .parity import parity_table

    try:
        report = export(
            model,
            sample,
            args.repository,
            args.name,
            version=args.version,
            description=args.description,
            max_batch_size=args.max_batch_size,
            **{k: v for k, v in options.items() if v is not None},
        )
    except ParityError as exc:
        print(
            f"error: {exc.model!r} was not published: the ONNX graph disagrees with the model",
            file=sys.stderr,
        )
        print(parity_table(exc.results), file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.parity_table())
    print(f"published {report.name!r} version {report.version}: {report.model_path.parent}")
    print(f"sha256 {report.model_sha256}")
    print(f"max_batch_size {report.batching.max_batch_size} ({report.batching.chosen_by})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    _require_extras()
    from .demo import build_demo_repository
    from .errors import ExportError

    _quiet_third_party()
    from .demo import DEMO_MODELS, NEEDS_GBM

    names = list(DEMO_MODELS)
    if args.skip_existing:
        present = [n for n in names if (args.directory / n).is_dir()]
        names = [n for n in names if n not in present]
        if present:
            print(f"keeping {len(present)} demo models already in {args.directory}")
    gbm_models = [n for n in names if n in NEEDS_GBM]
    if gbm_models and not all(importlib.util.find_spec(m) for m in ("xgboost", "lightgbm", "onnxmltools")):
        names = [n for n in names if n not in NEEDS_GBM]
        print(f"skipping {', '.join(gbm_models)}: they need the 'gbm' extra (pip install 'medserve[gbm]')")
    print(f"building the demo repository in {args.directory} (seed {args.seed})")
    started = time.perf_counter()
    try:
        reports = build_demo_repository(args.directory, seed=args.seed, models=names)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for r in reports:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items() if k != "n_samples")
        batch = f"batch {r.batching.max_batch_size}"
        print(f"  {r.name:22} v{r.version}  {r.model_sha256[:16]}  {batch:10}  {figures}")
    print(f"{len(reports)} models in {time.perf_counter() - started:.1f} s")
    return 0
