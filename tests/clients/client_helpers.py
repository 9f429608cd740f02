"""Builders shared by the client tests: model repositories with model cards (certificates and
identities files come from `credentials`). Imported as a plain module (no conftest here)."""
from __future__ import annotations

import hashlib
import json
import subprocess
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


def server_cert_for_name(certs_folder: Path, dns_name: str) -> tuple[Path, Path]:
    """A server certificate signed by `credentials.make_certs`'s CA in `certs_folder` that names
    only `dns_name` (as a Kubernetes Service's certificate does): a caller dialling another name
    or address must check this one (`server_name=` / `--server-name`). Returns (cert, key)."""
    stem = "named-server"
    (certs_folder / f"{stem}.ext").write_text(
        f"subjectAltName=DNS:{dns_name}\nextendedKeyUsage=serverAuth\n", encoding="utf-8"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for args in (
        ("req", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={dns_name}"),
        ("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", f"{stem}.pem", "-days", "2", "-extfile", f"{stem}.ext"),
    ):
        subprocess.run(["openssl", *args], cwd=certs_folder, check=True, capture_output=True, timeout=60)
    return certs_folder / f"{stem}.pem", certs_folder / f"{stem}.key"
