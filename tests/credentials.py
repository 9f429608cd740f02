"""Throwaway credentials for tests: a CA, server and client certificates (openssl CLI), and an
identities file for `--tokens`. A plain module, imported by name."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


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


def write_tokens(path: Path, tokens: dict[str, list[str]], certificates: dict[str, list[str]] | None = None) -> Path:
    """An identities file: one identity per token (named after it; admin when it may use "*"),
    and one per client-certificate subject."""
    identities: list[dict[str, object]] = [
        {"name": token, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "models": models,
         "admin": "*" in models}
        for token, models in tokens.items()
    ]
    identities += [
        {"name": f"cert-{i}", "certificate": subject, "models": models}
        for i, (subject, models) in enumerate((certificates or {}).items())
    ]
    path.write_text(json.dumps({"version": 1, "identities": identities}), encoding="utf-8")
    return path


def make_client_cert(folder: Path, name: str, common_name: str, subject_alt_names: str = "") -> tuple[Path, Path]:
    """Another client certificate signed by `make_certs`'s CA in `folder`: `subject_alt_names` in
    openssl's syntax and order ("email:gw@ward7.local,DNS:gw.ward7.local"); returns (cert, key)."""
    ext = "extendedKeyUsage=clientAuth\n" + (f"subjectAltName={subject_alt_names}\n" if subject_alt_names else "")
    (folder / f"{name}.ext").write_text(ext, encoding="utf-8")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"
