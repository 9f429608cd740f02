"""Every `medserve` subcommand works with exactly the extras its README section installs, and a
subcommand whose extra is missing says which one to install (one line, exit 2), never a traceback.

A missing extra is simulated in a child interpreter whose import system refuses the extra's
modules, as a fresh virtual environment without them would (CI also runs the README's first
command in a fresh environment with only the extras it names).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from medserve.perf.serverproc import start_process
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc

import onnx_models

# The top-level modules of each extra (pyproject.toml [project.optional-dependencies]).
EXTRA_MODULES = {
    "server": ("onnxruntime", "grpc_health", "grpc_reflection", "prometheus_client"),
    "export": ("torch", "sklearn", "skl2onnx", "onnx", "joblib", "onnxscript", "onnx_ir"),
    "perf": ("hdrh", "matplotlib", "hpack"),
    "dev": ("pytest", "tritonclient", "hypothesis", "mypy", "ruff"),
}

# Runs `medserve` (argv[2:]) with the modules named in argv[1] (JSON) made unimportable.
CHILD = """
import importlib.abc, json, sys
blocked = set(json.loads(sys.argv[1]))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from medserve.server.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _without(*extras: str) -> list[str]:
    return sorted(m for e in extras for m in EXTRA_MODULES[e])


def _medserve(blocked: list[str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(blocked), *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd,
    )


def test_the_parser_and_every_help_need_no_extra() -> None:
    blocked = _without("server", "export", "perf", "dev")
    for args in (("--help",), ("serve", "--help"), ("export", "--help"), ("demo-repository", "--help"),
                 ("perf", "--help")):
        done = _medserve(blocked, *args)
        assert done.returncode == 0, done.stderr
        assert "usage: medserve" in done.stdout


@pytest.mark.parametrize(
    ("args", "missing_extras", "named"),
    [
        (("serve", "--repository", "nowhere"), ("server",), "'server'"),
        (("demo-repository", "demo"), ("export",), "'server,export'"),
        (("export", "model.joblib", "--name", "m", "--repository", "r"), ("export",), "'server,export'"),
        (("perf", "--target", "127.0.0.1:1", "--model", "m"), ("perf",), "'perf'"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    tmp_path: Path, args: tuple[str, ...], missing_extras: tuple[str, ...], named: str
) -> None:
    (tmp_path / "model.joblib").write_bytes(b"")
    done = _medserve(_without(*missing_extras), *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"medserve {args[0]}: needs the {named} extra")
    assert "Traceback" not in done.stderr
    assert f"pip install 'medserve[{named.strip(chr(39))}]'" in lines[0]


def test_serve_runs_without_the_export_perf_and_dev_extras(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-c", CHILD, json.dumps(_without("export", "perf", "dev")),
           "serve", "--repository", str(repo), "--port", "0", "--ready-file", str(ready)]
    with start_process(cmd, ready, tmp_path / "serve.log") as handle:
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelReady(pb.ModelReadyRequest(name="affine"), timeout=10).ready
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "READY" in log


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-queue-size", "0", "--max-queue-size 0: expected >= 1"),
        ("--port", "70000", "--port 70000: expected 0..65535"),
        ("--max-message-mb", "0", "--max-message-mb 0: expected 1..2047"),
        ("--max-message-mb", "4096", "--max-message-mb 4096: expected 1..2047"),
        ("--intra-op-threads", "-1", "--intra-op-threads -1: expected >= 0"),
        ("--drain-grace-s", "-1", "--drain-grace-s -1.0: expected >= 0 seconds"),
        ("--workers", "0", "--workers 0: expected >= 1"),
        ("--metrics-port", "-5", "--metrics-port -5: expected 0..65535"),
        ("--providers", "CUDA", "--providers ('CUDA',): expected comma-separated onnxruntime provider names"),
    ],
)
def test_a_bad_setting_stops_the_server_at_start_naming_the_flag(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    done = _medserve([], "serve", "--repository", str(tmp_path), flag, value)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medserve serve: {message}"), done.stderr
    assert "Traceback" not in done.stderr


# --- One clear line for each CLI mistake a new user made (issue 26) ---


def test_a_port_in_use_is_one_line_before_any_model_loads(tmp_path: Path) -> None:
    """Before: every model loaded, then gRPC's `RuntimeError: Failed to bind` as a traceback."""
    import socket

    repo = tmp_path / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _medserve([], "serve", "--repository", str(repo), "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"medserve serve: 127.0.0.1:{port} is in use (another server? pick --port, or 0 "
                                   "for any free port)")
    assert "affine" not in done.stderr + done.stdout  # nothing was loaded


def test_an_empty_repository_is_warned_and_global_options_work_after_the_subcommand(tmp_path: Path) -> None:
    """`medserve serve --log-format json` (a top-level option after the subcommand) is accepted,
    and an empty repository says so instead of only "0 model(s) READY"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-c", CHILD, "[]", "serve", "--repository", str(empty), "--port", "0",
           "--ready-file", str(ready), "--log-format", "json"]
    with start_process(cmd, ready, tmp_path / "serve.log"):
        pass
    records = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    warned = [r for r in records if r.get("level") == "WARNING" and "holds no model" in r.get("message", "")]
    assert len(warned) == 1, records
    assert warned[0]["message"] == (f"repository {empty} holds no model (expected {empty}/<model>/<version>/model.onnx):"
                                    " serving none")


def test_global_options_parse_before_or_after_the_subcommand(tmp_path: Path) -> None:
    from medserve.server.cli import build_parser

    parser = build_parser()
    for argv in (["--log-format", "json", "--log-level", "DEBUG", "serve", "--repository", "r"],
                 ["serve", "--repository", "r", "--log-format", "json", "--log-level", "DEBUG"],
                 ["--log-level", "DEBUG", "serve", "--repository", "r", "--log-format", "json"]):
        args = parser.parse_args(argv)
        assert (args.log_format, args.log_level) == ("json", "DEBUG"), argv
    args = parser.parse_args(["--log-format", "json", "serve", "--repository", "r"])
    assert (args.log_format, args.log_level) == ("json", "INFO")  # not reset by the subcommand's own


def test_tokens_add_splits_comma_separated_models_and_refuses_impossible_patterns(tmp_path: Path) -> None:
    """Before: `--models rf,lookup` stored the one pattern "rf,lookup", which no model name can
    match: the identity could use nothing, and nothing said so."""
    from medserve.server.identities import IdentityFile

    file = tmp_path / "tokens.json"
    done = _medserve([], "tokens", "add", "ward", "--models", "rf,lookup", "--models", "icu_*", "--file", str(file))
    assert done.returncode == 0, done.stderr
    (ward,) = IdentityFile.load(file).identities
    assert ward.models == ("rf", "lookup", "icu_*")
    assert ward.may_use("rf") and ward.may_use("lookup") and ward.may_use("icu_beds") and not ward.may_use("ward")
    for pattern in ("rf lookup", "models/rf", "rf;lookup"):
        done = _medserve([], "tokens", "add", "other", "--models", pattern, "--file", str(file))
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("medserve tokens: ") and f"{pattern!r} can never match a model name" in line
    assert [i.name for i in IdentityFile.load(file).identities] == ["ward"]  # nothing stored
    hand_edited = json.loads(file.read_text())
    hand_edited["identities"][0]["models"] = ["rf,lookup"]
    file.write_text(json.dumps(hand_edited))
    with pytest.raises(Exception, match="'rf,lookup' can never match a model name"):
        IdentityFile.load(file)
