"""deploy/Dockerfile, read statically (the real build and run is `.ci/container_check.py`): the
base is a build argument, the final stage runs the server as a numeric non-root user with the
documented default command (TLS from /etc/medserve/tls, never plaintext; identities from
/etc/medserve/identities; the keyed audit trail on /var/lib/medserve/audit), wheels come only from
the build context, and the image command, the Kubernetes arguments and the container check
agree."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import PurePosixPath
from types import ModuleType

import k8s_manifests as km
import pytest

DOCKERFILE = km.DEPLOY / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _container_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("container_check", km.ROOT / ".ci" / "container_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_base_is_a_build_argument_of_every_stage() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    assert any(word == "ARG" and rest.startswith("BASE") for word, rest in instructions[:first_from])
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    assert all(rest.split()[0] == "${BASE}" for rest in froms)


def test_the_final_stage_runs_the_server_as_a_numeric_non_root_user() -> None:
    final = _stages()[-1]
    words = dict(final)  # the last of each instruction wins, as in a build
    user_arg = next(rest for word, rest in final if word == "ARG" and rest.startswith("UID="))
    uid = user_arg.split("=", 1)[1]
    assert uid == str(km.UID)
    assert words["USER"] in (f"{uid}:{uid}", "${UID}:${UID}")
    assert json.loads(words["ENTRYPOINT"]) == ["medserve"]
    cmd = json.loads(words["CMD"])
    assert cmd == ["--log-format", "json", "serve", "--repository", "/models", "--host", "0.0.0.0", "--port", "8001",
                   *km.TLS_ARGS, "--tokens", km.IDENTITIES_FILE, "--audit-log", f"{km.AUDIT_DIR}/audit.jsonl",
                   "--audit-key", km.AUDIT_KEY_FILE, "--metrics-port", "9090", "--metrics-host", "0.0.0.0",
                   "--http-port", "off"]
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert {"8001", "9090"} <= set(words["EXPOSE"].split())


def test_the_default_command_serves_tls_and_never_plaintext() -> None:
    """`medserve serve` refuses 0.0.0.0 without TLS: the default command names the files of a
    kubernetes.io/tls Secret mounted at /etc/medserve/tls, and plaintext is never the default."""
    cmd = json.loads(dict(_stages()[-1])["CMD"])
    args = km.serve_args(cmd)
    assert args is not None and cmd[: cmd.index("serve")] == ["--log-format", "json"]
    assert km._arg(args, "--host") == "0.0.0.0"
    assert km._arg(args, "--tls-cert") == "/etc/medserve/tls/tls.crt"
    assert km._arg(args, "--tls-key") == "/etc/medserve/tls/tls.key"
    assert "--allow-plaintext" not in cmd and "--tls-client-ca" not in cmd
    assert km._arg(args, "--metrics-port") == "9090"
    # the mount points exist in the image; mutual TLS and the mesh-only plaintext override are
    # documented beside the command
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "/etc/medserve/tls" in next(rest for word, rest in _stages()[-1] if word == "RUN")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "--tls-client-ca /etc/medserve/tls/ca.crt" in comments and "--allow-plaintext" in comments


def test_the_default_command_needs_identities_and_a_keyed_audit_trail_on_a_volume() -> None:
    """Secure by default (issue 25, row 16): the image's command asks every caller for an identity
    of the mounted identities file and records every call in the keyed audit trail on the audit
    volume's mount point, which the image gives to the server's user (a fresh named volume takes
    its owner) and nothing else."""
    cmd = json.loads(dict(_stages()[-1])["CMD"])
    args = km.serve_args(cmd)
    assert args is not None
    assert km._arg(args, "--tokens") == km.IDENTITIES_FILE
    assert km._arg(args, "--audit-log") == f"{km.AUDIT_DIR}/audit.jsonl"
    assert km._arg(args, "--audit-key") == km.AUDIT_KEY_FILE
    # the metrics port is published from the container: every address (the NetworkPolicy limits who)
    assert km._arg(args, "--metrics-host") == "0.0.0.0"
    # nothing listens that is not published: the REST port is off (EXPOSE names 8001 and 9090)
    assert km._arg(args, "--http-port") == "off"
    run = " ".join(rest for word, rest in _stages()[-1] if word == "RUN")
    for folder in ("/etc/medserve/identities", "/etc/medserve/audit-key", km.AUDIT_DIR):
        assert folder in run
    assert f"chown ${{UID}}:${{UID}} {km.AUDIT_DIR}" in run and f"chmod 0700 {km.AUDIT_DIR}" in run
    # no VOLUME: an anonymous volume would keep the trail somewhere nobody looks, and vanish with --rm
    assert not any(word == "VOLUME" for word, _ in _stages()[-1])


def test_the_image_command_the_deployment_and_the_container_check_agree() -> None:
    cmd = json.loads(dict(_stages()[-1])["CMD"])
    check = _container_check()
    assert check.EXPECTED_CMD == cmd and check.EXPECTED_ENTRYPOINT == ["medserve"] and check.UID == km.UID
    assert check.TLS_MOUNT == km.TLS_DIR
    assert (check.IDENTITIES_MOUNT, check.AUDIT_KEY_MOUNT, check.AUDIT_MOUNT) == (
        str(PurePosixPath(km.IDENTITIES_FILE).parent), str(PurePosixPath(km.AUDIT_KEY_FILE).parent),
        km.AUDIT_DIR)
    deployment = next(d for d in km.render(km.K8S / "base") if d["kind"] == "Deployment")
    args = km.pod_spec(deployment)["containers"][0]["args"][: len(cmd)]
    # the Deployment runs the image's command; only the audit file is named after the pod, since
    # the replicas share the audit claim
    audit = cmd.index("--audit-log") + 1
    assert args[:audit] == cmd[:audit] and args[audit + 1:] == cmd[audit + 1:]
    assert args[audit] == f"{km.AUDIT_DIR}/$({km.POD_NAME_VAR}).jsonl"


def test_wheels_come_from_the_context_only_and_never_reach_the_final_stage() -> None:
    build, final = _stages()[0], _stages()[-1]
    runs = " ".join(rest for word, rest in build if word == "RUN")
    installs = re.findall(r"pip install ([^&]*)", runs)
    assert installs and all("--no-index" in i and "--find-links /wheels" in i for i in installs)
    assert all('"medserve[server]"' in i for i in installs)  # the server extra, no other
    assert ("COPY", "wheels/ /wheels/") in build
    for word, rest in final:
        assert not (word in ("COPY", "ADD") and "wheels" in rest), rest
        if word == "RUN":
            assert not re.search(r"\b(apt-get|apt|pip|gcc|make)\b", rest), f"build tools in the final stage: {rest}"
    assert any(word == "COPY" and rest.startswith("--from=build /opt/medserve") for word, rest in final)
    ignore = (km.DEPLOY / ".dockerignore").read_text(encoding="utf-8").split()
    assert ignore[ignore.index("*"):] == ["*", "!wheels", "!wheels/*.whl"]


def test_the_hand_built_fallback_model_runs_in_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    np = pytest.importorskip("numpy")
    session = ort.InferenceSession(_container_check().hand_built_onnx(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    assert y.tolist() == (np.arange(8, dtype=np.float32).reshape(2, 4) + 1).tolist()
    assert [i.shape for i in session.get_inputs()] == [["N", 4]]
