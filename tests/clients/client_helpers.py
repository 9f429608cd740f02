"""Builders shared by the client tests: model repositories with model cards (certificates and
identities files come from `credentials`). Imported as a plain module (no conftest here)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx_models

FEATURES = ("mean radius", "mean texture", "age")  # the model's column order
SLOW_LAYERS = 48


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_card(model_path: Path, **fields: object) -> Path:
    """model_card.json next to model.onnx, with the file's true SHA-256 unless given."""
    card = {"model_sha256": sha256_file(model_path), **fields}
    path = model_path.parent / "model_card.json"
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


def tabular(repo: Path, name: str, features: tuple[str, ...] | None, version: int = 1) -> Path:
    """affine (y = 2x + 1, s = row sum) over len(features) columns, with a card naming them."""
    path = onnx_models.affine(repo / name / str(version) / "model.onnx", features=len(features or FEATURES))
    if features is not None:
        write_card(path, feature_names=list(features), class_labels=["benign", "malignant"])
    return path


def slow_queue(repo: Path, name: str) -> Path:
    """A slow model that takes one row per batch and queues at most one request."""
    path = onnx_models.slow(repo / name / "1" / "model.onnx", layers=SLOW_LAYERS)
    onnx_models.write_config(
        repo, name, "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"
    )
    return path


def corrupt(repo: Path, name: str) -> Path:
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an onnx file")
    return path
