"""Deployment secure by default (issue 25, row 16), offline: the base Deployment and the KServe
runtime ask every caller for an identity from a Secret and record every call in a keyed audit
trail on a volume that outlives the pod; a NetworkPolicy admits the data ports only from labelled
namespaces and the metrics port only from the monitoring namespace; the KServe example's
plaintext runtime sits behind Istio's STRICT mutual TLS and an ALLOW policy; every flag the
manifests and the image pass is one `medserve serve` accepts. Each rule also has broken
manifests that must fail it."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import k8s_manifests as km
import pytest

from medserve.server.cli import build_parser

Doc = dict[str, Any]
RENDERED = {name: km.render(path) for name, path in km.KUSTOMIZATIONS.items()}
SERVER_KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/model-image", "overlays/mtls"]


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _deployment(name: str = "base") -> Doc:
    return copy.deepcopy(_one(RENDERED[name], "Deployment", "medserve"))


def _container(doc: Doc) -> Doc:
    container: Doc = km.pod_spec(doc)["containers"][0]
    return container


def _volume(pod: Doc, name: str) -> Doc:
    volume: Doc = next(v for v in pod["volumes"] if v["name"] == name)
    return volume


def _mount(container: Doc, name: str) -> Doc:
    mount: Doc = next(m for m in container["volumeMounts"] if m["name"] == name)
    return mount


def _set_arg(args: list[str], flag: str, value: str) -> None:
    args[args.index(flag) + 1] = value


def _drop_arg(args: list[str], flag: str) -> None:
    del args[args.index(flag): args.index(flag) + 2]


# -- identities and the audit trail ------------------------------------------------------------------

@pytest.mark.parametrize("name", SERVER_KUSTOMIZATIONS)
def test_every_server_workload_needs_identities_and_writes_a_keyed_audit_trail(name: str) -> None:
    deployment = _deployment(name)
    container, pod = _container(deployment), km.pod_spec(deployment)
    args = km.serve_args(container["args"])
    assert args is not None
    # --tokens: the identities file of the Secret medserve-identities, read-only, 0440 (fsGroup)
    assert km._arg(args, "--tokens") == km.IDENTITIES_FILE
    assert _volume(pod, "identities")["secret"] == {"secretName": "medserve-identities", "defaultMode": 0o440}
    assert _mount(container, "identities") == {"name": "identities", "mountPath": "/etc/medserve/identities",
                                               "readOnly": True}
    # --audit-key: the key of the Secret medserve-audit-key, the same way
    assert km._arg(args, "--audit-key") == km.AUDIT_KEY_FILE
    assert _volume(pod, "audit-key")["secret"] == {"secretName": "medserve-audit-key", "defaultMode": 0o440}
    assert _mount(container, "audit-key")["readOnly"] is True
    # --audit-log: one file per pod on the writable claim medserve-audit (not /tmp, not an emptyDir)
    assert km._arg(args, "--audit-log") == f"{km.AUDIT_DIR}/$(POD_NAME).jsonl"
    assert _volume(pod, "audit") == {"name": "audit", "persistentVolumeClaim": {"claimName": "medserve-audit"}}
    assert _mount(container, "audit") == {"name": "audit", "mountPath": km.AUDIT_DIR}
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert pod["securityContext"]["fsGroup"] == km.UID  # the Secrets' group and the claim's: the server's
    # the probes and Prometheus reach the metrics port from outside the pod
    assert km._arg(args, "--metrics-host") == "0.0.0.0"
    assert km.workload_problems(deployment) == []


def test_the_audit_claim_outlives_the_server_kustomization() -> None:
    """The claim lives in its own kustomization: `kubectl delete -k base` never deletes the trail.
    ReadWriteMany: every replica, on any node, appends to its own file."""
    claim = _one(RENDERED["audit-volume"], "PersistentVolumeClaim", "medserve-audit")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in SERVER_KUSTOMIZATIONS + ["kserve", "model-volume"]:
        assert not [d for d in RENDERED[name] if d["kind"] == "PersistentVolumeClaim"
                    and d["metadata"]["name"] == "medserve-audit"], name


def test_the_kserve_runtime_also_needs_identities_and_audits() -> None:
    runtime = _one(RENDERED["kserve"], "ServingRuntime")
    services = [d for d in RENDERED["kserve"] if d["kind"] == "InferenceService"]
    assert {d["metadata"]["name"] for d in services} == {"medserve-demo", "medserve-demo-rest"}
    (container,) = runtime["spec"]["containers"]
    args = km.serve_args(container["args"])
    assert args is not None
    assert km._arg(args, "--tokens") == km.IDENTITIES_FILE and km._arg(args, "--audit-key") == km.AUDIT_KEY_FILE
    assert km._arg(args, "--audit-log") == f"{km.AUDIT_DIR}/$(POD_NAME).jsonl"
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert volumes["identities"]["secret"]["secretName"] == "medserve-identities"
    assert volumes["audit-key"]["secret"]["secretName"] == "medserve-audit-key"
    assert volumes["audit"]["persistentVolumeClaim"]["claimName"] == "medserve-audit"
    # the Secrets' files are 0440 root:fsGroup: each predictor's pod security context gives the group
    for isvc in services:
        assert isvc["spec"]["predictor"]["securityContext"]["fsGroup"] == km.UID, isvc["metadata"]["name"]
    problems = km.container_problems(container, runtime["spec"]["volumes"], isvc["spec"]["predictor"]["securityContext"],
                                     isvc["spec"]["predictor"]["terminationGracePeriodSeconds"],
                                     metrics_container_port=False, allow_plaintext=True)
    assert problems == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, p: _drop_arg(c["args"], "--tokens"), "no --tokens"),
        (lambda c, p: _drop_arg(c["args"], "--audit-log"), "no --audit-log"),
        (lambda c, p: _drop_arg(c["args"], "--audit-key"), "--audit-log without --audit-key"),
        (lambda c, p: _set_arg(c["args"], "--audit-key", "/var/lib/medserve/audit/audit.key"),
         "--audit-key /var/lib/medserve/audit/audit.key is not in a mounted Secret"),
        (lambda c, p: _volume(p, "audit-key")["secret"].update(defaultMode=0o444), "readable by others"),
        (lambda c, p: _volume(p, "identities")["secret"].update(defaultMode=0o644), "readable by others"),
        (lambda c, p: _mount(c, "identities").pop("readOnly"), "the Secret of --tokens is not mounted readOnly"),
        (lambda c, p: _set_arg(c["args"], "--audit-log", "/tmp/audit.jsonl"), "on an emptyDir"),
        (lambda c, p: _set_arg(c["args"], "--audit-log", "/var/log/audit.jsonl"), "not on a mounted volume"),
        (lambda c, p: _volume(p, "audit").update(persistentVolumeClaim=None, emptyDir={}), "on an emptyDir"),
        (lambda c, p: _mount(c, "audit").update(readOnly=True), "on a read-only mount"),
        (lambda c, p: _set_arg(c["args"], "--audit-log", f"{km.AUDIT_DIR}/audit.jsonl"), "one file for every replica"),
        (lambda c, p: c.pop("env"), "one file for every replica"),
        (lambda c, p: _drop_arg(c["args"], "--metrics-host"), "--metrics-host is None"),
        (lambda c, p: _set_arg(c["args"], "--metrics-host", "127.0.0.1"), "--metrics-host is '127.0.0.1'"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_a_deployment_without_identities_or_audit_fails_medserves_rules(change: Any, message: str) -> None:
    doc = _deployment()
    change(_container(doc), km.pod_spec(doc))
    # strategic merge removes a null; do the same so that the broken copy is a valid manifest
    for volume in km.pod_spec(doc)["volumes"]:
        for key in [k for k, v in volume.items() if v is None]:
            del volume[key]
    km.validate(doc, km.KUBERNETES_VERSIONS[-1])  # still a valid Kubernetes object: only the rules catch it
    problems = km.workload_problems(doc)
    assert any(message in p for p in problems), problems


# -- the flags are the server's ----------------------------------------------------------------------

def _commands() -> dict[str, list[str]]:
    from test_dockerfile import _stages  # the Dockerfile's parser, shared

    commands = {"Dockerfile CMD": json.loads(dict(_stages()[-1])["CMD"])}
    for name in SERVER_KUSTOMIZATIONS:
        commands[name] = [str(a) for a in _container(_deployment(name))["args"]]
    (runtime,) = _one(RENDERED["kserve"], "ServingRuntime")["spec"]["containers"]
    commands["kserve"] = [str(a) for a in runtime["args"]]
    return commands


@pytest.mark.parametrize("where", ["Dockerfile CMD", *SERVER_KUSTOMIZATIONS, "kserve"])
def test_every_flag_of_the_manifests_is_one_medserve_serve_accepts(where: str) -> None:
    """The names the manifests use (--tokens, --audit-log, --audit-key, --metrics-host, ...) are
    the CLI's: argparse exits 2 on an unknown flag. A misspelt flag would crash-loop every pod."""
    args = _commands()[where]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "serve"
    assert parsed.tokens == km.IDENTITIES_FILE and parsed.audit_key == km.AUDIT_KEY_FILE
    assert parsed.audit_log.startswith(km.AUDIT_DIR + "/") and parsed.metrics_host == "0.0.0.0"


# -- NetworkPolicy -------------------------------------------------------------------------------------

def _policy() -> Doc:
    return copy.deepcopy(_one(RENDERED["base"], "NetworkPolicy", "medserve"))


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _deployment()["spec"]["template"]["metadata"]["labels"]
    return labels


def test_the_network_policy_follows_the_rules() -> None:
    for name in SERVER_KUSTOMIZATIONS:  # every overlay keeps it
        assert km.network_policy_problems(_one(RENDERED[name], "NetworkPolicy", "medserve"), _pod_labels()) == []


# (source namespace, its labels, port) -> admitted?
CONNECTIONS = [
    ("ward-apps", km.CLIENT_NAMESPACE_LABEL, 8001, True),
    ("ward-apps", km.CLIENT_NAMESPACE_LABEL, 8000, True),
    ("ward-apps", km.CLIENT_NAMESPACE_LABEL, 9090, False),  # a client never sees /metrics
    ("ward-apps", {}, 8001, False),  # not labelled
    ("ward-apps", {"medserve/client": "yes"}, 8001, False),
    ("medserve", {}, 8001, False),  # the server's own namespace is not trusted by default
    ("medserve", {}, 9090, False),
    ("monitoring", {}, 9090, True),
    ("monitoring", {}, 8001, False),  # Prometheus does not call models
    ("default", {"kubernetes.io/metadata.name": "monitoring"}, 9090, False),  # the name label is the API server's
    ("ward-apps", km.CLIENT_NAMESPACE_LABEL, 22, False),
]


@pytest.mark.parametrize(("namespace", "labels", "port", "admitted"), CONNECTIONS)
def test_the_network_policy_admits_only_labelled_namespaces_and_monitoring(
        namespace: str, labels: dict[str, str], port: int, admitted: bool) -> None:
    policies = [d for d in RENDERED["base"] if d["kind"] == "NetworkPolicy"]
    verdict = km.network_policies_admit(policies, pod_labels=_pod_labels(), policy_namespace="medserve",
                                        source_namespace=namespace, source_namespace_labels=labels,
                                        source_pod_labels={"app": "caller"}, port=port)
    assert verdict is admitted
    # without the policy, everything would have been admitted: the check can tell
    assert km.network_policies_admit([], pod_labels=_pod_labels(), policy_namespace="medserve",
                                     source_namespace=namespace, source_namespace_labels=labels,
                                     source_pod_labels={}, port=port)


def test_the_network_policy_does_not_select_the_model_loader() -> None:
    loader = _one(RENDERED["model-volume"], "Pod")
    policy = _policy()
    assert not km._selector_matches(policy["spec"]["podSelector"], loader["metadata"]["labels"])
    assert km._selector_matches(policy["spec"]["podSelector"], _pod_labels())


def _ingress(policy: Doc, port: int) -> Doc:
    rule: Doc = next(r for r in policy["spec"]["ingress"] if any(p["port"] == port for p in r["ports"]))
    return rule


BROKEN_POLICIES: list[tuple[Callable[[Doc], Any], str]] = [
    (lambda s: s.update(podSelector={"matchLabels": {"app": "other"}}), "does not select"),
    (lambda s: s.update(podSelector={}), "does not select"),
    (lambda s: s.update(policyTypes=["Ingress"]), "policyTypes"),
    (lambda s: s.update(egress=[{}]), "egress is allowed"),
    (lambda s: _ingress({"spec": s}, 8001).pop("from"), "admits every source"),
    (lambda s: _ingress({"spec": s}, 8001).pop("ports"), "admits every port"),
    (lambda s: _ingress({"spec": s}, 8001)["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
     "only a namespaceSelector"),
    (lambda s: _ingress({"spec": s}, 8001)["from"].append({"podSelector": {}}), "only a namespaceSelector"),
    (lambda s: _ingress({"spec": s}, 8001)["from"].append({"namespaceSelector": {}}), "may not reach"),
    (lambda s: _ingress({"spec": s}, 9090)["from"][0]["namespaceSelector"].update(
        matchLabels=km.CLIENT_NAMESPACE_LABEL), "may not reach the metrics"),
    (lambda s: _ingress({"spec": s}, 8001)["ports"].append({"protocol": "TCP", "port": 9090}), "mixes"),
    (lambda s: _ingress({"spec": s}, 8001)["ports"].append({"protocol": "TCP", "port": 8080}), "mixes"),
    (lambda s: _ingress({"spec": s}, 8001)["ports"][0].update(port="grpc"), "single TCP port numbers"),
    (lambda s: _ingress({"spec": s}, 8001)["ports"][0].update(endPort=9090), "single TCP port numbers"),
    (lambda s: s["ingress"].remove(_ingress({"spec": s}, 9090)), "no ingress rule reaches port 9090"),
]


@pytest.mark.parametrize(("change", "message"), BROKEN_POLICIES,
                         ids=[m + f"-{i}" for i, (_, m) in enumerate(BROKEN_POLICIES)])
def test_a_loose_network_policy_fails_the_rules(change: Callable[[Doc], Any], message: str) -> None:
    policy = _policy()
    change(policy["spec"])
    problems = km.network_policy_problems(policy, _pod_labels())
    assert any(message in p for p in problems), problems


# -- Istio in front of the KServe runtime --------------------------------------------------------------

GRPC_POLICIES = "medserve-demo-predictor"  # the Istio policies of the gRPC example (the REST one has its own)


def _predictor_labels() -> dict[str, str]:
    """The labels KServe gives the predictor pods of the gRPC example InferenceService."""
    isvc = _one(RENDERED["kserve"], "InferenceService", "medserve-demo")
    return {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}


def _grpc_and_metrics_ports() -> tuple[int, int]:
    (container,) = _one(RENDERED["kserve"], "ServingRuntime")["spec"]["containers"]
    args = km.serve_args(container["args"])
    assert args is not None
    return int(km._arg(args, "--port") or 0), int(km._arg(args, "--metrics-port") or 0)


def test_the_kserve_example_ships_strict_mtls_and_an_allow_policy() -> None:
    docs = RENDERED["kserve"]
    peer = _one(docs, "PeerAuthentication", GRPC_POLICIES)
    assert peer["apiVersion"] == "security.istio.io/v1"
    assert peer["spec"]["mtls"] == {"mode": "STRICT"} and "portLevelMtls" not in peer["spec"]
    policy = _one(docs, "AuthorizationPolicy", GRPC_POLICIES)
    assert policy["spec"]["action"] == "ALLOW"
    grpc, metrics = _grpc_and_metrics_ports()
    assert (grpc, metrics) == (8001, 9090)
    by_port = {int(p): r["from"] for r in policy["spec"]["rules"] for t in r["to"] for p in t["operation"]["ports"]}
    assert by_port[metrics] == [{"source": {"namespaces": [km.MONITORING_NAMESPACE]}}]
    assert {"source": {"principals": ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]}} \
        in by_port[grpc]
    # the plaintext runtime asks for the sidecar the policies need
    runtime = _one(docs, "ServingRuntime")
    assert runtime["spec"]["annotations"]["sidecar.istio.io/inject"] == "true"
    assert "--allow-plaintext" in runtime["spec"]["containers"][0]["args"]
    assert km.mesh_problems(docs, _predictor_labels(), grpc, metrics) == []


def test_the_rest_example_has_its_own_strict_mtls_and_allow_policy() -> None:
    """The REST InferenceService's predictor pods are held to the same rules, with the REST port
    (the runtime's --http-port) in the gRPC port's place."""
    docs = RENDERED["kserve"]
    (container,) = _one(docs, "ServingRuntime")["spec"]["containers"]
    args = km.serve_args(container["args"])
    assert args is not None
    http = int(km._arg(args, "--http-port") or 0)
    assert http == 8000
    labels = {"serving.kserve.io/inferenceservice": "medserve-demo-rest", "component": "predictor"}
    _, metrics = _grpc_and_metrics_ports()
    assert km.mesh_problems(docs, labels, http, metrics) == []


BROKEN_MESH: list[tuple[str, Callable[[Doc], Any], str]] = [
    ("PeerAuthentication", lambda s: s["mtls"].update(mode="PERMISSIVE"), "not STRICT"),
    ("PeerAuthentication", lambda s: s.update(portLevelMtls={"9090": {"mode": "DISABLE"}}), "ports ['9090']"),
    ("PeerAuthentication", lambda s: s["selector"]["matchLabels"].update(
        {"serving.kserve.io/inferenceservice": "other"}), "no PeerAuthentication selects"),
    ("AuthorizationPolicy", lambda s: s["selector"].update(matchLabels={"app": "other"}),
     "no AuthorizationPolicy selects"),
    ("AuthorizationPolicy", lambda s: s.update(action="DENY"), "expected ALLOW"),
    ("AuthorizationPolicy", lambda s: s.update(rules=[]), "no rules"),
    ("AuthorizationPolicy", lambda s: s["rules"][0].pop("from"), "without principals or namespaces"),
    ("AuthorizationPolicy", lambda s: s["rules"][0]["from"].append({"source": {"namespaces": ["*"]}}), "wildcard"),
    ("AuthorizationPolicy", lambda s: s["rules"][0]["from"].append({"source": {"notNamespaces": ["x"]}}),
     "without principals or namespaces"),
    ("AuthorizationPolicy", lambda s: s["rules"][0].pop("to"), "admits every port"),
    ("AuthorizationPolicy", lambda s: s["rules"][0]["to"][0]["operation"]["ports"].append("9090"),
     "the metrics port 9090 from others"),
    ("AuthorizationPolicy", lambda s: s["rules"][1]["to"][0]["operation"]["ports"].append("22"), "opens ports [22]"),
    ("AuthorizationPolicy", lambda s: s["rules"].pop(0), "nobody may reach the gRPC port"),
]


@pytest.mark.parametrize(("kind", "change", "message"), BROKEN_MESH,
                         ids=[f"{k}-{m}-{i}" for i, (k, _, m) in enumerate(BROKEN_MESH)])
def test_a_loose_mesh_policy_fails_the_rules(kind: str, change: Callable[[Doc], Any], message: str) -> None:
    docs = copy.deepcopy(RENDERED["kserve"])
    change(_one(docs, kind, GRPC_POLICIES)["spec"])
    for doc in docs:
        km.validate(doc, km.KUBERNETES_VERSIONS[-1])  # still valid Istio: only the rules catch it
    problems = km.mesh_problems(docs, _predictor_labels(), *_grpc_and_metrics_ports())
    assert any(message in p for p in problems), problems


BROKEN_ISTIO_SCHEMA: list[tuple[str, Callable[[Doc], Any]]] = [
    ("PeerAuthentication", lambda d: d["spec"]["mtls"].update(mode="STRICTT")),
    ("PeerAuthentication", lambda d: d["spec"].update(mTLS={"mode": "STRICT"})),
    ("PeerAuthentication", lambda d: d["spec"]["selector"].update(matchLabel={"a": "b"})),
    ("PeerAuthentication", lambda d: d.update(apiVersion="security.istio.io/v2")),
    ("AuthorizationPolicy", lambda d: d["spec"].update(action="PERMIT")),
    ("AuthorizationPolicy", lambda d: d["spec"]["rules"][0]["from"][0]["source"].update(principal=["x"])),
    ("AuthorizationPolicy", lambda d: d["spec"]["rules"][0]["to"][0]["operation"].update(ports=[8001])),
    ("AuthorizationPolicy", lambda d: d["spec"]["rules"][0]["to"][0]["operation"].update(ports=["grpc"])),
    ("AuthorizationPolicy", lambda d: d["spec"].update(targetRef={"kind": "Service", "name": "x"})),
    ("AuthorizationPolicy", lambda d: d["spec"]["rules"][0].update(when=[{"values": ["x"]}])),
    ("AuthorizationPolicy", lambda d: d.pop("spec")),
]


@pytest.mark.parametrize(("kind", "change"), BROKEN_ISTIO_SCHEMA,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(BROKEN_ISTIO_SCHEMA)])
def test_a_broken_istio_resource_fails_its_schema(kind: str, change: Callable[[Doc], Any]) -> None:
    doc = copy.deepcopy(_one(RENDERED["kserve"], kind, GRPC_POLICIES))
    km.validate(doc, km.KUBERNETES_VERSIONS[-1])
    change(doc)
    with pytest.raises(jsonschema.ValidationError):
        km.validate(doc, km.KUBERNETES_VERSIONS[-1])
