"""Builders shared by the client tests: model repositories with model cards, throwaway TLS
certificates (openssl CLI), and a token file. Imported as a plain module (no conftest here)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(folder: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to build test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=medserve test {ca}", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", encoding="utf-8"
    )
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n", encoding="utf-8")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=medserve test {who}",
                 cwd=folder)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=folder)
    return Certs(
        folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
        folder / "client.key", folder / "other-ca.pem",
    )


def write_tokens(path: Path, tokens: dict[str, list[str]]) -> Path:
    path.write_text(json.dumps(tokens), encoding="utf-8")
    return path
