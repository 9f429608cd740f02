"""A real container test of deploy/Dockerfile: build the image with podman and run its default
command the way a cluster would (read-only root filesystem, a tmpfs on /tmp only, numeric
non-root user, no capabilities, the model repository and three Secrets mounted read-only: a TLS
certificate, an identities file and the audit key; a writable audit volume), make inferences over
TLS with a bearer token through the client library (none without one), check the HTTP health
paths and /metrics, verify the keyed audit trail on the volume, then SIGTERM while calls are in
flight and require a clean drain (every call OK or UNAVAILABLE, exit status 0 within the grace
period) and the audit trail to verify against the checkpoint the server logged on stop; mutual
TLS with a certificate identity in a second container; and the image without its Secrets (or
without the audit volume) refusing to serve.

    python3 .ci/container_check.py                 # from the repository root, as root
    python3 .ci/container_check.py --hand-built-model   # skip the demo repository: one tiny ONNX model

Steps, each timed: install podman/runc/debootstrap/openssl (apt-get) and the containers.conf
tweak these machines need; make the base image `localhost/debian-python:bookworm` with
debootstrap unless it exists; build the wheels of `.[server]` on the host with `.venv/bin/pip
wheel`; build the image (`podman --runtime runc build --build-arg BASE=...`); check its user,
command and contents; pick a model repository (`demo-repository/` if present, else
`.venv/bin/medserve demo-repository`, else a hand-built ONNX model); make a throwaway CA, a server
certificate (SAN IP:127.0.0.1, DNS:localhost) and a client certificate with `openssl`; the
identities file (a token identity, and the client certificate's subject) with `medserve tokens
add` and the audit key with `medserve audit keygen` on the host, laid out as Secret volumes;
check that the image refuses plaintext on 0.0.0.0, and refuses to start without its Secrets
(each missing one named) or to serve without the audit volume; run the image's default command
with the Secrets and an audit folder mounted and ports 8001/9090 published on 127.0.0.1; wait
until /v2/health/ready is 200; check PID 1, the user and the read-only filesystem from inside;
the HTTP health paths (model readiness without credentials told to nobody); a call without a
token refused UNAUTHENTICATED; one inference per READY model through `medserve.clients.Client`
over TLS with the token; a /metrics scrape; `medserve audit verify --key` of the trail on the
volume, which holds the calls and never the token; SIGTERM (to the container's PID 1) while
client threads call continuously: every call ends OK or UNAVAILABLE, /v2/health/ready turns 503,
exit status 0 in time, and the trail verifies against the checkpoint (count, head) of the
server's last log line that carries one; then the default command plus `--tls-client-ca`: a
client with a certificate (an identity by its subject, no token) is served, one without is
refused. Any failure exits non-zero and prints the container's log. Only the audit checkpoint is
read from the log's text.

Standard library only: it runs with the machine's python3. It expects `.venv` (with at least the
`server` extra) in the repository root.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE = "localhost/medserve:container-check"
UID = 10001
TLS_MOUNT = "/etc/medserve/tls"  # where the image's command reads tls.crt and tls.key (a kubernetes.io/tls Secret)
IDENTITIES_MOUNT = "/etc/medserve/identities"  # identities.json (--tokens), a Secret
AUDIT_KEY_MOUNT = "/etc/medserve/audit-key"  # audit.key (--audit-key), a Secret
AUDIT_MOUNT = "/var/lib/medserve/audit"  # audit.jsonl (--audit-log), a writable volume
CHECK_IDENTITY = "container-check"  # the token identity the clients call as
CLIENT_SUBJECT = "container-check-client"  # the client certificate's SAN and CN: a certificate identity
# The image's default command runs as is, so the server's own defaults apply.
DRAIN_GRACE_S = 10.0  # --drain-grace-s default
DRAIN_ANNOUNCE_S = 0.5  # --drain-announce-s default
STOP_MARGIN_S = 10.0  # grpc stop, unloading the models, podman's bookkeeping
READY_TIMEOUT_S = 240.0
DRAIN_THREADS = 4  # client threads calling continuously while SIGTERM arrives
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
EXPECTED_CMD = ["--log-format", "json", "serve", "--repository", "/models", "--host", "0.0.0.0", "--port", "8001",
                "--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key",
                "--tokens", f"{IDENTITIES_MOUNT}/identities.json",
                "--audit-log", f"{AUDIT_MOUNT}/audit.jsonl", "--audit-key", f"{AUDIT_KEY_MOUNT}/audit.key",
                "--metrics-port", "9090", "--metrics-host", "0.0.0.0", "--http-port", "off"]
EXPECTED_ENTRYPOINT = ["medserve"]
GRPC_PORT, HTTP_PORT = 8001, 9090  # in the container

# Runs in the host's .venv. argv: MODE TARGET CA ...; the bearer token, if any, in the environment
# (MEDSERVE_CHECK_TOKEN), never in argv.
#   ready [CERT KEY]:  the server answers ServerReady true over TLS
#   infer [CERT KEY]:  one inference per READY model (inputs from metadata)
#   refused:           without a client certificate, a call fails (mutual TLS)
#   unauthenticated:   without a token, an inference is refused UNAUTHENTICATED
#   drain THREADS URL: THREADS clients call continuously (no retries) and a thread polls URL (the
#                      ready path); prints "loaded" once every thread has answers, then on a line
#                      from stdin stops and prints every call (thread, start, end, status) and
#                      every health answer (start, end, status) as JSON (monotonic clock times).
CLIENT = r"""
import json, os, sys, threading, time, urllib.error, urllib.request
import numpy as np
from medserve.clients import Client, RetryPolicy, TLSConfig
from medserve.clients.errors import MedserveClientError
from medserve.protos.wire import numpy_dtype

mode, target, ca = sys.argv[1:4]
rest = sys.argv[4:]
cert = key = None
if mode in ("ready", "infer") and len(rest) == 2:
    cert, key = rest
TLS = TLSConfig(ca_file=ca, cert_file=cert, key_file=key)
TOKEN = os.environ.get("MEDSERVE_CHECK_TOKEN") or None
NO_RETRY = RetryPolicy(max_attempts=1)


def inputs_of(client, name, version=None):
    inputs = {}
    for t in client.model_metadata(name, version=version).inputs:
        shape = tuple(1 if d < 0 else d for d in t.shape)
        inputs[t.name] = (np.full(shape, "x", dtype=object) if t.datatype == "BYTES"
                          else np.zeros(shape, dtype=numpy_dtype(t.datatype)))
    return inputs


def code_of(exc):
    return exc.code.name if getattr(exc, "code", None) is not None else type(exc).__name__


if mode == "ready":
    with Client(target, tls=TLS, token=TOKEN, timeout_s=10.0) as client:
        sys.exit(0 if client.server_ready() else 3)

if mode == "infer":
    with Client(target, tls=TLS, token=TOKEN, timeout_s=10.0) as client:
        models = list(client.repository_index(ready=True))
        assert models, "no model is READY"
        for m in models:
            # each READY version, named (a labelled model serves several; no version = its stable one)
            result = client.infer(m.name, inputs_of(client, m.name, m.version), version=m.version,
                                  request_id="container-check")
            assert result.model_version == m.version and result.request_id == "container-check", result
            assert len(result.model_sha256) == 64 and len(result) > 0, result
            print(f"    {m.name} v{m.version}: {', '.join(f'{k} {v.shape}' for k, v in result.items())}")
        how = "a client certificate (its subject's identity)" if cert else "a bearer token" if TOKEN else "nothing"
        print(f"    {len(models)} model(s) answered over TLS to {how}")
    sys.exit(0)

if mode == "unauthenticated":
    name = rest[0]
    with Client(target, tls=TLS, token=TOKEN, timeout_s=10.0) as client:
        inputs = inputs_of(client, name)
    with Client(target, tls=TLS, timeout_s=10.0, retries=NO_RETRY) as client:
        try:
            client.infer(name, inputs, request_id="container-check-anonymous")
        except MedserveClientError as exc:
            print(f"    without a token: {code_of(exc)}")
            sys.exit(0 if code_of(exc) == "UNAUTHENTICATED" else 1)
    print("    without a token the server answered: identities are not enforced")
    sys.exit(1)

if mode == "refused":
    with Client(target, tls=TLS, timeout_s=5.0, retries=NO_RETRY) as client:
        try:
            client.server_ready()
        except MedserveClientError as exc:
            print(f"    without a client certificate: {code_of(exc)} (refused)")
            sys.exit(0)
    print("    without a client certificate the server answered: mutual TLS is not enforced")
    sys.exit(1)

assert mode == "drain", mode
threads_n, health_url = int(rest[0]), rest[1]
with Client(target, tls=TLS, token=TOKEN, timeout_s=10.0) as client:
    work = [(m.name, inputs_of(client, m.name)) for m in client.repository_index(ready=True)]
assert work, "no model is READY"
calls, health = [], []
stop = threading.Event()


def caller(i):
    with Client(target, tls=TLS, token=TOKEN, timeout_s=10.0, retries=NO_RETRY) as client:
        k = i
        while not stop.is_set():
            name, inputs = work[k % len(work)]
            k += 1
            started = time.monotonic()
            message = ""
            try:
                client.infer(name, inputs)
                code = "OK"
            except MedserveClientError as exc:
                code = code_of(exc)
                message = "" if code == "UNAVAILABLE" else f"{name}: {exc}"[:200]
            calls.append((i, started, time.monotonic(), code, message))
            if code != "OK":
                time.sleep(0.02)  # the server is going away: do not spin


def poller():
    while not stop.is_set():
        started = time.monotonic()
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0  # refused or reset: the endpoint is gone
        health.append((started, time.monotonic(), status))
        time.sleep(0.05)


threads = [threading.Thread(target=caller, args=(i,)) for i in range(threads_n)] + [threading.Thread(target=poller)]
for th in threads:
    th.start()
deadline = time.monotonic() + 60
while True:
    done = list(calls)
    if all(sum(1 for c in done if c[0] == i and c[3] == "OK") >= 20 for i in range(threads_n)):
        print("loaded", flush=True)
        break
    if time.monotonic() > deadline:
        print(f"no load: {len(done)} calls, {sorted(set(c[3] for c in done))}", flush=True)
        stop.set()
        sys.exit(1)
    time.sleep(0.05)
sys.stdin.readline()
stop.set()
for th in threads:
    th.join(30)
print(json.dumps({"calls": calls, "health": health}), flush=True)
"""


class CheckFailed(Exception):
    pass


_timings: list[tuple[str, float]] = []


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    print(f"[container-check] {name} ...", flush=True)
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        _timings.append((name, elapsed))
        print(f"[container-check] {name}: {elapsed:.1f} s", flush=True)


def run(cmd: Sequence[str | Path], *, timeout: float = 600, check: bool = True, capture: bool = False,
        stdin: Any = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(argv, text=True, timeout=timeout, stdin=stdin, env=env,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None)
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        detail = f"\n{proc.stdout or ''}{proc.stderr or ''}" if capture else ""
        raise CheckFailed(f"exit status {proc.returncode}: {' '.join(argv)}{detail}")
    return proc


def podman(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    # crun refuses these machines' hybrid cgroups; runc works.
    return run(["podman", "--runtime", "runc", *args], **kwargs)


# -- 1. tools --------------------------------------------------------------------------------------

def install_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap", "openssl") if shutil.which(tool) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise CheckFailed(f"{', '.join(missing)} missing and no apt-get to install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture=True)
    # The sandbox may not raise rlimits: podman's default ulimits must be off.
    text = CONTAINERS_CONF.read_text(encoding="utf-8") if CONTAINERS_CONF.exists() else ""
    if "default_ulimits" not in text:
        if re.search(r"^\[containers\]\s*$", text, flags=re.MULTILINE):
            text = re.sub(r"^\[containers\]\s*$", "[containers]\ndefault_ulimits = []", text, count=1,
                          flags=re.MULTILINE)
        else:
            text = text + ("\n" if text and not text.endswith("\n") else "") + "[containers]\ndefault_ulimits = []\n"
        CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF.write_text(text, encoding="utf-8")
    print("    " + run(["podman", "--version"], capture=True).stdout.strip() + "; "
          + run(["openssl", "version"], capture=True).stdout.strip())


# -- 2. base image ---------------------------------------------------------------------------------

def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 .sources or one-line lists), for debootstrap."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, flags=re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, flags=re.MULTILINE)
            if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                return uris.group(1)
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(name: str, rebuild: bool) -> None:
    exists = podman("image", "exists", name, check=False, capture=True).returncode == 0
    if exists and not rebuild:
        print(f"    {name} exists")
        return
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="medserve-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(f"    debootstrap bookworm from {mirror}")
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", rootfs, mirror],
            capture=True, timeout=1200)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            podman("import", "-", name, stdin=tar.stdout, capture=True)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                raise CheckFailed("tar of the debootstrap root failed")


# -- 3. wheels and image ---------------------------------------------------------------------------

def build_wheels(context: Path) -> None:
    if not (VENV / "bin" / "pip").exists():
        raise CheckFailed(f"{VENV}/bin/pip missing: create the .venv first (README, 'The two commands')")
    wheels = context / "wheels"
    wheels.mkdir(parents=True)
    run([VENV / "bin" / "pip", "wheel", "--quiet", "--disable-pip-version-check", "--wheel-dir", wheels,
         f"{ROOT}[server]"], timeout=1800)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    print(f"    {len(names)} wheels, {total / 2**20:.0f} MiB: {', '.join(n.split('-')[0] for n in names)}")
    shutil.copy(ROOT / "deploy" / ".dockerignore", context / ".dockerignore")


def _extras() -> dict[str, list[str]]:
    extras: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["optional-dependencies"]
    return extras


def server_requirements() -> set[str]:
    return {_dist(r) for r in _extras().get("server", [])}


def other_extras() -> set[str]:
    """Distribution names of every extra except `server`: none may be in the image, unless the
    server extra itself depends on it (DEPENDENCIES), and never one of FORBIDDEN."""
    return {_dist(r) for name, reqs in _extras().items() if name != "server" for r in reqs} - server_requirements()


# The export, perf and test packages that must never be in the server image, whoever depends on them
# (the distributions of the modules deploy/Dockerfile's build stage refuses).
FORBIDDEN = {"torch", "scikit-learn", "skl2onnx", "onnx", "matplotlib", "hdrhistogram", "hpack", "pytest"}

# Runs in the image: the installed distributions and the dependency closure of medserve[server].
DEPENDENCIES = (ROOT / ".ci" / "closure.py").read_text(encoding="utf-8")


def _dist(requirement: str) -> str:
    return re.split(r"[\[=<>!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def image_id(image: str) -> str | None:
    out = podman("image", "inspect", "--format", "{{.Id}}", image, check=False, capture=True)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def build_image(context: Path, base: str, image: str) -> None:
    # No layer cache: the wheel of medserve is new on every run, so every layer after it would be
    # rebuilt anyway, and cached stages of earlier runs would pile up (about 1 GB a run).
    previous = image_id(image)
    podman("build", "--layers=false", "--force-rm", "--build-arg", f"BASE={base}", "--file", DOCKERFILE,
           "--tag", image, context, timeout=1800)
    if previous is not None and previous != image_id(image):
        podman("rmi", previous, check=False, capture=True)  # the earlier run's image, now untagged


def check_image(image: str) -> None:
    info = json.loads(podman("image", "inspect", image, capture=True).stdout)[0]
    config = info.get("Config", {})
    user = str(config.get("User", ""))
    if user.split(":")[0] != str(UID):
        raise CheckFailed(f"image user is {user!r}, expected {UID}")
    if config.get("Entrypoint") != EXPECTED_ENTRYPOINT or config.get("Cmd") != EXPECTED_CMD:
        raise CheckFailed(f"image command is {config.get('Entrypoint')} {config.get('Cmd')}, "
                          f"expected {EXPECTED_ENTRYPOINT} {EXPECTED_CMD}")
    listing = json.loads(podman("run", "--rm", "--network", "none", "--entrypoint", "/opt/medserve/bin/python",
                                image, "-c", DEPENDENCIES, "server", capture=True).stdout)
    installed = {_dist(name) for name in listing["installed"]}
    closure = {_dist(name) for name in listing["closure"]}
    others = other_extras()
    heavy = sorted(installed & FORBIDDEN)
    if heavy:
        raise CheckFailed(f"the image holds export, perf or test packages: {heavy}")
    stray = sorted((installed & others) - closure)
    if stray:
        raise CheckFailed(f"the image holds packages of other extras than [server]: {stray}")
    for tool in ("pip", "setuptools"):
        if tool in installed:
            raise CheckFailed(f"the image's venv still holds {tool}")
    pulled = sorted((installed & others) - server_requirements())
    size = info.get("Size", 0)
    print(f"    user {user}, entrypoint {config['Entrypoint']}, cmd {config['Cmd']}")
    print(f"    {len(installed)} distributions, none of another extra"
          + (f" except what [server] itself depends on ({', '.join(pulled)})" if pulled else "")
          + f"; image {size / 2**20:.0f} MiB")


# -- 4. model repository ---------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def hand_built_onnx() -> bytes:
    """An ONNX model without the onnx package, encoded field by field (onnx.proto3 numbers):
    y = x + 1, FP32 [N, 4] -> [N, 4], opset 17, IR version 8."""
    def value_info(name: str) -> bytes:
        dims = _field(1, _field(2, "N")) + _field(1, _field(1, 4))  # Dimension: dim_param / dim_value
        tensor_type = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor_type))  # name, TypeProto.tensor_type

    one = _field(2, 1) + _field(8, "one") + _field(9, struct.pack("<f", 1.0))  # data_type, name, raw_data
    node = _field(1, "x") + _field(1, "one") + _field(2, "y") + _field(3, "add") + _field(4, "Add")
    graph = (_field(1, node) + _field(2, "plus_one") + _field(5, one)
             + _field(11, value_info("x")) + _field(12, value_info("y")))
    opset = _field(1, "") + _field(2, 17)
    return _field(1, 8) + _field(2, "medserve-container-check") + _field(7, graph) + _field(8, opset)


def model_repository(requested: Path | None, hand_built: bool, scratch: Path) -> Path:
    if requested is not None:
        if not requested.is_dir():
            raise CheckFailed(f"--repository {requested}: not a folder")
        return requested.resolve()
    demo = ROOT / "demo-repository"
    if not hand_built:
        if not (demo.is_dir() and any(demo.glob("*/*/model.onnx"))):
            medserve = VENV / "bin" / "medserve"
            proc = run([medserve, "demo-repository", demo, "--skip-existing"], check=False, timeout=1200)
            if proc.returncode != 0:
                print(f"    `medserve demo-repository` failed ({proc.returncode}; the export extra may be "
                      "missing): using a hand-built model")
        if demo.is_dir() and any(demo.glob("*/*/model.onnx")):
            return demo
    repo = scratch / "models"
    (repo / "plus_one" / "1").mkdir(parents=True)
    (repo / "plus_one" / "1" / "model.onnx").write_bytes(hand_built_onnx())
    return repo


def make_readable(repo: Path) -> None:
    """The container runs as UID 10001: every file must be world-readable, every folder searchable."""
    for path in [repo, *repo.rglob("*")]:
        mode = path.stat().st_mode
        wanted = mode | (0o555 if path.is_dir() else 0o444)
        if wanted != mode:
            path.chmod(wanted)


# -- 5. certificates -------------------------------------------------------------------------------

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = medserve container-check
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:container-check-client
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Certificates:
    tls_dir: Path  # mounted at TLS_MOUNT: tls.crt, tls.key, ca.crt (a kubernetes.io/tls Secret's keys)
    ca: Path  # the CA certificate, for the clients
    client_cert: Path
    client_key: Path


def make_certificates(root: Path) -> Certificates:
    """A throwaway CA (P-256, 2 days), a server certificate for 127.0.0.1 and localhost, and a
    client certificate, with the openssl CLI. The server's files are laid out and protected as a
    Kubernetes Secret volume with defaultMode 0440 and fsGroup 10001 would be."""
    work, tls, client = root / "ca", root / "tls", root / "client"
    for folder in (work, client):
        folder.mkdir(mode=0o700, parents=True)
    tls.mkdir(mode=0o750)
    config = work / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG, encoding="utf-8")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str | Path) -> None:
        run(["openssl", *args], capture=True, timeout=60)

    openssl("req", "-x509", "-config", config, "-extensions", "ca", *key, "-keyout", work / "ca.key",
            "-out", work / "ca.crt", "-days", "2", "-subj", "/CN=medserve container-check CA")
    for name, section, subject, folder in (("tls", "server", "/CN=localhost", tls),
                                           ("client", "client", "/CN=container-check-client", client)):
        openssl("req", "-new", "-config", config, *key, "-keyout", folder / f"{name}.key",
                "-out", work / f"{name}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", work / f"{name}.csr", "-CA", work / "ca.crt", "-CAkey", work / "ca.key",
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
                "-extfile", config, "-extensions", section, "-out", folder / f"{name}.crt")
    shutil.copy(work / "ca.crt", tls / "ca.crt")
    os.chown(tls, 0, UID)
    for path in tls.iterdir():
        os.chown(path, 0, UID)
        path.chmod(0o440)
    text = run(["openssl", "x509", "-in", tls / "tls.crt", "-noout", "-ext", "subjectAltName"],
               capture=True).stdout
    sans = text.strip().splitlines()[-1].strip() if text.strip() else "?"
    print(f"    CA, server ({sans}) and client certificates; {tls}: {', '.join(sorted(p.name for p in tls.iterdir()))}"
          f" (root:{UID}, 0440)")
    return Certificates(tls, work / "ca.crt", client / "client.crt", client / "client.key")


# -- 5b. the identities and the audit key ----------------------------------------------------------

@dataclass(frozen=True)
class Secrets:
    identities_dir: Path  # mounted at IDENTITIES_MOUNT: identities.json (a Secret's key)
    audit_key_dir: Path  # mounted at AUDIT_KEY_MOUNT: audit.key
    key_file: Path  # the verifier's copy of the audit key (on the host, root only)
    token: str  # the bearer token of CHECK_IDENTITY
    audit_root: Path  # one writable audit folder per container under here

    def client_env(self, token: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MEDSERVE_CHECK_TOKEN"}
        return {**env, "MEDSERVE_CHECK_TOKEN": self.token} if token else env


def _as_secret_volume(folder: Path) -> None:
    """Lay a folder out as a Kubernetes Secret volume with defaultMode 0440 and fsGroup 10001:
    root-owned, readable by the server's group, nobody else."""
    os.chown(folder, 0, UID)
    folder.chmod(0o750)
    for path in folder.iterdir():
        os.chown(path, 0, UID)
        path.chmod(0o440)


def make_secrets(root: Path) -> Secrets:
    """The identities file (a token identity for the clients, and the client certificate's
    subject for the mutual-TLS container) with `medserve tokens add`, and the audit key with
    `medserve audit keygen`, run on the host as an operator would."""
    medserve = VENV / "bin" / "medserve"
    identities, key_dir, verifier = root / "identities", root / "audit-key", root / "verifier"
    for folder in (identities, key_dir, verifier):
        folder.mkdir(mode=0o700, parents=True)
    ids = identities / "identities.json"
    token = run([medserve, "tokens", "add", CHECK_IDENTITY, "--models", "*", "--file", ids],
                capture=True, timeout=60).stdout.strip()
    if not token or len(token.split()) != 1:
        raise CheckFailed("`medserve tokens add` printed no token")
    run([medserve, "tokens", "add", CLIENT_SUBJECT, "--certificate", CLIENT_SUBJECT, "--models", "*", "--file", ids],
        capture=True, timeout=60)
    run([medserve, "audit", "keygen", key_dir / "audit.key"], capture=True, timeout=60)
    shutil.copy(key_dir / "audit.key", verifier / "audit.key")
    for folder in (identities, key_dir):
        _as_secret_volume(folder)
    audit_root = root / "audit"
    audit_root.mkdir(mode=0o700)
    print(f"    {ids.name}: identities {CHECK_IDENTITY!r} (token) and {CLIENT_SUBJECT!r} (certificate subject); "
          f"audit.key; both laid out as Secret volumes (root:{UID}, 0440)")
    return Secrets(identities, key_dir, verifier / "audit.key", token, audit_root)


def audit_folder(secrets: Secrets, name: str) -> Path:
    """A fresh audit volume for one container: owned by the server's user, as a volume with
    fsGroup (or the image's own folder, for a fresh named volume) would be."""
    folder = secrets.audit_root / name
    folder.mkdir(mode=0o700)
    os.chown(folder, UID, UID)
    return folder


# -- 6. the container ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def container_state(name: str) -> dict[str, Any]:
    out = podman("inspect", "--format", "{{json .State}}", name, capture=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}


def http_status(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class Server:
    name: str
    port: int  # gRPC over TLS, published on 127.0.0.1
    http_port: int  # /metrics and /v2/health/*, published on 127.0.0.1
    audit_dir: Path | None = None  # the host folder mounted at AUDIT_MOUNT

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"


HARDENING = ("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m,mode=1777",
             "--user", f"{UID}:{UID}", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def secret_volumes(certs: Certificates | None, secrets: Secrets | None, *, identities: bool = True,
                   audit_key: bool = True) -> list[str]:
    """--volume options for the Secrets (each read-only), as a pod mounts them."""
    out = ["--volume", f"{certs.tls_dir}:{TLS_MOUNT}:ro"] if certs else []
    if secrets and identities:
        out += ["--volume", f"{secrets.identities_dir}:{IDENTITIES_MOUNT}:ro"]
    if secrets and audit_key:
        out += ["--volume", f"{secrets.audit_key_dir}:{AUDIT_KEY_MOUNT}:ro"]
    return out


def start_container(name: str, image: str, repo: Path, certs: Certificates, secrets: Secrets,
                    command: Sequence[str] = (), *, audit_volume: bool = True) -> Server:
    """Run the image the way the Deployment does; `command` empty = the image's default command."""
    server = Server(name, free_port(), free_port(), audit_folder(secrets, name) if audit_volume else None)
    while server.http_port == server.port:
        server.http_port = free_port()
    audit = ["--volume", f"{server.audit_dir}:{AUDIT_MOUNT}:rw"] if server.audit_dir else []
    podman(
        "run", "--detach", "--name", name,
        "--publish", f"127.0.0.1:{server.port}:{GRPC_PORT}", "--publish", f"127.0.0.1:{server.http_port}:{HTTP_PORT}",
        *HARDENING, "--volume", f"{repo}:/models:ro", *secret_volumes(certs, secrets), *audit,
        image, *command,
        capture=True,
    )
    return server


def wait_ready(server: Server, certs: Certificates, secrets: Secrets, client_cert: bool = False) -> None:
    """Until /v2/health/ready answers 200 (it answers 503 while the models load), then ServerReady
    over TLS."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    seen: list[int] = []
    while time.monotonic() < deadline:
        state = container_state(server.name)
        if not state.get("Running"):
            raise CheckFailed(f"the container stopped before it was ready: {state.get('Status')} "
                              f"(exit {state.get('ExitCode')})")
        status, _ = http_status(server.url("/v2/health/ready"), timeout=2)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200:
            break
        if status not in (0, 503):
            raise CheckFailed(f"/v2/health/ready answered {status} while starting")
        time.sleep(0.2)
    else:
        raise CheckFailed(f"/v2/health/ready not 200 within {READY_TIMEOUT_S:.0f} s (answers: {seen})")
    extra = [str(certs.client_cert), str(certs.client_key)] if client_cert else []
    run([PYTHON, "-c", CLIENT, "ready", server.target, certs.ca, *extra], capture=True, timeout=60,
        env=secrets.client_env(token=not client_cert))
    print(f"    /v2/health/ready answers: {' -> '.join('no answer' if s == 0 else str(s) for s in seen)}; "
          f"ServerReady over TLS: true")


def check_plaintext_refused(image: str) -> None:
    """The image's server refuses a non-loopback address without TLS (no --allow-plaintext)."""
    proc = podman("run", "--rm", "--network", "none", "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
                  image, "serve", "--repository", "/models", "--host", "0.0.0.0", "--port", str(GRPC_PORT),
                  capture=True, check=False, timeout=120)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 2 or "--allow-plaintext" not in text:
        raise CheckFailed(f"`serve --host 0.0.0.0` without TLS was not refused (exit {proc.returncode}): {text[-400:]}")
    print(f"    exit 2: {text.splitlines()[-1][:160]}")


def check_refused_without_secrets(image: str, repo: Path, certs: Certificates, secrets: Secrets) -> None:
    """Secure by default: the image's default command without one of its Secrets refuses to
    start, naming the missing file (exit 2); without the audit volume (a read-only root) it never
    serves. Nothing here needs the network."""
    cases = [
        ("no Secrets at all", secret_volumes(None, None), "/etc/medserve/"),
        ("no identities", secret_volumes(certs, secrets, identities=False), f"--tokens {IDENTITIES_MOUNT}/"),
        ("no audit key", secret_volumes(certs, secrets, audit_key=False), f"--audit-key {AUDIT_KEY_MOUNT}/"),
    ]
    for what, volumes, named in cases:
        proc = podman("run", "--rm", "--network", "none", *HARDENING, "--volume", f"{repo}:/models:ro", *volumes,
                      image, capture=True, check=False, timeout=120)
        text = (proc.stdout + proc.stderr).strip()
        lines = [line for line in text.splitlines() if named in line]
        if proc.returncode == 0 or not lines:
            raise CheckFailed(f"the image's command with {what} did not refuse to start naming {named!r} "
                              f"(exit {proc.returncode}): {text[-600:]}")
        if "Traceback" in text:
            raise CheckFailed(f"the image's command with {what} refused with a traceback: {text[-600:]}")
        print(f"    {what}: exit {proc.returncode}: {lines[-1][:200]}")


def check_no_audit_volume(image: str, repo: Path, certs: Certificates, secrets: Secrets, name: str,
                          launched: list[str], wait_s: float = 20.0) -> None:
    """Every Secret but no audit volume: the audit folder is on the read-only root, so the
    server must not serve: it exits non-zero, or stays not ready (503) while it runs."""
    launched.append(name)
    try:
        server = start_container(name, image, repo, certs, secrets, audit_volume=False)
        deadline = time.monotonic() + wait_s
        seen: list[int] = []
        while time.monotonic() < deadline:
            state = container_state(name)
            if not state.get("Running"):
                code = state.get("ExitCode")
                logs = podman("logs", name, capture=True, check=False)
                tail = [line for line in (logs.stdout + logs.stderr).splitlines() if line.strip()][-1:]
                if code == 0:
                    raise CheckFailed(f"without the audit volume the server exited 0: {tail}")
                print(f"    no audit volume: exit {code}: {tail[0][:200] if tail else ''}")
                return
            status, _ = http_status(server.url("/v2/health/ready"), timeout=2)
            if status == 200:
                raise CheckFailed("without the audit volume (read-only root) /v2/health/ready answered 200: "
                                  "the server serves calls it cannot record")
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.5)
        print(f"    no audit volume: still not ready after {wait_s:.0f} s (/v2/health/ready: "
              f"{' -> '.join('no answer' if s == 0 else str(s) for s in seen)})")
    finally:
        podman("rm", "--force", "--ignore", name, capture=True, check=False)
        launched.remove(name)


def check_inside(name: str) -> None:
    """PID 1 is the server with TLS, identities and the audit trail, running as UID 10001; the
    Secrets are read-only; only /tmp and the audit volume are writable."""
    cmdline = podman("exec", name, "cat", "/proc/1/cmdline", capture=True).stdout.split("\0")
    if not any(arg.endswith("medserve") for arg in cmdline) or "serve" not in cmdline:
        raise CheckFailed(f"PID 1 is not the server: {' '.join(cmdline)}")
    if "--tls-cert" not in cmdline or "--allow-plaintext" in cmdline:
        raise CheckFailed(f"PID 1 does not serve TLS: {' '.join(cmdline)}")
    if not {"--tokens", "--audit-log", "--audit-key"} <= set(cmdline):
        raise CheckFailed(f"PID 1 runs without identities or the keyed audit trail: {' '.join(cmdline)}")
    status = podman("exec", name, "cat", "/proc/1/status", capture=True).stdout
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, flags=re.MULTILINE)
    if uids is None or {uids.group(1), uids.group(2)} != {str(UID)}:
        raise CheckFailed(f"PID 1 does not run as {UID}: {uids.group(0) if uids else status!r}")
    caps = re.search(r"^CapEff:\s+([0-9a-f]+)", status, flags=re.MULTILINE)
    if caps is None or int(caps.group(1), 16) != 0:
        raise CheckFailed(f"PID 1 has effective capabilities: {caps.group(0) if caps else '?'}")
    for path in ("/opt/medserve/probe", "/models/probe", f"{TLS_MOUNT}/probe", f"{IDENTITIES_MOUNT}/probe",
                 f"{AUDIT_KEY_MOUNT}/probe", "/probe"):
        if podman("exec", name, "touch", path, check=False, capture=True).returncode == 0:
            raise CheckFailed(f"{path} was writable: the root filesystem or a mount is not read-only")
    podman("exec", name, "touch", "/tmp/probe", capture=True)
    print(f"    PID 1: {' '.join(a for a in cmdline if a)}; UID {UID}; no capabilities; only /tmp and the audit "
          "volume writable")


def check_health(server: Server, models: list[str]) -> None:
    """The open HTTP paths the probes use, from the host; a model's readiness needs credentials
    (identities are on), so without them a model that is there and one that is not answer alike."""
    expected = {"/v2/health/live": 200, "/v2/health/ready": 200, "/v2/models/no-such-model/ready": 401}
    if models:
        expected[f"/v2/models/{models[0]}/ready"] = 401
    answers = {path: http_status(server.url(path)) for path in expected}
    wrong = {path: status for path, (status, _) in answers.items() if status != expected[path]}
    if wrong:
        raise CheckFailed(f"health paths answered {wrong}, expected {expected}")
    if models and answers[f"/v2/models/{models[0]}/ready"] != answers["/v2/models/no-such-model/ready"]:
        raise CheckFailed("without credentials, a model's readiness answers differ from a missing model's")
    live = json.loads(answers["/v2/health/live"][1] or b"{}")
    print("    " + "; ".join(f"{path} {status}" for path, (status, _) in answers.items()) + f" {live}")


def check_unauthenticated(server: Server, certs: Certificates, secrets: Secrets, model: str) -> None:
    run([PYTHON, "-c", CLIENT, "unauthenticated", server.target, certs.ca, model], timeout=60,
        env=secrets.client_env())


_CHECKPOINT = re.compile(r"count\W{1,4}(\d+)\b.*?head\W{1,4}([0-9a-f]{64})")


def last_checkpoint(name: str) -> tuple[int, str] | None:
    """The (count, head) of the server's last log line that carries an audit checkpoint: what a
    log pipeline would have carried off the host."""
    logs = podman("logs", name, capture=True, check=False)
    found = None
    for line in (logs.stdout + logs.stderr).splitlines():
        if "checkpoint" in line:
            m = _CHECKPOINT.search(line)
            if m:
                found = (int(m.group(1)), m.group(2))
    return found


def check_audit(server: Server, secrets: Secrets, *, min_records: int,
                checkpoint: tuple[int, str] | None = None) -> None:
    """`medserve audit verify --key` (on the host, with the verifier's copy of the key) of the
    trail on the container's audit volume; it holds the check's calls (identity and request id),
    and neither it nor the server's log holds the token."""
    assert server.audit_dir is not None
    trail = server.audit_dir / "audit.jsonl"
    if not trail.is_file():
        found = sorted(p.name for p in server.audit_dir.iterdir())
        raise CheckFailed(f"no {AUDIT_MOUNT}/audit.jsonl on the audit volume (it holds {found})")
    cmd: list[str | Path] = [VENV / "bin" / "medserve", "audit", "verify", trail, "--key", secrets.key_file]
    if checkpoint is not None:
        cmd += ["--expect-count", str(checkpoint[0]), "--expect-head", checkpoint[1]]
    proc = run(cmd, capture=True, check=False, timeout=120)
    message = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise CheckFailed(f"`medserve audit verify` of the container's trail failed (exit {proc.returncode}): "
                          f"{message[-600:]}")
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(server.audit_dir.iterdir())
                   if p.is_file())
    records = [line for line in text.splitlines() if line.strip()]
    if len(records) < min_records:
        raise CheckFailed(f"the audit trail holds {len(records)} records, expected at least {min_records}")
    if f'"{CHECK_IDENTITY}"' not in text or '"container-check"' not in text:
        raise CheckFailed(f"the audit trail does not name the identity {CHECK_IDENTITY!r} and the request id")
    if secrets.token in text:
        raise CheckFailed("the bearer token is in the audit trail")
    logs = podman("logs", server.name, capture=True, check=False)
    if secrets.token in logs.stdout + logs.stderr:
        raise CheckFailed("the bearer token is in the server's log")
    against = f" against the logged checkpoint (count {checkpoint[0]})" if checkpoint else ""
    print(f"    {trail.name}: {len(records)} records, verified with the key{against}: "
          f"{message.splitlines()[-1][:160] if message else ''}")


def scrape_metrics(server: Server) -> None:
    status, body = http_status(server.url("/metrics"), timeout=10)
    text = body.decode("utf-8", "replace")
    if status != 200 or "medserve_requests" not in text:
        raise CheckFailed(f"/metrics answered {status} without medserve_requests")
    print(f"    /metrics: {len(text.splitlines())} lines")


def send_sigterm(name: str) -> tuple[float, float]:
    """SIGTERM to the container's PID 1 (what `podman kill --signal TERM` does), timed closely:
    the monotonic times just before and just after the signal was sent."""
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", name, capture=True).stdout.strip() or 0)
    before = time.monotonic()
    if pid > 0:
        os.kill(pid, signal.SIGTERM)
    else:
        podman("kill", "--signal", "TERM", name, capture=True)
    return before, time.monotonic()


STOP_LIMIT_S = DRAIN_ANNOUNCE_S + DRAIN_GRACE_S + STOP_MARGIN_S


def wait_stopped(name: str, sent: float) -> tuple[str, float]:
    """Wait for the container to exit after SIGTERM: (exit status, seconds since `sent`)."""
    proc = podman("wait", name, capture=True, check=False, timeout=STOP_LIMIT_S + 30)
    elapsed = time.monotonic() - sent
    code = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"
    print(f"    exit status {code} after {elapsed:.1f} s (announce {DRAIN_ANNOUNCE_S} s + drain grace "
          f"{DRAIN_GRACE_S:.0f} s + {STOP_MARGIN_S:.0f} s allowed)")
    return code, elapsed


def require_clean_exit(code: str, elapsed: float) -> None:
    if code != "0":
        raise CheckFailed(f"the server exited with status {code} after SIGTERM, expected 0")
    if elapsed > STOP_LIMIT_S:
        raise CheckFailed(f"the server took {elapsed:.1f} s to stop, more than {STOP_LIMIT_S:.0f} s")


def drain_under_load(server: Server, certs: Certificates, secrets: Secrets) -> None:
    """SIGTERM while DRAIN_THREADS clients call continuously (no retries): every call ends OK or
    UNAVAILABLE (none CANCELLED, none other), calls are in flight when the signal arrives, the
    ready path turns 503, and the server exits 0 in time."""
    driver = subprocess.Popen(
        [str(PYTHON), "-c", CLIENT, "drain", server.target, str(certs.ca), str(DRAIN_THREADS),
         server.url("/v2/health/ready")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=secrets.client_env())
    assert driver.stdin is not None and driver.stdout is not None
    watchdog = threading.Timer(300, driver.kill)
    watchdog.start()
    try:
        line = driver.stdout.readline().strip()
        if line != "loaded":
            raise CheckFailed(f"the client threads did not get going: {line or f'exit {driver.wait()}'}")
        sent, delivered = send_sigterm(server.name)
        code, elapsed = wait_stopped(server.name, sent)
        driver.stdin.write("stop\n")
        driver.stdin.flush()
        out = driver.stdout.read()
        if driver.wait(60) != 0 or not out.strip():
            raise CheckFailed(f"the client threads failed (exit {driver.returncode})")
    finally:
        watchdog.cancel()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    data = json.loads(out)
    calls = [(int(i), float(a), float(b), str(status)) for i, a, b, status, _ in data["calls"]]
    odd = [f"{status} {a - sent:+.3f}..{b - sent:+.3f} s: {message}"
           for _, a, b, status, message in data["calls"] if status not in ("OK", "UNAVAILABLE")]
    health = [(float(a), float(b), int(s)) for a, b, s in data["health"]]
    codes = Counter(status for *_, status in calls)
    in_flight = Counter(status for _, a, b, status in calls if a < sent and b > delivered)
    after = Counter(status for _, a, b, status in calls if b > delivered)
    calling_before = {i for i, a, b, _ in calls if b > sent - 1.0 and a < sent}
    calling_after = {i for i, a, _, _ in calls if a > delivered}
    ready_before = Counter(s for _, b, s in health if b < sent)
    ready_after = Counter(s for a, _, s in health if a > delivered)
    print(f"    {len(calls)} calls from {DRAIN_THREADS} threads: {dict(codes)}; in flight at SIGTERM: "
          f"{dict(in_flight)}; ended after SIGTERM: {dict(after)}")
    print(f"    /v2/health/ready before SIGTERM {dict(ready_before)}, after {dict(ready_after)} "
          "(0 = no answer: the server is gone)")
    require_clean_exit(code, elapsed)
    other = {status: n for status, n in codes.items() if status not in ("OK", "UNAVAILABLE")}
    if other:
        raise CheckFailed(f"calls ended other than OK or UNAVAILABLE during the drain: {other}"
                          + (" (CANCELLED: accepted calls were dropped)" if "CANCELLED" in other else "")
                          + f"; each one's start..end relative to SIGTERM: {'; '.join(odd[:10])}; the server "
                          f"exited {elapsed:.3f} s after SIGTERM")
    if len(calling_before) < DRAIN_THREADS or len(calling_after) < DRAIN_THREADS:
        raise CheckFailed(f"not every thread called through the signal: before {sorted(calling_before)}, "
                          f"after {sorted(calling_after)}")
    if not in_flight:
        raise CheckFailed("no call was in flight when SIGTERM was sent")
    if not codes["UNAVAILABLE"]:
        raise CheckFailed("no call was refused UNAVAILABLE: the server did not drain before it exited")
    if set(ready_before) != {200}:
        raise CheckFailed(f"/v2/health/ready was not 200 throughout before SIGTERM: {dict(ready_before)}")
    if not ready_after.get(503):
        raise CheckFailed(f"/v2/health/ready never answered 503 during the drain: {dict(ready_after)}")


def repeat_drains(count: int, image: str, repo: Path, certs: Certificates, secrets: Secrets, name: str,
                  launched: list[str]) -> None:
    failures = []
    for i in range(count):
        container = f"{name}-drain-{i}"
        launched.append(container)
        try:
            server = start_container(container, image, repo, certs, secrets)
            wait_ready(server, certs, secrets)
            drain_under_load(server, certs, secrets)
        except CheckFailed as exc:
            failures.append(f"drain {i + 1}: {exc}")
            print(f"    drain {i + 1} of {count} FAILED: {exc}")
        finally:
            podman("rm", "--force", "--ignore", container, capture=True, check=False)
            launched.remove(container)
    if failures:
        raise CheckFailed(f"{len(failures)} of {count} drains failed; first: {failures[0]}")
    print(f"    {count} of {count} drains: every call OK or UNAVAILABLE")


def summarize_log(name: str) -> None:
    """The log is JSON lines (--log-format json): count them. Informational only: nothing here
    depends on the log's words."""
    logs = podman("logs", name, capture=True, check=False)
    lines = [line for line in (logs.stdout + logs.stderr).splitlines() if line.strip()]
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    levels = Counter(str(r.get("level", "?")) for r in records)
    last = str(records[-1].get("message", ""))[:80] if records else ""
    print(f"    log: {len(records)} JSON lines {dict(levels)}, {len(lines) - len(records)} other; last: {last!r}")


def check_mutual_tls(server: Server, certs: Certificates, secrets: Secrets) -> None:
    """With a client certificate and no token: the identity of its subject; without one: refused."""
    run([PYTHON, "-c", CLIENT, "infer", server.target, certs.ca, certs.client_cert, certs.client_key], timeout=120,
        env=secrets.client_env(token=False))
    run([PYTHON, "-c", CLIENT, "refused", server.target, certs.ca], timeout=60, env=secrets.client_env(token=False))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-image", default=BASE_IMAGE, help="BASE for the build (made with debootstrap if absent)")
    parser.add_argument("--rebuild-base", action="store_true", help="make the base image again even if it exists")
    parser.add_argument("--image", default=IMAGE, help="tag of the image built")
    parser.add_argument("--repository", type=Path, default=None, help="model repository to mount (default: demo-repository/)")
    parser.add_argument("--hand-built-model", action="store_true", help="mount one hand-built ONNX model instead of the demo repository")
    parser.add_argument("--drain-repeat", type=int, default=0, metavar="N",
                        help="after the checks, N more drains under load, each in a fresh container (a rare race "
                             "needs many tries); fails if any does")
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("container-check: run as root (it installs packages and runs rootful podman)", file=sys.stderr)
        return 2
    if not PYTHON.exists():
        print(f"container-check: {PYTHON} missing: create the .venv first", file=sys.stderr)
        return 2
    started = time.monotonic()
    name = f"medserve-check-{os.getpid()}"
    mtls_name = f"{name}-mtls"
    scratch = Path(tempfile.mkdtemp(prefix="medserve-container-check-", dir="/var/tmp"))
    launched: list[str] = []
    try:
        with step("install podman, runc, debootstrap, openssl"):
            install_tools()
        with step(f"base image {args.base_image}"):
            ensure_base_image(args.base_image, args.rebuild_base)
        with step("wheels of .[server] (host pip)"):
            build_wheels(scratch / "context")
        with step(f"podman build {args.image}"):
            build_image(scratch / "context", args.base_image, args.image)
        with step("image: user, command, packages"):
            check_image(args.image)
        with step("model repository"):
            repo = model_repository(args.repository, args.hand_built_model, scratch)
            make_readable(repo)
            models = sorted({p.parent.parent.name for p in repo.glob("*/*/model.onnx")})
            print(f"    {repo}: {len(models)} model(s): {', '.join(models)}")
        with step("throwaway CA and certificates (openssl)"):
            certs = make_certificates(scratch / "pki")
        with step("identities and audit key (medserve tokens add, medserve audit keygen)"):
            secrets = make_secrets(scratch / "secrets")
        with step("plaintext on 0.0.0.0 is refused"):
            check_plaintext_refused(args.image)
        with step("without its Secrets the image refuses to start"):
            check_refused_without_secrets(args.image, repo, certs, secrets)
        with step("without the audit volume the image does not serve"):
            check_no_audit_volume(args.image, repo, certs, secrets, f"{name}-no-audit", launched)
        with step("container start (the image's default command) until ready"):
            launched.append(name)
            server = start_container(name, args.image, repo, certs, secrets)
            wait_ready(server, certs, secrets)
        with step("inside: PID 1, user, read-only filesystem"):
            check_inside(name)
        with step("HTTP health paths"):
            check_health(server, models)
        with step("a call without a token is refused"):
            check_unauthenticated(server, certs, secrets, models[0])
        with step("inference over TLS with a token through medserve.clients.Client"):
            run([PYTHON, "-c", CLIENT, "infer", server.target, certs.ca], timeout=120, env=secrets.client_env())
        with step("metrics scrape"):
            scrape_metrics(server)
        with step("the audit trail on the volume verifies with the key"):
            check_audit(server, secrets, min_records=len(models) + 1)
        with step("SIGTERM under load: drain and exit 0"):
            drain_under_load(server, certs, secrets)
            summarize_log(name)
        with step("the audit trail verifies against the checkpoint logged on stop"):
            checkpoint = last_checkpoint(name)
            if checkpoint is None:
                raise CheckFailed("the server's log carries no audit checkpoint (count, head) after the stop")
            check_audit(server, secrets, min_records=len(models) + 1, checkpoint=checkpoint)
        with step("mutual TLS (--tls-client-ca): start, client certificate required, SIGTERM"):
            launched.append(mtls_name)
            mtls = start_container(mtls_name, args.image, repo, certs, secrets,
                                   [*EXPECTED_CMD, "--tls-client-ca", f"{TLS_MOUNT}/ca.crt"])
            wait_ready(mtls, certs, secrets, client_cert=True)
            check_mutual_tls(mtls, certs, secrets)
            require_clean_exit(*wait_stopped(mtls_name, send_sigterm(mtls_name)[0]))
        if args.drain_repeat:
            with step(f"{args.drain_repeat} more drains under load, each in a fresh container"):
                repeat_drains(args.drain_repeat, args.image, repo, certs, secrets, name, launched)
    except CheckFailed as exc:
        print(f"container-check: FAILED: {exc}", file=sys.stderr)
        for container in launched:
            logs = podman("logs", "--tail", "60", container, capture=True, check=False)
            print(f"--- {container} log (last 60 lines) ---", file=sys.stderr)
            print(logs.stdout + logs.stderr, file=sys.stderr)
        return 1
    finally:
        for container in launched:
            podman("rm", "--force", "--ignore", container, capture=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    total = time.monotonic() - started
    print("[container-check] timings: " + "; ".join(f"{n} {t:.1f} s" for n, t in _timings))
    print(f"[container-check] passed in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
